"""What the Triton forward (triton_delta.py) and backward (triton_delta_bwd.py) share: the masked tile loads and
stores, and the one function that picks every launch's block sizes, num_warps and num_stages (bench.py compile
compiles what it picks for each GPU target)."""
import types

import torch

try:
    import triton
    import triton.language as tl
    TRITON_AVAILABLE = True
except ImportError:  # keep the modules importable so the dispatcher can read TRITON_AVAILABLE
    triton = types.SimpleNamespace(jit=lambda fn: fn)
    tl = types.SimpleNamespace(constexpr=None)
    TRITON_AVAILABLE = False


@triton.jit
def load_tile(ptr, r0, n_rows, stride, c0, n_cols, BR: tl.constexpr, BC: tl.constexpr):
    """[BR, BC] tile at rows r0.., columns c0.. of a row-major matrix (row stride `stride`), zero outside
    [n_rows, n_cols]: this masks the last partial chunk and the padding of the head dims."""
    r = r0 + tl.arange(0, BR)
    c = c0 + tl.arange(0, BC)
    mask = (r[:, None] < n_rows) & (c[None, :] < n_cols)
    return tl.load(ptr + r[:, None] * stride + c[None, :], mask=mask, other=0.0)


@triton.jit
def store_tile(ptr, x, r0, n_rows, stride, c0, n_cols, BR: tl.constexpr, BC: tl.constexpr):
    """Store the [BR, BC] tile x (cast to ptr's dtype) where load_tile would read it."""
    r = r0 + tl.arange(0, BR)
    c = c0 + tl.arange(0, BC)
    mask = (r[:, None] < n_rows) & (c[None, :] < n_cols)
    tl.store(ptr + r[:, None] * stride + c[None, :], x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def load_rows(ptr, r0, n_rows, stride, BR: tl.constexpr):
    """[BR] fp32 vector ptr[r * stride] for r = r0.., zero past n_rows (beta of one chunk)."""
    r = r0 + tl.arange(0, BR)
    return tl.load(ptr + r * stride, mask=r < n_rows, other=0.0).to(tl.float32)


def launch_config(DK, DV, dtype):
    """Block sizes of every kernel: BKF, BVF (head dims padded to powers of two >= 16), BK, BV (column blocks), BVS
    (value block of the serial state passes: more programs); and num_warps / num_stages: fp32 gets no extra pipeline
    stage (two stages of fp32 [64, 128] tiles overflow the shared memory of an H100)."""
    BKF, BVF = max(16, triton.next_power_of_2(DK)), max(16, triton.next_power_of_2(DV))
    blocks = types.SimpleNamespace(BKF=BKF, BVF=BVF, BK=min(64, BKF), BV=min(64, BVF), BVS=min(32, BVF))
    return blocks, dict(num_warps=4, num_stages=1 if dtype == torch.float32 else 2)
