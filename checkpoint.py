"""Checkpoints in the reference (Hugging Face) layout: a folder with config.json + model.safetensors (or shards
listed in model.safetensors.index.json) + optionally tokenizer.json.

The config uses the field names of the reference config classes (fla's DeltaNetConfig, model_type "delta_net";
fla's GatedDeltaNetConfig, "gated_deltanet"; LaCT's LaCTSWIGLUConfig, "lact_swiglu"), the weights their state-dict
names (FastWeightLM's own). A field missing from config.json takes the reference class's default (NOT ModelConfig's),
an unknown field is ignored, and a feature we do not implement is refused by name.

Training checkpoints (train.py's out_dir/ckpt.pt, for --resume) are one torch.save file: the full model and AdamW
state keyed by parameter name, gathered from whatever engine trained them (one process, DDP, FSDP2), so a run can
resume with another number of processes: save_training / load_training.
"""
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.nn.parallel import DistributedDataParallel

from model import FastWeightLM, ModelConfig

# reference model_type -> ModelConfig.arch
MODEL_TYPES = {"delta_net": "deltanet", "gated_deltanet": "gated_deltanet", "lact_swiglu": "lact"}
ARCHITECTURES = {"deltanet": "DeltaNetForCausalLM", "gated_deltanet": "GatedDeltaNetForCausalLM",
                 "lact": "LaCTForCausalLM"}

_COMMON = dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=24, hidden_ratio=4, intermediate_size=None,
               norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=None,
               hidden_act="swish")
# The reference config classes' defaults (fla DeltaNetConfig, GatedDeltaNetConfig; LaCT LaCTSWIGLUConfig): the value
# of a missing field.
REFERENCE_DEFAULTS = {
    "deltanet": dict(_COMMON, initializer_range=0.02, max_position_embeddings=2048, num_heads=16, expand_k=1.0,
                     expand_v=1.0, conv_size=4, use_short_conv=True, use_beta=True, use_gate=False,
                     use_output_norm=True, qk_activation="silu", qk_norm="l2", allow_neg_eigval=False),
    "gated_deltanet": dict(_COMMON, num_hidden_layers=21, initializer_range=0.02, max_position_embeddings=2048,
                           num_heads=6, head_dim=256, expand_v=2.0, num_v_heads=None, conv_size=4, use_gate=True,
                           use_short_conv=True, allow_neg_eigval=False),
    "lact": dict(_COMMON, initializer_range=0.006, max_position_embeddings=2048, num_attn_heads=32, num_lact_heads=4,
                 inter_multi=1, window_size=2048, lact_chunk_size=2048, qkv_bias=False, attn_qk_norm=False,
                 qkv_silu=True, no_v_silu=False, lr_dim=1, use_muon=False, use_momentum=True,
                 learnable_ttt_scale=True, w0_w2_low_rank=-1, fw_init_gain=0.5, rope_theta=10000.0,
                 ttt_prenorm=False, ttt_nope=False, lr_parameterization="mamba", ttt_loss_type="dot_product",
                 base_lr=1e-3),  # base_lr: hard-coded 1e-3 in the reference code (which ignores the field)
}
_SWISH = ("swish", "silu")
# Reference features we do not implement: field -> the supported values, checked when present (true never matches 1).
# Everything else the references define (attn_mode, fuse_*, use_l2warp, use_cache, use_fused_kernel, fp32_states,
# chunk_size, attention_bias, elementwise_affine for LaCT, ...) is a kernel/training detail that leaves logits alone.
SUPPORTED_VALUES = {
    "deltanet": dict(use_short_conv=(True,), use_beta=(True,), use_output_norm=(True,),
                     qk_activation=("silu",), qk_norm=("l2",), attn=(None,),
                     norm_first=(False,), share_conv_kernel=(False,), use_rope=(False,), use_elu=(False,),
                     conv_bias=(False,), elementwise_affine=(True,), attnres_block_size=(None,), hidden_act=_SWISH),
    "gated_deltanet": dict(use_short_conv=(True,), attn=(None,), conv_bias=(False,), attnres_block_size=(None,),
                           output_gate_activation=_SWISH, hidden_act=_SWISH),
    "lact": dict(attn_qk_norm=(False,), no_v_silu=(False,), ttt_prenorm=(False,), lr_dim=(1,),
                 lr_parameterization=("mamba",), ttt_loss_type=("dot_product",), hidden_act=_SWISH),
}
_FIELDS = {f.name: f for f in dataclasses.fields(ModelConfig)}
WEIGHTS, INDEX, CONFIG, TOKENIZER = "model.safetensors", "model.safetensors.index.json", "config.json", "tokenizer.json"


def config_from_hf(hf: dict) -> ModelConfig:
    """A reference config.json dict -> ModelConfig. ValueError for an unsupported model_type or feature."""
    if not isinstance(hf, dict):
        raise ValueError(f"a config must be a JSON object, got {type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(MODEL_TYPES)}")
    arch = MODEL_TYPES[model_type]
    for name, ok in SUPPORTED_VALUES[arch].items():
        if name in hf and not any(hf[name] == v and isinstance(hf[name], bool) == isinstance(v, bool) for v in ok):
            raise ValueError(f"{model_type} feature {name}={hf[name]!r} is not implemented "
                             f"(supported: {' or '.join(json.dumps(v) for v in ok)})")
    ref = {**REFERENCE_DEFAULTS[arch], **{k: v for k, v in hf.items() if k in REFERENCE_DEFAULTS[arch]}}
    for name in ("window_size", "rope_theta") if arch == "lact" else ():
        if ref[name] is None:
            raise ValueError(f"{model_type} feature {name}=null is not implemented (give a number)")
    ref["hidden_ratio"] = 4 if ref["hidden_ratio"] is None else ref["hidden_ratio"]   # the references' fallback
    ref["pad_token_id"] = ref["eos_token_id"] if ref["pad_token_id"] is None else ref["pad_token_id"]
    values = {k: float(v) if isinstance(_FIELDS[k].default, float) and type(v) is int else v   # 1 -> 1.0, not True
              for k, v in ref.items() if k in _FIELDS}   # hidden_act, ttt_loss_type: checked above, not stored
    return ModelConfig(arch=arch, **values)


def config_to_hf(config: ModelConfig) -> dict:
    """ModelConfig -> a reference config.json dict (field names of the reference class, model_type, architectures).
    Runtime-only fields (chunk_size, delta_backend, gradient_checkpointing) are not written."""
    if config.arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {config.arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    model_type = {a: t for t, a in MODEL_TYPES.items()}[config.arch]
    hf = {"model_type": model_type, "architectures": [ARCHITECTURES[config.arch]]}
    for name, default in REFERENCE_DEFAULTS[config.arch].items():
        hf[name] = getattr(config, name) if name in _FIELDS else default  # hidden_act, ttt_loss_type: neutral
    if config.arch != "lact":
        hf["attn"] = None                                                  # fla's hybrid attention layers: none
    return hf


def _read_config(path):
    """The JSON of a config file, or of a checkpoint folder's config.json."""
    p = Path(path)
    file = p / CONFIG if p.is_dir() or not p.suffix else p
    if not file.is_file():
        raise ValueError(f"'{p}' has no {CONFIG}; a checkpoint folder needs {CONFIG} and {WEIGHTS}" if p.is_dir() else
                         f"checkpoint folder or config file '{p}' does not exist; pass a folder with {CONFIG} and "
                         f"{WEIGHTS}")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"'{file}' is not valid JSON ({e})") from None


def model_from_config_json(path_or_dict, device="meta", **overrides) -> FastWeightLM:
    """A FastWeightLM from a reference config (a dict, a config.json file or a checkpoint folder), no weights loaded:
    on the meta device (the default) only shapes and parameter counts exist; elsewhere the reference init.
    overrides: runtime ModelConfig fields (delta_backend, chunk_size, gradient_checkpointing, ...)."""
    config = config_from_hf(path_or_dict if isinstance(path_or_dict, dict) else _read_config(path_or_dict))
    bad = sorted(set(overrides) - set(_FIELDS))
    if bad:
        raise ValueError(f"unknown ModelConfig field(s) {', '.join(bad)}; valid: {', '.join(_FIELDS)}")
    config = dataclasses.replace(config, **overrides)
    try:
        with torch.device(device):
            return FastWeightLM(config)
    except NotImplementedError as e:          # a mixer's own guard, in case config_from_hf let something through
        raise ValueError(str(e)) from None


def _short(names, n=5):
    names = sorted(names)
    return ", ".join(names[:n]) + (f", ... (+{len(names) - n} more)" if len(names) > n else "")


def _read_weights(folder, device):
    """All tensors of model.safetensors or of the shards in model.safetensors.index.json -> {name: tensor}."""
    if (folder / WEIGHTS).is_file():
        return load_file(folder / WEIGHTS, device=device)
    if not (folder / INDEX).is_file():
        raise ValueError(f"'{folder}' has no weights: expected {WEIGHTS} or {INDEX} (+ shards); "
                         f"pytorch_model.bin is not supported")
    try:
        weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"'{folder / INDEX}' is not a safetensors index (needs a \"weight_map\" object)") from None
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise ValueError(f"'{folder}' lacks shard file(s) listed in {INDEX}: {_short(missing)}")
    return {name: t for shard in shards for name, t in load_file(folder / shard, device=device).items()}


def load_pretrained(path, dtype=None, device=None, **overrides) -> FastWeightLM:
    """A FastWeightLM from a checkpoint folder in the reference layout, in eval mode. dtype: None keeps the
    checkpoint's (config torch_dtype / dtype, else the stored embedding's); device: None = cpu. overrides: as
    model_from_config_json. Built on the meta device, then the loaded tensors are assigned, so no memory goes to a
    throw-away init."""
    folder = Path(path)
    hf = _read_config(folder)
    model = model_from_config_json(hf, "meta", **overrides)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = _read_weights(folder, str(torch.device(device or "cpu")))
    if model.config.arch == "gated_deltanet":               # fla before 2025-03-12 saved an unused attn.D
        state = {k: v for k, v in state.items() if not k.endswith(".attn.D")}
    if model.config.tie_word_embeddings:                    # the reference drops the tied copy when saving
        expected.pop("lm_head.weight")
        state.pop("lm_head.weight", None)
    for name in [k for k in state if k.endswith(".mlp.gate_proj.weight")]:
        # older fla GatedMLP: one gate_proj [2I, D] computing `gate, y = gate_proj(x).chunk(2, -1)`
        up = name.replace(".gate_proj.", ".up_proj.")
        if up not in state and up in expected and state[name].shape[0] == 2 * expected[name][0]:
            state[name], state[up] = state[name].chunk(2, dim=0)   # [2I, D] -> gate [I, D], up [I, D]
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing or unexpected:
        raise ValueError(f"weights in '{folder}' do not match the config: missing keys [{_short(missing)}]; "
                         f"unexpected keys [{_short(unexpected)}]")
    bad = [f"{k} {list(state[k].shape)} (model {list(s)})" for k, s in expected.items() if tuple(state[k].shape) != s]
    if bad:
        raise ValueError(f"shape mismatches in '{folder}': {_short(bad, 3)}")
    name = str(dtype or hf.get("torch_dtype") or hf.get("dtype") or state["model.embeddings.weight"].dtype)
    dtype = getattr(torch, name.replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; use e.g. float32, bfloat16, float16")
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)   # the keys are checked above
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embeddings.weight   # the tied head shares the embedding Parameter
    on_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if on_meta:
        raise RuntimeError(f"parameters left on the meta device after loading: {_short(on_meta)}")
    return model.eval()


def save_pretrained(model: FastWeightLM, path, extra=None, state=None):
    """Write config.json + model.safetensors (reference names; no tied lm_head.weight, as the reference) into a
    temporary folder beside `path`, then rename it into place: never a half-written checkpoint. `extra`: more
    config.json fields (train.py records its tokenizer's name); `state`: the weights to write instead of
    model.state_dict() (gathered from FSDP2 shards). An existing folder's other files (tokenizer.json) are kept."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"'{folder}' exists and is not a folder; pass a checkpoint folder path")
    params = dict(model.state_dict() if state is None else state)
    if any(t.is_meta for t in params.values()):
        raise ValueError("the model has parameters on the meta device; load or initialise it before saving")
    if model.config.tie_word_embeddings:
        params.pop("lm_head.weight")                  # shares storage with model.embeddings.weight
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in params.items()}
    hf = {**config_to_hf(model.config), "torch_dtype": str(model.lm_head.weight.dtype).replace("torch.", ""),
          **(extra or {})}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)                     # mkdtemp makes it private; a checkpoint is not
    try:
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(hf, indent=2) + "\n")
        old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
        if folder.is_dir():
            for entry in folder.iterdir():            # keep tokenizer files etc.; drop old weights and config
                if entry.name not in (CONFIG, INDEX) and not entry.name.endswith(".safetensors"):
                    (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, tmp / entry.name)
            os.replace(folder, old / folder.name)
        os.replace(tmp, folder)
        shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_tokenizer(path):
    """The checkpoint folder's tokenizer.json as data.HFTokenizer, with BOS/EOS/PAD ids from its config.json."""
    import importlib.util
    folder = Path(path)
    hf = _read_config(folder)
    if not (folder / TOKENIZER).is_file():
        raise ValueError(f"'{folder}' has no {TOKENIZER} (a SentencePiece tokenizer.model alone is not supported)")
    if importlib.util.find_spec("tokenizers") is None:
        raise ValueError(f"reading {TOKENIZER} needs the 'tokenizers' package: pip install tokenizers")
    from data import HFTokenizer
    return HFTokenizer(folder / TOKENIZER, hf.get("bos_token_id", 1), hf.get("eos_token_id", 2), hf.get("pad_token_id"))


# ------------------------------------------------------------------------------------------ training checkpoints
def save_training(path, model, opt, meta, write=True):
    """Gather the full model and AdamW state as CPU tensors keyed by parameter name (every process calls this: under
    FSDP2 it gathers the shards, and only rank 0 receives them) and, where `write` (rank 0), save it with `meta`
    (config, step, data position, versions) and the RNG state to a temporary name, then rename: a crash never leaves
    a half-written checkpoint. -> the gathered model state (for the Hugging Face export)."""
    module = model.module if isinstance(model, DistributedDataParallel) else model
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(module, options=full)
    opt_state = get_optimizer_state_dict(module, opt, options=full)
    if write:
        rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()}
        torch.save({"model": model_state, "optimizer": opt_state, "rng": rng, **meta}, path + ".tmp")
        os.replace(path + ".tmp", path)
    return model_state


def load_training(path, model, opt):
    """Load a save_training file into model (plain, DDP or FSDP2: each process takes its part) and opt; restores
    the RNG state. -> the checkpoint dict. One-line ValueError for a file that is not this run's kind."""
    module = model.module if isinstance(model, DistributedDataParallel) else model
    full = StateDictOptions(full_state_dict=True)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        set_model_state_dict(module, ckpt["model"], options=full)
        set_optimizer_state_dict(module, opt, ckpt["optimizer"], options=full)
    except Exception as e:  # unpickling errors, missing keys, shape mismatches: all mean "not this run's file"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot resume from {path}: corrupt or incompatible checkpoint ({first[:200]})") from None
    torch.set_rng_state(ckpt["rng"]["torch"])
    if torch.cuda.is_available() and ckpt["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return ckpt
