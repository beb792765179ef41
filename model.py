"""The language model around the fast-weight mixers: config, presets, the pre-norm stack, decoding and snapshots.

Layout and parameter names follow the reference checkpoints one-to-one (fla's DeltaNetForCausalLM and
GatedDeltaNetForCausalLM, LaCT's lact_swiglu): model.embeddings, model.layers.{i}.{attn_norm, attn, mlp_norm, mlp},
model.norm, lm_head.
Checkpoint I/O in the reference (Hugging Face) layout lives in checkpoint.py (checkpoint.load_pretrained,
checkpoint.save_pretrained), which imports this file.
"""
import math
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fastweights import DeltaNetMixer, GatedDeltaNetMixer, RMSNorm, map_state
from lact import LaCTMixer


@dataclass
class ModelConfig:
    arch: str = "deltanet"                 # "deltanet" | "gated_deltanet" | "lact"
    vocab_size: int = 32000
    hidden_size: int = 2048
    num_hidden_layers: int = 24
    hidden_ratio: float = 4                # MLP width: 256 * ceil(int(hidden * ratio * 2/3) / 256)
    intermediate_size: int | None = None   # overrides the rule above when set
    norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 2
    gradient_checkpointing: bool = False   # recompute each block in the backward (saves memory at 16K context)
    # DeltaNet (fla's DeltaNetConfig names)
    num_heads: int = 16
    expand_k: float = 1.0
    expand_v: float = 1.0
    conv_size: int = 4
    use_short_conv: bool = True
    use_beta: bool = True
    use_gate: bool = False
    use_output_norm: bool = True
    qk_activation: str = "silu"
    qk_norm: str = "l2"
    allow_neg_eigval: bool = False         # beta in (0, 2) instead of (0, 1)
    # Gated DeltaNet (fla's GatedDeltaNetConfig names; the fields above too, but expand_v multiplies head_dim)
    head_dim: int = 256                    # key width per head; values: head_dim * expand_v
    num_v_heads: int | None = None         # value heads, a multiple of num_heads (None: num_heads)
    # the decay rate A ~ U(lo, hi) at init (fla's; toy-gdn's is narrower): init only, so neither saved nor compared
    gate_A_init: tuple = field(default=(0.01, 16.0), compare=False)
    chunk_size: int = 64                   # delta-rule chunk
    delta_backend: str = "auto"            # kernels.BACKENDS
    # LaCT (the lact_swiglu config names)
    num_attn_heads: int = 24
    num_lact_heads: int = 4
    inter_multi: float = 1.0
    window_size: int = 2048
    lact_chunk_size: int = 2048
    qkv_bias: bool = False
    attn_qk_norm: bool = False
    qkv_silu: bool = True
    lr_dim: int = 1
    use_muon: bool = False
    use_momentum: bool = True
    base_lr: float = 1e-3                  # inner lr at init: softplus(lr_proj(x) + inv_softplus(base_lr))
    learnable_ttt_scale: bool = True
    w0_w2_low_rank: int = 32
    fw_init_gain: float = 0.5
    rope_theta: float = 1e6
    ttt_prenorm: bool = False
    ttt_nope: bool = False
    no_v_silu: bool = False
    lr_parameterization: str = "mamba"
    ttt_loss_type: str = "dot_product"
    max_position_embeddings: int = 32768

    @property
    def mlp_width(self):
        if self.intermediate_size:
            return self.intermediate_size
        return 256 * math.ceil(int(self.hidden_size * self.hidden_ratio * 2 / 3) / 256)


TOY_VOCAB = dict(vocab_size=512, bos_token_id=256, eos_token_id=257, pad_token_id=258)   # the word tokenizer's ids
MODEL_PRESETS = {
    # tiny models that learn associative recall on a laptop CPU in minutes
    "toy-deltanet": ModelConfig(arch="deltanet", hidden_size=64, num_hidden_layers=2, num_heads=2, **TOY_VOCAB),
    # the toy preset's model: one head with 64-dim keys (2 x 32 learns key-value binding late and seed-dependently)
    "toy-deltanet-1head": ModelConfig(arch="deltanet", hidden_size=64, num_hidden_layers=2, num_heads=1, **TOY_VOCAB),
    # 16-token chunks: the reference's base inner lr 1e-3 (for 2048-token chunks) moves the fast weights by 1e-4 of
    # their norm per chunk and stores nothing (README: the toy LaCT); 1.0 stores a chunk's bindings and keeps them
    "toy-lact": ModelConfig(arch="lact", hidden_size=64, num_hidden_layers=2, num_attn_heads=2, num_lact_heads=1,
                            window_size=16, lact_chunk_size=16, w0_w2_low_rank=8, rope_theta=10000.0, base_lr=1.0,
                            **TOY_VOCAB),
    # the toy preset's model with a gate: one head, the same 64 x 64 state; A ~ U(0.01, 0.1) keeps >= half of a needle
    # over the 64-token warm-up at init (fla's U(0.01, 16) forgets it within 2 tokens on the default seed: README)
    "toy-gdn": ModelConfig(arch="gated_deltanet", hidden_size=64, num_hidden_layers=2, num_heads=1, head_dim=64,
                           expand_v=1.0, use_gate=True, gate_A_init=(0.01, 0.1), **TOY_VOCAB),
    # the reference architectures (fla-hub/delta_net-1.3B-100B and YunjinZhang/lact_llm 760M)
    "deltanet-1.3b": ModelConfig(arch="deltanet", max_position_embeddings=2048),
    # fla's Gated DeltaNet 1.3B recipe (fla-org/flame configs/gated_deltanet_1B.json): 1,387,348,732 parameters
    "gated-deltanet-1.3b": ModelConfig(arch="gated_deltanet", num_hidden_layers=21, num_heads=6, head_dim=256,
                                       expand_v=2.0, use_gate=True, max_position_embeddings=2048),
    "lact-760m": ModelConfig(arch="lact", hidden_size=1536, num_hidden_layers=24, num_attn_heads=24,
                             num_lact_heads=4, window_size=2048, lact_chunk_size=2048),
}


# A NamedTuple, not a dataclass: FSDP2 hooks its pre-backward all-gather onto the output tensors it finds with torch's
# pytree, which (torch 2.11) does not look into dataclasses; the backward of a decoding step would read a freed weight.
class LMOutput(NamedTuple):
    logits: torch.Tensor              # [B, T, V] fp32
    hidden: torch.Tensor              # [B, T, D] last layer after the final norm (the head's input)
    snapshots: list | None = None     # per layer: state dict, row b*P + p = state after token snapshot_at[b, p]
    state: list | None = None         # per layer: state dict after the last token (step only)
    positions: torch.Tensor | None = None  # [B, P] the positions of the snapshots
    snapshot_logits: torch.Tensor | None = None  # [B*P, V] fp32: logits[b, positions[b, p]] at row b*P + p


class MLP(nn.Module):
    """SwiGLU: down(silu(gate x) * up x)."""

    def __init__(self, config):
        super().__init__()
        D, I = config.hidden_size, config.mlp_width
        self.gate_proj = nn.Linear(D, I, bias=False)
        self.up_proj = nn.Linear(D, I, bias=False)
        self.down_proj = nn.Linear(I, D, bias=False)

    def forward(self, x):  # [B, T, D]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm: h = x + attn(attn_norm(x)); out = h + mlp(mlp_norm(h))."""

    def __init__(self, config, layer_idx):
        super().__init__()
        mixers = {"deltanet": DeltaNetMixer, "gated_deltanet": GatedDeltaNetMixer, "lact": LaCTMixer}
        if config.arch not in mixers:
            raise ValueError(f"unknown arch {config.arch!r}; choose one of {', '.join(mixers)}")
        self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.attn = mixers[config.arch](config, layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, snapshot_at=None, state=None):
        """x [B, T, D] -> ([B, T, D], snapshots), or with a decoding state -> ([B, T, D], new state)."""
        if state is None:
            y, extra = self.attn(self.attn_norm(x), snapshot_at)
        else:
            y, extra = self.attn.step(self.attn_norm(x), state)
        h = x + y
        return h + self.mlp(self.mlp_norm(h)), extra


class Backbone(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)


class FastWeightLM(nn.Module):
    """A DeltaNet, Gated DeltaNet or LaCT language model. Three entry points that agree (tests/test_model.py):
    model(ids) for training, model(ids, snapshot_at) for the state after chosen prefixes, model.step for decoding."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embeddings.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        """Reference init: Linear / Conv / Embedding weights N(0, initializer_range), biases 0, norms 1; the LaCT
        fast-weight parameters and Gated DeltaNet's A_log, dt_bias (not Linear modules) keep the mixer's own init."""
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def _head(self, h):  # [B, T, D] -> (logits fp32 [B, T, V], hidden [B, T, D])
        hidden = self.model.norm(h)
        return self._head_logits(hidden), hidden

    def _head_logits(self, hidden):  # [..., D] after the final norm -> [..., V] fp32 (fp64 for fp64 weights)
        return self.lm_head(hidden).to(torch.promote_types(hidden.dtype, torch.float32))

    def forward(self, input_ids, snapshot_at=None, state=None):
        """input_ids: LongTensor [B, T]; snapshot_at: None, LongTensor [B, P] of positions, or a function
        (logits [B, T, V], hidden [B, T, D]) -> positions [B, P] that picks them from this very pass (REFINE's
        entropy selection). -> LMOutput; .snapshots holds the states after the chosen positions (rows b*P + p),
        .positions the positions. With `state` it decodes instead (see step): one entry point for both, so a
        DistributedDataParallel or FSDP2 wrapper sees every call."""
        if state is not None:
            return self._decode(input_ids, state)
        h = self.model.embeddings(input_ids)                                   # [B, T, D]
        mode = None if snapshot_at is None else ("defer" if callable(snapshot_at) else snapshot_at)
        snapshots = []
        for layer in self.model.layers:
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h, snaps = checkpoint(layer, h, mode, use_reentrant=False)
            else:
                h, snaps = layer(h, mode)
            snapshots.append(snaps)
        logits, hidden = self._head(h)
        if mode is None:
            return LMOutput(logits, hidden)
        positions = snapshot_at(logits, hidden) if callable(snapshot_at) else snapshot_at
        if callable(snapshot_at):
            snapshots = [snaps(positions) for snaps in snapshots]
        rows = hidden[torch.arange(len(positions), device=h.device)[:, None], positions].flatten(0, 1)  # [B*P, D]
        return LMOutput(logits, hidden, snapshots, positions=positions, snapshot_logits=self._head_logits(rows))

    def init_state(self, batch_size):
        """The empty decoding state: one dict per layer, on the model's device and dtype."""
        w = self.lm_head.weight
        return [layer.attn.init_state(batch_size, w.device, w.dtype) for layer in self.model.layers]

    def step(self, input_ids, state):
        """Continue from `state` (init_state, a snapshot, or a previous step) over new tokens input_ids [B, T]
        (T = 1 when decoding), never in place -> LMOutput with .state. The same as model(input_ids, state=state)."""
        return self(input_ids, state=state)

    def _decode(self, input_ids, state):
        h = self.model.embeddings(input_ids)                                   # [B, T, D]
        new_state = []
        for layer, s in zip(self.model.layers, state):
            h, s = layer(h, state=s)
            new_state.append(s)
        logits, hidden = self._head(h)
        return LMOutput(logits, hidden, state=new_state)

    def prefill(self, input_ids):
        """State after the whole prompt input_ids [B, T] from one full-sequence pass -> (LMOutput, state)."""
        B, T = input_ids.shape
        last = torch.full((B, 1), T - 1, dtype=torch.long, device=input_ids.device)
        out = self(input_ids, snapshot_at=last)
        return out, out.snapshots

    def num_parameters(self):
        return sum(p.numel() for p in self.parameters())


def map_model_state(fn, state):
    """Apply fn to every tensor of a whole-model state (list of per-layer dicts)."""
    return [map_state(fn, s) for s in state]


def build_model(name_or_config, **overrides):
    """A FastWeightLM from a preset name or a ModelConfig, with field overrides."""
    if isinstance(name_or_config, str):
        if name_or_config not in MODEL_PRESETS:
            raise ValueError(f"unknown model preset {name_or_config!r}; choose one of {', '.join(MODEL_PRESETS)}")
        name_or_config = MODEL_PRESETS[name_or_config]
    return FastWeightLM(replace(name_or_config, **overrides))
