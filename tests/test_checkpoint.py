"""Checkpoint I/O in the reference (Hugging Face) layout: round trips, hand-written reference folders (plain, fused
MLP, sharded), error messages, reference parameter counts on the meta device. Logit comparisons are exact
(torch.equal): the same fp32 weights run through the same code."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import checkpoint
from checkpoint import (config_from_hf, config_to_hf, load_pretrained, load_tokenizer, model_from_config_json,
                        save_pretrained)
from model import MODEL_PRESETS, FastWeightLM, ModelConfig

TOY_DELTANET = ModelConfig(arch="deltanet", vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=2,
                           bos_token_id=1, eos_token_id=2, pad_token_id=2)
TOY_LACT = ModelConfig(arch="lact", vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attn_heads=2,
                       num_lact_heads=2, window_size=6, lact_chunk_size=5, w0_w2_low_rank=4, rope_theta=10000.0,
                       max_position_embeddings=64)
# Gated DeltaNet with every option on (GVA, beta in (0, 2), the output gate)
TOY_GDN = ModelConfig(arch="gated_deltanet", vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=2,
                      head_dim=8, expand_v=2.0, num_v_heads=4, use_gate=True, allow_neg_eigval=True,
                      max_position_embeddings=2048)
IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45], [3, 60, 7, 2, 11, 0, 19, 23, 63, 31, 35, 39]])


def toy(config, seed=0):
    torch.manual_seed(seed)
    model = FastWeightLM(config).eval()
    with torch.no_grad():                 # norms and qk_scale/offset away from their init so every weight matters
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "A_log", "dt_bias")) or "qk_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


# ------------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("config", [TOY_DELTANET, TOY_GDN, TOY_LACT], ids=["deltanet", "gated_deltanet", "lact"])
def test_round_trip_is_bit_exact(tmp_path, config):
    model = toy(config)
    save_pretrained(model, tmp_path / "ckpt")
    loaded = load_pretrained(tmp_path / "ckpt")
    assert loaded.config == config
    assert not loaded.training
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 and p.requires_grad for p in loaded.parameters())
    assert torch.equal(logits(loaded), logits(model))
    hf = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert hf["torch_dtype"] == "float32"
    assert hf["architectures"] == [{"deltanet": "DeltaNetForCausalLM", "gated_deltanet": "GatedDeltaNetForCausalLM",
                                    "lact": "LaCTForCausalLM"}[config.arch]]
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]            # no temporary folders left behind


def test_round_trip_tied_embeddings(tmp_path):
    model = toy(ModelConfig(**{**TOY_DELTANET.__dict__, "tie_word_embeddings": True}))
    save_pretrained(model, tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")  # the reference drops the tied copy
    loaded = load_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embeddings.weight
    assert torch.equal(logits(loaded), logits(model))


def test_dtype_and_overrides(tmp_path):
    save_pretrained(toy(TOY_DELTANET), tmp_path)
    m = load_pretrained(tmp_path, dtype=torch.float64, chunk_size=4, delta_backend="torch")
    assert m.lm_head.weight.dtype == torch.float64 and m.config.chunk_size == 4
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf, "torch_dtype": "bfloat16"}))
    assert load_pretrained(tmp_path).model.embeddings.weight.dtype == torch.bfloat16   # None = the checkpoint's
    with pytest.raises(ValueError, match="unknown ModelConfig field.*chunksize"):
        load_pretrained(tmp_path, chunksize=4)


@pytest.mark.parametrize("name", list(MODEL_PRESETS))
def test_config_mapping_round_trip(name):
    assert config_from_hf(config_to_hf(MODEL_PRESETS[name])) == MODEL_PRESETS[name]


def test_missing_fields_take_reference_defaults_not_ours():
    c = config_from_hf({"model_type": "lact_swiglu"})             # LaCTSWIGLUConfig defaults
    assert (c.num_attn_heads, c.w0_w2_low_rank, c.rope_theta, c.max_position_embeddings) == (32, -1, 10000.0, 2048)
    assert c.initializer_range == 0.006 and c.pad_token_id == c.eos_token_id == 2
    assert c.base_lr == 1e-3                                      # the reference code's constant
    d = config_from_hf({"model_type": "delta_net", "hidden_ratio": None, "chunk_size": 16, "fuse_norm": False})
    assert d.max_position_embeddings == 2048 and d.hidden_ratio == 4 and d.chunk_size == 64  # fla's kernel chunk


def test_save_is_atomic_and_keeps_other_files(tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    save_pretrained(toy(TOY_DELTANET, seed=1), folder)
    (folder / "tokenizer.json").write_text("{}")
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"stale")
    save_pretrained(toy(TOY_DELTANET, seed=2), folder)
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors", "tokenizer.json"]
    want = toy(TOY_DELTANET, seed=2).lm_head.weight
    assert torch.equal(load_pretrained(folder).lm_head.weight, want)

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(toy(TOY_DELTANET, seed=3), folder)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]                # no temporary folder left behind
    assert torch.equal(load_pretrained(folder).lm_head.weight, want)              # the old one is intact


# ---------------------------------------------------------------------------- folders in the reference layout
def fla_config(**changes):
    """config.json as fla's DeltaNetConfig.save_pretrained writes it (plus fields our loader must ignore)."""
    return {"architectures": ["DeltaNetForCausalLM"], "attn": None, "attn_mode": "chunk", "bos_token_id": 1,
            "conv_size": 4, "eos_token_id": 2, "expand_k": 1, "expand_v": 1, "fuse_cross_entropy": True,
            "fuse_norm": True, "fuse_swiglu": True, "hidden_act": "swish", "hidden_ratio": 4, "hidden_size": 32,
            "initializer_range": 0.02, "intermediate_size": None, "max_position_embeddings": 2048,
            "model_type": "delta_net", "norm_eps": 1e-06, "num_heads": 2, "num_hidden_layers": 2,
            "pad_token_id": None, "qk_activation": "silu", "qk_norm": "l2", "tie_word_embeddings": False,
            "torch_dtype": "float32", "transformers_version": "4.51.3", "use_beta": True, "use_cache": True,
            "use_gate": False, "use_l2warp": False, "use_output_norm": True, "use_short_conv": True,
            "vocab_size": 64, **changes}


def fla_weights(seed=0, fused_mlp=False):
    """Random tensors under fla's DeltaNetForCausalLM names, written out by hand (D 32, H 2, I 256, V 64)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: 0.2 * torch.randn(*shape, generator=g)
    w = {"model.embeddings.weight": r(64, 32), "model.norm.weight": 1 + r(32), "lm_head.weight": r(64, 32)}
    for i in range(2):
        p = f"model.layers.{i}."
        w.update({p + "attn_norm.weight": 1 + r(32), p + "mlp_norm.weight": 1 + r(32),
                  p + "attn.q_proj.weight": r(32, 32), p + "attn.k_proj.weight": r(32, 32),
                  p + "attn.v_proj.weight": r(32, 32), p + "attn.b_proj.weight": r(2, 32),
                  p + "attn.q_conv1d.weight": r(32, 1, 4), p + "attn.k_conv1d.weight": r(32, 1, 4),
                  p + "attn.v_conv1d.weight": r(32, 1, 4), p + "attn.o_norm.weight": 1 + r(16),
                  p + "attn.o_proj.weight": r(32, 32), p + "mlp.down_proj.weight": r(32, 256)})
        if fused_mlp:
            w[p + "mlp.gate_proj.weight"] = r(512, 32)               # older fla GatedMLP: [gate; up] in one
        else:
            w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"] = r(256, 32), r(256, 32)
    return w


def write_folder(folder, config, weights):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def explicit_model(w):
    """Our model with the weights set attribute by attribute (not through state-dict names)."""
    m = FastWeightLM(config_from_hf(fla_config())).eval()
    with torch.no_grad():
        m.model.embeddings.weight.copy_(w["model.embeddings.weight"])
        m.model.norm.weight.copy_(w["model.norm.weight"])
        m.lm_head.weight.copy_(w["lm_head.weight"])
        for i, layer in enumerate(m.model.layers):
            get = lambda name: w[f"model.layers.{i}.{name}"]
            layer.attn_norm.weight.copy_(get("attn_norm.weight"))
            layer.mlp_norm.weight.copy_(get("mlp_norm.weight"))
            for mod in ("q_proj", "k_proj", "v_proj", "b_proj", "q_conv1d", "k_conv1d", "v_conv1d", "o_norm",
                        "o_proj"):
                getattr(layer.attn, mod).weight.copy_(get(f"attn.{mod}.weight"))
            gate = get("mlp.gate_proj.weight")
            if gate.shape[0] == 512:                                  # fla: gate, y = gate_proj(x).chunk(2, -1)
                layer.mlp.gate_proj.weight.copy_(gate[:256])
                layer.mlp.up_proj.weight.copy_(gate[256:])
            else:
                layer.mlp.gate_proj.weight.copy_(gate)
                layer.mlp.up_proj.weight.copy_(get("mlp.up_proj.weight"))
            layer.mlp.down_proj.weight.copy_(get("mlp.down_proj.weight"))
    return m


@pytest.mark.parametrize("fused", [False, True], ids=["split-mlp", "fused-mlp"])
def test_loads_fla_layout(tmp_path, fused):
    w = fla_weights(fused_mlp=fused)
    model = load_pretrained(write_folder(tmp_path, fla_config(), w))
    assert model.config.pad_token_id == 2 and model.config.arch == "deltanet"   # pad null -> eos
    assert torch.equal(logits(model), logits(explicit_model(w)))


def test_fused_mlp_split_matches_fla_semantics(tmp_path):
    """Old fla GatedMLP: gate, y = gate_proj(x).chunk(2, -1); out = down_proj(silu(gate) * y)."""
    w = fla_weights(fused_mlp=True)
    mlp = load_pretrained(write_folder(tmp_path, fla_config(), w)).model.layers[1].mlp
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    gate, y = (x @ w["model.layers.1.mlp.gate_proj.weight"].T).chunk(2, -1)
    want = (F.silu(gate) * y) @ w["model.layers.1.mlp.down_proj.weight"].T
    with torch.no_grad():
        # float32 matmuls over 32-64 terms of O(1) values in another grouping: ~1e-6 of summation order; a wrong
        # split (next line) is O(1) off
        assert torch.allclose(mlp(x), want, atol=1e-6, rtol=0)
        swapped = (F.silu(y) * gate) @ w["model.layers.1.mlp.down_proj.weight"].T   # the order matters
        assert not torch.allclose(mlp(x), swapped, atol=1e-3)


def test_loads_sharded_index(tmp_path):
    w = fla_weights(seed=5)
    names = sorted(w)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    (tmp_path / "config.json").write_text(json.dumps(fla_config()))
    for file, keys in shards.items():
        save_file({k: w[k] for k in keys}, tmp_path / file, metadata={"format": "pt"})
    index = {"metadata": {"total_size": 0}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert torch.equal(logits(load_pretrained(tmp_path)), logits(explicit_model(w)))
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="lacks shard file.*model-00002-of-00002"):
        load_pretrained(tmp_path)


def test_loads_lact_layout(tmp_path):
    """LaCT names written by hand (the reference checkpoint's list); compared with our model given the same tensors by
    attribute."""
    hf = {"model_type": "lact_swiglu", "architectures": ["LaCTForCausalLM"], "hidden_size": 32, "num_attn_heads": 2,
          "num_lact_heads": 2, "num_hidden_layers": 1, "vocab_size": 64, "window_size": 6, "lact_chunk_size": 5,
          "w0_w2_low_rank": 4, "rope_theta": 10000, "inter_multi": 1, "use_momentum": True, "use_muon": False,
          "learnable_ttt_scale": True, "qkv_silu": True, "fuse_norm": True, "use_fused_kernel": False,
          "fp32_states": False, "attention_bias": False, "torch_dtype": "float32"}
    g = torch.Generator().manual_seed(3)
    r = lambda *shape: 0.2 * torch.randn(*shape, generator=g)
    p = "model.layers.0."
    w = {"model.embeddings.weight": r(64, 32), "model.norm.weight": 1 + r(32), "lm_head.weight": r(64, 32),
         p + "attn_norm.weight": 1 + r(32), p + "mlp_norm.weight": 1 + r(32), p + "attn.qkv.weight": r(96, 32),
         p + "attn.o_proj.weight": r(32, 32), p + "attn.w1": r(2, 16, 16), p + "attn.w0.w_left": r(2, 16, 4),
         p + "attn.w0.w_right": r(2, 4, 16), p + "attn.w2.w_left": r(2, 16, 4), p + "attn.w2.w_right": r(2, 4, 16),
         p + "attn.qk_scale": 1 + r(32, 2), p + "attn.qk_offset": r(32, 2), p + "attn.lr_proj.weight": r(6, 32),
         p + "attn.lr_proj.bias": r(6), p + "attn.ttt_scale_proj.weight": r(2, 32),
         p + "attn.ttt_scale_proj.bias": r(2),
         p + "attn.ttt_norm.weight": 1 + r(16), p + "attn.momentum_proj.0.weight": r(2, 32),
         p + "attn.momentum_proj.0.bias": r(2), p + "mlp.gate_proj.weight": r(256, 32),
         p + "mlp.up_proj.weight": r(256, 32), p + "mlp.down_proj.weight": r(32, 256)}
    model = load_pretrained(write_folder(tmp_path, hf, w))
    ref = FastWeightLM(model.config).eval()
    with torch.no_grad():
        a = ref.model.layers[0].attn
        for mod, t in [(ref.model.embeddings.weight, "model.embeddings.weight"), (ref.lm_head.weight, "lm_head.weight"),
                       (ref.model.norm.weight, "model.norm.weight"), (a.qkv.weight, "attn.qkv.weight"),
                       (a.o_proj.weight, "attn.o_proj.weight"), (a.w1, "attn.w1"), (a.w0.w_left, "attn.w0.w_left"),
                       (a.w0.w_right, "attn.w0.w_right"), (a.w2.w_left, "attn.w2.w_left"),
                       (a.w2.w_right, "attn.w2.w_right"), (a.qk_scale, "attn.qk_scale"),
                       (a.qk_offset, "attn.qk_offset"), (a.lr_proj.weight, "attn.lr_proj.weight"),
                       (a.lr_proj.bias, "attn.lr_proj.bias"), (a.ttt_scale_proj.weight, "attn.ttt_scale_proj.weight"),
                       (a.ttt_scale_proj.bias, "attn.ttt_scale_proj.bias"), (a.ttt_norm.weight, "attn.ttt_norm.weight"),
                       (a.momentum_proj[0].weight, "attn.momentum_proj.0.weight"),
                       (a.momentum_proj[0].bias, "attn.momentum_proj.0.bias")]:
            mod.copy_(w[t] if t.startswith(("model.", "lm_head")) else w[p + t])
        blk = ref.model.layers[0]
        for mod in ("attn_norm", "mlp_norm"):
            getattr(blk, mod).weight.copy_(w[p + mod + ".weight"])
        for mod in ("gate_proj", "up_proj", "down_proj"):
            getattr(blk.mlp, mod).weight.copy_(w[p + f"mlp.{mod}.weight"])
    assert torch.equal(logits(model), logits(ref))


# ----------------------------------------------------------------------------------------------------- errors
def test_error_messages(tmp_path):
    with pytest.raises(ValueError, match="checkpoint folder .* does not exist"):
        load_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="has no config.json"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(fla_config()))
    with pytest.raises(ValueError, match="has no weights: expected model.safetensors or model.safetensors.index"):
        load_pretrained(tmp_path)
    w = fla_weights()
    del w["model.layers.1.attn.b_proj.weight"]
    w["model.layers.0.attn.g_proj.weight"] = torch.zeros(32, 32)
    write_folder(tmp_path, fla_config(), w)
    with pytest.raises(ValueError, match=r"missing keys \[model\.layers\.1\.attn\.b_proj\.weight\]; "
                                         r"unexpected keys \[model\.layers\.0\.attn\.g_proj\.weight\]"):
        load_pretrained(tmp_path)
    w = fla_weights()
    w.update({f"extra.{i}": torch.zeros(1) for i in range(7)})
    write_folder(tmp_path, fla_config(), w)
    with pytest.raises(ValueError, match=r"unexpected keys \[extra\.0, .*extra\.4, \.\.\. \(\+2 more\)\]"):
        load_pretrained(tmp_path)
    write_folder(tmp_path, fla_config(num_heads=4), fla_weights())
    with pytest.raises(ValueError, match=r"shape mismatches .*attn\.b_proj\.weight \[2, 32\] \(model \[4, 32\]\)"):
        load_pretrained(tmp_path)
    write_folder(tmp_path, fla_config(model_type="llama"), fla_weights())
    with pytest.raises(ValueError, match="unsupported model_type 'llama'; supported: delta_net, gated_deltanet, "
                                         "lact_swiglu"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("field, value", [("qk_activation", "relu"), ("qk_norm", "sum"),
                                          ("attn", {"layers": [1], "num_heads": 2}),
                                          ("use_short_conv", False), ("norm_first", True), ("hidden_act", "gelu")])
def test_unsupported_deltanet_features_are_named(field, value):
    with pytest.raises(ValueError, match=f"delta_net feature {field}=.* is not implemented"):
        config_from_hf(fla_config(**{field: value}))


@pytest.mark.parametrize("field, value", [("use_short_conv", False), ("conv_bias", True), ("attnres_block_size", 4),
                                          ("output_gate_activation", "sigmoid"), ("attn", {"layers": [1]})])
def test_unsupported_gated_deltanet_features_are_named(field, value):
    with pytest.raises(ValueError, match=f"gated_deltanet feature {field}=.* is not implemented"):
        config_from_hf({"model_type": "gated_deltanet", field: value})


def test_deltanet_gate_and_negative_eigenvalues_round_trip(tmp_path):
    """fla's DeltaNet options use_gate (g_proj, gated output norm) and allow_neg_eigval: the Gated DeltaNet's code."""
    config = ModelConfig(**{**TOY_DELTANET.__dict__, "use_gate": True, "allow_neg_eigval": True})
    model = toy(config)
    save_pretrained(model, tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["use_gate"] is True and hf["allow_neg_eigval"] is True and "g_proj" in str(model.state_dict().keys())
    assert torch.equal(logits(load_pretrained(tmp_path)), logits(model))


def test_gated_deltanet_fla_folder(tmp_path):
    """A folder as fla's GatedDeltaNetForCausalLM.save_pretrained writes it, from an fla version that still saved the
    unused attn.D: the config maps to ours (fla's defaults for missing fields), attn.D is ignored, and saving
    writes fla's field names back."""
    model = toy(TOY_GDN)
    weights = {**model.state_dict(), **{f"model.layers.{i}.attn.D": torch.ones(4) for i in range(2)}}
    write_folder(tmp_path, {**FLA_GDN, "torch_dtype": "float32"}, weights)
    loaded = load_pretrained(tmp_path)
    assert loaded.config == TOY_GDN and torch.equal(logits(loaded), logits(model))
    written = config_to_hf(TOY_GDN)                 # fla's fields, fla's values (its pad null reads as eos: 2)
    assert all(written[k] == v for k, v in FLA_GDN.items() if k in checkpoint._FIELDS and k != "pad_token_id")
    with torch.device("meta"):
        defaults = model_from_config_json({"model_type": "gated_deltanet"})    # fla's defaults: the 1.3B recipe
    assert defaults.num_parameters() == 1_387_348_732 and defaults.config == MODEL_PRESETS["gated-deltanet-1.3b"]


@pytest.mark.parametrize("field, value", [("ttt_prenorm", True), ("no_v_silu", True), ("attn_qk_norm", True),
                                          ("lr_dim", 2), ("ttt_loss_type", "l2"), ("window_size", None)])
def test_unsupported_lact_features_are_named(field, value):
    with pytest.raises(ValueError, match=f"lact_swiglu feature {field}=.* is not implemented"):
        config_from_hf({"model_type": "lact_swiglu", field: value})


def test_tokenizer(tmp_path, monkeypatch):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "hello", "world"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "config.json").write_text(json.dumps(fla_config(pad_token_id=None)))
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        load_tokenizer(tmp_path)
    tok.save(str(tmp_path / "tokenizer.json"))
    t = load_tokenizer(tmp_path)
    assert (t.bos_id, t.eos_id, t.pad_id, t.vocab_size) == (1, 2, 2, 5)
    assert t.encode("hello world") == [3, 4] and t.decode([3, 4]) == "hello world"
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(ValueError, match="needs the 'tokenizers' package"):
        load_tokenizer(tmp_path)


FLA_GDN = {  # TOY_GDN's config.json as fla 0.6.0's GatedDeltaNetConfig writes it (transformers 5.25)
    "allow_neg_eigval": True, "architectures": ["GatedDeltaNetForCausalLM"], "attn": None, "attn_mode": "chunk",
    "attnres_block_size": None, "bos_token_id": 1, "conv_size": 4, "dtype": "float32", "eos_token_id": 2,
    "expand_v": 2, "fuse_cross_entropy": True, "fuse_linear_cross_entropy": False, "fuse_norm": True,
    "fuse_swiglu": True, "head_dim": 8, "hidden_act": "swish", "hidden_ratio": 4, "hidden_size": 32,
    "initializer_range": 0.02, "intermediate_size": None, "max_position_embeddings": 2048,
    "model_type": "gated_deltanet", "norm_eps": 1e-06, "num_heads": 2, "num_hidden_layers": 2, "num_v_heads": 4,
    "output_gate_activation": "swish", "pad_token_id": None, "tie_word_embeddings": False,
    "transformers_version": "5.25.0", "use_cache": True, "use_gate": True, "use_l2warp": False,
    "use_short_conv": True, "vocab_size": 64}


# -------------------------------------------------------------------------------- the reference checkpoints
DELTANET_1_3B = {  # fla-hub/delta_net-1.3B-100B, as fla's DeltaNetConfig writes it
    "architectures": ["DeltaNetForCausalLM"], "attn_mode": "chunk", "bos_token_id": 1, "conv_size": 4,
    "eos_token_id": 2, "expand_k": 1, "expand_v": 1, "fuse_cross_entropy": True, "hidden_act": "swish",
    "hidden_ratio": 4, "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": None,
    "max_position_embeddings": 2048, "model_type": "delta_net", "norm_eps": 1e-06, "norm_first": False,
    "num_heads": 16, "num_hidden_layers": 24, "pad_token_id": 2, "qk_activation": "silu", "qk_norm": "l2",
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.40.2", "use_beta": True,
    "use_cache": True, "use_gate": False, "use_output_norm": True, "use_short_conv": True, "vocab_size": 32000}
LACT_760M = {  # YunjinZhang/lact_llm: LaCT's configs/760M_lact_swiglu_nh4_fwlow_rank_momentum.json + saved fields
    "architectures": ["LaCTForCausalLM"], "attention_bias": False, "attn_qk_norm": False, "bos_token_id": 1,
    "elementwise_affine": True, "eos_token_id": 2, "fp32_states": False, "fuse_cross_entropy": True,
    "fuse_norm": True, "fuse_swiglu": True, "fw_init_gain": 0.5, "hidden_act": "swish", "hidden_ratio": 4,
    "hidden_size": 1536, "initializer_range": 0.02, "inter_multi": 1, "intermediate_size": None,
    "lact_chunk_size": 2048, "last_layer_fuse_norm": True, "learnable_ttt_scale": True, "lr_dim": 1,
    "lr_parameterization": "mamba", "max_position_embeddings": 32768, "model_type": "lact_swiglu",
    "no_v_silu": False, "norm_eps": 1e-06, "num_attn_heads": 24, "num_hidden_layers": 24, "num_lact_heads": 4,
    "pad_token_id": None, "qkv_bias": False, "qkv_silu": True, "rope_theta": 1000000, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.51.3", "ttt_loss_type": "dot_product", "ttt_nope": False,
    "ttt_prenorm": False, "use_cache": True, "use_fused_kernel": False, "use_momentum": True, "use_muon": False,
    "vocab_size": 32000, "w0_w2_low_rank": 32, "window_size": 2048}


@pytest.mark.parametrize("hf, count", [(DELTANET_1_3B, 1_365_677_056), (LACT_760M, 797_625_312)],
                         ids=["deltanet-1.3b", "lact-760m"])
def test_reference_parameter_counts_on_meta(tmp_path, hf, count):
    (tmp_path / "config.json").write_text(json.dumps(hf))
    model = model_from_config_json(tmp_path)                     # device="meta": no memory, no weights
    assert model.num_parameters() == count
    assert all(p.is_meta for p in model.parameters())
    assert model_from_config_json(hf).num_parameters() == count
    preset = MODEL_PRESETS["deltanet-1.3b" if hf is DELTANET_1_3B else "lact-760m"]
    assert config_from_hf(hf) == preset
