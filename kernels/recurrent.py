"""The (gated) delta rule as an explicit loop over time: the slow, obviously-correct reference.

Every other backend (chunked.py, the Triton kernel) is tested against this file, snapshots (the state after chosen
positions) included: here the state after token t is simply S_t of the loop.
fla convention: the state S has shape [K, V] per head, so reading is S^T q and writing is S + k v'^T.
Gated DeltaNet (Yang, Kautz, Hatamizadeh 2025) adds a per-token log-decay g_t <= 0, applied to the state FIRST:
S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T; g = None runs DeltaNet's loop, skipping the decay.
Precision: the state and every product in fp32 (fp64 for fp64 inputs), also under autocast; the output in v's dtype.
"""
import torch

from .chunked import deliver_snapshots


def delta_rule_step(S, q_t, k_t, v_t, beta_t, g_t=None):
    """One token of the gated delta rule, per head: S [B, H, K, V], q_t (already scaled), k_t [B, H, K],
    v_t [B, H, V], beta_t and g_t (log-decay, or None for DeltaNet) [B, H]. Returns (S_t, o_t [B, H, V])."""
    if g_t is not None:
        S = S * g_t.exp()[..., None, None]                                   # S <- exp(g_t) S: the decay comes first
    v_new = beta_t[..., None] * (v_t - torch.einsum("bhkv,bhk->bhv", S, k_t))  # v'_t = beta_t (v_t - S^T k_t)
    S = S + k_t[..., :, None] * v_new[..., None, :]                          # S_t = S + k_t v'_t^T
    return S, torch.einsum("bhkv,bhk->bhv", S, q_t)                          # o_t = S_t^T (scale q_t)


def recurrent_delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False, snapshot_at=None,
                         g=None):
    """q, k: [B, T, H, K] (already L2-normalised), v: [B, T, H, V], beta: [B, T, H], g: [B, T, H] log-decay or None,
    initial_state: [B, H, K, V] or None; snapshot_at: None, LongTensor [B, P] of positions, or "defer".
    Returns (o [B, T, H, V] in v's dtype, final state [B, H, K, V] fp32 or None), and with snapshot_at a third item
    as chunked_delta_rule's: the states after the positions [B, P, H, K, V] fp32, or ("defer") a function
    positions -> those states. Snapshots keep every S_t alive: T states, fine for a reference."""
    (B, T, H, K), V = q.shape, v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    dtype, acc = v.dtype, torch.promote_types(v.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    with torch.autocast(q.device.type, enabled=False):  # autocast would run the einsums in bf16
        q, k, v, beta = q.to(acc) * scale, k.to(acc), v.to(acc), beta.to(acc)
        g = [None] * T if g is None else g.to(acc).unbind(1)                 # T of [B, H] (or no decay)
        S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(acc)
        outs, states = [], []
        for t in range(T):
            S, o_t = delta_rule_step(S, q[:, t], k[:, t], v[:, t], beta[:, t], g[t])
            outs.append(o_t)
            if snapshot_at is not None:
                states.append(S)
    o = torch.stack(outs, dim=1).to(dtype)                                   # [B, T, H, V]
    final = S if output_final_state else None
    if snapshot_at is None:
        return o, final

    def snapshots(positions):  # [B, P] -> [B, P, H, K, V]: S_t of sequence b for t = positions[b, p]
        picked = [states[t][b] for b, row in enumerate(positions.tolist()) for t in row]   # B*P of [H, K, V]
        return (torch.stack(picked) if picked else S.new_zeros(0, H, K, V)).view(B, -1, H, K, V)
    return o, final, deliver_snapshots(snapshot_at, snapshots, B, T)
