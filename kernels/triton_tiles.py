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


@triton.jit
def load_decay(gc, t0, seq_len, H, BT: tl.constexpr):
    """(G [BT], G_last) fp32 of one chunk of Gated DeltaNet: gc[r * H] is the in-chunk cumsum of the log-decay;
    rows past seq_len get the last row's G, so that every exponent the kernels take (G_i - G_j for i >= j,
    G_last - G_i) is <= 0 and no padded row can overflow."""
    r = t0 + tl.arange(0, BT)
    last = tl.load(gc + (tl.minimum(t0 + BT, seq_len) - 1) * H).to(tl.float32)
    return tl.where(r < seq_len, load_rows(gc, t0, seq_len, H, BT), last), last


@triton.jit
def decay_matrix(G, BT: tl.constexpr):
    """Gam [BT, BT] fp32: exp(G_i - G_j) on and below the diagonal, 0 above it, by selection (never inf * 0)."""
    rows = tl.arange(0, BT)
    lower = rows[:, None] >= rows[None, :]
    return tl.where(lower, tl.exp(tl.where(lower, G[:, None] - G[None, :], 0.0)), 0.0)


def launch_config(DK, DV, dtype):
    """Block sizes of every kernel: BKF, BVF (head dims padded to powers of two >= 16), BK, BV (column blocks), BVS
    (value block of the serial state passes: more programs); and num_warps / num_stages: fp32 and K > 128 get no extra
    pipeline stage (two stages of fp32 [64, 128] tiles overflow the shared memory of an H100, two of the gated state
    passes' [64, 256] bf16 tiles that of an L40)."""
    BKF, BVF = max(16, triton.next_power_of_2(DK)), max(16, triton.next_power_of_2(DV))
    blocks = types.SimpleNamespace(BKF=BKF, BVF=BVF, BK=min(64, BKF), BV=min(64, BVF), BVS=min(32, BVF))
    return blocks, dict(num_warps=4, num_stages=1 if dtype == torch.float32 or BKF > 128 else 2)
