"""Grading tests of the course assignments (course/assignments.py) that the other test files leave out: hand-computed
values where those compare one function against another (the delta rule), each reward alone, the aggregation modes
by hand, and the rollouts from snapshots against the official per-prefix re-forwards at a temperature != 1 with
several rollouts per prefix. course/mutants.py lists the wrong implementations these tests must catch."""
import math

import pytest
import torch

from grpo import aggregate
from kernels.recurrent import recurrent_delta_rule
from reward import binary_reward, cosine_reward
from rollout import logprobs_from_snapshots, reforward_logprobs, sample_by_reforward, sample_from_snapshots
from test_model import ids, tiny

# ---------------------------------------------------------------- the delta rule, two tokens by hand


def test_recurrent_delta_rule_by_hand():
    """B = H = 1, K = V = 2, T = 2, default scale 2^-0.5, an initial state; every step by hand:
    t=1: S_0^T k_1 = [1, 0]; v'_1 = 0.5 ([3, 1] - [1, 0]) = [1, 0.5]; S_1 = S_0 + k_1 v'_1^T = [[2, 0.5], [0, 0]];
         o_1 = scale S_1^T q_1 = scale [2, 0.5] (q_1 = [1, 1])
    t=2: S_1^T k_2 = 0.6 [2, 0.5] = [1.2, 0.3]; v'_2 = 1.0 ([1, 2] - [1.2, 0.3]) = [-0.2, 1.7];
         S_2 = S_1 + [0.6, 0.8]^T [-0.2, 1.7] = [[1.88, 1.52], [-0.16, 1.36]];
         o_2 = scale S_2^T [0, 1] = scale [-0.16, 1.36]
    Tolerance 1e-6: fp32 rounding of O(1) numbers over a few products."""
    q = torch.tensor([[1.0, 1.0], [0.0, 1.0]]).view(1, 2, 1, 2)
    k = torch.tensor([[1.0, 0.0], [0.6, 0.8]]).view(1, 2, 1, 2)
    v = torch.tensor([[3.0, 1.0], [1.0, 2.0]]).view(1, 2, 1, 2)
    beta = torch.tensor([0.5, 1.0]).view(1, 2, 1)
    s0 = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    scale = 2 ** -0.5
    S1, S2 = torch.tensor([[2.0, 0.5], [0.0, 0.0]]), torch.tensor([[1.88, 1.52], [-0.16, 1.36]])
    o, final = recurrent_delta_rule(q, k, v, beta, initial_state=s0, output_final_state=True)
    tol = dict(atol=1e-6, rtol=0)
    torch.testing.assert_close(o, scale * torch.tensor([[2.0, 0.5], [-0.16, 1.36]]).view(1, 2, 1, 2), **tol)
    torch.testing.assert_close(final, S2.view(1, 1, 2, 2), **tol)
    o2, none, snaps = recurrent_delta_rule(q, k, v, beta, initial_state=s0, snapshot_at=torch.tensor([[1, 0]]))
    assert none is None and snaps.shape == (1, 2, 1, 2, 2) and snaps.dtype == torch.float32
    torch.testing.assert_close(snaps, torch.stack([S2, S1]).view(1, 2, 1, 2, 2), **tol)
    torch.testing.assert_close(o2, o)
    # without an initial state S_0 = 0: v'_1 = [1.5, 0.5], o_1 = scale [1.5, 0.5]; scale=1 is used as given
    o0, _ = recurrent_delta_rule(q, k, v, beta, scale=1.0)
    torch.testing.assert_close(o0[0, 0, 0], torch.tensor([1.5, 0.5]), **tol)
    o16, _ = recurrent_delta_rule(q, k, v.half(), beta)
    assert o16.dtype == torch.float16                                   # the output in v's dtype


# ---------------------------------------------------------------- each reward alone

def test_cosine_reward_fp32_no_grad_and_shapes():
    # k=2: cos([3, 4], [4, 3]) = 24 / 25, cos([1, 0], [-1, 0]) = -1 -> (0.96 - 1) / 2 = -0.02; tolerance 1e-6 (fp32)
    h_pred = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]], dtype=torch.bfloat16, requires_grad=True)
    h_gt = torch.tensor([[[4.0, 3.0], [-1.0, 0.0]]], dtype=torch.bfloat16)
    r = cosine_reward(h_pred, h_gt)
    assert r.shape == (1,) and r.dtype == torch.float32 and not r.requires_grad
    assert r.item() == pytest.approx(-0.02, abs=1e-6)
    with pytest.raises(ValueError):
        cosine_reward(torch.randn(2, 3, 4), torch.randn(2, 3, 5))
    with pytest.raises(ValueError):
        cosine_reward(torch.randn(3, 4), torch.randn(3, 4))


def test_binary_reward_fraction_dtype_and_shapes():
    pred = torch.tensor([[4, 4, 1, 2], [0, 1, 2, 3]])
    gt = torch.tensor([[4, 0, 1, 0], [3, 2, 1, 0]])
    r = binary_reward(pred, gt)
    assert r.dtype == torch.float32 and r.shape == (2,)
    torch.testing.assert_close(r, torch.tensor([0.5, 0.0]))           # 2 of 4, none of 4 (per position, not a set)
    with pytest.raises(ValueError):
        binary_reward(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError):
        binary_reward(torch.zeros(6), torch.zeros(6))


# ---------------------------------------------------------------- aggregation by hand

# rows: 2 valid tokens, 1 valid token, none valid; the masked slots hold garbage that must not count
LOSS = torch.tensor([[1.0, 2.0, 30.0], [4.0, 50.0, 60.0], [70.0, 80.0, 90.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])


@pytest.mark.parametrize("agg, value", [
    ("token-mean", (1 + 2 + 4) / 3),                      # sum over the 3 valid tokens / 3
    ("seq-mean-token-mean", ((1 + 2) / 2 + 4 / 1) / 2),   # mean of the row means (a mean of ratios), 2 non-empty rows
    ("seq-mean-token-sum", ((1 + 2) + 4) / 2),            # mean of the row sums over the 2 non-empty rows
    ("seq-mean-token-sum-norm", (1 + 2 + 4) / 9),         # total / (N * k)
])
def test_aggregate_by_hand(agg, value):
    loss = LOSS.clone().requires_grad_()
    out = aggregate(loss, MASK, agg)
    assert out.item() == pytest.approx(value, abs=1e-6)    # fp32 sums of small integers: exact up to the division
    out.backward()
    assert (loss.grad[MASK == 0] == 0).all() and (loss.grad[MASK == 1] > 0).all()


@pytest.mark.parametrize("agg, numerator", [("token-mean", 7.0), ("seq-mean-token-mean", 5.5),
                                            ("seq-mean-token-sum", 7.0), ("seq-mean-token-sum-norm", 7.0)])
def test_aggregate_whole_batch_normaliser_and_errors(agg, numerator):
    # n_total replaces this call's own divisor (the whole batch's, for micro-batches): numerator / 10
    assert aggregate(LOSS, MASK, agg, n_total=10).item() == pytest.approx(numerator / 10, abs=1e-6)
    empty = torch.zeros(2, 3, requires_grad=True)
    out = aggregate(empty, torch.zeros(2, 3), agg)          # nothing valid: 0 that keeps the graph
    out.backward()
    assert out.item() == 0.0 and empty.grad is not None
    with pytest.raises(ValueError, match="n_total"):
        aggregate(LOSS, MASK, agg, n_total=0)
    with pytest.raises(ValueError, match="agg"):
        aggregate(LOSS, MASK, "mean")


# ---------------------------------------------------------------- rollouts from snapshots vs the per-prefix re-forwards

POSITIONS = torch.tensor([[5, 14], [9, 18]])                # 2 prefixes per sequence of 24 tokens
KNOBS = dict(k=3, n=2, temperature=0.7)                    # 2 rollouts per prefix, temperature != 1
TOL = dict(atol=1e-9, rtol=1e-9)                            # fp64: the two ways differ only in how a prefix is run


@pytest.mark.parametrize("arch", ["deltanet", "lact"])
def test_sample_from_snapshots_equals_reforward(arch):
    """Same generator seed: the same tokens, log-probs (at the sampling temperature), hidden states and truth; with
    EOS suppressed, the same tokens and never EOS. (The log-probs are compared without suppression: sample_token
    returns them under the EOS-suppressed distribution, the re-forward under the full one.)"""
    model, x = tiny(arch), ids(2, 24)
    with torch.no_grad():
        out = model(x, snapshot_at=POSITIONS)
    ro = sample_from_snapshots(model, out, x, generator=torch.Generator().manual_seed(3), **KNOBS)
    ref = sample_by_reforward(model, x, POSITIONS, generator=torch.Generator().manual_seed(3), **KNOBS)
    assert ro.tokens.shape == (8, 3) and ro.n == 2 and torch.equal(ro.positions, POSITIONS)
    assert torch.equal(ro.tokens, ref.tokens) and torch.equal(ro.gt_tokens, ref.gt_tokens)
    for name in ("logp", "h_pred", "h_gt"):
        torch.testing.assert_close(getattr(ro, name), getattr(ref, name), **TOL, msg=name)
    eos = ro.tokens[0, 0].item()                                # a token the unsuppressed run drew
    ro = sample_from_snapshots(model, out, x, generator=torch.Generator().manual_seed(3), eos_id=eos, **KNOBS)
    ref = sample_by_reforward(model, x, POSITIONS, generator=torch.Generator().manual_seed(3), eos_id=eos, **KNOBS)
    assert torch.equal(ro.tokens, ref.tokens) and (ro.tokens != eos).all()


@pytest.mark.parametrize("arch", ["deltanet", "lact"])
def test_logprobs_from_snapshots_equal_reforward(arch):
    """Teacher-forced log-probs of given rollouts [8, 3] and the gradient of a weighted sum of them w.r.t. every
    parameter: from the snapshots of one forward, and from a forward of every prefix + rollout."""
    model, x = tiny(arch), ids(2, 24)
    tokens = sample_by_reforward(model, x, POSITIONS, generator=torch.Generator().manual_seed(4), **KNOBS).tokens
    w = torch.randn(8, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    params = list(model.parameters())
    logp = logprobs_from_snapshots(model, model(x, snapshot_at=POSITIONS), tokens, 2, 0.7)
    ref, _ = reforward_logprobs(model, x, POSITIONS, tokens, 2, 0.7)
    torch.testing.assert_close(logp, ref, **TOL)
    assert math.isfinite(logp.sum().item()) and logp.requires_grad
    grads = torch.autograd.grad((logp * w).sum(), params)
    ref_grads = torch.autograd.grad((ref * w).sum(), params)
    for (name, _), a, b in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7, msg=name)
