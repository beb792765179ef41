"""Fast-weight token mixers: the DeltaNet layer (and shared pieces used by lact.py).

Each mixer offers three ways to run that must agree (tests/test_model.py):
  forward(x, snapshot_at=None) -> (y, snapshots)   full sequence; optionally the state after chosen positions
  step(x, state) -> (y, new_state)                  continue from a state (decoding), never in place
  init_state(batch_size, device) -> state           the empty state
A state is a flat dict of tensors whose first dimension is the batch, so it can be indexed, repeated and detached
entry by entry (see `map_state`).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import delta_rule


class RMSNorm(nn.Module):
    """y = x * rsqrt(mean(x^2) + eps) * w, computed in fp32 (fp64 for fp64 input), returned in x's dtype."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # [..., dim]
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(xf.dtype)).to(x.dtype)


def map_state(fn, state):
    """Apply fn to every tensor of a state dict (index rows, repeat, detach, move)."""
    return {name: fn(t) for name, t in state.items()}


def l2norm(x, eps=1e-6):
    """x / sqrt(sum(x^2) + eps) over the last dim, in fp32 (eps inside the sqrt, as fla)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


class ShortConv(nn.Conv1d):
    """Causal depthwise convolution (kernel w, left zero padding w-1, the LAST tap multiplies the current token)
    followed by SiLU. Stored like fla's ShortConvolution: weight [D, 1, w], no bias."""

    def __init__(self, dim, width):
        super().__init__(dim, dim, width, groups=dim, bias=False)

    def forward(self, x, tail=None):
        """x: [B, T, D] pre-activation inputs; tail: [B, w-1, D] the inputs before x (zeros at the start).
        Returns (silu(conv) [B, T, D], new tail [B, w-1, D])."""
        w = self.kernel_size[0]
        if tail is None:
            tail = x.new_zeros(x.shape[0], w - 1, x.shape[2])
        xt = torch.cat([tail, x], dim=1)                                       # [B, w-1+T, D]
        if x.shape[1] < w:  # decoding: w products cost less than a convolution call (x's dtype out, as conv1d)
            y = (xt.unfold(1, w, 1) * self.weight[:, 0]).sum(-1).to(xt.dtype)   # [B, T, D, w] -> [B, T, D]
        else:
            y = F.conv1d(xt.transpose(1, 2), self.weight, groups=self.groups).transpose(1, 2)  # [B, T, D]
        return F.silu(y), xt[:, xt.shape[1] - (w - 1):]


class DeltaNetMixer(nn.Module):
    """DeltaNet token mixer (Yang et al. 2024), fla's layout and names (fla's DeltaNet layer):
    q, k, v projections -> short conv + SiLU -> L2-normalised q, k; beta = sigmoid(b_proj x) -> delta rule
    -> per-head RMSNorm -> o_proj. State: S [B, H, dk, dv] fp32, the conv tails, pos [B]."""

    def __init__(self, config, layer_idx=0):
        super().__init__()
        for name, want in (("use_short_conv", True), ("use_beta", True), ("use_gate", False),
                           ("use_output_norm", True), ("qk_activation", "silu"), ("qk_norm", "l2")):
            if getattr(config, name) != want:
                raise NotImplementedError(f"DeltaNet option {name}={getattr(config, name)!r} is not implemented "
                                          f"(supported: {want!r})")
        D, H = config.hidden_size, config.num_heads
        self.H, self.key_dim, self.value_dim = H, int(D * config.expand_k), int(D * config.expand_v)
        self.dk, self.dv = self.key_dim // H, self.value_dim // H
        self.chunk_size, self.backend = config.chunk_size, config.delta_backend
        self.q_proj = nn.Linear(D, self.key_dim, bias=False)
        self.k_proj = nn.Linear(D, self.key_dim, bias=False)
        self.v_proj = nn.Linear(D, self.value_dim, bias=False)
        self.b_proj = nn.Linear(D, H, bias=False)
        self.q_conv1d = ShortConv(self.key_dim, config.conv_size)
        self.k_conv1d = ShortConv(self.key_dim, config.conv_size)
        self.v_conv1d = ShortConv(self.value_dim, config.conv_size)
        self.o_norm = RMSNorm(self.dv, eps=config.norm_eps)
        self.o_proj = nn.Linear(self.value_dim, D, bias=False)

    def _inputs(self, x, state):
        """Projections, convs, norms. x [B, T, D] -> q, k [B, T, H, dk], v [B, T, H, dv], beta [B, T, H], conv tails,
        and the projections before the convs (pq, pk, pv [B, T, d]: what a snapshot's conv tail is made of)."""
        B, T, _ = x.shape
        get = (lambda name: None) if state is None else state.get
        pq, pk, pv = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, tq = self.q_conv1d(pq, get("conv_q"))
        k, tk = self.k_conv1d(pk, get("conv_k"))
        v, tv = self.v_conv1d(pv, get("conv_v"))
        q, k = (l2norm(t.view(B, T, self.H, self.dk)) for t in (q, k))        # [B, T, H, dk]
        v = v.view(B, T, self.H, self.dv)                                      # [B, T, H, dv]
        beta = torch.sigmoid(self.b_proj(x).to(torch.promote_types(x.dtype, torch.float32)))  # [B, T, H]
        return q, k, v, beta, (tq, tk, tv), (pq, pk, pv)

    def _output(self, o):  # o [B, T, H, dv] -> [B, T, D]
        return self.o_proj(self.o_norm(o).flatten(2))                         # o_norm(o) as [B, T, H * dv]

    def forward(self, x, snapshot_at=None):
        """x: [B, T, D]; snapshot_at: LongTensor [B, P], None, or "defer". Returns (y [B, T, D], snapshots): None,
        a state whose row b*P + p is the state after token snapshot_at[b, p] of sequence b, or ("defer") a function
        positions [B, P] -> that state; differentiable, from the same delta-rule pass as y."""
        q, k, v, beta, _, projections = self._inputs(x, None)
        if snapshot_at is None:
            o, _ = delta_rule(q, k, v, beta, backend=self.backend, chunk_size=self.chunk_size)
            return self._output(o), None
        o, _, states_at = delta_rule(q, k, v, beta, backend=self.backend, chunk_size=self.chunk_size,
                                     snapshot_at="defer")
        w = self.q_conv1d.kernel_size[0]

        def snapshots(positions):  # [B, P] -> state with B*P rows
            B, P = positions.shape
            snaps = {"S": states_at(positions).flatten(0, 1), "pos": (positions + 1).flatten()}
            # conv tails: the w-1 projections (before the conv) ending at token t, zeros before the start, gathered
            # from this pass (no weights are used after the pass: under FSDP2 they are sharded again by then)
            idx = (positions[:, :, None] + torch.arange(2 - w, 1, device=x.device)).flatten(1)  # [B, P*(w-1)]
            for name, proj in zip(("conv_q", "conv_k", "conv_v"), projections):
                rows = torch.gather(proj, 1, idx.clamp(min=0)[:, :, None].expand(-1, -1, proj.shape[2]))
                snaps[name] = torch.where(idx[:, :, None] >= 0, rows, 0).view(B * P, w - 1, -1)  # [B*P, w-1, d]
            return snaps

        return self._output(o), snapshots if isinstance(snapshot_at, str) else snapshots(snapshot_at)

    def init_state(self, batch_size, device=None, dtype=torch.float32):
        w = self.q_conv1d.kernel_size[0]
        z = lambda d: torch.zeros(batch_size, w - 1, d, device=device, dtype=dtype)
        acc = torch.promote_types(dtype, torch.float32)
        return {"S": torch.zeros(batch_size, self.H, self.dk, self.dv, device=device, dtype=acc),
                "conv_q": z(self.key_dim), "conv_k": z(self.key_dim), "conv_v": z(self.value_dim),
                "pos": torch.zeros(batch_size, dtype=torch.long, device=device)}

    def step(self, x, state):
        """x: [B, T, D] new tokens (T = 1 when decoding), state: dict. Returns (y [B, T, D], new state)."""
        q, k, v, beta, (tq, tk, tv), _ = self._inputs(x, state)
        backend = "recurrent" if x.shape[1] < self.chunk_size else self.backend  # decoding: the token loop is cheapest
        o, S = delta_rule(q, k, v, beta, initial_state=state["S"], output_final_state=True, backend=backend,
                          chunk_size=self.chunk_size)
        new = {"S": S, "conv_q": tq, "conv_k": tk, "conv_v": tv, "pos": state["pos"] + x.shape[1]}
        return self._output(o), new
