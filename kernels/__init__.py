"""The (gated) delta rule, interchangeable with fla's chunk_delta_rule (same layout, signature and state semantics).

Backends: "recurrent" (token loop, the reference), "torch" (chunked WY/UT form), "triton" (chunked kernel with a
hand-written backward). "auto" takes Triton on CUDA when it imports, else torch; the environment variable
REFINE_DELTA_BACKEND overrides "auto". All three hand out snapshots (the state after chosen positions, what a REFINE
step starts its rollouts from) from the same single pass. Gated DeltaNet is the option g= (a keyword: fla's
chunk_gated_delta_rule puts g before beta, so pass it by name), with GVA (more value heads than q/k heads).
"""
import os

from .chunked import chunked_delta_rule
from .recurrent import recurrent_delta_rule

BACKENDS = ("auto", "recurrent", "torch", "triton")


def delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False, backend="auto",
               chunk_size=64, snapshot_at=None, *, g=None):
    """q, k: [B, T, H, K] (L2-normalised), v: [B, T, HV, V], beta: [B, T, HV], initial_state: [B, HV, K, V] or None;
    g: [B, T, HV] log-decay (<= 0, kept in fp32: Gated DeltaNet) or None (DeltaNet). HV is a multiple of H: value
    head j reads q/k head j // (HV // H) (GVA). Returns (o [B, T, HV, V] in v's dtype, final_state [B, HV, K, V] fp32
    or None). snapshot_at: None, LongTensor [B, P] of positions, or "defer". When given, a third item is returned:
    the states after those positions [B, P, HV, K, V] fp32, or ("defer") a function positions [B, P] -> those
    states, to call once the positions are chosen; both are differentiable in q, k, v, beta, g and initial_state."""
    backend = resolve_backend(backend, q)
    (B, T, H, _), HV = q.shape, v.shape[2]
    if k.shape != q.shape or v.shape[:2] != (B, T) or HV % H or beta.shape != (B, T, HV) or \
            (g is not None and g.shape != beta.shape):
        raise ValueError(f"expected q, k [B, T, H, K], v [B, T, HV, V] with HV a multiple of H, beta and g "
                         f"[B, T, HV]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, {tuple(beta.shape)}, "
                         f"{None if g is None else tuple(g.shape)}")
    if HV > H:  # GVA: value head j pairs with q/k head j // (HV // H)   [B, T, HV, K]
        q, k = q.repeat_interleave(HV // H, dim=2), k.repeat_interleave(HV // H, dim=2)
    if backend == "recurrent":
        return recurrent_delta_rule(q, k, v, beta, scale, initial_state, output_final_state, snapshot_at, g)
    if backend == "triton":
        from .triton_delta import triton_delta_rule
        return triton_delta_rule(q, k, v, beta, scale, initial_state, output_final_state, chunk_size, snapshot_at,
                                 g=g)
    o, final, snaps = chunked_delta_rule(q, k, v, beta, scale, initial_state, output_final_state, chunk_size,
                                         snapshot_at, g=g)
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
