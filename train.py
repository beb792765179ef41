"""Train a fast-weight language model with REFINE (or plain next-token prediction), from a laptop CPU to a GPU node.

    python train.py --preset toy                                   # tiny DeltaNet on built-in data, CPU, minutes
    python train.py --preset toy --max_steps=50 --lambda_rl=0.5    # 2000 NTP warm-up steps, then 50 REFINE steps
    python train.py --preset toy --warmup_steps=0 --max_steps=50   # 50 REFINE steps from scratch, no warm-up
    python train.py --list_presets
    python train.py --help                                         # every config field, its default and meaning
    python train.py --preset deltanet-1.3b-mid --init_from=DIR --data=DIR   # the paper's runs (GPUs)
    torchrun --nproc_per_node=8 train.py --preset ...              # data parallel: DDP (default) or --parallel=fsdp

A run has warmup_steps NTP steps (the "warmup" phase) followed by max_steps steps of the objective ("refine" or
"sft"); every log line and metrics.jsonl row names its phase. Any config field can be set as --key=value.
Reads top to bottom: setup -> the loop -> evaluation. One optimisation step is in step.py, the config, presets and
command line in config.py, checkpoint files in checkpoint.py.
"""
import copy
import ctypes
import dataclasses
import json
import os
import platform
import sys
import time
import warnings

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

import data as datalib
from checkpoint import load_training, save_pretrained, save_training
from config import PRESETS, parse_args, usage
from evaluate import eval_niah, eval_validation, format_table, load_checkpoint
from model import MODEL_PRESETS, build_model
from phases import run_phase
from plot import plot_run
from step import lr_at, make_optimizer, train_step


# ------------------------------------------------------------------------------------------ setup
def setup_distributed(cfg):
    """-> (rank, world size, device). torchrun sets RANK / WORLD_SIZE; otherwise one process."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if world == 1:
        return 0, 1, torch.device(device)
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    return dist.get_rank(), world, torch.device(device)


def load_model(cfg, device):
    """A fresh model from a preset, or the weights of --init_from, and its tokenizer."""
    if cfg.init_from:
        model, tok, _ = load_checkpoint(cfg.init_from, cfg.tokenizer, device=device)
    else:
        tok = datalib.get_tokenizer(cfg.tokenizer)
        vocab = max(MODEL_PRESETS[cfg.model].vocab_size, tok.vocab_size)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, vocab_size=vocab, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                            pad_token_id=tok.pad_id).to(device)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer {tok.name} has {tok.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size}; use a matching --tokenizer")
    model.config.gradient_checkpointing = cfg.gradient_checkpointing
    return model, tok


def load_data(cfg, tok, seq_len):
    if cfg.data == "synthetic":
        styles = tuple(cfg.doc_styles.split(","))
        if not set(styles) <= {"S", "MK", "MQ", "MV"} or min(cfg.value_tokens, cfg.min_needles, cfg.n_needles) < 1:
            raise ValueError(f"--doc_styles={cfg.doc_styles!r}, --value_tokens={cfg.value_tokens}, --min_needles="
                             f"{cfg.min_needles}, --n_needles={cfg.n_needles}: need styles from S,MK,MQ,MV, "
                             f"value_tokens >= 1, min_needles and n_needles >= 1")
        values = (cfg.value_tokens, max(cfg.value_tokens, cfg.value_tokens_max))   # words per value: a range
        fit = max(1, seq_len // (14 + 2 * values[1]))   # a needle + its query take 14 + 2 * value_tokens
        needles = (min(cfg.min_needles, cfg.n_needles, fit), min(cfg.n_needles, fit))
        return datalib.SyntheticData(tok, seq_len, cfg.seed, needles, values[0] if values[0] == values[1] else values,
                                     styles)
    if cfg.answer_weight != 1.0 or cfg.select_mode == "answer":
        raise ValueError("--answer_weight and --select_mode=answer need --data=synthetic (its batches mark answers)")
    return datalib.TextData(cfg.data, tok, seq_len, cfg.seed)


def parallelize(model, cfg, world, device):
    """Several processes: DistributedDataParallel, or FSDP2 (fully_shard per block, then the whole model; bf16
    gathered weights and fp32 gradient reduction with --dtype=bfloat16). Every call, decoding included, goes through
    the wrapper: FastWeightLM.forward(ids, state=...) decodes."""
    if world == 1:
        return model
    if cfg.parallel == "ddp":
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    bf16 = cfg.dtype == "bfloat16"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                  reduce_dtype=torch.float32 if bf16 else None)
    for block in model.model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    # FSDP2 warns that outputs which are views lose their hook under in-place ops; the model never does those
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
    return model


def keep_freed_memory():
    """CPU speed, values unchanged: glibc's malloc gives large freed blocks back to the system (munmap, heap trim), so
    every step's temporaries are faulted in again page by page (the toy preset's warm-up: ~10,000 minor page faults
    and ~15 ms of system time per step). Raising M_TRIM_THRESHOLD and M_MMAP_THRESHOLD to 1 GiB keeps freed memory in
    the process for the next step; the resident memory stays at its peak. A no-op without glibc (macOS, Windows)."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    for option in (-1, -3):  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD (malloc.h)
        mallopt(option, 1 << 30)


def versions():
    import numpy
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}


# ------------------------------------------------------------------------------------------ the run
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(__doc__.strip() + "\n\n" + usage())
        return 0
    if "--list_presets" in argv:
        print("\n".join(f"{name:24s} {about}" for name, (about, _) in PRESETS.items()))
        return 0
    keep_freed_memory()
    try:  # everything that can be wrong with the input is found here, before anything is written
        cfg = parse_args(argv)
        if cfg.phase in ("post", "ttt") and int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise ValueError(f"--phase={cfg.phase} runs in one process; start it without torchrun")
        rank, world, device = setup_distributed(cfg)
        model, tok = load_model(cfg, device)
        cfg = dataclasses.replace(cfg, eos_id=tok.eos_id)
        encoder = copy.deepcopy(model).eval().requires_grad_(False) if cfg.reward_encoder == "frozen" else None
        model = parallelize(model, cfg, world, device)
        opt = make_optimizer(model, cfg)  # after fully_shard: AdamW holds the shards
        ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
        start, data_state = 0, None
        if cfg.resume:
            if not os.path.exists(ckpt_path):
                raise ValueError(f"--resume: no checkpoint at {ckpt_path}")
            ckpt = load_training(ckpt_path, model, opt)
            start, data_state = ckpt["step"], ckpt["data"]
        elif os.path.exists(ckpt_path):
            raise ValueError(f"{ckpt_path} exists; pass --resume to continue it or choose another --out_dir")
        if cfg.phase in ("post", "ttt"):  # the nested post-training loop and test-time training
            return run_phase(cfg, model, opt, tok, device)
        data = load_data(cfg, tok, cfg.seq_len)
        warm = load_data(cfg, tok, cfg.warmup_seq_len or cfg.seq_len) if cfg.warmup_steps else None
        # validation: other synthetic documents, or --eval_data (for files without it: the training files reshuffled)
        held_out = dataclasses.replace(cfg, seed=cfg.seed + 1, data=cfg.eval_data or cfg.data)
        val = load_data(held_out, tok, cfg.seq_len)
        if data_state:
            data.load_state_dict(data_state["data"])
            if warm:
                warm.load_state_dict(data_state["warm"])
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    return train(cfg, model, opt, tok, data, warm, val, start, rank, world, device, encoder)


def phase_of(step, cfg):
    """The phase of (0-based) step: "warmup" (NTP on the warm-up data), then "refine" or "sft"."""
    if step < cfg.warmup_steps:
        return "warmup"
    return "refine" if cfg.objective == "refine" and cfg.phase != "pretrain" else "sft"


def train(cfg, model, opt, tok, data, warm, val, start, rank, world, device, encoder=None):
    master = rank == 0
    core = model.module if isinstance(model, DistributedDataParallel) else model   # the FastWeightLM
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        print(f"config: {json.dumps(dataclasses.asdict(cfg))}")
        print(f"versions: {versions()}  device: {device}  processes: {world} ({cfg.parallel if world > 1 else '-'})"
              f"  parameters: {core.num_parameters():,}"
              f"  steps: {cfg.warmup_steps} warm-up + {cfg.max_steps} {phase_of(cfg.warmup_steps, cfg)}")
        run = {"versions": versions(), "device": str(device)}
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump({"train": dataclasses.asdict(cfg), "model": dataclasses.asdict(core.config), **run}, f, indent=1)
    log = open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") if master else None
    if master:  # every run (and every resume) starts its log with the exact config, versions and device
        log.write(json.dumps({"config": dataclasses.asdict(cfg), **run, "start_step": start}) + "\n")
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    bad, t0, total, weights = 0, time.time(), cfg.total_steps, None
    model.train()
    for step in range(start, total):
        phase = phase_of(step, cfg)
        source = warm if phase == "warmup" else data
        B = (cfg.warmup_batch_size or cfg.batch_size) if phase == "warmup" else cfg.batch_size
        rows = slice(rank * (B // world), (rank + 1) * (B // world))   # this process's share of the batch
        batch, answers = source.get_batch(B, with_mask=True)             # answers: synthetic data only
        batch, answers = batch[rows].to(device), None if answers is None else answers[rows, 1:].to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        t = time.time()
        stats = train_step(model, opt, batch, cfg, step, rank, world, phase == "refine", answers=answers,
                           encoder=encoder)
        if stats is None:
            bad += 1
            if master:
                print(f"warning: step {step + 1} ({phase}): loss or gradient is not finite; step skipped ({bad} in a "
                      f"row)")
            if bad == 3:
                print("train.py: error: 3 non-finite steps in a row; stopping (the last checkpoint is intact)",
                      file=sys.stderr)
                return 3
            continue
        bad = 0
        dt = time.time() - t
        rewards = torch.cat(stats["rewards"]) if stats["rewards"] else torch.zeros(0)
        row = {"step": step + 1, "phase": phase, "ntp_loss": stats["ntp_loss"], "nsp_loss": stats["nsp_loss"],
               "reward_mean": rewards.mean().item() if len(rewards) else None,
               "reward_std": rewards.std().item() if len(rewards) > 1 else None,
               "zero_std_frac": sum(stats["zero_std"]) / len(stats["zero_std"]) if stats["zero_std"] else None,
               "clip_frac": stats["clip_frac"], "adv_logp": stats["adv_logp"] if phase == "refine" else None,
               "grad_norm": stats["grad_norm"], "lr": lr_at(step, cfg),
               "tokens_per_s": batch.numel() * world / dt}
        if master:
            log.write(json.dumps(row) + "\n")
            log.flush()
            if (step + 1) % cfg.log_interval == 0 or step + 1 == total:
                eta = (time.time() - t0) / (step + 1 - start) * (total - step - 1)
                # NSP's signal: the rewards and A.logp (the surrogate's value is 0 on-policy: README, "The log")
                rw = "" if row["reward_mean"] is None else \
                    f" | reward {row['reward_mean']:.3f}±{row['reward_std'] or 0:.3f} " \
                    f"A·logp {row['adv_logp']:+.4f} zero-std {row['zero_std_frac']:.2f} clip {row['clip_frac']:.3f}"
                print(f"step {step + 1:5d}/{total} {phase:6s} | ntp {row['ntp_loss']:.4f}"
                      f"{rw} | grad {row['grad_norm']:.2f} lr {row['lr']:.2e} | {row['tokens_per_s']:.0f} tok/s "
                      f"| eta {eta:.0f}s")
        done = step + 1 == total
        if cfg.eval_interval and (step + 1) % cfg.eval_interval == 0 and not done:
            scores = validation(core, val, cfg)  # every process: under FSDP2 the weights are sharded
            if master:
                print(f"eval step {step + 1}: {scores}")
        if done or (cfg.ckpt_interval and (step + 1) % cfg.ckpt_interval == 0):
            meta = {"config": dataclasses.asdict(cfg), "model_config": dataclasses.asdict(core.config),
                    "step": step + 1, "data": {"data": data.state_dict(), "warm": warm.state_dict() if warm else None},
                    "versions": versions()}
            weights = save_training(ckpt_path, model, opt, meta, write=master)  # every process: a gather
    if master and weights is not None:  # the model in the reference (Hugging Face) layout, loadable by fla / LaCT
        save_pretrained(core, os.path.join(cfg.out_dir, "hf"), extra={"tokenizer": tok.name}, state=weights)
    final_evaluation(core, tok, val, cfg, log)
    if master:
        log.close()
        print(f"learning curves: {plot_run(cfg.out_dir)['path']} (python plot.py {cfg.out_dir} redraws them)")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def validation(model, val, cfg):
    state = val.state_dict()
    batches = [val.get_batch(min(cfg.batch_size, 16)).to(model.lm_head.weight.device) for _ in range(cfg.eval_batches)]
    val.load_state_dict(state)  # the same held-out batches every time
    return eval_validation(model, batches)


def final_evaluation(model, tok, val, cfg, log):
    """Validation loss and (synthetic data) NIAH. Every process runs it (FSDP2 needs all of them for each forward);
    rank 0 prints and writes eval.json."""
    results = {f"val_{k}": v for k, v in validation(model, val, cfg).items()}
    if cfg.data == "synthetic" and cfg.eval_examples > 0:
        niah = eval_niah(model, tok, lengths=tuple(int(n) for n in cfg.eval_lengths.split(",")),
                         n_examples=cfg.eval_examples, seed=cfg.seed, value_tokens=cfg.value_tokens)   # trained length
        results.update({f"niah_{k}": v for k, v in niah.items()})
    if log is None:
        return
    print(f"validation: loss {results['val_loss']:.4f}  next-token accuracy {results['val_acc']:.4f}")
    if any(k.startswith("niah_") for k in results):
        print(format_table(niah))
    log.write(json.dumps({"final": results}) + "\n")
    with open(os.path.join(cfg.out_dir, "eval.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
