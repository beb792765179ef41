"""The delta rule, interchangeable with fla's chunk_delta_rule (same layout, signature and state semantics).

Backends: "recurrent" (token loop, the reference), "torch" (chunked WY/UT form), "triton" (chunked kernel with a
hand-written backward). "auto" takes Triton on CUDA when it imports, else torch; the environment variable
REFINE_DELTA_BACKEND overrides "auto". All three hand out snapshots (the state after chosen positions, what a REFINE
step starts its rollouts from) from the same single pass.
"""
import os

from .chunked import chunked_delta_rule
from .recurrent import recurrent_delta_rule

BACKENDS = ("auto", "recurrent", "torch", "triton")


def delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False, backend="auto",
               chunk_size=64, snapshot_at=None):
    """q, k: [B, T, H, K] (L2-normalised), v: [B, T, H, V], beta: [B, T, H], initial_state: [B, H, K, V] or None.
    Returns (o [B, T, H, V] in v's dtype, final_state [B, H, K, V] fp32 or None).
    snapshot_at: None, LongTensor [B, P] of positions, or "defer". When given, a third item is returned: the states
    after those positions [B, P, H, K, V] fp32, or ("defer") a function positions [B, P] -> those states, to call
    once the positions are chosen; both are differentiable in q, k, v, beta and initial_state."""
    backend = resolve_backend(backend, q)
    if backend == "recurrent":
        return recurrent_delta_rule(q, k, v, beta, scale, initial_state, output_final_state, snapshot_at)
    if backend == "triton":
        from .triton_delta import triton_delta_rule
        return triton_delta_rule(q, k, v, beta, scale, initial_state, output_final_state, chunk_size, snapshot_at)
    o, final, snaps = chunked_delta_rule(q, k, v, beta, scale, initial_state, output_final_state, chunk_size,
                                         snapshot_at)
    return (o, final) if snapshot_at is None else (o, final, snaps)


def resolve_backend(backend, x):
    """The backend that will run for tensor x: validates names and whether Triton can run here."""
    if backend == "auto":
        backend = os.environ.get("REFINE_DELTA_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"unknown delta-rule backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if x.is_cuda and _triton_runs(x) else "torch"
    if backend == "triton" and not _triton_runs(x):
        raise ValueError("backend 'triton' needs a CUDA tensor and the triton package (or TRITON_INTERPRET=1 and "
                         "triton >= 3.9 on CPU); use backend='torch' or 'recurrent'")
    return backend


def _triton_runs(x):
    from .triton_delta import triton_can_run  # a lazy import: triton is imported only where it may run
    return triton_can_run(x)
