"""The chunked (WY / UT transform) delta rule in plain torch; autograd gives the backward.

Per chunk of C tokens (fla convention, S in R^{K x V}; Yang et al. 2024, arXiv 2406.06484, the WY form):
  1. A = tril(diag(beta) K K^T, -1)            strictly lower triangular          [C, C]
  2. T = (I + A)^{-1}                          unit lower triangular (forward substitution)
  3. W = T diag(beta) K,  U = T diag(beta) V                                       [C, K], [C, V]
  4. V'_n = U_n - W_n S_n;  S_{n+1} = S_n + K_n^T V'_n    (sequential over chunks, fp32)
  5. O_n = scale (Q_n S_n + tril(Q_n K_n^T) V'_n)          (tril keeps the diagonal)
Row r of V'_n is beta_r (v_r - S_{r-1}^T k_r), so the state after token r of chunk n is S_n + K_{n,<=r}^T V'_{n,<=r}:
`states_after` computes it from the chunk states and V' of one pass, here and for the Triton kernel alike, so
`snapshot_at` hands out the (differentiable) state after any position without a second pass.
Gated DeltaNet (g: per-token log-decay; G: its inclusive cumsum inside each chunk; Gam_ij = exp(G_i - G_j) for i >= j
and 0 above the diagonal, selected before exp: no positive exponent is ever taken) changes six places: A o Gam;
W = T diag(beta exp(G)) K; exp(G) on the queries reading S_n; tril(Q K^T) o Gam; S_{n+1} = exp(G_last) S_n +
(diag(exp(G_last - G)) K_n)^T V'_n; the state after token r is exp(G_r) S_n + sum_{j <= r} exp(G_r - G_j) k_j v'_j^T.
Precision: everything (G too) runs in fp32 (fp64 for fp64 inputs), also under autocast; the output in v's dtype.
"""
import torch
import torch.nn.functional as F


def chunked_delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False, chunk_size=64,
                       snapshot_at=None, g=None):
    """q, k: [B, T, H, K], v: [B, T, H, V], beta and g (log-decay, or None): [B, T, H],
    initial_state: [B, H, K, V] or None, snapshot_at: LongTensor [B, P] of token positions, None, or "defer".
    Returns (o [B, T, H, V], final_state [B, H, K, V] fp32 or None, snapshots [B, P, H, K, V] fp32 or None);
    with "defer" the third item is a function positions [B, P] -> snapshots, to call once positions are chosen
    (REFINE picks them from the logits of this very pass)."""
    with torch.autocast(q.device.type, enabled=False):  # autocast would run the matmuls below in bf16
        return _chunked(q, k, v, beta, scale, initial_state, output_final_state, chunk_size, snapshot_at, g)


def _chunked(q, k, v, beta, scale, initial_state, output_final_state, chunk_size, snapshot_at, g):
    B, T, H, K = q.shape
    V, C, dtype = v.shape[-1], chunk_size, v.dtype
    acc = torch.promote_types(v.dtype, torch.float32)  # fp32, or fp64 when the inputs are fp64
    scale = K ** -0.5 if scale is None else scale
    N = (T + C - 1) // C
    pad = N * C - T  # zero k, v and beta leave the state untouched, so padding is exact
    k_rows = k.to(acc)                                                                  # [B, T, H, K]

    def chunks(x):  # [B, T, H, d] -> [B, H, N, C, d]
        x = F.pad(x.to(acc).transpose(1, 2), (0, 0, 0, pad))
        return x.reshape(B, H, N, C, x.shape[-1])

    q, k, v = chunks(q) * scale, chunks(k), chunks(v)
    beta = F.pad(beta.to(acc).transpose(1, 2), (0, pad)).reshape(B, H, N, C, 1)        # [B, H, N, C, 1]
    kb, vb = k * beta, v * beta                                                         # diag(beta) K, diag(beta) V
    A, kw, q_in, k_out = kb @ k.transpose(-1, -2), kb, q, k                             # [B, H, N, C, C]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    QK = (q @ k.transpose(-1, -2)).masked_fill(~causal, 0)                              # [B, H, N, C, C]
    if g is not None:  # the gate's six places (module docstring)
        G = chunk_cumsum(g.to(acc), C).transpose(1, 2).reshape(B, H, N, C, 1)          # [B, H, N, C, 1]
        Gam = torch.where(causal, G - G.transpose(-1, -2), -torch.inf).exp()           # [B, H, N, C, C]
        A, QK, kw = A * Gam, QK * Gam, kb * G.exp()                                     # diag(beta exp(G)) K
        q_in, k_out, decay = q * G.exp(), k * (G[..., -1:, :] - G).exp(), G[..., -1:, :].exp()
    A = torch.tril(A, -1)                                                               # step 1
    eye = torch.eye(C, device=q.device, dtype=acc)
    Tinv = torch.linalg.solve_triangular(eye + A, eye.expand_as(A), upper=False, unitriangular=True)  # step 2
    W, U = Tinv @ kw, Tinv @ vb                                                         # step 3, [B, H, N, C, K|V]

    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(acc)
    states, v_news, outs = [], [], []
    for n in range(N):
        v_new = U[:, :, n] - W[:, :, n] @ S                                             # step 4: V'_n = U_n - W_n S_n
        outs.append(q_in[:, :, n] @ S + QK[:, :, n] @ v_new)                            # step 5: O_n
        states.append(S)
        v_news.append(v_new)
        if n + 1 < N or output_final_state:  # the state after the last chunk only when it is asked for
            S = (S if g is None else decay[:, :, n] * S) + k_out[:, :, n].transpose(-1, -2) @ v_new  # S_{n+1}
    o = torch.stack(outs, dim=2).reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2)    # [B, T, H, V]

    def snapshots(positions):  # [B, P] -> [B, P, H, K, V]; the stacks are built only when asked for
        chunk_states = torch.stack(states, dim=1)                                       # [B, N, H, K, V]
        rows = torch.stack(v_news, dim=2).reshape(B, H, N * C, V).transpose(1, 2)      # V' [B, N*C, H, V]
        G_rows = None if g is None else G.reshape(B, H, N * C).transpose(1, 2)          # [B, N*C, H]
        return states_after(positions, chunk_states, k_rows, rows, C, G_rows)

    final = S if output_final_state else None
    return o.to(dtype), final, deliver_snapshots(snapshot_at, snapshots, B, T)


def states_after(positions, chunk_states, k, v_new, chunk_size, G=None):
    """The state after token t = n*C + r (C = chunk_size) for every t in positions: S_n + K_{n,<=r}^T V'_{n,<=r}, or
    gated exp(G_r) S_n + sum_{j <= r} exp(G_r - G_j) k_j v'_j^T.
    positions: LongTensor [B, P] in [0, T); chunk_states: [B, N, H, K, V] (S_n, the state entering chunk n);
    k: [B, T, H, K]; v_new: [B, T', H, V] with T' >= T (row t is v'_t = beta_t (v_t - exp(g_t) S_{t-1}^T k_t));
    G: [B, T', H] (chunk_cumsum of g) or None. Returns [B, P, H, K, V] in fp32 (fp64 for fp64 states),
    differentiable in all four; a gather of P chunks."""
    B, P = positions.shape
    C, T = chunk_size, k.shape[1]
    acc = torch.promote_types(chunk_states.dtype, torch.float32)
    n, r = positions // C, positions % C                                                # chunk, row in it  [B, P]
    offsets = torch.arange(C, device=positions.device)                                 # [C]
    rows = (n[..., None] * C + offsets).clamp(max=T - 1)                               # token rows of chunk n [B, P, C]
    keep = (offsets <= r[..., None])[..., None, None]                                  # rows <= r  [B, P, C, 1, 1]

    def take(x, idx):  # x[b, idx[b, ...]] for x [B, L, ...]: an index_select of flattened rows, whose backward is an
        # index_add (advanced indexing's backward, an accumulating index_put, costs ten times more on CPU)
        flat = idx + x.shape[1] * torch.arange(B, device=idx.device).view(-1, *[1] * (idx.dim() - 1))
        return x.flatten(0, 1).index_select(0, flat.flatten()).view(*idx.shape, *x.shape[2:])

    with torch.autocast(positions.device.type, enabled=False):
        S_n = take(chunk_states, n).to(acc)                                             # [B, P, H, K, V]
        if G is not None:  # keep becomes exp(G_r - G_j) on rows j <= r, selected before exp  [B, P, C, H, 1]
            G_r, G_j = take(G, positions).to(acc), take(G, rows).to(acc)                # [B, P, H], [B, P, C, H]
            keep = torch.where(keep[..., 0], G_r[:, :, None] - G_j, -torch.inf).exp()[..., None]
            S_n = S_n * G_r.exp()[..., None, None]                                      # exp(G_r) S_n
        K_r = take(k, rows).to(acc) * keep                                              # K_{n,<=r}  [B, P, C, H, K]
        V_r = take(v_new, rows).to(acc)                                                 # V'_n       [B, P, C, H, V]
        return S_n + torch.einsum("bpchk,bpchv->bphkv", K_r, V_r)                     # S_n + K^T V'


def chunk_cumsum(g, chunk_size):
    """[B, T, H] -> [B, N * C, H] (C = chunk_size, N = ceil(T / C)): G, the inclusive cumsum of the log-decay g inside
    each chunk, restarting every chunk, in g's dtype (fp32 or fp64); padded rows (g = 0) repeat the chunk's last G."""
    B, T, H = g.shape
    return F.pad(g, (0, 0, 0, (-T) % chunk_size)).view(B, -1, chunk_size, H).cumsum(2).view(B, -1, H)


def deliver_snapshots(snapshot_at, take, B, T):
    """A delta rule's snapshots: None (snapshot_at None), take(snapshot_at) for positions [B, P], or ("defer": REFINE
    chooses the positions after the pass) the function `take`; either way the positions are checked first."""
    def checked(positions):  # [B, P] -> [B, P, H, K, V]
        if positions.dim() != 2 or positions.shape[0] != B or positions.is_floating_point():
            raise ValueError(f"snapshot positions must be an integer tensor [B={B}, P]; got {tuple(positions.shape)} "
                             f"{positions.dtype}")
        if positions.numel() and not (0 <= int(positions.min()) and int(positions.max()) < T):
            raise ValueError(f"snapshot positions must lie in [0, {T - 1}]")
        return take(positions)

    if snapshot_at is None:
        return None
    if isinstance(snapshot_at, str):
        if snapshot_at != "defer":
            raise ValueError(f"snapshot_at must be None, 'defer' or positions [B, P]; got {snapshot_at!r}")
        return checked
    return checked(snapshot_at)
