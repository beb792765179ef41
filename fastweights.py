"""Fast-weight token mixers: the DeltaNet and Gated DeltaNet layers (and shared pieces used by lact.py).

Each mixer offers three ways to run that must agree (tests/test_model.py):
  forward(x, snapshot_at=None) -> (y, snapshots)   full sequence; optionally the state after chosen positions
  step(x, state) -> (y, new_state)                  continue from a state (decoding), never in place
  init_state(batch_size, device) -> state           the empty state
A state is a flat dict of tensors whose first dimension is the batch, so it can be indexed, repeated and detached
entry by entry (see `map_state`).
"""
import math

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
        w, from_state = self.kernel_size[0], tail is not None
        if tail is None:
            tail = x.new_zeros(x.shape[0], w - 1, x.shape[2])
        xt = torch.cat([tail, x], dim=1)                                       # [B, w-1+T, D]
        if from_state or x.shape[1] < w:  # decoding, REFINE's teacher-forced rollout tokens: w products cost less
            # than a convolution call and its backward (x's dtype out, as conv1d)
            y = (xt.unfold(1, w, 1) * self.weight[:, 0]).sum(-1).to(xt.dtype)   # [B, T, D, w] -> [B, T, D]
        else:
            y = F.conv1d(xt.transpose(1, 2), self.weight, groups=self.groups).transpose(1, 2)  # [B, T, D]
        return F.silu(y), xt[:, xt.shape[1] - (w - 1):]


class DeltaNetMixer(nn.Module):
    """DeltaNet token mixer (Yang et al. 2024), fla's layout and names (fla's DeltaNet layer):
    q, k, v projections -> short conv + SiLU -> L2-normalised q, k; beta = sigmoid(b_proj x) (x 2 with
    allow_neg_eigval) -> delta rule -> per-head RMSNorm (use_gate: rmsnorm(o) * w * silu(g_proj x)) -> o_proj.
    State: S [B, HV, dk, dv] fp32, the conv tails, pos [B]. GatedDeltaNetMixer adds the decay and value heads."""

    def __init__(self, config, layer_idx=0):
        super().__init__()
        for name, want in (("use_short_conv", True), ("use_beta", True), ("use_output_norm", True),
                           ("qk_activation", "silu"), ("qk_norm", "l2")):
            if getattr(config, name) != want:
                raise NotImplementedError(f"DeltaNet option {name}={getattr(config, name)!r} is not implemented "
                                          f"(supported: {want!r})")
        D = config.hidden_size
        self.H, self.HV, self.dk, self.dv = self._heads(config)
        self.key_dim, self.value_dim = self.H * self.dk, self.HV * self.dv
        self.chunk_size, self.backend = config.chunk_size, config.delta_backend
        self.beta_scale = 2.0 if config.allow_neg_eigval else 1.0           # beta in (0, 2): eigenvalues down to -1
        self.q_proj = nn.Linear(D, self.key_dim, bias=False)
        self.k_proj = nn.Linear(D, self.key_dim, bias=False)
        self.v_proj = nn.Linear(D, self.value_dim, bias=False)
        self.b_proj = nn.Linear(D, self.HV, bias=False)
        self.q_conv1d = ShortConv(self.key_dim, config.conv_size)
        self.k_conv1d = ShortConv(self.key_dim, config.conv_size)
        self.v_conv1d = ShortConv(self.value_dim, config.conv_size)
        self.g_proj = nn.Linear(D, self.value_dim, bias=False) if config.use_gate else None
        self.o_norm = RMSNorm(self.dv, eps=config.norm_eps)
        self.o_proj = nn.Linear(self.value_dim, D, bias=False)

    @staticmethod
    def _heads(config):  # -> (H q/k heads, HV value heads, dk, dv): DeltaNet's key / value widths are hidden x expand
        H = config.num_heads
        return H, H, int(config.hidden_size * config.expand_k) // H, int(config.hidden_size * config.expand_v) // H

    def _decay(self, x):  # the per-token log-decay g [B, T, HV] (GatedDeltaNetMixer); DeltaNet has none
        return None

    def _inputs(self, x, state):
        """Projections, convs, norms. x [B, T, D] -> q, k [B, T, H, dk], v [B, T, HV, dv], beta [B, T, HV], g (None or
        [B, T, HV] fp32), conv tails, and the projections before the convs (pq, pk, pv [B, T, d]: what a snapshot's
        conv tail is made of)."""
        B, T, _ = x.shape
        get = (lambda name: None) if state is None else state.get
        pq, pk, pv = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, tq = self.q_conv1d(pq, get("conv_q"))
        k, tk = self.k_conv1d(pk, get("conv_k"))
        v, tv = self.v_conv1d(pv, get("conv_v"))
        q, k = (l2norm(t.view(B, T, self.H, self.dk)) for t in (q, k))        # [B, T, H, dk]
        v = v.view(B, T, self.HV, self.dv)                                     # [B, T, HV, dv]
        beta = self.beta_scale * torch.sigmoid(self.b_proj(x).to(torch.promote_types(x.dtype, torch.float32)))
        return q, k, v, beta, self._decay(x), (tq, tk, tv), (pq, pk, pv)

    def _output(self, o, x):  # o [B, T, HV, dv], x [B, T, D] (the gate's input) -> [B, T, D]
        if self.g_proj is None:
            return self.o_proj(self.o_norm(o).flatten(2))                     # o_norm(o) as [B, T, HV * dv]
        acc = torch.promote_types(o.dtype, torch.float32)                     # the gated norm in fp32
        gated = self.o_norm(o.to(acc)) * F.silu(self.g_proj(x).view(o.shape).to(acc))   # [B, T, HV, dv]
        return self.o_proj(gated.to(o.dtype).flatten(2))

    def forward(self, x, snapshot_at=None):
        """x: [B, T, D]; snapshot_at: LongTensor [B, P], None, or "defer". Returns (y [B, T, D], snapshots): None,
        a state whose row b*P + p is the state after token snapshot_at[b, p] of sequence b, or ("defer") a function
        positions [B, P] -> that state; differentiable, from the same delta-rule pass as y."""
        q, k, v, beta, g, _, projections = self._inputs(x, None)
        if snapshot_at is None:
            o, _ = delta_rule(q, k, v, beta, g=g, backend=self.backend, chunk_size=self.chunk_size)
            return self._output(o, x), None
        o, _, states_at = delta_rule(q, k, v, beta, g=g, backend=self.backend, chunk_size=self.chunk_size,
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

        return self._output(o, x), snapshots if isinstance(snapshot_at, str) else snapshots(snapshot_at)

    def init_state(self, batch_size, device=None, dtype=torch.float32):
        w = self.q_conv1d.kernel_size[0]
        z = lambda d: torch.zeros(batch_size, w - 1, d, device=device, dtype=dtype)
        acc = torch.promote_types(dtype, torch.float32)
        return {"S": torch.zeros(batch_size, self.HV, self.dk, self.dv, device=device, dtype=acc),
                "conv_q": z(self.key_dim), "conv_k": z(self.key_dim), "conv_v": z(self.value_dim),
                "pos": torch.zeros(batch_size, dtype=torch.long, device=device)}

    def step(self, x, state):
        """x: [B, T, D] new tokens (T = 1 when decoding), state: dict. Returns (y [B, T, D], new state)."""
        q, k, v, beta, g, (tq, tk, tv), _ = self._inputs(x, state)
        # decoding (T = 1): the token loop is cheapest; a few tokens (REFINE's teacher-forced rollouts): ONE chunk of
        # T rows (the token loop's backward costs several [B, H, dk, dv] temporaries per token)
        T = x.shape[1]
        backend = "recurrent" if T == 1 else "torch" if T < self.chunk_size else self.backend
        o, S = delta_rule(q, k, v, beta, g=g, initial_state=state["S"], output_final_state=True, backend=backend,
                          chunk_size=min(T, self.chunk_size))
        new = {"S": S, "conv_q": tq, "conv_k": tk, "conv_v": tv, "pos": state["pos"] + x.shape[1]}
        return self._output(o, x), new


class GatedDeltaNetMixer(DeltaNetMixer):
    """Gated DeltaNet (Yang, Kautz, Hatamizadeh 2025), fla's GatedDeltaNet layout and names: DeltaNet's layer with a
    per-token, per-value-head decay S <- exp(g_t) S applied before each delta update, g = -exp(A_log) *
    softplus(a_proj x + dt_bias) (fp32); heads of head_dim keys and head_dim * expand_v values; num_v_heads value
    heads, value head j reading q/k head j // (num_v_heads / num_heads) (GVA). A_log and dt_bias are 1-D: no weight
    decay (step.make_optimizer)."""

    def __init__(self, config, layer_idx=0):
        super().__init__(config, layer_idx)
        self.a_proj = nn.Linear(config.hidden_size, self.HV, bias=False)
        # Mamba-2's init: A ~ U(0, 16) (from 0.01: a drawn 0 would make A_log -inf; config.gate_A_init, narrower in
        # toy-gdn); dt log-uniform in [1e-3, 1e-1]
        self.A_log = nn.Parameter(torch.empty(self.HV).uniform_(*config.gate_A_init).log())
        dt = torch.empty(self.HV).uniform_(math.log(1e-3), math.log(1e-1)).exp().clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))        # softplus^-1(dt)

    @staticmethod
    def _heads(config):  # -> (H, HV, dk, dv): fla's head_dim, expand_v (of head_dim) and num_v_heads
        H, HV = config.num_heads, config.num_v_heads or config.num_heads
        if HV % H:
            raise ValueError(f"num_v_heads={HV} must be a multiple of num_heads={H}")
        return H, HV, config.head_dim, int(config.head_dim * config.expand_v)

    def _decay(self, x):  # x [B, T, D] -> g [B, T, HV] fp32 (fp64 for fp64 x), <= 0
        acc = torch.promote_types(x.dtype, torch.float32)
        return -self.A_log.to(acc).exp() * F.softplus(self.a_proj(x).to(acc) + self.dt_bias.to(acc))
