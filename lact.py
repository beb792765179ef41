"""The LaCT token mixer (Zhang et al. 2025, "Test-Time Training Done Right"): sliding-window attention plus a
SwiGLU fast-weight network updated once per large chunk (apply-then-update), summed before o_proj.

forward, step and init_state as for the DeltaNet mixer in fastweights.py (they agree: tests/test_lact.py); forward
starts from the empty state, step runs T new tokens as T one-token steps.
State (first dim = batch, see `map_state`): pos [B] tokens consumed; attn_k/attn_v [B, window-1, Ha, dh] the last
window-1 post-RoPE keys/values (most recent last, zeros before the sequence start); w0, w2 [B, Hl, dh, din] and
w1 [B, Hl, dout, dh] the fast weights after pos // C chunk updates; m0, m1, m2 their momentum (use_momentum);
buf_k [B, Hl, C, din], buf_v [B, Hl, C, dout], buf_lr [B, Hl, C, 3], buf_gate [B, Hl, C, 1] (use_momentum): the
current partial chunk, pos % C valid slots, the others zero.
Precision: everything runs in the input dtype; learning rates, momentum gates, RoPE angles and the output norm in
fp32 (fp64 for fp64 inputs). The reference runs matmuls in bf16 and Newton-Schulz in bf16 (`muon_dtype`).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastweights import RMSNorm
from kernels.chunked import deliver_snapshots

NS_COEFFS = ((4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
             (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012))


def inv_softplus(y):
    """x with softplus(x) = y (a float)."""
    return y + math.log(-math.expm1(-y))


def rope(x, pos, theta):
    """Rotate-half RoPE. x: [B, T, H, dh], pos: [B, T] integer positions -> [B, T, H, dh]."""
    half = x.shape[-1] // 2
    acc = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    inv_freq = 1.0 / theta ** (torch.arange(0, 2 * half, 2, device=x.device, dtype=acc) / (2 * half))  # [dh/2]
    ang = pos.to(acc)[..., None, None] * inv_freq                     # [B, T, 1, dh/2]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., :half].to(acc), x[..., half:].to(acc)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def silu_grad(x):
    """d silu(x) / dx = sigmoid(x) (1 + x (1 - sigmoid(x)))."""
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def swiglu_apply(w0, w1, w2, x):
    """f(x) = W1 (silu(W0 x) * (W2 x)); w0, w2 [..., dh, din], w1 [..., dout, dh], x [..., L, din] -> [..., L, dout]."""
    xt = x.transpose(-1, -2)                                          # [..., din, L]
    return (w1 @ (F.silu(w0 @ xt) * (w2 @ xt))).transpose(-1, -2)


def swiglu_inner_grads(w0, w1, w2, k, v, lr):
    """Update directions dWj = -dL_j/dWj of the inner loss L_j = -sum_t lr[t, j] <v_t, f(k_t)> (summed over the chunk).
    w0, w2: [..., dh, din], w1: [..., dout, dh], k: [..., L, din], v: [..., L, dout], lr: [..., L, 3]
    -> dW0 [..., dh, din], dW1 [..., dout, dh], dW2 [..., dh, din]."""
    kt, vt = k.transpose(-1, -2), v.transpose(-1, -2)                 # [..., din, L], [..., dout, L]
    g, u = w0 @ kt, w2 @ kt                                           # g = W0 k, u = W2 k: [..., dh, L]
    sg = F.silu(g)
    h = sg * u                                                        # h = silu(g) * u
    delta = w1.transpose(-1, -2) @ vt                                 # delta = W1^T v: [..., dh, L]
    lr0, lr1, lr2 = lr[..., 0:1], lr[..., 1:2], lr[..., 2:3]          # [..., L, 1] each
    dw1 = vt @ (h.transpose(-1, -2) * lr1).to(v.dtype)                # dW1 = sum eta1 v h^T
    dw0 = (delta * u * silu_grad(g)) @ (k * lr0).to(k.dtype)          # dW0 = sum eta0 (delta * u * silu'(g)) k^T
    dw2 = (delta * sg) @ (k * lr2).to(k.dtype)                        # dW2 = sum eta2 (delta * silu(g)) k^T
    return dw0, dw1, dw2


def newton_schulz5(g, dtype=None):
    """Muon orthogonalisation: five Newton-Schulz steps on each [m, n] matrix of g: [..., m, n] -> [..., m, n] in g's
    dtype, computed in `dtype` (default g's; the reference uses bf16). Transposes when m > n."""
    x = g.to(dtype or g.dtype)
    tall = g.shape[-2] > g.shape[-1]
    if tall:
        x = x.transpose(-1, -2)
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)               # Frobenius norm -> spectral norm <= 1
    for a, b, c in NS_COEFFS:
        A = x @ x.transpose(-1, -2)
        x = a * x + (b * A + c * A @ A) @ x
    if tall:
        x = x.transpose(-1, -2)
    return x.to(g.dtype)


def fast_weight_update(w, m, k, v, lr, gate, norms, use_muon, muon_dtype=None):
    """One chunk's update. w: (w0, w1, w2) as in `swiglu_apply` with leading dims [...]; m: their momentum or None;
    k: [..., C, din], v: [..., C, dout], lr: [..., C, 3], gate: [..., C, 1] momentum gates or None;
    norms: row norms of the initial weights, [..., rows, 1] each. Returns (new w, new m)."""
    dw = swiglu_inner_grads(*w, k, v, lr)
    if m is not None:
        beta = gate.mean(-2)[..., None]                                # beta_m: mean gate over the chunk [..., 1, 1]
        dw = tuple((d + beta * mi).to(d.dtype) for d, mi in zip(dw, m))  # dW <- dW + beta_m M
        m = dw                                                         # M <- dW
    if use_muon:
        dw = tuple(newton_schulz5(d, muon_dtype) for d in dw)
    w = tuple(wi + d for wi, d in zip(w, dw))                           # W <- W + dW
    w = tuple(wi / (wi.norm(dim=-1, keepdim=True) + 1e-5) * n for wi, n in zip(w, norms))  # row renormalisation
    return w, m


def sliding_window_attention(q, k, v, window):
    """Causal attention where query i sees keys i-window+1 .. i. q, k, v: [B, T, H, dh] -> [B, T, H, dh].
    Runs in query blocks so no [T, T] mask is built: a block of Q queries sees Q + window - 1 keys."""
    T = q.shape[1]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))                # [B, H, T, dh]
    blk = max(window, 256)
    outs = []
    for s in range(0, T, blk):
        e, ks = min(T, s + blk), max(0, s - window + 1)
        i = torch.arange(s, e, device=q.device)[:, None]
        j = torch.arange(ks, e, device=q.device)[None, :]
        mask = (j <= i) & (j > i - window)                             # [e - s, e - ks]
        outs.append(F.scaled_dot_product_attention(qt[:, :, s:e], kt[:, :, ks:e], vt[:, :, ks:e], attn_mask=mask))
    return torch.cat(outs, dim=2).transpose(1, 2)


class LowRankWeight(nn.Module):
    """An initial fast weight w_left @ w_right + 0.5 I: [H, rows, cols] (reference: LowRankFastWeight)."""

    def __init__(self, heads, rows, cols, rank):
        super().__init__()
        self.w_left = nn.Parameter(torch.empty(heads, rows, rank))
        self.w_right = nn.Parameter(torch.empty(heads, rank, cols))

    def forward(self):  # -> [H, rows, cols]
        rows, cols = self.w_left.shape[1], self.w_right.shape[2]
        eye = torch.eye(rows, cols, device=self.w_left.device, dtype=self.w_left.dtype)
        return self.w_left @ self.w_right + 0.5 * eye


class LaCTMixer(nn.Module):
    """The LaCT layer ("attn." in the reference state dict). x: [B, T, hidden] -> [B, T, hidden]."""

    def __init__(self, config, layer_idx=0):
        super().__init__()
        c = config
        for field, ok in [("attn_qk_norm", False), ("no_v_silu", False), ("ttt_prenorm", False), ("lr_dim", 1),
                          ("lr_parameterization", "mamba"), ("ttt_loss_type", "dot_product")]:
            if getattr(c, field) != ok:
                raise NotImplementedError(f"{field}={getattr(c, field)!r} is not implemented (only {ok!r})")
        D, Ha, Hl = c.hidden_size, c.num_attn_heads, c.num_lact_heads
        if D % Ha or D % Hl or (D // Ha) % 2:
            raise ValueError(f"hidden_size {D} must split into {Ha} attention heads of even size and {Hl} lact heads")
        if c.window_size is None or c.window_size < 1 or c.lact_chunk_size < 1:
            raise ValueError(f"window_size ({c.window_size}) and lact_chunk_size ({c.lact_chunk_size}) must be >= 1")
        self.layer_idx = layer_idx
        self.hidden, self.n_attn, self.n_fw = D, Ha, Hl
        self.head_dim, self.fw_dim = D // Ha, D // Hl
        self.d_h = int(self.fw_dim * c.inter_multi)
        self.window, self.chunk, self.theta = c.window_size, c.lact_chunk_size, c.rope_theta
        self.qkv_silu, self.ttt_nope, self.use_muon = c.qkv_silu, c.ttt_nope, c.use_muon
        self.use_momentum, self.learnable_ttt_scale = c.use_momentum, c.learnable_ttt_scale
        self.low_rank, self.fw_init_gain = c.w0_w2_low_rank, c.fw_init_gain
        self.base_lr_inv = inv_softplus(c.base_lr)                    # lr = softplus(lr_proj(x) + this)
        self.muon_dtype = None  # dtype of Newton-Schulz; None = the weights' dtype; torch.bfloat16 = the reference

        self.qkv = nn.Linear(D, 3 * D, bias=c.qkv_bias)
        self.o_proj = nn.Linear(D, D, bias=False)
        d_in, d_h = self.fw_dim, self.d_h
        for name in ("w0", "w2"):                                      # [Hl, dh, din]
            setattr(self, name, LowRankWeight(Hl, d_h, d_in, self.low_rank) if self.low_rank > 0
                    else nn.Parameter(torch.empty(Hl, d_h, d_in)))
        self.w1 = nn.Parameter(torch.empty(Hl, d_in, d_h))             # [Hl, dout, dh]
        self.lr_proj = nn.Linear(D, 3 * Hl)                             # channel 3h + j: rate of Wj of head h
        self.qk_scale = nn.Parameter(torch.ones(D, 2))
        self.qk_offset = nn.Parameter(torch.zeros(D, 2))
        if self.learnable_ttt_scale:
            self.ttt_scale_proj = nn.Linear(D, Hl)
        self.ttt_norm = RMSNorm(d_in, eps=1e-5)                         # eps 1e-5, not norm_eps
        if self.use_momentum:
            self.momentum_proj = nn.Sequential(nn.Linear(D, Hl), nn.Sigmoid())
        self.reset_parameters_like_reference(c.initializer_range)

    @torch.no_grad()
    def reset_parameters_like_reference(self, initializer_range):
        """The reference's _init_weights for this layer (Linears, norms, fast weights); skipped on the meta device."""
        if self.w1.is_meta:
            return
        for lin in [m for m in self.modules() if isinstance(m, nn.Linear)]:
            nn.init.normal_(lin.weight, std=initializer_range)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        nn.init.ones_(self.qk_scale)
        nn.init.zeros_(self.qk_offset)
        nn.init.ones_(self.ttt_norm.weight)
        for w in (self.w0, self.w2):
            if self.low_rank > 0:
                nn.init.normal_(w.w_left, std=self.fw_init_gain / math.sqrt(self.low_rank))
                nn.init.normal_(w.w_right, std=self.fw_init_gain / math.sqrt(self.fw_dim))
            else:
                nn.init.normal_(w, std=1 / math.sqrt(self.fw_dim))
        nn.init.normal_(self.w1, std=1 / math.sqrt(self.d_h))

    def initial_weights(self):
        """The learnable initial fast weights: w0, w2 [Hl, dh, din], w1 [Hl, dout, dh]."""
        if self.low_rank > 0:
            return self.w0(), self.w1, self.w2()
        return self.w0, self.w1, self.w2

    def _project(self, x, pos):
        """x: [B, T, D], pos: [B, T] -> dict of q, k, v [B, T, Ha, dh] (q, k post-RoPE); fq, fk, fv [B, Hl, T, d];
        lr [B, Hl, T, 3]; gate [B, Hl, T, 1] or None; scale [B, Hl, T, 1] or None."""
        (B, T, _), Ha, Hl = x.shape, self.n_attn, self.n_fw
        q, k, v = self.qkv(x).chunk(3, dim=-1)                         # [B, T, D] each
        fq = q * self.qk_scale[:, 0] + self.qk_offset[:, 0]            # fast branch: same q, k, v before RoPE
        fk = k * self.qk_scale[:, 1] + self.qk_offset[:, 1]
        fq, fk, fv = (t.view(B, T, Hl, -1) for t in (fq, fk, v))       # [B, T, Hl, d]
        if self.qkv_silu:
            fq, fk, fv = F.silu(fq), F.silu(fk), F.silu(fv)
        fq, fk = (t / (t.norm(dim=-1, keepdim=True) + 1e-5) for t in (fq, fk))  # L2, the reference's epsilon
        if not self.ttt_nope:  # RoPE over attention-head-sized blocks of the fast-weight heads
            fq, fk = (rope(t.reshape(B, T, Ha, -1), pos, self.theta).view(B, T, Hl, -1) for t in (fq, fk))
        acc = torch.promote_types(x.dtype, torch.float32)
        lr = F.softplus(self.lr_proj(x).to(acc) + self.base_lr_inv).view(B, T, Hl, 3)
        gate = self.momentum_proj(x).to(acc).transpose(1, 2)[..., None] if self.use_momentum else None
        scale = F.silu(self.ttt_scale_proj(x)).transpose(1, 2)[..., None] if self.learnable_ttt_scale else None
        return dict(q=rope(q.view(B, T, Ha, -1), pos, self.theta), k=rope(k.view(B, T, Ha, -1), pos, self.theta),
                    v=v.view(B, T, Ha, -1), fq=fq.transpose(1, 2), fk=fk.transpose(1, 2), fv=fv.transpose(1, 2),
                    lr=lr.transpose(1, 2), gate=gate, scale=scale)

    def _output(self, o_attn, o_fw, scale):
        """o_attn: [B, T, Ha, dh], o_fw: [B, Hl, T, d], scale: [B, Hl, T, 1] or None -> y [B, T, D]."""
        o_fw = self.ttt_norm(o_fw)                                      # per-head RMSNorm in fp32 (fp64 for fp64)
        if scale is not None:
            o_fw = o_fw * scale
        return self.o_proj(o_attn.flatten(2) + o_fw.transpose(1, 2).flatten(2))  # both [B, T, D]

    def _update(self, w, m, k, v, lr, gate, w_init):
        norms = tuple(wi.norm(dim=-1, keepdim=True) for wi in w_init)  # [Hl, rows, 1]: initial row norms
        return fast_weight_update(w, m, k, v, lr, gate, norms, self.use_muon, self.muon_dtype)

    def forward(self, x, snapshot_at=None):
        """x: [B, T, D] from the empty state; snapshot_at: LongTensor [B, P] of positions t, None, or "defer".
        Returns y [B, T, D] and (if snapshot_at) the state after token snapshot_at[b, p] at row b * P + p
        (with "defer": a function positions [B, P] -> that state, to call once the positions are chosen)."""
        (B, T, _), C = x.shape, self.chunk
        n_upd = (T - 1) // C if snapshot_at is None else T // C     # chunk j < n_upd updates W for chunk j + 1
        p = self._project(x, torch.arange(T, device=x.device).expand(B, T))  # positions [B, T]
        o_attn = sliding_window_attention(p["q"], p["k"], p["v"], self.window)  # [B, T, Ha, dh]

        w_init = self.initial_weights()
        w = tuple(wi.expand(B, *wi.shape) for wi in w_init)            # [B, Hl, ., .]
        m = tuple(torch.zeros_like(wi) for wi in w) if self.use_momentum else None
        ws, ms, outs = [w], [m], []
        for j in range(-(-T // C)):
            s, e = j * C, min(T, (j + 1) * C)
            outs.append(swiglu_apply(*w, p["fq"][:, :, s:e]))          # apply W_j to chunk j, then update
            if j < n_upd:
                gate = p["gate"][:, :, s:e] if self.use_momentum else None
                w, m = self._update(w, m, p["fk"][:, :, s:e], p["fv"][:, :, s:e], p["lr"][:, :, s:e], gate, w_init)
                ws.append(w)
                ms.append(m)
        y = self._output(o_attn, torch.cat(outs, dim=2), p["scale"])
        if snapshot_at is None:
            return y, None
        # the weights after each update, stacked now: ws[0] views the parameters, whose storage FSDP2 frees once
        # this block's forward ends, so a deferred snapshot must not read them later
        ws = [torch.stack(col) for col in zip(*ws)]                    # 3 x [updates + 1, B, Hl, ., .]
        ms = [torch.stack(col) for col in zip(*ms)] if self.use_momentum else None
        return y, deliver_snapshots(snapshot_at, lambda t: self._snapshots(t, p, ws, ms), B, T)  # checks t

    def _snapshots(self, t, p, ws, ms):
        """Gather the states after tokens t [B, P] from the forward's tensors (differentiably): rows B * P."""
        B, P = t.shape
        C, W1 = self.chunk, self.window - 1
        n = t + 1                                                       # tokens consumed
        b = torch.arange(B, device=t.device)[:, None]                   # [B, 1]
        j = n // C                                                      # updates done
        state = {"pos": n.flatten()}
        names = ["w0", "w1", "w2"] + (["m0", "m1", "m2"] if self.use_momentum else [])
        for i, name in enumerate(names):
            seq = ws if i < 3 else ms                                   # 3 x [updates + 1, B, Hl, ., .]
            state[name] = seq[i % 3][j, b.expand(B, P)].flatten(0, 1)  # [B*P, Hl, ., .]

        def gather(x, idx, valid):  # x [B, T, ...], idx/valid [B, P, S] -> [B*P, S, ...], zero where invalid
            g = x[b[..., None], idx.clamp(0, x.shape[1] - 1)]
            return torch.where(valid.view(*valid.shape, *[1] * (g.dim() - 3)), g, 0).flatten(0, 1)

        wpos = n[..., None] - W1 + torch.arange(W1, device=t.device)    # [B, P, W-1] window slots
        state["attn_k"] = gather(p["k"], wpos, wpos >= 0)               # [B*P, W-1, Ha, dh]
        state["attn_v"] = gather(p["v"], wpos, wpos >= 0)
        slot = torch.arange(C, device=t.device)
        cpos, cvalid = (j * C)[..., None] + slot, slot < (n % C)[..., None]  # [B, P, C] partial-chunk slots
        for name, key in [("buf_k", "fk"), ("buf_v", "fv"), ("buf_lr", "lr")] + (
                [("buf_gate", "gate")] if self.use_momentum else []):
            state[name] = gather(p[key].transpose(1, 2), cpos, cvalid).transpose(1, 2)  # [B*P, Hl, C, ...]
        return state

    def init_state(self, batch_size, device, dtype=torch.float32):
        """The empty state (see the module docstring), its fast weights the (differentiable) initial weights."""
        B, C, Hl, acc = batch_size, self.chunk, self.n_fw, torch.promote_types(dtype, torch.float32)
        zeros = lambda *shape, dtype=dtype: torch.zeros(B, *shape, device=device, dtype=dtype)
        w = [wi.to(device=device, dtype=dtype).expand(B, *wi.shape) for wi in self.initial_weights()]
        state = {"pos": zeros(dtype=torch.long), "w0": w[0], "w1": w[1], "w2": w[2],
                 "attn_k": zeros(self.window - 1, self.n_attn, self.head_dim),
                 "attn_v": zeros(self.window - 1, self.n_attn, self.head_dim),
                 "buf_k": zeros(Hl, C, self.fw_dim), "buf_v": zeros(Hl, C, self.fw_dim),
                 "buf_lr": zeros(Hl, C, 3, dtype=acc)}
        if self.use_momentum:
            state.update(m0=torch.zeros_like(w[0]), m1=torch.zeros_like(w[1]), m2=torch.zeros_like(w[2]),
                         buf_gate=zeros(Hl, C, 1, dtype=acc))
        return state

    def step(self, x, state):
        """x: [B, T, D] new tokens, state as from init_state/step/forward snapshots (rows may differ in pos).
        Returns y [B, T, D] and a new state; the input state is not modified. T > 1: T one-token steps."""
        B, C, W = x.shape[0], self.chunk, self.window
        if x.dim() != 3 or state["pos"].shape != (B,):
            raise ValueError(f"step takes x [B, T, D] and a state of batch B, got {tuple(x.shape)}, "
                             f"pos {tuple(state['pos'].shape)}")
        if x.shape[1] != 1:
            ys = []
            for t in range(x.shape[1]):
                y, state = self.step(x[:, t:t + 1], state)
                ys.append(y)
            return torch.cat(ys, 1), state
        pos = state["pos"]                                              # [B]
        p = self._project(x, pos[:, None])
        keys = torch.cat([state["attn_k"], p["k"]], dim=1)              # [B, W, Ha, dh], current key last
        vals = torch.cat([state["attn_v"], p["v"]], dim=1)
        valid = torch.arange(W, device=x.device) >= (W - 1 - pos)[:, None]  # [B, W]: slots inside the sequence
        o_attn = F.scaled_dot_product_attention(p["q"].transpose(1, 2), keys.transpose(1, 2), vals.transpose(1, 2),
                                                attn_mask=valid[:, None, None, :]).transpose(1, 2)  # [B, 1, Ha, dh]
        w = (state["w0"], state["w1"], state["w2"])
        o_fw = swiglu_apply(*w, p["fq"])                                # [B, Hl, 1, d]: apply before the update
        new = {"pos": pos + 1, "attn_k": keys[:, 1:], "attn_v": vals[:, 1:]}

        here = (torch.arange(C, device=x.device) == (pos % C)[:, None])[:, None, :, None]  # [B, 1, C, 1]
        bufs = {"buf_k": "fk", "buf_v": "fv", "buf_lr": "lr", **({"buf_gate": "gate"} if self.use_momentum else {})}
        for name, key in bufs.items():
            new[name] = torch.where(here, p[key], state[name])          # write the token at slot pos % C
        m = (state["m0"], state["m1"], state["m2"]) if self.use_momentum else None
        full = (pos + 1) % C == 0                                       # [B] rows whose chunk just completed
        if bool(full.any()):
            idx = full.nonzero()[:, 0]
            sel = lambda t: t.index_select(0, idx)
            gate = sel(new["buf_gate"]) if self.use_momentum else None
            w_sub, m_sub = self._update(tuple(map(sel, w)), tuple(map(sel, m)) if m else None, sel(new["buf_k"]),
                                        sel(new["buf_v"]), sel(new["buf_lr"]), gate, self.initial_weights())
            w = tuple(wi.index_put((idx,), ws.to(wi.dtype)) for wi, ws in zip(w, w_sub))
            if m is not None:
                m = tuple(mi.index_put((idx,), ms.to(mi.dtype)) for mi, ms in zip(m, m_sub))
            for name in bufs:                                          # an emptied buffer holds zeros
                new[name] = torch.where(full[:, None, None, None], 0, new[name])
        new.update(w0=w[0], w1=w[1], w2=w[2])
        if m is not None:
            new.update(m0=m[0], m1=m[1], m2=m[2])
        return self._output(o_attn, o_fw, p["scale"]), new
