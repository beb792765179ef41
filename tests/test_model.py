"""The language model's three entry points agree, for both mixers: full sequence, token-by-token decoding, and
snapshots after chosen prefixes (values and gradients). fp64, so tolerances are tight (1e-9 absolute)."""
import pytest
import torch

from model import MODEL_PRESETS, FastWeightLM, ModelConfig, build_model, map_model_state

TINY = {
    "deltanet": dict(arch="deltanet", vocab_size=61, hidden_size=32, num_hidden_layers=2, num_heads=2, chunk_size=8),
    # LaCT: window 6 and chunk 5 so 23 tokens cross several chunk boundaries and go beyond the window
    "lact": dict(arch="lact", vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attn_heads=2,
                 num_lact_heads=2, window_size=6, lact_chunk_size=5, w0_w2_low_rank=4, rope_theta=100.0),
}
# float64 models: the paths compared differ in summation order (chunked vs step by step, one sequence vs a
# batch); float64 rounding is ~1e-16 per operation, ~1e-13 after the chunked form's triangular solve on O(1)
# values: 1e-9 / 1e-7 sits far above that and far below any real error (O(1e-2) and up)
TOL = dict(atol=1e-9, rtol=1e-7)


def tiny(arch, seed=0, **kw):
    torch.manual_seed(seed)
    return FastWeightLM(ModelConfig(**{**TINY[arch], **kw})).double()


def ids(B, T, seed=1):
    return torch.randint(0, 61, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["deltanet", "lact"])
def test_decoding_reproduces_full_sequence(arch):
    model, x = tiny(arch), ids(2, 23)
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


@pytest.mark.parametrize("arch", ["deltanet", "lact"])
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


@pytest.mark.parametrize("arch", ["deltanet", "lact"])
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
    for name in ("toy-deltanet", "toy-lact"):
        model = build_model(name)
        out = model(torch.randint(0, 256, (1, 40)))
        assert out.logits.shape == (1, 40, MODEL_PRESETS[name].vocab_size) and out.logits.dtype == torch.float32
        assert out.hidden.shape == (1, 40, MODEL_PRESETS[name].hidden_size)


def test_unknown_arch_and_preset():
    with pytest.raises(ValueError, match="choose one of"):
        build_model("gpt-5")
    with pytest.raises(ValueError, match="choose one of"):
        FastWeightLM(ModelConfig(arch="mamba", hidden_size=8, num_hidden_layers=1, vocab_size=5))


@pytest.mark.parametrize("arch", ["deltanet", "lact"])
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


@pytest.mark.parametrize("arch", ["deltanet", "lact"])
@pytest.mark.parametrize("T", [4, 11])
def test_multi_token_step_equals_single_steps(arch, T):
    """model(ids, state=...) over T tokens equals T one-token steps: logits, hidden states, the final state and the
    gradients of a loss on logits and final state, from snapshots. T = 11 crosses chunk boundaries (DeltaNet: one
    chunk of 8 and more, the chunked form; T = 4 takes its recurrent form; LaCT: chunks of 5 with updates inside)."""
    model, x = tiny(arch), ids(2, 19)
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
