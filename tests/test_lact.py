"""Tests for lact.py: the LaCT mixer's three ways to run (forward, snapshots, step) agree with each other and with a
literal re-statement of the reference layer; hand-written inner gradients; Newton-Schulz; state-dict names.
Tolerances: fp64 1e-10 (values) / 1e-9 (gradients); fp32 with Muon 1e-4 (Newton-Schulz amplifies rounding)."""
import math
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from lact import (LaCTMixer, fast_weight_update, inv_softplus, newton_schulz5, swiglu_apply,
                  swiglu_inner_grads)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is fastest and avoids oversubscription on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))   # the user's count where set (conftest.py)
    yield
    torch.set_num_threads(n)


@dataclass
class Cfg:  # the reference config fields the mixer reads (reference defaults except the sizes)
    hidden_size: int = 32
    num_attn_heads: int = 4
    num_lact_heads: int = 2
    inter_multi: float = 1
    window_size: int = 6
    lact_chunk_size: int = 4
    qkv_bias: bool = False
    attn_qk_norm: bool = False
    qkv_silu: bool = True
    no_v_silu: bool = False
    lr_dim: int = 1
    lr_parameterization: str = "mamba"
    use_muon: bool = False
    use_momentum: bool = True
    learnable_ttt_scale: bool = True
    ttt_prenorm: bool = False
    ttt_nope: bool = False
    ttt_loss_type: str = "dot_product"
    w0_w2_low_rank: int = 4
    fw_init_gain: float = 0.5
    rope_theta: float = 10000.0
    initializer_range: float = 0.02
    base_lr: float = 1e-3  # hard-coded in the reference


CONFIGS = {  # name: (config overrides, dtype, tolerance)
    "lowrank-momentum": (dict(), torch.float64, 1e-10),
    "fullrank-muon": (dict(num_attn_heads=2, w0_w2_low_rank=-1, use_momentum=False, use_muon=True, window_size=5,
                           lact_chunk_size=6), torch.float64, 1e-10),
    "momentum-muon-fp32": (dict(use_muon=True, window_size=8, lact_chunk_size=5), torch.float32, 1e-4),
    "options": (dict(qkv_silu=False, ttt_nope=True, learnable_ttt_scale=False, qkv_bias=True, inter_multi=2,
                     use_momentum=False), torch.float64, 1e-10),
}


def make(name, seed=0):
    """A mixer with large random parameters (lr ~ 1, so the fast-weight updates move the outputs)."""
    over, dtype, tol = CONFIGS[name]
    torch.manual_seed(seed)
    mix = LaCTMixer(Cfg(**over))
    with torch.no_grad():
        for n, p in mix.named_parameters():
            if n not in ("w1", "w0", "w2") and "w_left" not in n and "w_right" not in n:
                p.add_(0.2 * torch.randn_like(p))
        mix.lr_proj.bias.add_(-mix.base_lr_inv)                  # lr = softplus(bias + noise) ~ 0.7
    return mix.to(dtype), dtype, tol


def close(a, b, tol):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert err <= tol * (1 + b.abs().max().item()), err


def run_steps(mix, x, state=None):
    """Step through x [B, T, D]; returns outputs [B, T, D] and the list of states after each token."""
    state = mix.init_state(x.shape[0], x.device, x.dtype) if state is None else state
    ys, states = [], []
    for t in range(x.shape[1]):
        y, state = mix.step(x[:, t:t + 1], state)
        ys.append(y)
        states.append(state)
    return torch.cat(ys, 1), states


def rope_ref(x, theta):  # x [B, T, H, dh], positions 0..T-1, pairs (i, i + dh/2)
    T, half = x.shape[1], x.shape[-1] // 2
    ang = torch.arange(T, dtype=x.dtype)[:, None] * theta ** (-torch.arange(half, dtype=x.dtype) * 2 / (2 * half))
    c, s = ang.cos()[:, None], ang.sin()[:, None]
    return torch.cat([x[..., :half] * c - x[..., half:] * s, x[..., half:] * c + x[..., :half] * s], -1)


def reference_layer(mix, x):
    """A literal re-statement of the reference LaCTSWIGLULayer.forward (heads merged into the batch, a full [T, T]
    window mask, the `for i in range(0, T - C, C)` loop). x: [B, T, D] -> [B, T, D]."""
    b, s, D = x.shape
    nh, fh, hd, C = mix.n_attn, mix.n_fw, mix.head_dim, mix.chunk
    q, k, v = mix.qkv(x).chunk(3, -1)
    fq, fk, fv = q * mix.qk_scale[:, 0] + mix.qk_offset[:, 0], k * mix.qk_scale[:, 1] + mix.qk_offset[:, 1], v
    qa, ka = (rope_ref(t.view(b, s, nh, hd), mix.theta).transpose(1, 2) for t in (q, k))
    i, j = torch.arange(s)[:, None], torch.arange(s)[None]
    scores = (qa @ ka.transpose(-1, -2) / math.sqrt(hd)).masked_fill(~((j <= i) & (i - j <= mix.window - 1)), -1e30)
    o = (scores.softmax(-1) @ v.view(b, s, nh, hd).transpose(1, 2)).transpose(1, 2).reshape(b, s, D)
    heads = lambda t: t.reshape(b, s, fh, -1).transpose(1, 2).reshape(b * fh, s, -1)   # '(b n_h) s d'
    fq, fk, fv = heads(fq), heads(fk), heads(fv)
    if mix.qkv_silu:
        fq, fk, fv = F.silu(fq), F.silu(fk), F.silu(fv)
    fq, fk = fq / (fq.norm(dim=-1, keepdim=True) + 1e-5), fk / (fk.norm(dim=-1, keepdim=True) + 1e-5)
    if not mix.ttt_nope:
        unheads = lambda t: t.reshape(b, fh, s, -1).transpose(1, 2).reshape(b, s, nh, hd)
        fq, fk = (heads(rope_ref(unheads(t), mix.theta).reshape(b, s, D)) for t in (fq, fk))
    w0, w1, w2 = (w.repeat(b, 1, 1) for w in mix.initial_weights())
    n0, n1, n2 = (w.norm(dim=2, keepdim=True) for w in (w0, w1, w2))
    lr = F.softplus(mix.lr_proj(x) + inv_softplus(1e-3))  # the reference hard-codes 1e-3
    lr0, lr1, lr2 = heads(lr).chunk(3, dim=-1)
    mom = heads(mix.momentum_proj(x)) if mix.use_momentum else None
    m0, m1, m2 = torch.zeros_like(w0), torch.zeros_like(w1), torch.zeros_like(w2)
    out, e = torch.zeros_like(fv), 0
    f = lambda qi: torch.bmm(w1, F.silu(torch.bmm(w0, qi.mT)) * torch.bmm(w2, qi.mT)).mT
    for st in range(0, s - C, C):
        e = st + C
        out[:, st:e] = f(fq[:, st:e])
        ki, vi = fk[:, st:e], fv[:, st:e].mT
        gb, hb = torch.bmm(w0, ki.mT), torch.bmm(w2, ki.mT)
        dh = torch.bmm(w1.mT, vi)
        sig = torch.sigmoid(gb)
        d1 = torch.bmm(vi, (F.silu(gb) * hb).mT * lr1[:, st:e])
        d0 = torch.bmm(dh * hb * sig * (1 + gb * (1 - sig)), ki * lr0[:, st:e])
        d2 = torch.bmm(dh * F.silu(gb), ki * lr2[:, st:e])
        if mom is not None:
            mi = mom[:, st:e].mean(dim=1, keepdim=True)
            d0, d1, d2 = d0 + m0 * mi, d1 + m1 * mi, d2 + m2 * mi
            m0, m1, m2 = d0, d1, d2
        if mix.use_muon:
            d0, d1, d2 = newton_schulz5(d0), newton_schulz5(d1), newton_schulz5(d2)
        w0, w1, w2 = w0 + d0, w1 + d1, w2 + d2
        w0, w1, w2 = (w / (w.norm(dim=2, keepdim=True) + 1e-5) * n for w, n in ((w0, n0), (w1, n1), (w2, n2)))
    out[:, e:] = f(fq[:, e:])
    xn = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + 1e-5) * mix.ttt_norm.weight
    if mix.learnable_ttt_scale:
        xn = xn * heads(F.silu(mix.ttt_scale_proj(x)))
    return mix.o_proj(o + xn.reshape(b, fh, s, -1).transpose(1, 2).reshape(b, s, D))


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("T", [12, 13])
def test_forward_matches_reference_layer_and_step(name, T):
    mix, dtype, tol = make(name)
    x = torch.randn(2, T, 32, dtype=dtype)
    with torch.no_grad():
        y, snaps = mix(x)
        close(y, reference_layer(mix, x), tol)
        close(run_steps(mix, x)[0], y, tol)
        # the updates matter: a model with no fast-weight update (chunk > T) differs visibly
        mix.chunk = 100
        assert (mix(x)[0] - y).abs().max() > 1e-3
    assert snaps is None


@pytest.mark.parametrize("name", ["lowrank-momentum", "fullrank-muon"])
def test_forward_gradients_match_reference_layer(name):
    mix, dtype, _ = make(name, seed=6)
    x = torch.randn(2, 2 * mix.chunk + 3, 32, dtype=dtype, requires_grad=True)
    r = torch.randn(2, 2 * mix.chunk + 3, 32, dtype=dtype)
    params = [x] + list(mix.parameters())
    g = torch.autograd.grad((mix(x)[0] * r).sum(), params)
    g_ref = torch.autograd.grad((reference_layer(mix, x) * r).sum(), params)
    for n, a, b in zip(["x"] + [n for n, _ in mix.named_parameters()], g, g_ref):
        assert b.abs().max() > 0, n
        close(a, b, 1e-9)


@pytest.mark.parametrize("name", CONFIGS)
def test_snapshots_equal_step_states_and_continue(name):
    mix, dtype, tol = make(name, seed=1)
    C, T = mix.chunk, 4 * mix.chunk                                    # T a multiple of C: the last update too
    x = torch.randn(2, T + 2, 32, dtype=dtype)
    at = torch.tensor([[0, C - 1, C + 1, T - 1], [C, 2 * C - 1, T - 2, T - 1]])  # inside, chunk ends, 0, T-1
    with torch.no_grad():
        y_long = mix(x)[0]
        y, snaps = mix(x[:, :T], snapshot_at=at)
        _, states = run_steps(mix, x[:, :T])
        for b in range(2):
            for p in range(at.shape[1]):
                ref = states[at[b, p]]
                assert set(snaps) == set(ref)
                for key in ref:
                    close(snaps[key][b * 4 + p].to(ref[key].dtype), ref[key][b], tol)
        # a prefix run on its own ends in the same state
        _, alone = mix(x[:1, :C + 2], snapshot_at=torch.tensor([[C + 1]]))
        for key in alone:
            close(alone[key][0].to(snaps[key].dtype), snaps[key][2], tol)
        # continuing from the snapshots (rows at different pos, some at a chunk end) reproduces the long forward
        state = snaps
        for i in (1, 2):
            pos = at + i                                                # [B, P] next positions
            xt = x[torch.arange(2)[:, None], pos].reshape(8, 1, 32)
            yt, state = mix.step(xt, state)
            close(yt.view(2, 4, 32), y_long[torch.arange(2)[:, None], pos], tol)


def test_deferred_snapshots_equal_direct_snapshots():
    mix, dtype, tol = make("lowrank-momentum", seed=7)
    x = torch.randn(2, 3 * mix.chunk, 32, dtype=dtype)
    at = torch.tensor([[0, 3, 3 * mix.chunk - 1], [4, 7, 9]])
    with torch.no_grad():
        y, snaps = mix(x, snapshot_at=at)
        y2, take = mix(x, snapshot_at="defer")                          # positions chosen after the pass
        close(y2, y, tol)
        deferred = take(at)
        assert set(deferred) == set(snaps)
        for key in snaps:
            close(deferred[key].to(snaps[key].dtype), snaps[key], tol)
        with pytest.raises(ValueError, match="snapshot positions"):
            take(torch.tensor([[3 * mix.chunk]] * 2))


@pytest.mark.parametrize("name", ["lowrank-momentum", "fullrank-muon"])
def test_snapshot_gradients_equal_prefix_forward_gradients(name):
    mix, dtype, _ = make(name, seed=2)
    C = mix.chunk
    T = 3 * C + 1
    x = torch.randn(2, T + 2, 32, dtype=dtype, requires_grad=True)
    at = torch.tensor([[1, C - 1, 2 * C + 2], [C, 2 * C - 1, T - 1]])
    wts = torch.randn(2, 3, 2, 32, dtype=dtype)                          # loss weights per row, step, channel

    def grads(loss):
        params = [x] + list(mix.parameters())
        return torch.autograd.grad(loss, params)

    _, state = mix(x[:, :T], snapshot_at=at)
    loss = 0
    for i in (1, 2):
        pos = at + i
        yt, state = mix.step(x[torch.arange(2)[:, None], pos].reshape(6, 1, 32), state)
        loss = loss + (yt.view(2, 3, 32) * wts[:, :, i - 1]).sum()
    g_snap = grads(loss)
    loss_ref = 0
    for b in range(2):
        for p in range(3):
            t = int(at[b, p])
            y = mix(x[b:b + 1, :t + 3])[0][0, t + 1:]                    # the same two outputs, from scratch
            loss_ref = loss_ref + (y * wts[b, p]).sum()
    g_ref = grads(loss_ref)
    names = ["x"] + [n for n, _ in mix.named_parameters()]
    for n, a, r in zip(names, g_snap, g_ref):
        assert r is not None and r.abs().max() > 0, n
        close(a, r, 1e-9)


def test_step_is_functional_and_differentiable():
    mix, dtype, _ = make("lowrank-momentum", seed=3)
    C = mix.chunk
    x = torch.randn(2, 2 * C + 1, 32, dtype=dtype)
    with torch.no_grad():
        _, states = run_steps(mix, x[:, :2 * C - 1])
    state = {k: (v.clone().requires_grad_(True) if v.is_floating_point() else v) for k, v in states[-1].items()}
    before = {k: v.detach().clone() for k, v in state.items()}
    y1, s1 = mix.step(x[:, 2 * C - 1:2 * C], state)                     # completes chunk 1: the update runs
    y2, _ = mix.step(x[:, 2 * C:2 * C + 1], s1)                         # uses the updated weights
    for k in state:
        assert torch.equal(state[k].detach(), before[k]), k
    assert int(s1["pos"][0]) == 2 * C and s1["buf_k"].abs().max() == 0     # buffer emptied after the update
    g = torch.autograd.grad((y1.sum() + y2.sum()), [v for v in state.values() if v.requires_grad], allow_unused=True)
    for (k, v), gk in zip([(k, v) for k, v in state.items() if v.requires_grad], g):
        assert gk is not None and gk.abs().max() > 0, k


def test_hand_inner_gradients_equal_autograd():
    torch.manual_seed(4)
    Hl, L, din, dh, dout = 3, 7, 5, 6, 4
    w = [torch.randn(Hl, dh, din, dtype=torch.float64, requires_grad=True),
         torch.randn(Hl, dout, dh, dtype=torch.float64, requires_grad=True),
         torch.randn(Hl, dh, din, dtype=torch.float64, requires_grad=True)]
    k, v = torch.randn(Hl, L, din, dtype=torch.float64), torch.randn(Hl, L, dout, dtype=torch.float64)
    lr = torch.rand(Hl, L, 3, dtype=torch.float64)
    dw = swiglu_inner_grads(*w, k, v, lr)
    f = swiglu_apply(*w, k)                                              # [Hl, L, dout]
    for j in range(3):
        loss = -(lr[..., j] * (v * f).sum(-1)).sum()                     # L_j = -sum_t eta_j,t <v_t, f(k_t)>
        (g,) = torch.autograd.grad(loss, w[j], retain_graph=True)
        close(dw[j], -g, 1e-12)


def test_fast_weight_update_hand_example():
    """One head, 1x1 weights: every step by hand. w0 = w1 = w2 = 1, k = v = 1, lr = 1, momentum M = 1, gate 0.5."""
    one = torch.ones(1, 1, 1, dtype=torch.float64)
    k = v = torch.ones(1, 1, 1, dtype=torch.float64)
    w, m = fast_weight_update((one, one, one), (one, one, one), k, v, torch.ones(1, 1, 3, dtype=torch.float64),
                              torch.full((1, 1), 0.5, dtype=torch.float64), (2 * one, one, one), use_muon=False)
    s = 1 / (1 + math.exp(-1))                                          # g = u = 1, silu(1) = s, delta = 1
    d0, d1, d2 = s * (1 + (1 - s)) + 0.5, s + 0.5, s + 0.5              # dW + 0.5 * M
    # float64 against float64 math on O(1) values: a few roundings of 1.1e-16; abs 1e-14
    assert [float(t) for t in m] == pytest.approx([d0, d1, d2], abs=1e-14)
    # renormalisation to the initial row norms (2, 1, 1): |W + dW| / (|W + dW| + 1e-5) * norm
    expect = [n * (1 + d) / (1 + d + 1e-5) for n, d in zip((2, 1, 1), (d0, d1, d2))]
    assert [float(t) for t in w] == pytest.approx(expect, abs=1e-14)


def test_newton_schulz():
    torch.manual_seed(5)
    for shape in [(3, 8, 8), (2, 10, 6), (2, 6, 10)]:
        g = torch.randn(*shape, dtype=torch.float64)
        x = newton_schulz5(g)
        sv = torch.linalg.svdvals(x)
        assert sv.min() > 0.7 and sv.max() < 1.3, sv                   # near-orthogonal rows / columns
    # hand example: 2 I (4x4) has all singular values 2; normalised: 2 / (||2 I||_F + 1e-7) = 2 / (4 + 1e-7)
    sig = 2 / (4 + 1e-7)
    for a, b, c in [(4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
                    (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012)]:
        sig = a * sig + b * sig ** 3 + c * sig ** 5
    close(newton_schulz5(2 * torch.eye(4, dtype=torch.float64)[None]), sig * torch.eye(4, dtype=torch.float64)[None],
          1e-14)
    tall = torch.randn(2, 10, 6, dtype=torch.float64)
    close(newton_schulz5(tall), newton_schulz5(tall.mT).mT, 1e-14)      # the transpose branch
    g32 = torch.randn(2, 6, 6)
    x16 = newton_schulz5(g32, torch.bfloat16)                           # the reference's bf16 mode
    # bf16 has 8 bits of mantissa (rounding 2^-9 = 0.002 relative) and Newton-Schulz's 5 iterations of
    # degree-5 polynomials amplify it; entries are O(1), a wrong mode (no orthogonalisation, fp32 skipped) is O(1) off
    assert x16.dtype == torch.float32 and (x16 - newton_schulz5(g32)).abs().max() < 0.2


def test_state_dict_names_and_shapes_760m():
    cfg = Cfg(hidden_size=1536, num_attn_heads=24, num_lact_heads=4, window_size=2048, lact_chunk_size=2048,
              w0_w2_low_rank=32, rope_theta=1e6)
    with torch.device("meta"):
        mix = LaCTMixer(cfg)
        full = LaCTMixer(Cfg(hidden_size=1536, num_attn_heads=24, num_lact_heads=4, w0_w2_low_rank=-1))
    shapes = {k: tuple(v.shape) for k, v in mix.state_dict().items()}
    assert shapes == {
        "qkv.weight": (4608, 1536), "o_proj.weight": (1536, 1536), "w1": (4, 384, 384),
        "w0.w_left": (4, 384, 32), "w0.w_right": (4, 32, 384), "w2.w_left": (4, 384, 32), "w2.w_right": (4, 32, 384),
        "qk_scale": (1536, 2), "qk_offset": (1536, 2), "lr_proj.weight": (12, 1536), "lr_proj.bias": (12,),
        "ttt_scale_proj.weight": (4, 1536), "ttt_scale_proj.bias": (4,), "ttt_norm.weight": (384,),
        "momentum_proj.0.weight": (4, 1536), "momentum_proj.0.bias": (4,)}
    assert sum(v.numel() for v in mix.parameters()) == 10_260_884     # 797,625,312 = 24 x (this + MLP, norms) + ...
    fshapes = {k: tuple(v.shape) for k, v in full.state_dict().items()}
    assert fshapes["w0"] == fshapes["w2"] == (4, 384, 384) and "w0.w_left" not in fshapes


def test_init_like_reference_and_bad_config():
    mix = LaCTMixer(Cfg(hidden_size=64, num_lact_heads=2, w0_w2_low_rank=8))
    assert torch.equal(mix.qk_scale, torch.ones(64, 2)) and torch.equal(mix.lr_proj.bias, torch.zeros(6))
    lr = F.softplus(mix.lr_proj(torch.zeros(1, 64)) + mix.base_lr_inv)
    # softplus(inv_softplus(x)) in float32: a few roundings; allclose's defaults (rtol 1e-5, atol 1e-8)
    assert torch.allclose(lr, torch.full((1, 6), 1e-3))                 # base lr 1e-3 at init
    w0 = mix.initial_weights()[0]
    # float32 matmul of O(1) values summing 4 terms: ~1e-7; allclose's defaults (rtol 1e-5, atol 1e-8)
    assert torch.allclose(w0 - mix.w0.w_left @ mix.w0.w_right, 0.5 * torch.eye(32).expand(2, 32, 32))
    assert abs(mix.w0.w_left.std().item() - 0.5 / math.sqrt(8)) < 0.03
    assert abs(mix.w1.std().item() - 1 / math.sqrt(32)) < 0.03
    for field, value in [("ttt_prenorm", True), ("no_v_silu", True), ("lr_dim", 2), ("attn_qk_norm", True)]:
        with pytest.raises(NotImplementedError, match=field):
            LaCTMixer(Cfg(**{field: value}))
    with pytest.raises(ValueError):
        LaCTMixer(Cfg(num_attn_heads=3))
    with pytest.raises(ValueError, match="snapshot positions"):
        mix(torch.randn(1, 4, 64), snapshot_at=torch.tensor([[4]]))


def test_fast_weight_memory_needs_a_large_inner_lr_on_16_token_chunks():
    """study/lact_probe.py's storage probe (README: the toy LaCT): at the reference's base inner lr 1e-3 a 16-token
    chunk leaves the toy's fast weights recalling its 16 values at chance (1/16); at 1.0 most of them. 64 x 16 = 1024
    trials: chance's standard error is 0.8 points, so 12% and 50% are far from both sides (measured 6.1% and 78%)."""
    from model import build_model
    from study.lact_probe import memory
    torch.manual_seed(0)
    mix = build_model("toy-lact").model.layers[0].attn
    assert memory(mix, 1e-3, 1e-3, 16, 0, batch=64)[0] < 0.12
    assert memory(mix, 1.0, 1.0, 16, 0, batch=64)[0] > 0.5
