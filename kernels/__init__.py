"""The delta rule, interchangeable with fla's chunk_delta_rule (same layout, signature and state semantics).

Backends: "recurrent" (token loop, the reference), "torch" (chunked WY/UT form), "triton" (chunked kernel with a
hand-written backward). "auto" takes Triton on CUDA when it imports, else torch; the environment variable
REFINE_DELTA_BACKEND overrides "auto".
"""
import os

from .chunked import chunked_delta_rule
from .recurrent import recurrent_delta_rule

BACKENDS = ("auto", "recurrent", "torch", "triton")


def delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False, backend="auto",
               chunk_size=64):
    """q, k: [B, T, H, K] (L2-normalised), v: [B, T, H, V], beta: [B, T, H], initial_state: [B, H, K, V] or None.
    Returns (o [B, T, H, V] in v's dtype, final_state [B, H, K, V] fp32 or None)."""
    backend = resolve_backend(backend, q)
    if backend == "recurrent":
        return recurrent_delta_rule(q, k, v, beta, scale, initial_state, output_final_state)
    if backend == "triton":
        from .triton_delta import triton_delta_rule
        return triton_delta_rule(q, k, v, beta, scale, initial_state, output_final_state, chunk_size)
    o, final, _ = chunked_delta_rule(q, k, v, beta, scale, initial_state, output_final_state, chunk_size)
    return o, final


def resolve_backend(backend, x):
    """The backend that will run for tensor x: validates names and whether Triton can run here."""
    if backend == "auto":
        backend = os.environ.get("REFINE_DELTA_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"unknown delta-rule backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if x.is_cuda and _triton_runs(x) else "torch"
    if backend == "triton" and not _triton_runs(x):
        raise ValueError("backend 'triton' needs a CUDA tensor and the triton package (or TRITON_INTERPRET=1 on "
                         "CPU); use backend='torch' or 'recurrent'")
    return backend


def _triton_runs(x):
    try:
        from .triton_delta import triton_can_run
    except ImportError:
        return False
    return triton_can_run(x)
