"""The chunked delta rule (WY/UT form) in Triton: forward kernels, the autograd.Function, the public entry point.

Per batch b, head h and chunk n of C rows (Q, K [C, DK], V [C, DV], beta [C]), as in kernels/chunked.py:
  step 1  A    = tril(diag(beta) K K^T, -1)                     chunk_scaled_dot_kkt
  step 2  T    = (I + A)^-1   (forward substitution)            solve_unit_lower_triangular
  step 3  W    = T diag(beta) K,  U = T diag(beta) V            compute_w_u
  step 4  V'_n = U_n - W_n S_n,  S_{n+1} = S_n + K_n^T V'_n     chunk_state_pass_kernel (sequential over n)
  step 5  O_n  = scale (Q_n S_n + tril(Q_n K_n^T) V'_n)         chunk_output_kernel
Steps 1-3 run in one kernel (wy_representation_kernel, one program per chunk). The hand-written backward walks the
same steps in reverse (triton_delta_bwd.py); the forward saves T, W, the chunk states S_n and V' for it.
Snapshots: S_n and the rows of V' are also outputs of the autograd.Function, so the state after any token is a torch
gather from them (chunked.states_after), and the backward takes gradients into every S_n and every row of V'.

Precision: every tl.dot accumulates in fp32 and the running state S is fp32. Dot operands and the stored
intermediates (T, W, U, V', S_n) are in the input dtype, as in fla: bf16/fp16 use tensor cores, fp32 runs as TF32
on a GPU and exactly in the CPU interpreter (TRITON_INTERPRET=1, set before triton is imported). With snapshots the
chunk states S_n (and their gradients) are stored in fp32, so a snapshot is as exact as the final state.
Supported: chunk size 16/32/64, head dims DK <= 128 (256 gated), DV <= 512 (padded to a power of two >= 16), any T.
"""
import os

import torch

from .chunked import chunk_cumsum, deliver_snapshots, states_after
from .triton_delta_bwd import chunk_delta_rule_bwd
from .triton_tiles import (TRITON_AVAILABLE, decay_matrix, launch_config, load_decay, load_rows, load_tile, store_tile,
                           tl, triton)

CHUNK_SIZES = (16, 32, 64)
# what bench.py compile checks: DeltaNet-1.3B's 128 / 128, Gated DeltaNet-1.3B's 256 / 512 (the gated rule only: on
# an H200 with triton 3.6 the ungated state pass at K = 256 hit an illegal memory access)
MAX_K, MAX_K_GATED, MAX_V = 128, 256, 512


# ------------------------------------------------------------------------------------------ steps 1-3: WY / UT form
# Pointers below are already moved to sequence b, head h of a [B, T, H, D] tensor: row t of the chunk sits at
# t * (H * D). One program handles one chunk of BT rows starting at t0.
@triton.jit
def chunk_scaled_dot_kkt(k, beta, t0, seq_len, H, DK: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    """Step 1: A = tril(diag(beta) K K^T, -1) [BT, BT] fp32; K [BT, DK] read in [BT, BK] blocks, beta [BT] fp32."""
    KKt = tl.zeros([BT, BT], dtype=tl.float32)
    for c0 in range(0, DK, BK):
        k_b = load_tile(k, t0, seq_len, H * DK, c0, DK, BT, BK)                  # [BT, BK]
        KKt += tl.dot(k_b, tl.trans(k_b))                                        # [BT, BT]
    rows = tl.arange(0, BT)
    return tl.where(rows[:, None] > rows[None, :], beta[:, None] * KKt, 0.0)   # strictly lower, row i times beta_i


@triton.jit
def solve_unit_lower_triangular(A, BT: tl.constexpr):
    """Step 2: T = (I + A)^-1 for strictly lower A [BT, BT] (fp32), by forward substitution over the rows:
    (I + A) T = I  =>  T_i = e_i - sum_{j<i} A_ij T_j, and rows j < i of T are final when row i is computed."""
    rows = tl.arange(0, BT)
    T = (rows[:, None] == rows[None, :]).to(tl.float32)                          # [BT, BT] starts as I
    for i in range(1, BT):
        a_i = tl.sum(tl.where(rows[:, None] == i, A, 0.0), axis=0)              # [BT] row i of A (zero at j >= i)
        T = tl.where(rows[:, None] == i, T - tl.sum(a_i[:, None] * T, axis=0)[None, :], T)  # T_i = e_i - a_i T
    return T


@triton.jit
def compute_w_u(T, beta, x, y, t0, seq_len, H, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """Step 3 for one input: Y = T diag(beta) X with X, Y [BT, D] in [BT, BD] column blocks
    (W from K, U from V). T [BT, BT] fp32, beta [BT] fp32; the dot runs in X's dtype with fp32 accumulation."""
    for c0 in range(0, D, BD):
        x_b = load_tile(x, t0, seq_len, H * D, c0, D, BT, BD)                    # [BT, BD]
        y_b = tl.dot(T.to(x_b.dtype), (beta[:, None] * x_b).to(x_b.dtype))      # [BT, BD]
        store_tile(y, y_b, t0, seq_len, H * D, c0, D, BT, BD)


@triton.jit
def wy_representation_kernel(k, v, beta, gc, T_out, w, u, seq_len, H, DK: tl.constexpr, DV: tl.constexpr,
                             BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATED: tl.constexpr):
    """Steps 1-3 for chunk program_id(0) of (b, h) = program_id(1): stores T [BT, BT] into T_out [B, T, H, BT],
    W [BT, DK] into w [B, T, H, DK] and U [BT, DV] into u [B, T, H, DV]. GATED: gc [B, T, H] holds G, A gets
    o Gam and W = T diag(beta exp(G)) K."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    row0 = i_b.to(tl.int64) * seq_len * H + i_h                                 # token (b, 0), head h
    t0 = i_n * BT
    b = load_rows(beta + row0, t0, seq_len, H, BT)                               # [BT]
    A = chunk_scaled_dot_kkt(k + row0 * DK, b, t0, seq_len, H, DK, BT, BK)       # step 1
    bw = b                                                                       # the row weights of W
    if GATED:
        Gc, _ = load_decay(gc + row0, t0, seq_len, H, BT)                         # [BT]
        A, bw = A * decay_matrix(Gc, BT), b * tl.exp(Gc)
    T = solve_unit_lower_triangular(A, BT)                                       # step 2
    store_tile(T_out + row0 * BT, T, t0, seq_len, H * BT, 0, BT, BT, BT)
    compute_w_u(T, bw, k + row0 * DK, w + row0 * DK, t0, seq_len, H, DK, BT, BK)  # step 3: W = T diag(bw) K
    compute_w_u(T, b, v + row0 * DV, u + row0 * DV, t0, seq_len, H, DV, BT, BV)  # step 3: U = T diag(beta) V


# --------------------------------------------------------------------------------------------- step 4: state pass
@triton.jit
def chunk_state_pass_kernel(k, gc, w, u, v_new, h, h0, ht, seq_len, H, NT, DK: tl.constexpr, DV: tl.constexpr,
                            BT: tl.constexpr, BKF: tl.constexpr, BV: tl.constexpr,
                            HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, GATED: tl.constexpr):
    """Step 4 for value columns [v0, v0 + BV) (v0 = program_id(0) * BV) of (b, h) = program_id(1), sequential over
    the chunks with the state S [BKF, BV] (all DK rows, padded to BKF) in fp32; h[b, n, h] = S_n. GATED:
    S_{n+1} = exp(G_last) S_n + (diag(exp(G_last - G)) K_n)^T V'_n.
    h0, ht: [B, H, DK, DV] fp32 (initial / final state), h: [B, NT, H, DK, DV], v_new (V'): [B, T, H, DV]."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    row0 = i_b.to(tl.int64) * seq_len * H + i_h
    v0 = i_v * BV
    if HAS_H0:
        S = load_tile(h0 + i_bh.to(tl.int64) * DK * DV, 0, DK, DV, v0, DV, BKF, BV).to(tl.float32)
    else:
        S = tl.zeros([BKF, BV], dtype=tl.float32)                                # S_0 = 0
    for n in range(NT):
        t0 = n * BT
        h_n = h + ((i_b.to(tl.int64) * NT + n) * H + i_h) * DK * DV
        store_tile(h_n, S, 0, DK, DV, v0, DV, BKF, BV)                           # snapshot S_n for step 5
        w_n = load_tile(w + row0 * DK, t0, seq_len, H * DK, 0, DK, BT, BKF)       # [BT, BKF]
        k_n = load_tile(k + row0 * DK, t0, seq_len, H * DK, 0, DK, BT, BKF)       # [BT, BKF]
        u_n = load_tile(u + row0 * DV, t0, seq_len, H * DV, v0, DV, BT, BV)       # [BT, BV]
        V_new = u_n - tl.dot(w_n, S.to(w_n.dtype))                               # V'_n = U_n - W_n S_n   [BT, BV]
        store_tile(v_new + row0 * DV, V_new, t0, seq_len, H * DV, v0, DV, BT, BV)
        if GATED:
            Gc, last = load_decay(gc + row0, t0, seq_len, H, BT)
            k_n, S = (k_n * tl.exp(last - Gc)[:, None]).to(k_n.dtype), S * tl.exp(last)
        S += tl.dot(tl.trans(k_n), V_new.to(k_n.dtype))                          # S_{n+1} = S_n + K_n^T V'_n
    if STORE_HT:
        store_tile(ht + i_bh.to(tl.int64) * DK * DV, S, 0, DK, DV, v0, DV, BKF, BV)


# ------------------------------------------------------------------------------------------------ step 5: output
@triton.jit
def chunk_output_kernel(q, k, gc, v_new, h, o, scale, seq_len, H, NT, DK: tl.constexpr, DV: tl.constexpr,
                        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATED: tl.constexpr):
    """Step 5, O_n [BT, BV], for value columns [v0, v0 + BV) of chunk n = program_id(1), (b, h) = program_id(2).
    The DK sum runs over [BT, BK] blocks of Q_n, K_n and [BK, BV] blocks of S_n. GATED:
    O_n = scale (diag(exp(G)) Q_n S_n + (Q_n K_n^T o Gam) V'_n)."""
    i_v, i_n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    row0 = i_b.to(tl.int64) * seq_len * H + i_h
    t0, v0 = i_n * BT, i_v * BV
    h_n = h + ((i_b.to(tl.int64) * NT + i_n) * H + i_h) * DK * DV
    QS = tl.zeros([BT, BV], dtype=tl.float32)
    P = tl.zeros([BT, BT], dtype=tl.float32)
    for c0 in range(0, DK, BK):
        q_b = load_tile(q + row0 * DK, t0, seq_len, H * DK, c0, DK, BT, BK)       # [BT, BK]
        k_b = load_tile(k + row0 * DK, t0, seq_len, H * DK, c0, DK, BT, BK)       # [BT, BK]
        S_b = load_tile(h_n, c0, DK, DV, v0, DV, BK, BV).to(q_b.dtype)            # [BK, BV] (fp32 if snapshots)
        QS += tl.dot(q_b, S_b)                                                   # Q_n S_n
        P += tl.dot(q_b, tl.trans(k_b))                                          # Q_n K_n^T
    rows = tl.arange(0, BT)
    P = tl.where(rows[:, None] >= rows[None, :], P, 0.0)                         # tril incl. the diagonal
    if GATED:
        Gc, _ = load_decay(gc + row0, t0, seq_len, H, BT)
        QS, P = QS * tl.exp(Gc)[:, None], P * decay_matrix(Gc, BT)
    vn = load_tile(v_new + row0 * DV, t0, seq_len, H * DV, v0, DV, BT, BV)        # [BT, BV]
    O = scale * (QS + tl.dot(P.to(vn.dtype), vn))
    store_tile(o + row0 * DV, O, t0, seq_len, H * DV, v0, DV, BT, BV)


# ------------------------------------------------------------------------------------------------- host side
def chunk_delta_rule_fwd(q, k, v, beta, scale, h0, output_final_state, BT, state_dtype=None, gc=None):
    """q, k [B, T, H, DK], v [B, T, H, DV], beta [B, T, H], h0 [B, H, DK, DV] fp32 or None (all contiguous);
    gc [B, T, H] fp32: G, the in-chunk cumsum of the log-decay (Gated DeltaNet), or None;
    state_dtype: dtype of the stored chunk states S_n (default: the input dtype; fp32 for snapshots).
    Returns o [B, T, H, DV], final state [B, H, DK, DV] fp32 or None, and (T, W, S_n, V') for the backward:
    T [B, T, H, BT], W [B, T, H, DK], S_n [B, NT, H, DK, DV], V' [B, T, H, DV]."""
    (B, T, H, DK), DV = q.shape, v.shape[-1]
    NT = triton.cdiv(T, BT)
    c, opts = launch_config(DK, DV, q.dtype)                                     # block sizes, num_warps/stages
    T_mat = k.new_empty(B, T, H, BT)                                             # [B, T, H, BT]: row t holds T_{t, :}
    w, u = torch.empty_like(k), torch.empty_like(v)                              # [B, T, H, DK], [B, T, H, DV]
    wy_representation_kernel[(NT, B * H)](k, v, beta, gc, T_mat, w, u, T, H, DK, DV, BT, c.BK, c.BV,
                                          GATED=gc is not None, **opts)

    h = k.new_empty(B, NT, H, DK, DV, dtype=state_dtype or k.dtype)              # S_n, the state entering chunk n
    v_new, o = torch.empty_like(v), torch.empty_like(v)                          # V', O [B, T, H, DV]
    ht = q.new_empty(B, H, DK, DV, dtype=torch.float32) if output_final_state else None
    chunk_state_pass_kernel[(triton.cdiv(DV, c.BVS), B * H)](
        k, gc, w, u, v_new, h, h0, ht, T, H, NT, DK, DV, BT, c.BKF, c.BVS,
        HAS_H0=h0 is not None, STORE_HT=output_final_state, GATED=gc is not None, **opts)

    grid = (triton.cdiv(DV, c.BV), NT, B * H)
    chunk_output_kernel[grid](q, k, gc, v_new, h, o, scale, T, H, NT, DK, DV, BT, c.BK, c.BV, GATED=gc is not None,
                              **opts)
    return o, ht, (T_mat, w, h, v_new)


class ChunkDeltaRuleFunction(torch.autograd.Function):
    """chunk_delta_rule_fwd -> (o, final state, S_n [B, NT, H, DK, DV], V' [B, T, H, DV]), backward: the hand-written
    chunk_delta_rule_bwd. S_n and V' are differentiable outputs only with keep_states (which stores S_n in fp32).
    gc (G, the in-chunk cumsum of g) gets its gradient here; autograd takes it back through the cumsum to g."""

    @staticmethod
    def forward(ctx, q, k, v, beta, gc, scale, h0, output_final_state, chunk_size, keep_states):
        o, ht, (T_mat, w, h, v_new) = chunk_delta_rule_fwd(q, k, v, beta, scale, h0, output_final_state, chunk_size,
                                                           torch.float32 if keep_states else None, gc)
        ctx.save_for_backward(q, k, v, beta, gc, h0, T_mat, w, h, v_new)
        ctx.scale, ctx.chunk_size = scale, chunk_size
        ctx.set_materialize_grads(False)  # unused outputs give None, not [B, NT, H, DK, DV] of zeros
        if not keep_states:
            ctx.mark_non_differentiable(h, v_new)
        return o, ht, h, v_new

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dht, dh_states, dv_rows):
        q, k, v, beta, gc, h0, T_mat, w, h, v_new = ctx.saved_tensors
        fp32 = lambda g: None if g is None else g.float().contiguous()
        dq, dk, dv, dbeta, dgc, dh0 = chunk_delta_rule_bwd(
            q, k, v, beta, ctx.scale, torch.zeros_like(v) if do is None else do.contiguous(), fp32(dht),
            T_mat, w, h, v_new, ctx.chunk_size, need_dh0=h0 is not None and ctx.needs_input_grad[6],
            dh_states=fp32(dh_states), dv_rows=None if dv_rows is None else dv_rows.contiguous(), gc=gc)
        return dq, dk, dv, dbeta, dgc, None, dh0, None, None, None


def triton_can_run(tensor):
    """True if the kernels can run on `tensor`: it is on CUDA, or TRITON_INTERPRET=1 and the kernels were built for
    the interpreter (the flag must be set before triton is first imported) of triton >= 3.9 (older interpreters take
    int() of a 1-element array for the state pass's run-time loop bound range(NT), which numpy 2.4 rejects)."""
    if not TRITON_AVAILABLE:
        return False
    # every jit object (kernels and the tile helpers, which another import may have built first) for the interpreter
    interpreted = all(type(f).__name__ == "InterpretedFunction" for f in (chunk_output_kernel, load_tile))
    new_enough = tuple(map(int, triton.__version__.split(".")[:2])) >= (3, 9)
    return tensor.is_cuda or (os.environ.get("TRITON_INTERPRET") == "1" and interpreted and new_enough)


def triton_delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False, chunk_size=64,
                      snapshot_at=None, g=None):
    """kernels.delta_rule on the Triton kernels (the sizes they support: module docstring). q, k: [B, T, H, K]
    (L2-normalised), v: [B, T, H, V], beta and g (log-decay, any float dtype; G is summed in fp32) or None:
    [B, T, H], initial_state: [B, H, K, V] (any float dtype) or None."""
    if not TRITON_AVAILABLE:
        raise RuntimeError("triton is not installed; use the torch chunked or recurrent delta rule instead")
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"expected q, k [B, T, H, K] and v [B, T, H, V]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    (B, T, H, DK), DV = q.shape, v.shape[-1]
    h0_shape = None if initial_state is None else tuple(initial_state.shape)
    for ok, message in [
            (beta.shape == (B, T, H), f"beta must be [B, T, H] = {(B, T, H)}; got {tuple(beta.shape)}"),
            (g is None or g.shape == (B, T, H), f"g must be [B, T, H] = {(B, T, H)}; got {g is not None and g.shape}"),
            (h0_shape in (None, (B, H, DK, DV)),
             f"initial_state must be [B, H, K, V] = {(B, H, DK, DV)}; got {h0_shape}"),
            (chunk_size in CHUNK_SIZES, f"chunk_size must be one of {CHUNK_SIZES}; got {chunk_size}"),
            (T >= 1 and DK <= (MAX_K if g is None else MAX_K_GATED) and DV <= MAX_V,
             f"need T >= 1 and head dims K <= {MAX_K} ({MAX_K_GATED} with g), V <= {MAX_V}; got T={T}, K={DK}, V={DV}"),
            (q.dtype == k.dtype == v.dtype and q.dtype in (torch.float32, torch.bfloat16, torch.float16),
             f"q, k, v must share one dtype of float32/bfloat16/float16; got {q.dtype}, {k.dtype}, {v.dtype}"),
            (triton_can_run(q), "triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before importing triton "
                                ">= 3.9)")]:
        if not ok:
            raise ValueError(message)
    scale = DK ** -0.5 if scale is None else float(scale)
    h0 = None if initial_state is None else initial_state.float().contiguous()  # [B, H, K, V] fp32
    q, k, v, beta = q.contiguous(), k.contiguous(), v.contiguous(), beta.contiguous()
    gc = None if g is None else chunk_cumsum(g.float(), chunk_size)[:, :T].contiguous()  # G [B, T, H] fp32
    o, ht, h, v_new = ChunkDeltaRuleFunction.apply(q, k, v, beta, gc, scale, h0, output_final_state, chunk_size,
                                                   snapshot_at is not None)
    if snapshot_at is None:
        return o, ht
    take = lambda positions: states_after(positions, h, k, v_new, chunk_size, gc)  # [B, P] -> [B, P, H, K, V]
    return o, ht, deliver_snapshots(snapshot_at, take, B, T)
