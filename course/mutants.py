"""Wrong implementations a student might write, one edit each of the reference source, and the check that every one
fails its assignment's grading tests (tests/test_course.py runs `python -m course.mutants`). Instructor only: `make`
leaves this file out of a student copy (the edits point at the solution).

A mutant is (function, what is wrong, old text, new text): the function's source with `old` (which must occur exactly
once) replaced by `new`, compiled in its module's namespace and swapped in for every module attribute that is the
original function. Then the assignment's grading tests run in this process (pytest.main); the mutant is caught when
at least one fails.
"""
import contextlib
import importlib
import inspect
import io
import sys
import textwrap

from course.assignments import ASSIGNMENTS, BY_NAME
from course.pick import wanted

MUTANTS = {
    "delta_rule_step": [
        ("delta_rule_step", "beta missing: v' = v - S^T k", "v_new = beta_t[..., None] * (v_t - ", "v_new = (v_t - "),
        ("delta_rule_step", "off by one: o_t read from the state before the write",
         'return S, torch.einsum("bhkv,bhk->bhv", S, q_t)',
         'return S, torch.einsum("bhkv,bhk->bhv", S - k_t[..., :, None] * v_new[..., None, :], q_t)'),
        ("delta_rule_step", "linear attention write: S + k (beta v)^T instead of S + k v'^T",
         "S = S + k_t[..., :, None] * v_new[..., None, :]",
         "S = S + k_t[..., :, None] * (beta_t[..., None] * v_t)[..., None, :]"),
        ("delta_rule_step", "the decay applied after the error (the error read from the undecayed state)",
         "    if g_t is not None:\n        S = S * g_t.exp()[..., None, None]                                   # S <- "
         "exp(g_t) S: the decay comes first\n    v_new = beta_t[..., None] * (v_t - torch.einsum(\"bhkv,bhk->bhv\", "
         "S, k_t))",
         "    v_new = beta_t[..., None] * (v_t - torch.einsum(\"bhkv,bhk->bhv\", S, k_t))\n    if g_t is not None:\n"
         "        S = S * g_t.exp()[..., None, None]"),
        ("delta_rule_step", "the decay applied to the new write as well: S_t = exp(g) S + exp(g) k v'^T",
         "S = S + k_t[..., :, None] * v_new[..., None, :]",
         "S = S + k_t[..., :, None] * v_new[..., None, :] * (1 if g_t is None else g_t.exp()[..., None, None])"),
        ("delta_rule_step", "g used as a decay factor instead of a log-decay: S <- g S",
         "S = S * g_t.exp()[..., None, None]", "S = S * g_t[..., None, None]"),
    ],
    "recurrent_delta_rule": [
        ("recurrent_delta_rule", "no scale on q", "q.to(acc) * scale", "q.to(acc)"),
        ("recurrent_delta_rule", "initial_state ignored",
         "S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(acc)",
         "S = q.new_zeros(B, H, K, V)"),
        ("recurrent_delta_rule", "off by one: token t decayed by the previous token's gate g_{t-1}",
         "beta[:, t], g[t])", "beta[:, t], g[t - 1])"),
    ],
    "chunked_delta_rule": [
        ("_chunked", "(I + A)^-1 taken as I - A (first order)",
         "Tinv = torch.linalg.solve_triangular(eye + A, eye.expand_as(A), upper=False, unitriangular=True)",
         "Tinv = eye - A"),
        ("_chunked", "off by one in the causal mask: strict tril(Q K^T, -1) drops the token itself",
         "torch.ones(C, C, dtype=torch.bool, device=q.device).tril()",
         "torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)"),
        ("_chunked", "beta missing on V: U = T V", "kb, vb = k * beta, v * beta", "kb, vb = k * beta, v"),
        ("_chunked", "state update with U instead of V' = U - W S",
         "k_out[:, :, n].transpose(-1, -2) @ v_new", "k_out[:, :, n].transpose(-1, -2) @ U[:, :, n]"),
        ("_chunked", "no scale on q", "q, k, v = chunks(q) * scale, chunks(k), chunks(v)",
         "q, k, v = chunks(q), chunks(k), chunks(v)"),
        ("_chunked", "gated: the intra-chunk Q K^T without the decay Gam", "A, QK, kw = A * Gam, QK * Gam, ",
         "A, QK, kw = A * Gam, QK, "),
    ],
    "token_entropy": [
        ("token_entropy", "bits instead of nats", "logp.nan_to_num(neginf=0.0)).sum(dim=-1))",
         "logp.nan_to_num(neginf=0.0)).sum(dim=-1) / 0.6931471805599453)"),
        ("token_entropy", "0 * log 0 not guarded (NaN for -inf logits)", "logp.nan_to_num(neginf=0.0)", "logp"),
        ("token_entropy", "sum over the wrong axis", "sum(dim=-1))", "sum(dim=0))"),
        ("token_entropy", "no fp32 upcast", "F.log_softmax(block.float(), dim=-1)", "F.log_softmax(block, dim=-1)"),
    ],
    "smooth_entropy": [
        ("smooth_entropy", "zero padding not counted in the mean", "padding=kernel // 2, count_include_pad=True",
         "padding=kernel // 2, count_include_pad=False"),
        ("smooth_entropy", "even k used as the kernel (the window is no longer centred)",
         "kernel = _odd_kernel(k)", "kernel = k"),
        ("smooth_entropy", "even k rounded down to k - 1", "kernel = _odd_kernel(k)",
         "kernel = _odd_kernel(k) if k % 2 else max(k - 1, 1)"),
        ("smooth_entropy", "trailing (causal) window instead of a centred one",
         "out = F.avg_pool1d(x, kernel_size=kernel, stride=1, padding=kernel // 2, count_include_pad=True)",
         "out = F.avg_pool1d(F.pad(x, (kernel - 1, 0)), kernel_size=kernel, stride=1)"),
    ],
    "select_positions": [
        ("select_positions", "temperature ignored", "probs = torch.softmax(chunks / temperature, dim=-1)",
         "probs = torch.softmax(chunks, dim=-1)"),
        ("select_positions", "the unsmoothed entropy sampled", "chunks = H_s[b, : n_chunks * size]",
         "chunks = H[b, : n_chunks * size]"),
        ("select_positions", "off by one: the rollout start s returned instead of the last prefix token t",
         "out[b] = start - 1", "out[b] = start"),
        ("select_positions", "the chunk offset forgotten", "i = j.cpu() + torch.arange(n_chunks) * size",
         "i = j.cpu()"),
        ("select_positions", "the margin clamp skipped", "start = (i + 1).clamp(lo, hi)", "start = i + 1"),
    ],
    "cosine_reward": [
        ("cosine_reward", "sum over the k positions instead of the mean", "return cos.mean(dim=-1)",
         "return cos.sum(dim=-1)"),
        ("cosine_reward", "dot product without normalisation",
         "F.cosine_similarity(h_pred.float(), h_gt.float(), dim=-1)", "(h_pred.float() * h_gt.float()).sum(-1)"),
        ("cosine_reward", "cosine over the positions axis instead of the hidden axis",
         "F.cosine_similarity(h_pred.float(), h_gt.float(), dim=-1)",
         "F.cosine_similarity(h_pred.float(), h_gt.float(), dim=1)"),
        ("cosine_reward", "gradient kept (no torch.no_grad)", "@torch.no_grad()\n", ""),
    ],
    "binary_reward": [
        ("binary_reward", "all-or-nothing: 1 only when every token matches", "return match.mean(dim=-1)",
         "return match.min(dim=-1).values"),
        ("binary_reward", "a count instead of a fraction", "return match.mean(dim=-1)", "return match.sum(dim=-1)"),
        ("binary_reward", "mean over the batch axis", "return match.mean(dim=-1)", "return match.mean(dim=0)"),
        ("binary_reward", "1 when any token matches", "return match.mean(dim=-1)", "return match.max(dim=-1).values"),
    ],
    "hybrid_reward": [
        ("hybrid_reward", "the average of the two instead of the sum", "return cos + hit", "return (cos + hit) / 2"),
        ("hybrid_reward", "the cosine only", "return cos + hit", "return cos"),
        ("hybrid_reward", "the product instead of the sum", "return cos + hit", "return cos * hit"),
    ],
    "group_advantages": [
        ("group_advantages", "the wrong std convention: biased (population) std",
         "R.std(dim=-1, keepdim=True) + eps", "R.std(dim=-1, keepdim=True, correction=0) + eps"),
        ("group_advantages", "eps missing", "centred / (R.std(dim=-1, keepdim=True) + eps)",
         "centred / R.std(dim=-1, keepdim=True)"),
        ("group_advantages", "the batch mean subtracted instead of the group mean",
         "centred = R - R.mean(dim=-1, keepdim=True)", "centred = R - R.mean()"),
        ("group_advantages", "constant groups not set to exactly 0",
         "return torch.where(_constant_groups(R), torch.zeros_like(A), A)", "return A"),
        ("group_advantages", "a group of one divided by its (NaN) std", "if R.shape[1] == 1:", "if False:"),
    ],
    "policy_loss": [
        ("policy_loss", "max and min swapped: the unclipped term always wins", "clipped = surr_clip > surr",
         "clipped = surr_clip < surr"),
        ("policy_loss", "no dual clip", "loss_tok = torch.where(dual, dual_bound, loss_tok)", "loss_tok = loss_tok"),
        ("policy_loss", "ratio inverted: exp(old - logp)", "log_ratio = (lp - old).clamp(-20.0, 20.0)",
         "log_ratio = (old - lp).clamp(-20.0, 20.0)"),
        ("policy_loss", "symmetric clip: clip_high ignored", "ratio.clamp(1.0 - clip_low, 1.0 + clip_high)",
         "ratio.clamp(1.0 - clip_low, 1.0 + clip_low)"),
        ("policy_loss", "a missing beta: the KL term without kl_coef",
         "loss = loss + kl_coef * aggregate(kl_tok, valid, agg, n_total)",
         "loss = loss + aggregate(kl_tok, valid, agg, n_total)"),
        ("policy_loss", "log-ratio not clamped", "log_ratio = (lp - old).clamp(-20.0, 20.0)",
         "log_ratio = lp - old"),
    ],
    "aggregate": [
        ("aggregate", "seq-mean-token-mean as a ratio of sums instead of a mean of ratios",
         "return (loss.sum(dim=-1) / count).sum() / denom", "return loss.sum() / valid.sum()"),
        ("aggregate", "masked slots multiplied by the mask (0 * inf = NaN)",
         "loss = torch.where(valid, loss, torch.zeros_like(loss))", "loss = loss * valid"),
        ("aggregate", "n_total ignored: each micro-batch divides by its own count",
         "denom = default_normaliser(mask, agg) if n_total is None else float(n_total)",
         "denom = default_normaliser(mask, agg)"),
        ("aggregate", "row means over the padded length instead of the valid tokens",
         "count = valid.sum(dim=-1).clamp(min=1)", "count = valid.shape[-1]"),
    ],
    "sample_from_snapshots": [
        ("sample_from_snapshots", "snapshots tiled with repeat, so rollout rows no longer follow their prefix",
         "lambda s: rows_per_prefix(s.detach(), n)", "lambda s: s.detach().repeat(n, *[1] * (s.dim() - 1))"),
        ("sample_from_snapshots", "log-probs and samples at temperature 1, not the sampling temperature",
         "sample_token(logits, temperature, top_p, top_k, eos_id, generator)",
         "sample_token(logits, 1.0, top_p, top_k, eos_id, generator)"),
        ("sample_from_snapshots", "the first token drawn from the last position's logits, not the prefix's",
         "logits = rows_per_prefix(out.snapshot_logits.detach(), n)",
         "logits = out.logits[:, -1].detach().repeat_interleave(out.positions.shape[1] * n, 0)"),
        ("sample_from_snapshots", "off by one: the ground truth starts at the last prefix token",
         "ground_truth(input_ids, out.hidden, out.positions, k)",
         "ground_truth(input_ids, out.hidden, out.positions - 1, k)"),
        ("sample_from_snapshots", "the state not advanced: every token decoded from the prefix state",
         "state, logits = step.state, step.logits[:, 0]", "logits = step.logits[:, 0]"),
        ("sample_from_snapshots", "EOS not suppressed", "top_k, eos_id, generator)", "top_k, None, generator)"),
    ],
    "logprobs_from_snapshots": [
        ("logprobs_from_snapshots", "off by one: each later token scored from the logits after it",
         "model(tokens[:, :-1], state=state)", "model(tokens[:, 1:], state=state)"),
        ("logprobs_from_snapshots", "temperature ignored", "F.log_softmax(logits.float() / temperature, -1)",
         "F.log_softmax(logits.float(), -1)"),
        ("logprobs_from_snapshots", "snapshots tiled with repeat, not row by row",
         "lambda s: rows_per_prefix(s, n)", "lambda s: s.repeat(n, *[1] * (s.dim() - 1))"),
        ("logprobs_from_snapshots", "snapshots detached: no gradient reaches the prefix",
         "lambda s: rows_per_prefix(s, n)", "lambda s: rows_per_prefix(s.detach(), n)"),
        ("logprobs_from_snapshots", "the state not advanced between tokens: each one scored from the prefix state",
         "model(tokens[:, :-1], state=state).logits",
         "torch.cat([model(tokens[:, j:j + 1], state=state).logits for j in range(tokens.shape[1] - 1)], 1)"),
    ],
    "swiglu_inner_grads": [
        ("swiglu_inner_grads", "sigmoid(g) instead of silu'(g)", "(delta * u * silu_grad(g))",
         "(delta * u * torch.sigmoid(g))"),
        ("swiglu_inner_grads", "the gate u missing in dW0", "(delta * u * silu_grad(g))", "(delta * silu_grad(g))"),
        ("swiglu_inner_grads", "learning rates of W0 and W2 swapped",
         "lr0, lr1, lr2 = lr[..., 0:1], lr[..., 1:2], lr[..., 2:3]",
         "lr2, lr1, lr0 = lr[..., 0:1], lr[..., 1:2], lr[..., 2:3]"),
        ("swiglu_inner_grads", "the sign of dW1 flipped (a step up the inner loss)",
         "dw1 = vt @ (h.transpose(-1, -2) * lr1)", "dw1 = -vt @ (h.transpose(-1, -2) * lr1)"),
        ("swiglu_inner_grads", "silu(g) instead of silu(g) * u in dW1", "dw1 = vt @ (h.transpose(-1, -2) * lr1)",
         "dw1 = vt @ (sg.transpose(-1, -2) * lr1)"),
    ],
    "fast_weight_update": [
        ("fast_weight_update", "the momentum gate of the last token instead of the chunk mean",
         "beta = gate.mean(-2)[..., None]", "beta = gate[..., -1:, :]"),
        ("fast_weight_update", "momentum not gated: dW + M", "(d + beta * mi)", "(d + mi)"),
        ("fast_weight_update", "no row renormalisation",
         "w = tuple(wi / (wi.norm(dim=-1, keepdim=True) + 1e-5) * n for wi, n in zip(w, norms))", "w = w"),
        ("fast_weight_update", "renormalised over columns instead of rows",
         "wi.norm(dim=-1, keepdim=True)", "wi.norm(dim=-2, keepdim=True)"),
        ("fast_weight_update", "the update subtracted: W - dW", "w = tuple(wi + d for wi, d in zip(w, dw))",
         "w = tuple(wi - d for wi, d in zip(w, dw))"),
    ],
    "newton_schulz5": [
        ("newton_schulz5", "normalised by the largest entry instead of the Frobenius norm",
         "x.norm(dim=(-2, -1), keepdim=True)", "x.abs().amax(dim=(-2, -1), keepdim=True)"),
        ("newton_schulz5", "four steps instead of five", "for a, b, c in NS_COEFFS:",
         "for a, b, c in NS_COEFFS[:4]:"),
        ("newton_schulz5", "the coefficients in reverse order", "for a, b, c in NS_COEFFS:",
         "for a, b, c in NS_COEFFS[::-1]:"),
        ("newton_schulz5", "result left in the compute dtype", "return x.to(g.dtype)", "return x"),
        ("newton_schulz5", "A = X^T X (the wrong side)", "A = x @ x.transpose(-1, -2)",
         "A = x.transpose(-1, -2) @ x"),
    ],
    "qa_f1_score": [
        ("qa_f1_score", "no normalisation (case, punctuation, articles count)",
         "pred_tokens = normalize_answer(prediction).split()", "pred_tokens = prediction.split()"),
        ("qa_f1_score", "counts not clipped: a repeated word counts every time",
         "sum((Counter(pred_tokens) & Counter(gold_tokens)).values())",
         "sum(c for t, c in Counter(pred_tokens).items() if t in gold_tokens)"),
        ("qa_f1_score", "precision only", "return 2 * precision * recall / (precision + recall)",
         "return precision"),
        ("qa_f1_score", "the arithmetic mean of P and R", "return 2 * precision * recall / (precision + recall)",
         "return (precision + recall) / 2"),
    ],
}


def module_name(file):
    return file[:-3].replace("/", ".")


def mutate(module, fn, old, new):
    """Compile the mutated source of module.fn; -> (original, mutant). ValueError when `old` does not occur once."""
    original = getattr(module, fn)
    src = textwrap.dedent(inspect.getsource(original))
    if src.count(old) != 1:
        raise ValueError(f"{src.count(old)} occurrences of {old!r} in {fn}: update course/mutants.py")
    namespace = dict(vars(module))
    exec(compile(src.replace(old, new), f"<mutant of {module.__name__}.{fn}>", "exec"), namespace)
    return original, namespace[fn]


@contextlib.contextmanager
def swapped(original, mutant):
    """Every module attribute that is `original` points at `mutant` inside the block."""
    places = [(m, k) for m in list(sys.modules.values()) for k, v in list(vars(m).items()) if v is original]
    for m, k in places:
        setattr(m, k, mutant)
    try:
        yield
    finally:
        for m, k in places:
            setattr(m, k, original)


class Runner:
    """A pytest plugin that replaces the test loop: it runs the reference, then every mutant, over the collected items
    of each assignment (a mutant stops at its first failing test) and records one line per mutant in `lines`."""

    def __init__(self, names, root):
        self.names, self.root, self.lines, self.bad = names, root, [], 0

    def pytest_runtestloop(self, session):
        from _pytest.runner import runtestprotocol

        def failed(item):
            return any(r.failed for r in runtestprotocol(item, nextitem=None, log=False))

        ids = {item: f"{item.path.relative_to(self.root).as_posix()}::{item.name}" for item in session.items}
        for name in self.names:
            a = BY_NAME[name]
            items = [it for it, i in ids.items() if wanted(i, a.tests)]
            broken = [ids[it] for it in items if failed(it)]
            if broken or not items:
                self.report(False, f"BROKEN  {name}: the reference fails {broken or 'no tests collected'}")
                continue
            module = importlib.import_module(module_name(a.file))
            for fn, what, old, new in MUTANTS[name]:
                try:
                    original, mutant = mutate(module, fn, old, new)
                except ValueError as e:
                    self.report(False, f"STALE   {name}: {e}")
                    continue
                with swapped(original, mutant):
                    caught = any(failed(it) for it in items)          # any() stops at the first failure
                self.report(caught, f"{'caught ' if caught else 'MISSED '} {name} ({fn}): {what}")
        return True

    def report(self, ok, line):
        self.lines.append(line)
        self.bad += not ok


def check(names, root):
    """Runs every mutant of `names` with the tests of the repository at root; -> (lines, number not caught)."""
    import pytest
    runner = Runner(names, root)
    tests = list(dict.fromkeys(t for n in names for t in BY_NAME[n].tests))
    with contextlib.redirect_stdout(io.StringIO()):
        status = pytest.main(["-q", "-p", "no:cacheprovider", f"--rootdir={root}", *tests], plugins=[runner])
    if status not in (0, 1) and not runner.lines:
        return [f"pytest could not run the grading tests (exit {status})"], 1
    return runner.lines, runner.bad


if __name__ == "__main__":
    from pathlib import Path
    lines, bad = check(sys.argv[1:] or [a.name for a in ASSIGNMENTS], Path(__file__).resolve().parents[1])
    print("\n".join(lines))
    print(f"{sum(ln.startswith('caught') for ln in lines)} wrong implementations caught, {bad} not")
    sys.exit(1 if bad else 0)
