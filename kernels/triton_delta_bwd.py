"""Hand-written backward of the chunked delta rule (triton_delta.py): the forward steps 5, 4, 3-1 in reverse.

Per chunk n (shapes [C, DK] for Q, K, W; [C, DV] for V, U, V', dO; [DK, DV] for states), with dS_{n+1} the
gradient of the state leaving chunk n (dS_N = the gradient flowing into the final state, or 0). With snapshots, S_n
and V'_n are outputs too and bring gradients of their own from outside, G_n and G'_n (zero without snapshots):
  step 5 (O_n = scale (Q_n S_n + tril(Q_n K_n^T) V'_n)) and step 4 (V'_n = U_n - W_n S_n, S_{n+1} = S_n + K_n^T V'_n):
    dV'_n = scale tril(Q_n K_n^T)^T dO_n + G'_n + K_n dS_{n+1}   chunk_output_bwd_dv_kernel + chunk_state_pass_bwd
    dS_n  = dS_{n+1} + scale Q_n^T dO_n - W_n^T dV'_n + G_n       chunk_state_pass_bwd (sequential, n = N-1 .. 0)
    dP    = scale tril(dO_n V'_n^T)                               chunk_output_bwd_dqk
    dQ_n  = scale dO_n S_n^T + dP K_n,   dK_n = dP^T Q_n + V'_n dS_{n+1}^T,   dW_n = -dV'_n S_n^T,   dU_n = dV'_n
  steps 3-1 (W = T diag(beta) K, U = T diag(beta) V, T = (I + A)^-1, A = tril(diag(beta) K K^T, -1)):
    dT = dW (diag(beta) K)^T + dU (diag(beta) V)^T;   dK += diag(beta) T^T dW;   dV = diag(beta) T^T dU
    dA = -tril(T^T dT T^T, -1);   dK += diag(beta) dA K + (diag(beta) dA)^T K
    dbeta = rowsum(K * T^T dW) + rowsum(V * T^T dU) + rowsum(dA * K K^T)      wy_representation_bwd_kernel
The initial-state gradient is dS_0. Precision as in the forward: fp32 accumulation, dot operands in the input dtype.
Gated DeltaNet (GATED): Q_n, K_n (state part), tril become diag(exp(G)) Q_n, diag(exp(G_last - G)) K_n, tril o Gam;
dS_n gets exp(G_last) dS_{n+1}; W's diag(beta) K becomes diag(beta exp(G)) K; A gets o Gam. Each factor exp(G_i - G_j)
multiplies a term bilinear in rows i and j, so with dQ, dK of steps 4-5 and X = dA o A:
    dG_i = rowsum(Q o dQ)_i - rowsum(K o dK)_i + beta_i exp(G_i) rowsum(K o T^T dW)_i + rowsum(X)_i - colsum(X)_i,
plus sum(K o dK_state) + exp(G_last) <dS_{n+1}, S_n> on the chunk's last row; chunk_cumsum's autograd makes it dg.
"""
import torch

from .triton_tiles import decay_matrix, launch_config, load_decay, load_rows, load_tile, store_tile, tl, triton


@triton.jit
def chunk_output_bwd_dv_kernel(q, k, gc, do, dv_rows, dv, scale, seq_len, H, DK: tl.constexpr, DV: tl.constexpr,
                               BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_DV_ROWS: tl.constexpr,
                               GATED: tl.constexpr):
    """Intra-chunk part of dV'_n = scale tril(Q_n K_n^T)^T dO_n + G'_n, [BT, DV], for chunk program_id(0) of
    (b, h) = program_id(1); G'_n is read from dv_rows [B, T, H, DV] if HAS_DV_ROWS (a gradient into V' itself).
    Written to dv [B, T, H, DV] (chunk_state_pass_bwd adds K_n dS_{n+1} in place)."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    row0 = i_b.to(tl.int64) * seq_len * H + i_h
    t0 = i_n * BT
    KQt = tl.zeros([BT, BT], dtype=tl.float32)
    for c0 in range(0, DK, BK):
        q_b = load_tile(q + row0 * DK, t0, seq_len, H * DK, c0, DK, BT, BK)       # [BT, BK]
        k_b = load_tile(k + row0 * DK, t0, seq_len, H * DK, c0, DK, BT, BK)       # [BT, BK]
        KQt += tl.dot(k_b, tl.trans(q_b))                                        # (Q K^T)^T  [BT, BT]
    rows = tl.arange(0, BT)
    KQt = tl.where(rows[:, None] <= rows[None, :], KQt, 0.0)                     # transpose of tril incl. diagonal
    if GATED:
        Gc, _ = load_decay(gc + row0, t0, seq_len, H, BT)
        KQt = KQt * tl.trans(decay_matrix(Gc, BT))                               # (Q K^T o Gam)^T
    for v0 in range(0, DV, BV):
        do_b = load_tile(do + row0 * DV, t0, seq_len, H * DV, v0, DV, BT, BV)     # [BT, BV]
        dv_b = scale * tl.dot(KQt.to(do_b.dtype), do_b)                          # [BT, BV]
        if HAS_DV_ROWS:                                                          # + G'_n
            dv_b += load_tile(dv_rows + row0 * DV, t0, seq_len, H * DV, v0, DV, BT, BV).to(tl.float32)
        store_tile(dv + row0 * DV, dv_b, t0, seq_len, H * DV, v0, DV, BT, BV)


@triton.jit
def chunk_state_pass_bwd_kernel(q, k, gc, w, do, dv, dh, dht, dh_states, dh0, scale, seq_len, H, NT,
                                DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BKF: tl.constexpr,
                                BV: tl.constexpr, HAS_DHT: tl.constexpr, HAS_DH_STATES: tl.constexpr,
                                STORE_DH0: tl.constexpr, GATED: tl.constexpr):
    """Reverse of step 4 for value columns [v0, v0 + BV) of (b, h) = program_id(1), sequential over n = NT-1 .. 0
    with dS [BKF, BV] in fp32; dh[b, n, h] = dS_{n+1}; G_n = dh_states[b, n, h] (fp32 [B, NT, H, DK, DV]) if
    HAS_DH_STATES. dv holds the intra-chunk part on entry and the full dV' on exit. dht, dh0: [B, H, DK, DV] fp32."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    row0 = i_b.to(tl.int64) * seq_len * H + i_h
    v0 = i_v * BV
    if HAS_DHT:
        dS = load_tile(dht + i_bh.to(tl.int64) * DK * DV, 0, DK, DV, v0, DV, BKF, BV).to(tl.float32)
    else:
        dS = tl.zeros([BKF, BV], dtype=tl.float32)                               # dS_N = 0
    for i in range(NT):
        n = NT - 1 - i
        t0 = n * BT
        dh_n = dh + ((i_b.to(tl.int64) * NT + n) * H + i_h) * DK * DV
        store_tile(dh_n, dS, 0, DK, DV, v0, DV, BKF, BV)                         # dS_{n+1}, for dK_n
        q_n = load_tile(q + row0 * DK, t0, seq_len, H * DK, 0, DK, BT, BKF)       # [BT, BKF]
        k_n = load_tile(k + row0 * DK, t0, seq_len, H * DK, 0, DK, BT, BKF)       # [BT, BKF]
        w_n = load_tile(w + row0 * DK, t0, seq_len, H * DK, 0, DK, BT, BKF)       # [BT, BKF]
        do_n = load_tile(do + row0 * DV, t0, seq_len, H * DV, v0, DV, BT, BV)     # [BT, BV]
        dv_n = load_tile(dv + row0 * DV, t0, seq_len, H * DV, v0, DV, BT, BV)     # [BT, BV] intra part
        if GATED:  # exp(G) Q_n, exp(G_last - G) K_n, and dS_{n+1} reaches S_n through exp(G_last)
            Gc, last = load_decay(gc + row0, t0, seq_len, H, BT)
            q_n = (q_n * tl.exp(Gc)[:, None]).to(q_n.dtype)
            k_n = (k_n * tl.exp(last - Gc)[:, None]).to(k_n.dtype)
        dv_n = dv_n + tl.dot(k_n, dS.to(k_n.dtype))                              # dV'_n += K_n dS_{n+1}
        store_tile(dv + row0 * DV, dv_n, t0, seq_len, H * DV, v0, DV, BT, BV)
        if GATED:
            dS = dS * tl.exp(last)
        dS += scale * tl.dot(tl.trans(q_n), do_n)                                # + scale Q_n^T dO_n
        dS -= tl.dot(tl.trans(w_n), dv_n.to(w_n.dtype))                          # - W_n^T dV'_n
        if HAS_DH_STATES:                                                        # + G_n: now dS = dS_n
            g_n = dh_states + ((i_b.to(tl.int64) * NT + n) * H + i_h) * DK * DV
            dS += load_tile(g_n, 0, DK, DV, v0, DV, BKF, BV).to(tl.float32)
    if STORE_DH0:
        store_tile(dh0 + i_bh.to(tl.int64) * DK * DV, dS, 0, DK, DV, v0, DV, BKF, BV)


@triton.jit
def chunk_output_bwd_dqk_kernel(q, k, gc, v_new, do, dv, h, dh, dq, dk, dw, dg, dg_stride, scale, seq_len, H, NT,
                                DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                                BV: tl.constexpr, GATED: tl.constexpr):
    """dQ_n, dK_n, dW_n (module docstring; each [BT, BK]) for key columns [c0, c0 + BK), c0 = program_id(0) * BK,
    of chunk n = program_id(1), (b, h) = program_id(2); the DV sums run over [BT, BV] / [BK, BV] blocks.
    dq is final; dk [B, T, H, DK] fp32 gets the part from steps 4-5 (wy_representation_bwd adds the rest).
    GATED: this key block's share of dG (module docstring) into dg + program_id(0) * dg_stride, [B, T, H] fp32."""
    i_k, i_n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    row0 = i_b.to(tl.int64) * seq_len * H + i_h
    t0, c0 = i_n * BT, i_k * BK
    state = ((i_b.to(tl.int64) * NT + i_n) * H + i_h) * DK * DV                  # offset of S_n and dS_{n+1}
    dP = tl.zeros([BT, BT], dtype=tl.float32)
    dQ = tl.zeros([BT, BK], dtype=tl.float32)
    dK = tl.zeros([BT, BK], dtype=tl.float32)
    dW = tl.zeros([BT, BK], dtype=tl.float32)
    if GATED:
        SdS = tl.zeros([BK], dtype=tl.float32)                                   # <S_n, dS_{n+1}> per key row
    for v0 in range(0, DV, BV):
        do_b = load_tile(do + row0 * DV, t0, seq_len, H * DV, v0, DV, BT, BV)     # [BT, BV]
        vn_b = load_tile(v_new + row0 * DV, t0, seq_len, H * DV, v0, DV, BT, BV)  # [BT, BV]
        dvn_b = load_tile(dv + row0 * DV, t0, seq_len, H * DV, v0, DV, BT, BV)    # [BT, BV]
        S_b = load_tile(h + state, c0, DK, DV, v0, DV, BK, BV).to(do_b.dtype)      # [BK, BV] (fp32 if snapshots)
        dS_b = load_tile(dh + state, c0, DK, DV, v0, DV, BK, BV).to(do_b.dtype)    # [BK, BV]
        dP += tl.dot(do_b, tl.trans(vn_b))                                       # dO_n V'_n^T
        dQ += tl.dot(do_b, tl.trans(S_b))                                        # dO_n S_n^T
        dK += tl.dot(vn_b, tl.trans(dS_b))                                       # V'_n dS_{n+1}^T
        dW -= tl.dot(dvn_b.to(do_b.dtype), tl.trans(S_b))                        # -dV'_n S_n^T
        if GATED:
            SdS += tl.sum(S_b.to(tl.float32) * dS_b.to(tl.float32), axis=1)
    rows = tl.arange(0, BT)
    dP = scale * tl.where(rows[:, None] >= rows[None, :], dP, 0.0)              # [BT, BT]
    q_b = load_tile(q + row0 * DK, t0, seq_len, H * DK, c0, DK, BT, BK)           # [BT, BK]
    k_b = load_tile(k + row0 * DK, t0, seq_len, H * DK, c0, DK, BT, BK)           # [BT, BK]
    if GATED:
        Gc, last = load_decay(gc + row0, t0, seq_len, H, BT)
        dQ, dK, dP = dQ * tl.exp(Gc)[:, None], dK * tl.exp(last - Gc)[:, None], dP * decay_matrix(Gc, BT)
        dG_last = tl.sum(k_b.to(tl.float32) * dK) + tl.exp(last) * tl.sum(SdS)   # exp(G_last) in S_{n+1}
    dQ = scale * dQ + tl.dot(dP.to(k_b.dtype), k_b)
    dK += tl.dot(tl.trans(dP).to(q_b.dtype), q_b)
    if GATED:
        r = t0 + rows
        dG = tl.sum(q_b.to(tl.float32) * dQ, axis=1) - tl.sum(k_b.to(tl.float32) * dK, axis=1)
        dG += tl.where(r == tl.minimum(t0 + BT, seq_len) - 1, dG_last, 0.0)
        tl.store(dg + i_k.to(tl.int64) * dg_stride + row0 + r * H, dG, mask=r < seq_len)
    store_tile(dq + row0 * DK, dQ, t0, seq_len, H * DK, c0, DK, BT, BK)
    store_tile(dk + row0 * DK, dK, t0, seq_len, H * DK, c0, DK, BT, BK)
    store_tile(dw + row0 * DK, dW, t0, seq_len, H * DK, c0, DK, BT, BK)


@triton.jit
def wy_representation_bwd_kernel(k, v, beta, gc, T_in, dw, du, dk_in, dk, dv, dbeta, dg, seq_len, H,
                                 DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                                 BV: tl.constexpr, GATED: tl.constexpr):
    """Reverse of steps 3, 2, 1 for chunk program_id(0) of (b, h) = program_id(1) (module docstring):
    reads T, dW, dU = dV' and the step 4-5 part of dK (dk_in, fp32); writes the final dK, dV and dbeta, and
    (GATED) the steps 1-3 share of dG into dg [B, T, H] fp32."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    row0 = i_b.to(tl.int64) * seq_len * H + i_h
    t0 = i_n * BT
    b = load_rows(beta + row0, t0, seq_len, H, BT)                               # [BT] fp32
    bw, ew = b, 1.0                                      # W's row weights beta exp(G), and exp(G) (1 without a gate)
    if GATED:
        Gc, _ = load_decay(gc + row0, t0, seq_len, H, BT)
        ew = tl.exp(Gc)
        bw = b * ew
    T = load_tile(T_in + row0 * BT, t0, seq_len, H * BT, 0, BT, BT, BT)          # [BT, BT]
    dT = tl.zeros([BT, BT], dtype=tl.float32)
    KKt = tl.zeros([BT, BT], dtype=tl.float32)
    db = tl.zeros([BT], dtype=tl.float32)
    for c0 in range(0, DK, BK):                                                  # dT += dW (diag(bw) K)^T
        k_b = load_tile(k + row0 * DK, t0, seq_len, H * DK, c0, DK, BT, BK)       # [BT, BK]
        dw_b = load_tile(dw + row0 * DK, t0, seq_len, H * DK, c0, DK, BT, BK)     # [BT, BK]
        dT += tl.dot(dw_b, tl.trans((bw[:, None] * k_b).to(k_b.dtype)))
        KKt += tl.dot(k_b, tl.trans(k_b))
    for v0 in range(0, DV, BV):                                                  # dT += dU (diag(beta) V)^T
        v_b = load_tile(v + row0 * DV, t0, seq_len, H * DV, v0, DV, BT, BV)       # [BT, BV]
        du_b = load_tile(du + row0 * DV, t0, seq_len, H * DV, v0, DV, BT, BV)     # [BT, BV]
        dT += tl.dot(du_b.to(v_b.dtype), tl.trans((b[:, None] * v_b).to(v_b.dtype)))
        G = tl.dot(tl.trans(T).to(v_b.dtype), du_b.to(v_b.dtype))               # T^T dU  [BT, BV]
        store_tile(dv + row0 * DV, b[:, None] * G, t0, seq_len, H * DV, v0, DV, BT, BV)  # dV = diag(beta) T^T dU
        db += tl.sum(v_b * G, axis=1)
    # T = (I + A)^-1  =>  dA = -T^T dT T^T, kept on the strictly lower part where A has free entries
    Tt = tl.trans(T).to(tl.float32)
    dA = -tl.dot(tl.dot(Tt, dT), Tt)
    rows = tl.arange(0, BT)
    dA = tl.where(rows[:, None] > rows[None, :], dA, 0.0)                        # [BT, BT]
    if GATED:                                                                    # A_ij = beta_i k_i . k_j Gam_ij
        dA = dA * decay_matrix(Gc, BT)
        X = b[:, None] * dA * KKt                                                # dA o A
        dG = tl.sum(X, axis=1) - tl.sum(X, axis=0)
    db += tl.sum(dA * KKt, axis=1)                                               # A_ij = beta_i k_i . k_j
    dAb = b[:, None] * dA                                                        # diag(beta) dA
    for c0 in range(0, DK, BK):
        k_b = load_tile(k + row0 * DK, t0, seq_len, H * DK, c0, DK, BT, BK)       # [BT, BK]
        dw_b = load_tile(dw + row0 * DK, t0, seq_len, H * DK, c0, DK, BT, BK)     # [BT, BK]
        dk_b = load_tile(dk_in + row0 * DK, t0, seq_len, H * DK, c0, DK, BT, BK)  # [BT, BK] fp32
        G = tl.dot(tl.trans(T).to(k_b.dtype), dw_b)                               # T^T dW  [BT, BK]
        kG = tl.sum(k_b * G, axis=1)                                             # rowsum(K o T^T dW)
        db += ew * kG
        if GATED:
            dG += bw * kG
        dk_b += bw[:, None] * G                                                  # + diag(bw) T^T dW
        dk_b += tl.dot(dAb.to(k_b.dtype), k_b) + tl.dot(tl.trans(dAb).to(k_b.dtype), k_b)
        store_tile(dk + row0 * DK, dk_b, t0, seq_len, H * DK, c0, DK, BT, BK)
    r = t0 + rows
    tl.store(dbeta + row0 + r * H, db.to(dbeta.dtype.element_ty), mask=r < seq_len)
    if GATED:
        tl.store(dg + row0 + r * H, dG, mask=r < seq_len)


def chunk_delta_rule_bwd(q, k, v, beta, scale, do, dht, T_mat, w, h, v_new, BT, need_dh0, dh_states=None,
                         dv_rows=None, gc=None):
    """Gradients of the chunked delta rule. q, k [B, T, H, DK], v, do [B, T, H, DV], beta [B, T, H], dht
    [B, H, DK, DV] fp32 or None; T_mat, w, h, v_new as saved by chunk_delta_rule_fwd; dh_states [B, NT, H, DK, DV]
    fp32 or None and dv_rows [B, T, H, DV] or None: gradients into the chunk states S_n and the rows of V';
    gc [B, T, H] fp32 (G, Gated DeltaNet) or None. Returns dq, dk, dv, dbeta (dtypes of the inputs), dG [B, T, H]
    fp32 (None without gc) and dh0 [B, H, DK, DV] fp32 (None unless need_dh0)."""
    (B, T, H, DK), DV = q.shape, v.shape[-1]
    NT = triton.cdiv(T, BT)
    c, opts = launch_config(DK, DV, q.dtype)                                     # block sizes, num_warps/stages
    dv_new = torch.empty_like(v)                                                 # dV' (intra part, then full)
    gated, NK = gc is not None, triton.cdiv(DK, c.BK)
    chunk_output_bwd_dv_kernel[(NT, B * H)](q, k, gc, do, dv_rows, dv_new, scale, T, H, DK, DV, BT, c.BK, c.BV,
                                            HAS_DV_ROWS=dv_rows is not None, GATED=gated, **opts)

    dh = torch.empty_like(h)                                                     # dS_{n+1} per chunk n
    dh0 = q.new_empty(B, H, DK, DV, dtype=torch.float32) if need_dh0 else None
    chunk_state_pass_bwd_kernel[(triton.cdiv(DV, c.BVS), B * H)](
        q, k, gc, w, do, dv_new, dh, dht, dh_states, dh0, scale, T, H, NT, DK, DV, BT, c.BKF, c.BVS,
        HAS_DHT=dht is not None, HAS_DH_STATES=dh_states is not None, STORE_DH0=need_dh0, GATED=gated, **opts)

    dq, dw = torch.empty_like(q), torch.empty_like(w)
    dk_state = torch.empty_like(k, dtype=torch.float32)
    dg = gc.new_empty(1 + NK, B, T, H) if gated else None                       # shares of dG: steps 1-3, key blocks
    chunk_output_bwd_dqk_kernel[(NK, NT, B * H)](
        q, k, gc, v_new, do, dv_new, h, dh, dq, dk_state, dw, dg[1:] if gated else None, B * T * H, scale, T, H, NT,
        DK, DV, BT, c.BK, c.BV, GATED=gated, **opts)

    dk, dv, dbeta = torch.empty_like(k), torch.empty_like(v), torch.empty_like(beta)
    wy_representation_bwd_kernel[(NT, B * H)](k, v, beta, gc, T_mat, dw, dv_new, dk_state, dk, dv, dbeta,
                                              dg[0] if gated else None, T, H, DK, DV, BT, c.BK, c.BV, GATED=gated,
                                              **opts)
    return dq, dk, dv, dbeta, dg.sum(0) if gated else None, dh0
