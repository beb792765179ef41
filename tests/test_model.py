"""The language model's three entry points agree, for every mixer: full sequence, token-by-token decoding, and
snapshots after chosen prefixes (values and gradients). fp64, so tolerances are tight (1e-9 absolute)."""
import pytest
import torch

from model import MODEL_PRESETS, FastWeightLM, ModelConfig, build_model, map_model_state

TINY = {
    "deltanet": dict(arch="deltanet", vocab_size=61, hidden_size=32, num_hidden_layers=2, num_heads=2, chunk_size=8),
    # Gated DeltaNet with every option on: 4 value heads on 2 q/k heads (GVA), beta in (0, 2), the output gate
    "gated_deltanet": dict(arch="gated_deltanet", vocab_size=61, hidden_size=32, num_hidden_layers=2, num_heads=2,
                           head_dim=8, expand_v=2.0, num_v_heads=4, allow_neg_eigval=True, use_gate=True,
                           chunk_size=8),
    # LaCT: window 6 and chunk 5 so 23 tokens cross several chunk boundaries and go beyond the window
    "lact": dict(arch="lact", vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attn_heads=2,
                 num_lact_heads=2, window_size=6, lact_chunk_size=5, w0_w2_low_rank=4, rope_theta=100.0),
}
# float64 models: the paths compared differ in summation order (chunked vs step by step, one sequence vs a
# batch); float64 rounding is ~1e-16 per operation, ~1e-13 after the chunked form's triangular solve on O(1)
# values: 1e-9 / 1e-7 sits far above that and far below any real error (O(1e-2) and up)
TOL = dict(atol=1e-9, rtol=1e-7)


ARCHS = ["deltanet", "gated_deltanet", "lact"]
# the gated model with every option off as well: one value head per q/k head, beta in (0, 1), no output gate
GATED_OFF = dict(num_v_heads=2, allow_neg_eigval=False, use_gate=False)
VARIANTS = [*(pytest.param(a, {}, id=a) for a in ARCHS), pytest.param("gated_deltanet", GATED_OFF, id="gated-off")]


def tiny(arch, seed=0, **kw):
    torch.manual_seed(seed)
    model = FastWeightLM(ModelConfig(**{**TINY[arch], **kw})).double()
    if arch == "gated_deltanet":  # log-decays per token from -1e-3 to -60 (median -0.1): strong ones too
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.attn.a_proj.weight, std=0.5)
    return model


def ids(B, T, seed=1):
    return torch.randint(0, 61, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch, kw", VARIANTS)
def test_decoding_reproduces_full_sequence(arch, kw):
    model, x = tiny(arch, **kw), ids(2, 23)
    full = model(x)
    state, logits, hidden = model.init_state(2), [], []
    for t in range(x.shape[1]):
        out = model.step(x[:, t:t + 1], state)
        state = out.state
        logits.append(out.logits)
        hidden.append(out.hidden)
    torch.testing.assert_close(torch.cat(logits, 1), full.logits, **TOL)
    torch.testing.assert_close(torch.cat(hidden, 1), full.hidden, **TOL)


def assert_state_close(a, b):
    for la, lb in zip(a, b):
        assert la.keys() == lb.keys()
        for name in la:
            torch.testing.assert_close(la[name], lb[name], **TOL, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_snapshots_equal_prefix_states(arch):
    model, x = tiny(arch), ids(2, 23)
    pos = torch.tensor([[0, 4, 9, 22], [3, 5, 14, 17]])
    snaps = model(x, snapshot_at=pos).snapshots
    for b in range(2):
        for p, t in enumerate(pos[b].tolist()):
            _, state = model.prefill(x[b:b + 1, :t + 1])
            row = map_model_state(lambda s: s[b * 4 + p:b * 4 + p + 1], snaps)
            assert_state_close(row, state)
            # ... and decoding on from the snapshot continues the full sequence
            if t + 1 < x.shape[1]:
                out = model.step(x[b:b + 1, t + 1:t + 2], row)
                torch.testing.assert_close(out.logits[0, 0], model(x[b:b + 1, :t + 2]).logits[0, -1], **TOL)


def continuation_loss(model, state, cont, weights):
    """Teacher-force cont [N, 2] from state; a fixed random functional of the logits."""
    loss = 0
    for j in range(cont.shape[1]):
        out = model.step(cont[:, j:j + 1], state)
        state = out.state
        loss = loss + (out.logits[:, 0] * weights[:, j]).sum()
    return loss


@pytest.mark.parametrize("arch", ARCHS)
def test_snapshot_gradients_equal_prefix_forward_gradients(arch):
    """The point of snapshots: one forward gives every prefix's state AND the same gradient as separate prefixes."""
    model, x = tiny(arch), ids(2, 19)
    pos = torch.tensor([[4, 12], [6, 16]])
    cont = ids(4, 2, seed=3)
    weights = torch.randn(4, 2, 61, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    params = list(model.parameters())

    g_snap = torch.autograd.grad(continuation_loss(model, model(x, snapshot_at=pos).snapshots, cont, weights),
                                 params, allow_unused=True)
    loss = 0
    for b in range(2):
        for p, t in enumerate(pos[b].tolist()):
            _, state = model.prefill(x[b:b + 1, :t + 1])
            i = b * 2 + p
            loss = loss + continuation_loss(model, state, cont[i:i + 1], weights[i:i + 1])
    g_ref = torch.autograd.grad(loss, params, allow_unused=True)
    for (name, _), a, b in zip(model.named_parameters(), g_snap, g_ref):
        if b is None:
            assert a is None or a.abs().max() == 0, name
        else:
            torch.testing.assert_close(a, b, **TOL, msg=name)


def test_parameter_counts_of_the_reference_presets():
    with torch.device("meta"):
        assert build_model("deltanet-1.3b").num_parameters() == 1_365_677_056
        assert build_model("lact-760m").num_parameters() == 797_625_312
        # per layer: q, k 2 x 1536 x 2048, v and the output gate 2 x 3072 x 2048, o_proj 2048 x 3072, a and b
        # 2 x 6 x 2048, A_log and dt_bias 2 x 6, convs (1536 + 1536 + 3072) x 4, o_norm 512; MLP 3 x 2048 x 5632,
        # 2 norms of 2048: 59,822,604; x 21 layers + embeddings and head 2 x 32000 x 2048 + final norm 2048
        assert build_model("gated-deltanet-1.3b").num_parameters() == 1_387_348_732


def lact_reference_keys():
    """The 507 state-dict keys of LaCT-760M (the LaCT reference checkpoint) with their shapes."""
    keys = {"model.embeddings.weight": (32000, 1536), "model.norm.weight": (1536,), "lm_head.weight": (32000, 1536)}
    per_layer = {"attn_norm.weight": (1536,), "attn.qkv.weight": (4608, 1536), "attn.o_proj.weight": (1536, 1536),
                 "attn.w1": (4, 384, 384), "attn.w0.w_left": (4, 384, 32), "attn.w0.w_right": (4, 32, 384),
                 "attn.w2.w_left": (4, 384, 32), "attn.w2.w_right": (4, 32, 384), "attn.qk_scale": (1536, 2),
                 "attn.qk_offset": (1536, 2), "attn.lr_proj.weight": (12, 1536), "attn.lr_proj.bias": (12,),
                 "attn.ttt_scale_proj.weight": (4, 1536), "attn.ttt_scale_proj.bias": (4,),
                 "attn.ttt_norm.weight": (384,), "attn.momentum_proj.0.weight": (4, 1536),
                 "attn.momentum_proj.0.bias": (4,), "mlp_norm.weight": (1536,),
                 "mlp.gate_proj.weight": (4096, 1536), "mlp.up_proj.weight": (4096, 1536),
                 "mlp.down_proj.weight": (1536, 4096)}
    for i in range(24):
        keys.update({f"model.layers.{i}.{k}": s for k, s in per_layer.items()})
    return keys


def test_lact_760m_state_dict_matches_reference_keys():
    with torch.device("meta"):
        sd = build_model("lact-760m").state_dict()
    ref = lact_reference_keys()
    assert len(ref) == 507
    assert {k: tuple(v.shape) for k, v in sd.items()} == ref


def test_deltanet_state_dict_names():
    with torch.device("meta"):
        sd = build_model("deltanet-1.3b").state_dict()
    assert tuple(sd["model.layers.0.attn.q_conv1d.weight"].shape) == (2048, 1, 4)
    assert tuple(sd["model.layers.23.attn.b_proj.weight"].shape) == (16, 2048)
    assert tuple(sd["model.layers.0.attn.o_norm.weight"].shape) == (128,)
    assert tuple(sd["model.layers.0.mlp.gate_proj.weight"].shape) == (5632, 2048)
    assert len(sd) == 3 + 24 * 14


def test_toy_presets_build_and_run():
    for name in ("toy-deltanet", "toy-gdn", "toy-lact"):
        model = build_model(name)
        out = model(torch.randint(0, 256, (1, 40)))
        assert out.logits.shape == (1, 40, MODEL_PRESETS[name].vocab_size) and out.logits.dtype == torch.float32
        assert out.hidden.shape == (1, 40, MODEL_PRESETS[name].hidden_size)


def test_unknown_arch_and_preset():
    with pytest.raises(ValueError, match="choose one of"):
        build_model("gpt-5")
    with pytest.raises(ValueError, match="choose one of"):
        FastWeightLM(ModelConfig(arch="mamba", hidden_size=8, num_hidden_layers=1, vocab_size=5))


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_checkpointing_with_deferred_snapshots(arch):
    """Recomputing each block in the backward changes nothing, also through snapshots chosen after the pass."""
    x, grads = ids(2, 19), []
    for gc in (False, True):
        model = tiny(arch, gradient_checkpointing=gc)
        out = model(x, snapshot_at=lambda logits, hidden: logits[..., 0].topk(2, dim=1).indices)
        loss = out.logits.square().mean() + continuation_loss(model, out.snapshots, ids(4, 2, seed=3),
                                                              torch.ones(4, 2, 61, dtype=torch.float64))
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **TOL)


def test_every_output_tensor_is_a_pytree_leaf():
    """FSDP2 registers the pre-backward all-gather of the root's weights (embeddings, lm_head) on the output tensors
    that torch's pytree finds; an output type pytree cannot open (a dataclass, on torch 2.11) leaves them sharded
    in the backward of a decoding step (tests/test_distributed.py runs that under torchrun)."""
    from torch.utils._pytree import tree_flatten
    model, x = tiny("deltanet"), ids(2, 9)
    out = model(x, snapshot_at=torch.tensor([[3], [5]]))
    step = model.step(x[:, :1], out.snapshots)
    for o in (out, step):
        leaves = {id(t) for t in tree_flatten(o)[0] if torch.is_tensor(t)}
        tensors = [o.logits, o.hidden] + [t for s in (o.snapshots or o.state) for t in s.values()]
        assert all(id(t) in leaves for t in tensors)


@pytest.mark.parametrize("arch, kw", VARIANTS)
@pytest.mark.parametrize("T", [4, 11])
def test_multi_token_step_equals_single_steps(arch, kw, T):
    """model(ids, state=...) over T tokens equals T one-token steps: logits, hidden states, the final state and the
    gradients of a loss on logits and final state, from snapshots. T = 11 crosses chunk boundaries (DeltaNet: one
    chunk of 8 and more, the chunked form; T = 4 takes its recurrent form; LaCT: chunks of 5 with updates inside)."""
    model, x = tiny(arch, **kw), ids(2, 19)
    pos = torch.tensor([[2, 12], [6, 3]])
    cont = ids(4, T, seed=3)
    weights = torch.randn(4, T, 61, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    params = list(model.parameters())

    def loss_of(logits, state):  # a fixed functional of the logits plus every float tensor of the final state
        return (logits * weights).sum() + sum(t.sum() for s in state for t in s.values() if t.is_floating_point())

    many = model(cont, state=model(x, snapshot_at=pos).snapshots)
    g_many = torch.autograd.grad(loss_of(many.logits, many.state), params, allow_unused=True)
    state, logits, hidden = model(x, snapshot_at=pos).snapshots, [], []
    for j in range(T):
        out = model(cont[:, j:j + 1], state=state)
        state = out.state
        logits.append(out.logits)
        hidden.append(out.hidden)
    logits = torch.cat(logits, 1)
    torch.testing.assert_close(many.logits, logits, **TOL)
    torch.testing.assert_close(many.hidden, torch.cat(hidden, 1), **TOL)
    assert_state_close(many.state, state)
    g_single = torch.autograd.grad(loss_of(logits, state), params, allow_unused=True)
    for (name, _), a, b in zip(model.named_parameters(), g_many, g_single):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, **TOL, msg=name)


def test_gated_deltanet_state_dict_names_and_init():
    """fla's GatedDeltaNet names and shapes (1.3B recipe); A_log and dt_bias as the spec initialises them, and out
    of weight decay."""
    from config import TrainConfig
    from step import make_optimizer
    with torch.device("meta"):
        sd = build_model("gated-deltanet-1.3b").state_dict()
    shapes = {"q_proj": (1536, 2048), "k_proj": (1536, 2048), "v_proj": (3072, 2048), "a_proj": (6, 2048),
              "b_proj": (6, 2048), "A_log": (6,), "dt_bias": (6,), "q_conv1d": (1536, 1, 4), "k_conv1d": (1536, 1, 4),
              "v_conv1d": (3072, 1, 4), "g_proj": (3072, 2048), "o_norm": (512,), "o_proj": (2048, 3072)}
    for name, shape in shapes.items():
        key = f"model.layers.20.attn.{name}" + ("" if name in ("A_log", "dt_bias") else ".weight")
        assert tuple(sd[key].shape) == shape, key
    assert len(sd) == 3 + 21 * 18
    model = tiny("gated_deltanet", num_v_heads=64, head_dim=2, expand_v=1.0)   # 64 draws per layer
    for layer in model.model.layers:
        A, dt = layer.attn.A_log.exp(), torch.nn.functional.softplus(layer.attn.dt_bias)
        # A_log and dt_bias were computed in fp32: rounding values <= 7 by 6e-8 relative moves A and dt by < 5e-7
        assert (A >= 0.01 * (1 - 1e-6)).all() and (A <= 16 * (1 + 1e-6)).all() and A.std() > 3   # U(0.01, 16): sd 4.6
        assert (dt >= 1e-3 * (1 - 1e-6)).all() and (dt <= 0.1 * (1 + 1e-6)).all() and dt.min() < 0.01 < dt.max()
    groups = make_optimizer(model, TrainConfig(weight_decay=0.1)).param_groups
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert all(id(p) in no_decay for n, p in model.named_parameters() if n.endswith(("A_log", "dt_bias")))
    with pytest.raises(ValueError, match="num_v_heads=3 must be a multiple of num_heads=2"):
        tiny("gated_deltanet", num_v_heads=3)


def test_gated_deltanet_toy_gate_init():
    """toy-gdn's gate_A_init draws A from its own range out of the same uniform draws, and nothing else changes; every
    head then keeps >= half of a needle over the 64-token warm-up at init (README: the toy's gate init)."""
    lo, hi = MODEL_PRESETS["toy-gdn"].gate_A_init
    fla, toy = (tiny("gated_deltanet", num_v_heads=64, head_dim=2, expand_v=1.0, **kw)
                for kw in ({}, {"gate_A_init": (lo, hi)}))
    for (name, a), b in zip(fla.named_parameters(), toy.parameters()):
        if name.endswith("A_log"):
            # the same u in U(lo, hi) = lo + (hi - lo) u; fp32 draws and logs: u agrees to ~1e-7, 1e-6 covers it
            torch.testing.assert_close((b.exp() - lo) / (hi - lo), (a.exp() - 0.01) / 15.99, rtol=0, atol=1e-6)
            g = -b.exp() * torch.nn.functional.softplus(toy.get_submodule(name[:-6]).dt_bias)
            assert (64 * g).exp().min() >= 0.5, name
        else:
            assert torch.equal(a, b), name



def test_gated_deltanet_layer_equals_its_equations():
    """The layer written out from the spec, token by token (fp64, so TOL): convs + SiLU, L2-normalised q and k,
    g = -exp(A_log) softplus(a_proj x + dt_bias), beta = 2 sigmoid(b_proj x) (allow_neg_eigval), value head j
    reading q/k head j // 2; S <- exp(g_t) S FIRST, then v' = beta (v - S^T k), S <- S + k v'^T, o = S^T q / sqrt(dk);
    out = o_proj(rmsnorm(o) * w * silu(g_proj x)). 13 tokens cross a chunk of 8 (the chunked backend runs)."""
    F = torch.nn.functional
    attn = tiny("gated_deltanet").model.layers[0].attn
    x = torch.randn(2, 13, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y, _ = attn(x)

    def conv(proj, c, heads):  # causal depthwise conv (left zero padding), SiLU, split into heads
        out = F.conv1d(F.pad(proj(x).transpose(1, 2), (3, 0)), c.weight, groups=c.weight.shape[0])
        return F.silu(out.transpose(1, 2)).view(2, 13, heads, -1)
    unit = lambda t: t / (t.pow(2).sum(-1, keepdim=True) + 1e-6).sqrt()
    q, k = unit(conv(attn.q_proj, attn.q_conv1d, 2)), unit(conv(attn.k_proj, attn.k_conv1d, 2))   # [2, 13, 2, 8]
    v = conv(attn.v_proj, attn.v_conv1d, 4)                                                      # [2, 13, 4, 16]
    g = -attn.A_log.exp() * F.softplus(attn.a_proj(x) + attn.dt_bias)                            # [2, 13, 4]
    beta = 2 * torch.sigmoid(attn.b_proj(x))
    S, outs = torch.zeros(2, 4, 8, 16, dtype=torch.float64), []
    for t in range(13):
        q_t, k_t = q[:, t, [0, 0, 1, 1]], k[:, t, [0, 0, 1, 1]]                                  # [2, 4, 8]
        S = S * g[:, t, :, None, None].exp()
        v_new = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, k_t))
        S = S + k_t[..., :, None] * v_new[..., None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q_t) / 8 ** 0.5)
    o = torch.stack(outs, 1)                                                                     # [2, 13, 4, 16]
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6) * attn.o_norm.weight
    torch.testing.assert_close(y, attn.o_proj((o * F.silu(attn.g_proj(x).view(o.shape))).flatten(2)), **TOL)
