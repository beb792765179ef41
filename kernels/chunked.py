"""The chunked (WY / UT transform) delta rule in plain torch; autograd gives the backward.

Per chunk of C tokens (fla convention, S in R^{K x V}; Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule"):
  1. A = tril(diag(beta) K K^T, -1)            strictly lower triangular          [C, C]
  2. T = (I + A)^{-1}                          unit lower triangular (forward substitution)
  3. W = T diag(beta) K,  U = T diag(beta) V                                       [C, K], [C, V]
  4. V'_n = U_n - W_n S_n;  S_{n+1} = S_n + K_n^T V'_n    (sequential over chunks, fp32)
  5. O_n = scale (Q_n S_n + tril(Q_n K_n^T) V'_n)          (tril keeps the diagonal)
Row r of V'_n is beta_r (v_r - S_{r-1}^T k_r), so the state after token r of chunk n is S_n + K_{n,<=r}^T V'_{n,<=r}:
`snapshot_at` uses this to hand out the (differentiable) state after any position from the same pass.
Precision: everything runs in fp32 (fp64 for fp64 inputs); the output is cast back to v's dtype.
"""
import torch
import torch.nn.functional as F


def chunked_delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False, chunk_size=64,
                       snapshot_at=None):
    """q, k: [B, T, H, K], v: [B, T, H, V], beta: [B, T, H], initial_state: [B, H, K, V] or None,
    snapshot_at: LongTensor [B, P] of token positions, None, or "defer".
    Returns (o [B, T, H, V], final_state [B, H, K, V] fp32 or None, snapshots [B, P, H, K, V] fp32 or None);
    with "defer" the third item is a function positions [B, P] -> snapshots, to call once positions are chosen
    (REFINE picks them from the logits of this very pass)."""
    B, T, H, K = q.shape
    V, C, dtype = v.shape[-1], chunk_size, v.dtype
    acc = torch.promote_types(v.dtype, torch.float32)  # fp32, or fp64 when the inputs are fp64
    scale = K ** -0.5 if scale is None else scale
    N = (T + C - 1) // C
    pad = N * C - T  # zero k, v and beta leave the state untouched, so padding is exact

    def chunks(x):  # [B, T, H, d] -> [B, H, N, C, d]
        x = F.pad(x.to(acc).transpose(1, 2), (0, 0, 0, pad))
        return x.reshape(B, H, N, C, x.shape[-1])

    q, k, v = chunks(q) * scale, chunks(k), chunks(v)
    beta = F.pad(beta.to(acc).transpose(1, 2), (0, pad)).reshape(B, H, N, C, 1)        # [B, H, N, C, 1]
    kb, vb = k * beta, v * beta                                                         # diag(beta) K, diag(beta) V
    A = torch.tril(kb @ k.transpose(-1, -2), -1)                                        # step 1, [B, H, N, C, C]
    eye = torch.eye(C, device=q.device, dtype=acc)
    Tinv = torch.linalg.solve_triangular(eye + A, eye.expand_as(A), upper=False, unitriangular=True)  # step 2
    W, U = Tinv @ kb, Tinv @ vb                                                         # step 3, [B, H, N, C, K|V]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    QK = (q @ k.transpose(-1, -2)).masked_fill(~causal, 0)                              # [B, H, N, C, C]

    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(acc)
    states, v_news, outs = [], [], []
    for n in range(N):
        v_new = U[:, :, n] - W[:, :, n] @ S                                             # step 4: V'_n = U_n - W_n S_n
        outs.append(q[:, :, n] @ S + QK[:, :, n] @ v_new)                               # step 5: O_n
        states.append(S)
        v_news.append(v_new)
        S = S + k[:, :, n].transpose(-1, -2) @ v_new                                    # S_{n+1} = S_n + K_n^T V'_n
    o = torch.stack(outs, dim=2).reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2)    # [B, T, H, V]

    def snapshots(positions):  # [B, P] -> [B, P, H, K, V]: S_n + K_{n,<=r}^T V'_{n,<=r} for t = n*C + r
        P = positions.shape[1]
        rows = [(b, t // C, t % C) for b, row in enumerate(positions.tolist()) for t in row]
        S_n = torch.stack([states[n][b] for b, n, _ in rows])                          # [B*P, H, K, V]
        K_n = torch.stack([k[b, :, n] for b, n, _ in rows])                            # [B*P, H, C, K]
        V_n = torch.stack([v_news[n][b] for b, n, _ in rows])                          # [B*P, H, C, V]
        upto = torch.tensor([r for *_, r in rows], device=k.device)[:, None, None, None]
        K_n = K_n * (torch.arange(C, device=k.device)[None, None, :, None] <= upto)     # keep rows <= r
        return (S_n + K_n.transpose(-1, -2) @ V_n).view(B, P, H, K, V)

    final = S if output_final_state else None
    if isinstance(snapshot_at, str) and snapshot_at == "defer":
        return o.to(dtype), final, snapshots
    return o.to(dtype), final, (None if snapshot_at is None else snapshots(snapshot_at))


