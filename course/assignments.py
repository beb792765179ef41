"""The assignments: one per function of the paper's pipeline, the tests that grade it, and its points.

`functions` are blanked together in a student copy (the first is the one the assignment is named after; the others
are private helpers holding the same computation, blanked so the copy does not keep the solution). `needs` lists the
assignments that the grading tests run through another path (the model's forward uses the delta rule, hybrid_reward
calls cosine_reward): grading a copy from the full repository (`course.py grade DIR`) takes them from the repository,
so an assignment's score depends only on its own function; inside a student copy they must be done first.
A test id without "[...]" selects every parametrisation of that test."""
from dataclasses import dataclass


@dataclass(frozen=True)
class Assignment:
    name: str             # the function's name
    file: str             # where it lives, relative to the repository root
    paper: str            # the equation / section it implements
    todo: str             # what to implement, one paragraph (written above the stub and into ASSIGNMENTS.md)
    points: int
    tests: tuple          # pytest node ids that grade it
    functions: tuple = ()  # blanked together with `name` (private helpers)
    needs: tuple = ()     # other assignments the grading tests call through another path

    @property
    def blanked(self):
        return (self.name,) + self.functions


K, E, R, G, L = "tests/test_kernels.py::", "tests/test_entropy.py::", "tests/test_reward.py::", \
    "tests/test_grpo.py::", "tests/test_lact.py::"
C = "tests/test_course_grading.py::"
SNAP = K + "test_snapshots_equal_prefix_final_states[{}]"
GATED = K + "test_gated_chunked_matches_recurrent_fp64"
MODEL = ("delta_rule_step", "recurrent_delta_rule", "chunked_delta_rule", "swiglu_inner_grads",
         "fast_weight_update")  # what the tiny models run on

ASSIGNMENTS = (
    Assignment(
        "recurrent_delta_rule", "kernels/recurrent.py",
        "DeltaNet / Gated DeltaNet as a loop over time (the reference every fast path is tested against)",
        "Loop over time with delta_rule_step: scale = K^-0.5 by default on q, S_0 = initial_state or 0, the state "
        "and products in fp32 (fp64 for fp64 inputs), token t's log-decay g[:, t] (or none), the output in v's "
        "dtype; snapshots: the state after the given positions, handed out through chunked.deliver_snapshots.", 1,
        (C + "test_recurrent_delta_rule_by_hand", GATED, K + "test_zero_gate_is_deltanet[recurrent]",
         *(SNAP.format(p) for p in ("direct-True-recurrent", "direct-False-recurrent", "deferred-True-recurrent",
                                    "deferred-False-recurrent"))),
        needs=("delta_rule_step",)),
    Assignment(
        "delta_rule_step", "kernels/recurrent.py",
        "Gated DeltaNet: S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T (g = None: DeltaNet)",
        "One token: the decay first, S <- exp(g_t) S (skipped when g_t is None); then the error read from the decayed "
        "state, v'_t = beta_t (v_t - S^T k_t); the write S_t = S + k_t v'_t^T; the read after the write, "
        "o_t = S_t^T q_t (q_t comes scaled).", 2,
        (K + "test_step_is_the_matrix_form",)),
    Assignment(
        "chunked_delta_rule", "kernels/chunked.py",
        "DeltaNet chunkwise WY/UT form (Yang et al. 2024; steps 1-5 of the file's docstring)",
        "Per chunk of C tokens: A = tril(diag(beta) K K^T, -1), T = (I + A)^-1, W = T diag(beta) K, U = T diag(beta) "
        "V, V'_n = U_n - W_n S_n, O_n = scale (Q_n S_n + tril(Q_n K_n^T) V'_n), S_{n+1} = S_n + K_n^T V'_n; pad T to "
        "a multiple of C; snapshots from the chunk states and V' with states_after. With a gate g: the six places of "
        "the module docstring (G = chunk_cumsum(g), Gam selected with torch.where before exp).", 4,
        (K + "test_chunked_matches_recurrent_fp32", K + "test_chunked_bf16_inputs",
         *(SNAP.format(p) for p in ("direct-True-torch", "direct-False-torch", "deferred-True-torch",
                                    "deferred-False-torch")),
         K + "test_snapshots_run_in_fp32_under_autocast", GATED, K + "test_zero_gate_is_deltanet[torch]",
         K + "test_gated_snapshots_equal_prefix_states[mild-torch]",
         K + "test_gated_snapshots_equal_prefix_states[strong-torch]"),
        functions=("_chunked",), needs=("delta_rule_step", "recurrent_delta_rule")),
    Assignment(
        "token_entropy", "entropy.py", "REFINE sec. 3 step 1: H_t = -sum_v p log p",
        "The next-token entropy in nats from raw logits [..., V] -> [...], in fp32; -inf logits contribute exactly 0 "
        "(no NaN in the value or the gradient).", 1,
        (E + "test_entropy_uniform_onehot_known", E + "test_entropy_shift_invariant_and_batched_shape",
         E + "test_entropy_fp32_from_bf16_and_finite_grad_with_neg_inf")),
    Assignment(
        "smooth_entropy", "entropy.py", "REFINE sec. 3 step 1: centred moving average of H",
        "Centred moving average [B, T] -> [B, T] with kernel k (k + 1 when k is even), zero padding on both sides that "
        "COUNTS in the mean.", 1,
        (E + "test_smooth_odd_kernel_zero_padding_counted", E + "test_smooth_even_k4_uses_kernel5",
         E + "test_smooth_k1_identity_and_bad_k")),
    Assignment(
        "select_positions", "entropy.py", "REFINE sec. 3 step 1: p_i(t) = softmax(H_t / tau) per chunk",
        "Cut the L real tokens into n_chunks chunks of L // n_chunks, draw one index per chunk from softmax(smoothed "
        "H / tau) (or uniform / argmax / argmin / answer, see the docstring), clamp the start s = i + 1 with "
        "_start_range and return t = s - 1 [B, n_chunks].", 3,
        tuple(E + t for t in (
            "test_chunk_boundaries_and_remainder_never_sampled", "test_entropy_peak_is_selected",
            "test_argmax_argmin_first_index_on_ties_unsmoothed", "test_margin_clamp",
            "test_rollout_fits_when_k_exceeds_margin", "test_short_sequence_drops_margin",
            "test_lengths_respected_with_padding", "test_errors", "test_generator_reproducible",
            "test_sampling_matches_softmax", "test_sampling_uses_smoothed_entropy", "test_uniform_ignores_entropy",
            "test_answer_mode_picks_only_allowed_positions_by_entropy", "test_answer_mode_clamps_without_end_margin")),
        needs=("smooth_entropy",)),
    Assignment(
        "cosine_reward", "reward.py", "REFINE sec. 3 step 3: R = (1/k) sum_j cos(h_pred_j, h_gt_j)",
        "Mean over the k positions of the cosine of the hidden states [N, k, D] -> [N], fp32, no gradient; shape "
        "errors as ValueError.", 1,
        (R + "test_cosine_identical_orthogonal_opposite", R + "test_cosine_mean_over_positions",
         C + "test_cosine_reward_fp32_no_grad_and_shapes")),
    Assignment(
        "binary_reward", "reward.py", "REFINE sec. 3 step 3: R = (1/k) sum_j [x_hat_j == x_j]",
        "The FRACTION of the k rollout tokens equal to the true token [N, k] -> [N], fp32; shape errors as "
        "ValueError.", 1,
        (R + "test_binary_fraction", C + "test_binary_reward_fraction_dtype_and_shapes")),
    Assignment(
        "hybrid_reward", "reward.py", "REFINE sec. 3 step 3: R = cosine + binary",
        "cosine_reward + binary_reward, range [-1, 2], fp32, no gradient.", 1,
        (R + "test_hybrid_is_sum_and_range", R + "test_no_grad_and_fp32", R + "test_compute_reward_dispatch"),
        needs=("cosine_reward", "binary_reward")),
    Assignment(
        "group_advantages", "grpo.py", "REFINE sec. 3 step 4 (GRPO): A = (R - mean) / (std + eps)",
        "Per group (row) of n rewards [G, n]: subtract the mean, divide by the Bessel-corrected std + eps (scale "
        "'group'), by the std of all rewards ('batch') or not at all ('none'); a group of one gives A = R, a "
        "constant group exactly 0; fp32, no gradient.", 2,
        tuple(G + t for t in (
            "test_advantages_two_and_four", "test_advantages_unbiased_std_and_eps",
            "test_constant_group_gives_exact_zeros", "test_group_of_one_is_reward", "test_batch_and_none_scaling",
            "test_advantage_errors_and_no_grad"))),
    Assignment(
        "policy_loss", "grpo.py", "REFINE sec. 3 step 4: PPO clipped surrogate with dual clip (+ optional k3 KL)",
        "Per token r = exp(clamp(logp - old, -20, 20)), L = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), for "
        "A < 0 L = min(L, -c A); masked slots removed with torch.where before anything else; aggregated with "
        "`aggregate`; + kl_coef * aggregate(k3) when kl_coef > 0; the stats of the docstring.", 3,
        tuple(G + t for t in (
            "test_loss_branches", "test_asymmetric_clip_and_dual_constant", "test_stats",
            "test_aggregation_on_policy", "test_micro_batches_sum_to_whole",
            "test_micro_batches_without_normaliser_differ", "test_no_nan_gradient_with_extreme_masked_log_ratios",
            "test_huge_valid_log_ratio_is_clamped", "test_kl_branch")),
        needs=("aggregate",)),
    Assignment(
        "aggregate", "grpo.py", "loss aggregation (verl token-mean / seq-mean-token-mean / -sum / -sum-norm)",
        "Per-token losses [N, k] -> scalar: masked slots replaced by 0 (torch.where), summed, divided by n_total or "
        "default_normaliser; seq-mean-token-mean averages each row's mean over its own valid tokens.", 2,
        (C + "test_aggregate_by_hand", C + "test_aggregate_whole_batch_normaliser_and_errors",
         G + "test_aggregate_ignores_nonfinite_masked_slots")),
    Assignment(
        "sample_from_snapshots", "rollout.py", "REFINE sec. 3 step 2: k-token rollouts from the snapshot states",
        "From out.snapshots (the state after each selected position) and out.logits at out.positions, decode k "
        "tokens n times per prefix (rows g * n + i: rows_per_prefix) with sample_token at the given temperature, "
        "EOS suppressed; return Rollouts with the tokens, their log-probs, hidden states and the ground truth "
        "(ground_truth).", 2,
        (C + "test_sample_from_snapshots_equals_reforward",), needs=MODEL),
    Assignment(
        "logprobs_from_snapshots", "rollout.py", "REFINE sec. 3 step 4: teacher-forced log-probs of the rollout tokens",
        "Log-probs [N, k] of the given tokens at `temperature`: the first from the full pass's logits at the "
        "positions, the others from k - 1 decoding steps starting at the (differentiable) snapshots; gradients reach "
        "the whole forward.", 2,
        (C + "test_logprobs_from_snapshots_equal_reforward",), needs=MODEL),
    Assignment(
        "swiglu_inner_grads", "lact.py", "LaCT inner loss L = -sum_t eta_t <v_t, f(k_t)>, f = SwiGLU: hand gradients",
        "With g = W0 k, u = W2 k, h = silu(g) * u, delta = W1^T v: dW1 = sum eta1 v h^T, dW0 = sum eta0 (delta * u * "
        "silu'(g)) k^T, dW2 = sum eta2 (delta * silu(g)) k^T (the update directions -dL/dW, summed over the chunk).", 2,
        (L + "test_hand_inner_gradients_equal_autograd",)),
    Assignment(
        "fast_weight_update", "lact.py", "LaCT chunk update: momentum, Muon, W + dW, row renormalisation",
        "dW = swiglu_inner_grads(W, k, v, lr); with momentum: dW <- dW + mean(gate over the chunk) M, M <- dW; with "
        "Muon: dW <- newton_schulz5(dW); W <- W + dW; each row rescaled to the initial row norm: "
        "W / (||W_row|| + 1e-5) * norm.", 2,
        (L + "test_fast_weight_update_hand_example", L + "test_forward_matches_reference_layer_and_step",
         L + "test_forward_gradients_match_reference_layer"),
        needs=("swiglu_inner_grads", "newton_schulz5")),
    Assignment(
        "newton_schulz5", "lact.py", "Muon: five quintic Newton-Schulz steps (NS_COEFFS)",
        "X = G / (||G||_F + 1e-7) (transposed when m > n), then for (a, b, c) in NS_COEFFS: A = X X^T, "
        "X = a X + (b A + c A A) X; computed in `dtype`, returned in g's dtype.", 1,
        (L + "test_newton_schulz",)),
    Assignment(
        "qa_f1_score", "metrics.py", "LongBench / SQuAD token F1 (REFINE sec. 5 evaluation)",
        "F1 of the bags of words of normalize_answer(prediction) and normalize_answer(ground_truth): shared tokens "
        "with counts clipped (Counter &), P = shared / len(pred), R = shared / len(gold), F1 = 2PR / (P + R), 0 when "
        "nothing is shared.", 1,
        ("tests/test_metrics.py::test_qa_f1_hand_computed",)),
)

BY_NAME = {a.name: a for a in ASSIGNMENTS}
