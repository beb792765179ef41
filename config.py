"""The training configuration: one typed dataclass, the presets (small override sets) and the command line.

    python train.py --preset NAME [--key=value ...]     values are converted to the field's type
    python train.py --list_presets
    python train.py --help                              every field with its default and meaning (usage())
Unknown presets or keys, values of the wrong type and settings that cannot work are a ValueError whose one-line
message names the problem and the valid choices (train.py prints it and exits with status 2).
"""
from dataclasses import dataclass, fields

from model import MODEL_PRESETS


@dataclass
class TrainConfig:
    # run
    out_dir: str = "out/toy"           # checkpoint, metrics.jsonl, config.json, eval.json and the hf/ export
    model: str = "toy-deltanet"        # a model.MODEL_PRESETS name (ignored with init_from)
    init_from: str = ""                # a checkpoint folder (Hugging Face layout, or a training out_dir)
    resume: bool = False               # continue from out_dir's checkpoint
    device: str = "auto"               # auto | cpu | cuda | mps
    dtype: str = "float32"             # float32 | bfloat16 (autocast; master weights stay fp32)
    gradient_checkpointing: bool = False  # recompute each block in the backward (memory for long contexts)
    parallel: str = "ddp"              # with several processes (torchrun): ddp | fsdp (shards weights, grads, AdamW)
    seed: int = 1337                   # weights, data order and rollouts
    # data
    data: str = "synthetic"            # synthetic | a .txt/.jsonl/.parquet file or a folder of them
    tokenizer: str = "word"            # byte | word | gpt2 | cl100k_base | o200k_base (a checkpoint brings its own)
    seq_len: int = 256                 # tokens per training sequence
    batch_size: int = 16               # sequences per batch, all processes together
    micro_batch_size: int = 0          # sequences per forward/backward (0: the whole batch)
    n_needles: int = 4                 # synthetic data: at most this many key-value facts per document
    min_needles: int = 1               # synthetic data: at least this many (capped at n_needles; both at what fits)
    value_tokens: int = 1              # synthetic data: words per needle value
    value_tokens_max: int = 0          # synthetic data: > value_tokens: each value has value_tokens..this many words
    doc_styles: str = "S"              # synthetic data: query styles of training documents, comma-separated S,MK,MQ,MV
    answer_weight: float = 1.0         # synthetic data: NTP weight of answer values after a query's "?" (1: plain)
    # phases and objective
    phase: str = "mid"                 # pretrain | mid | post | ttt
    objective: str = "refine"          # refine | sft (next-token prediction only: the baseline)
    warmup_steps: int = 0              # NTP-only steps BEFORE the max_steps of the objective, on top of them
    warmup_seq_len: int = 0            # sequence length of the warm-up steps (0: seq_len)
    warmup_batch_size: int = 0         # batch size of the warm-up steps (0: batch_size)
    max_steps: int = 100               # steps of the objective (REFINE or SFT); the run has warmup_steps + max_steps
    # optimiser (AdamW)
    lr: float = 1e-3                   # peak learning rate
    lr_schedule: str = "constant"      # constant | cosine (to lr / 10)
    lr_warmup: int = 0                 # linear warm-up steps
    weight_decay: float = 0.01         # on matrices only (not norms, biases)
    beta1: float = 0.9                 # AdamW beta1
    beta2: float = 0.999               # AdamW beta2
    grad_clip: float = 1.0             # clip the global gradient norm to this
    # REFINE (paper section 3; defaults are the paper's)
    n_chunks: int = 8                  # c: positions per sequence
    rollout_len: int = 5               # k: tokens per rollout
    n_rollouts: int = 1                # n: rollouts per position
    reward: str = "cosine"             # cosine | binary | hybrid
    reward_encoder: str = "policy"     # hidden states of cosine rewards: policy | frozen (the run's first weights)
    lambda_rl: float = 0.2             # weight of the NSP (GRPO) loss
    lambda_sft: float = 1.0            # weight of the NTP loss (0: REFINE only)
    select_mode: str = "entropy"       # entropy | uniform | argmax | argmin | answer (before query answers)
    select_temperature: float = 1.0    # tau of the selection softmax
    margin: int = 20                   # rollout starts stay in [margin, L - margin]
    sample_temperature: float = 1.0    # rollout sampling temperature
    top_p: float = 1.0                 # rollout nucleus sampling (1: off)
    top_k: int = 0                     # rollout top-k sampling (0: off)
    group_by: str = "sequence"         # sequence (official, n = 1) | position (a group = the n rollouts of a prefix)
    adv_scale: str = "group"           # group | batch | none
    clip_low: float = 0.2              # PPO ratio clip below 1
    clip_high: float = 0.2             # PPO ratio clip above 1
    clip_c: float = 3.0                # dual clip for negative advantages
    loss_agg: str = "token-mean"       # token-mean | seq-mean-token-mean | seq-mean-token-sum | ...-sum-norm
    kl_coef: float = 0.0               # k3 KL penalty to the sampling policy (0: off)
    ppo_mini_batch: int = 0            # sequences per optimiser update within a batch (0: the whole batch)
    ppo_epochs: int = 1                # passes over the batch's rollouts
    rollout_mode: str = "snapshot"     # snapshot (one forward) | reforward (the official per-prefix re-runs)
    eos_id: int = -1                   # set from the tokenizer
    # test-time training (phase ttt)
    ttt_steps: int = 1                 # REFINE steps per test example
    ttt_reset: bool = True             # restore weights and optimiser after each example (False: official)
    eval_data: str = ""                # held-out data: validation text (mid), the paired test split (post)
    # evaluation, logging, checkpoints
    eval_interval: int = 0             # validation every N steps (0: only at the end)
    eval_batches: int = 4              # validation batches
    eval_lengths: str = "256,512"      # NIAH context lengths of the final evaluation (synthetic data)
    eval_examples: int = 50            # NIAH examples per variant and length
    ckpt_interval: int = 0             # checkpoint every N steps (0: only at the end)
    log_interval: int = 1              # print every N steps (metrics.jsonl gets every step)

    @property
    def total_steps(self):
        """Steps of the whole run: the NTP warm-up (pretrain / mid only) comes on top of max_steps."""
        return self.max_steps + (self.warmup_steps if self.phase in ("pretrain", "mid") else 0)


# A preset is a one-line description and a small set of overrides.
PAPER = dict(lr=1e-6, lr_schedule="constant", weight_decay=0.01, beta1=0.9, beta2=0.999, grad_clip=1.0,
             n_chunks=8, rollout_len=5, n_rollouts=1, seq_len=16384, dtype="bfloat16", gradient_checkpointing=True,
             micro_batch_size=1, tokenizer="checkpoint", data="", eval_lengths="4096,8192,16384")
PHASES = {"mid": dict(phase="mid", reward="cosine", lambda_rl=0.2, batch_size=128, ppo_mini_batch=32),
          "post": dict(phase="post", reward="hybrid", lambda_rl=0.2, batch_size=64, ppo_mini_batch=16),
          "ttt": dict(phase="ttt", reward="binary", lambda_rl=0.4, batch_size=8, ppo_mini_batch=4)}
# The toy recipe: 1-word values, documents of 2-4 needles (MK-style ones ask one among distractors), one 64-dim head,
# 2000 warm-up steps at a constant 2e-3: key-value binding appears abruptly after 500-1200 steps, on every seed tried
# (README: NIAH over seeds); 200 NIAH prompts per cell (one cell's standard error <= 3.5 points).
TOY = dict(model="toy-deltanet-1head", data="synthetic", tokenizer="word", device="auto", seq_len=256, batch_size=16,
           warmup_steps=2000, warmup_seq_len=64, warmup_batch_size=64, max_steps=200, lr=2e-3, lr_warmup=50,
           lr_schedule="constant", beta2=0.98, weight_decay=0.1, margin=8, eval_lengths="256,512", eval_examples=200,
           value_tokens=1, min_needles=2, doc_styles="S,MK,MQ,MV", answer_weight=11.0)
PRESETS = {
    "toy": ("tiny DeltaNet, built-in data, CPU: NTP warm-up, then REFINE mid-training, then NIAH", dict(TOY)),
    "toy-lact": ("the same with a tiny LaCT", dict(TOY, model="toy-lact", out_dir="out/toy-lact")),
    "toy-sft": ("the toy run with next-token prediction only (the baseline)",
                dict(TOY, objective="sft", out_dir="out/toy-sft")),
    "toy-gdn": ("the toy run on a tiny Gated DeltaNet (one head, the same 64 x 64 state)",
                dict(TOY, model="toy-gdn", out_dir="out/toy-gdn")),
}
for _arch, _name in (("deltanet-1.3b", "DeltaNet-1.3B"), ("gated-deltanet-1.3b", "Gated DeltaNet-1.3B"),
                     ("lact-760m", "LaCT-760M")):
    for _phase, _over in PHASES.items():
        PRESETS[f"{_arch}-{_phase}"] = (f"{_name} {_phase}-training as in the paper (needs --init_from, GPUs)",
                                        dict(PAPER, model=_arch, out_dir=f"out/{_arch}-{_phase}", **_over))
CHOICES = dict(device=("auto", "cpu", "cuda", "mps"), dtype=("float32", "bfloat16"),
               phase=("pretrain", "mid", "post", "ttt"), objective=("refine", "sft"),
               reward=("cosine", "binary", "hybrid"), reward_encoder=("policy", "frozen"),
               select_mode=("entropy", "uniform", "argmax", "argmin", "answer"),
               group_by=("sequence", "position"), adv_scale=("group", "batch", "none"),
               loss_agg=("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"),
               rollout_mode=("snapshot", "reforward"), lr_schedule=("constant", "cosine"), parallel=("ddp", "fsdp"))


# ------------------------------------------------------------------------------------------ command line
def parse_args(argv):
    """--preset NAME [--key=value ...] -> TrainConfig. Values are converted to the field's type."""
    types = {f.name: f.type for f in fields(TrainConfig)}
    preset, overrides = None, {}
    argv = list(argv)
    if "--preset" in argv:  # "--preset NAME" as well as "--preset=NAME" (no NAME: the unknown preset '')
        i = argv.index("--preset")
        argv[i:i + 2] = ["--preset=" + "".join(argv[i + 1:i + 2])]
    for arg in argv:
        key, eq, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}; use --preset NAME and --key=value")
        if key == "preset":
            if value not in PRESETS:
                raise ValueError(f"unknown preset {value!r}; choose one of {', '.join(PRESETS)}")
            preset = value
        elif key not in types:
            raise ValueError(f"unknown config key {key!r}; valid keys: {', '.join(types)}")
        elif types[key] is bool:
            if eq and value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"--{key} takes true or false, not {value!r}")
            overrides[key] = not eq or value.lower() in ("true", "1")
        else:
            try:
                overrides[key] = types[key](value)   # int, float or str
            except ValueError:
                raise ValueError(f"--{key}={value!r} is not a valid {types[key].__name__}") from None
    cfg = TrainConfig(**{**(PRESETS[preset][1] if preset else {}), **overrides})
    validate(cfg)
    return cfg


def validate(cfg):
    for key, options in CHOICES.items():
        if getattr(cfg, key) not in options:
            raise ValueError(f"--{key}={getattr(cfg, key)!r} is not valid; choose one of {', '.join(options)}")
    if not cfg.init_from and cfg.model not in MODEL_PRESETS:
        raise ValueError(f"unknown model {cfg.model!r}; choose one of {', '.join(MODEL_PRESETS)}")
    for key in ("n_chunks", "rollout_len", "n_rollouts", "seq_len", "batch_size", "ppo_epochs"):
        if getattr(cfg, key) <= 0:
            raise ValueError(f"--{key} must be a positive integer, got {getattr(cfg, key)}")
    if cfg.max_steps < 0 or cfg.warmup_steps < 0 or cfg.total_steps == 0:
        raise ValueError(f"--max_steps={cfg.max_steps}, --warmup_steps={cfg.warmup_steps}: need max_steps >= 0 "
                         f"(steps of the objective) and warmup_steps >= 0 (NTP steps on top), not both 0")
    if cfg.rollout_len + 1 > cfg.seq_len // cfg.n_chunks:
        raise ValueError(f"--rollout_len={cfg.rollout_len} does not fit: each of the {cfg.n_chunks} chunks of "
                         f"seq_len {cfg.seq_len} needs more than rollout_len + 1 tokens")
    micro, mini = cfg.micro_batch_size or cfg.batch_size, cfg.ppo_mini_batch or cfg.batch_size
    if cfg.batch_size % mini or mini % micro:
        raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of ppo_mini_batch {mini}, itself a "
                         f"multiple of micro_batch_size {micro}")
    if cfg.phase in ("post", "ttt") and cfg.data == "synthetic" and not cfg.model.startswith("toy-"):
        raise ValueError(f"--phase={cfg.phase} needs --data=a prompt/answer parquet")
    if cfg.reward_encoder == "frozen" and cfg.phase != "mid":
        raise ValueError(f"--reward_encoder=frozen works in --phase=mid; got --phase={cfg.phase}")
    if cfg.phase == "pretrain" and cfg.objective == "refine":
        raise ValueError("--phase=pretrain trains with next-token prediction only; add --objective=sft, or use "
                         "--phase=mid for REFINE")
    if cfg.tokenizer == "checkpoint" and not cfg.init_from:
        raise ValueError("this preset needs --init_from=a checkpoint folder (see README: pretrained checkpoints)")


def usage():
    """The presets and every TrainConfig field with its default and the one-line meaning from its comment above."""
    import inspect
    lines = ["presets (python train.py --preset NAME; fields below can override any of them):"]
    lines += [f"  {name:24s} {about}" for name, (about, _) in PRESETS.items()]
    lines += ["", "config fields (--key=value; the default shown is TrainConfig's, a preset may change it):"]
    for line in inspect.getsource(TrainConfig).split("@property")[0].splitlines()[2:]:   # the fields
        code, _, meaning = line.strip().partition("#")
        if code:
            name = code.split(":")[0].strip()
            lines.append(f"    --{name}={getattr(TrainConfig, name)}".ljust(36) + f" {meaning.strip()}")
        elif meaning:                                         # a section comment: "# optimiser (AdamW)"
            lines.append(f"  [{meaning.strip()}]")
    return "\n".join(lines)
