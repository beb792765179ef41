"""Train a fast-weight language model with REFINE (or plain next-token prediction), from a laptop CPU to a GPU node.

    python train.py --preset toy                                   # tiny DeltaNet on built-in data, CPU, minutes
    python train.py --preset toy --max_steps=50 --lambda_rl=0.5    # any config field as --key=value
    python train.py --list_presets
    python train.py --preset deltanet-1.3b-mid --init_from=DIR --data=DIR   # the paper's runs (GPUs)
    torchrun --nproc_per_node=8 train.py --preset ...              # data parallel (NCCL on GPUs, gloo on CPUs)

Reads top to bottom: setup -> one training step -> checkpoints -> the loop. The config, presets and command line
are in config.py.
One REFINE step (paper section 3): ONE forward over the batch gives the NTP loss, the entropies, h_gt and the
fast-weight state after each selected position; rollouts decode k tokens from those states; rewards -> GRPO
advantages -> L = lambda_RL * L_NSP + lambda_SFT * L_NTP -> one backward, one AdamW step.
"""
import dataclasses
import json
import math
import os
import platform
import sys
import time

import torch
import torch.distributed as dist

import data as datalib
from config import PRESETS, parse_args
from grpo import default_normaliser, ntp_loss, refine_loss, rollout_advantages, zero_std_fraction
from model import MODEL_PRESETS, build_model
from reward import compute_reward
from rollout import collect_rollouts


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
    rank = dist.get_rank()
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        return rank, world, torch.device("cuda", torch.cuda.current_device())
    return rank, world, torch.device(device)


def load_model(cfg, device):
    """A fresh model from a preset, or the weights of --init_from, and its tokenizer."""
    if cfg.init_from:
        from checkpoint import load_pretrained, load_tokenizer
        folder = cfg.init_from
        if os.path.isdir(os.path.join(folder, "hf")):
            folder = os.path.join(folder, "hf")
        model = load_pretrained(folder, device=device)
        with open(os.path.join(folder, "config.json")) as f:
            name = json.load(f).get("tokenizer")
        tok = load_tokenizer(folder) if os.path.exists(os.path.join(folder, "tokenizer.json")) else \
            datalib.get_tokenizer(name or cfg.tokenizer)
    else:
        tok = datalib.get_tokenizer(cfg.tokenizer)
        preset = MODEL_PRESETS[cfg.model]
        vocab = max(preset.vocab_size, tok.vocab_size)
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
        if not set(styles) <= {"S", "MQ", "MV"} or cfg.value_tokens < 1 or not 1 <= cfg.min_needles <= cfg.n_needles:
            raise ValueError(f"--doc_styles={cfg.doc_styles!r}, --value_tokens={cfg.value_tokens}, --min_needles="
                             f"{cfg.min_needles}: need styles from S,MQ,MV, value_tokens >= 1, 1 <= min <= n_needles")
        fit = max(1, seq_len // (14 + 2 * cfg.value_tokens))   # a needle + its query take 14 + 2 * value_tokens
        needles = (min(cfg.min_needles, fit), min(cfg.n_needles, fit))
        return datalib.SyntheticData(tok, seq_len, cfg.seed, needles, cfg.value_tokens, styles)
    if cfg.answer_weight != 1.0:
        raise ValueError("--answer_weight needs --data=synthetic (it up-weights the synthetic answers)")
    return datalib.TextData(cfg.data, tok, seq_len, cfg.seed)


def answer_mask(x, y, tokenizer):
    """bool [B, T]: the targets y [B, T] that are synthetic needle values following a query's "?" in x [B, T]."""
    if tokenizer not in _ANSWER_IDS:
        tok = datalib.get_tokenizer(tokenizer)
        _ANSWER_IDS[tokenizer] = (torch.tensor([tok.encode(" " + v)[-1] for v in datalib.VALUES]),
                                  tok.encode(" ?")[-1])
    values, qmark = _ANSWER_IDS[tokenizer]
    return torch.isin(y, values.to(y.device)) & ((x == qmark).cumsum(1) > 0)


_ANSWER_IDS = {}   # tokenizer name -> (value word ids, id of " ?")


def make_optimizer(model, cfg):
    """AdamW; no weight decay on norms, biases and other 1-D parameters."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def lr_at(step, cfg):
    if step < cfg.lr_warmup:
        return cfg.lr * (step + 1) / cfg.lr_warmup
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - cfg.lr_warmup) / max(1, cfg.max_steps - cfg.lr_warmup)
    return cfg.lr / 10 + 0.5 * (cfg.lr - cfg.lr / 10) * (1 + math.cos(math.pi * min(progress, 1.0)))


# ------------------------------------------------------------------------------------------ one step

def rollout_generator(cfg, step, micro_index, device):
    """Selection and sampling randomness seeded by (seed, step, global micro-batch): identical whatever the number
    of processes, and exact on resume."""
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed * 1_000_003 + step * 10_007 + micro_index)
    return gen


def train_step(model, opt, batch, cfg, step, rank, world, use_refine, lengths=None, target_mask=None):
    """One batch [B_rank, T+1] of this process: REFINE or NTP, micro-batched, gradients all-reduced, one AdamW step
    per PPO mini-batch and epoch. Losses are normalised by whole-batch counts, so the update does not depend on how
    the batch is split into processes or micro-batches. lengths [B]: real tokens of right-padded rows;
    target_mask [B, T]: which next-token targets count (default: those of real tokens).
    With one mini-batch and one epoch (the toy presets) the rollout forward IS the training forward: one pass gives
    the NTP loss, the entropies, h_gt and the differentiable snapshots. Otherwise (the paper's presets: batch 128,
    mini-batches of 32) the whole batch is sampled first without grad, as in PPO, and each mini-batch update
    re-forwards its sequences once, taking the snapshots at the already chosen positions.
    -> stats dict, or None if a loss was not finite."""
    device, B = batch.device, batch.shape[0]
    micro = min(cfg.micro_batch_size or B * world, B)
    mini = min(cfg.ppo_mini_batch or B * world, B * world) // world
    x_all, y_all = batch[:, :-1], batch[:, 1:]
    mask_all = target_mask
    if mask_all is None and lengths is not None:
        mask_all = torch.arange(x_all.shape[1], device=device) < (lengths[:, None] - 1)
    stats = {"ntp_loss": 0.0, "nsp_loss": 0.0, "rewards": [], "zero_std": [], "clip_frac": 0.0, "grad_norm": 0.0}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    epochs = cfg.ppo_epochs if use_refine else 1
    fused = mini == B and epochs == 1

    def sample(j):  # steps 1-3 for the micro-batch at row j: (LMOutput, rollouts, advantages)
        gen = rollout_generator(cfg, step, (rank * B + j) // micro, device)
        lens = None if lengths is None else lengths[j:j + micro] - 1
        out, ro = collect_rollouts(model, x_all[j:j + micro], cfg, gen, lens, cfg.rollout_mode)
        n = ro.n
        rewards = compute_reward(cfg.reward, ro.h_pred, ro.h_gt.repeat_interleave(n, 0), ro.tokens,
                                 ro.gt_tokens.repeat_interleave(n, 0))
        stats["rewards"].append(rewards)
        stats["zero_std"].append(zero_std_fraction(rewards.view(-1, cfg.n_chunks * n if cfg.group_by == "sequence"
                                                                else n)))
        return out, ro, rollout_advantages(rewards, cfg.n_chunks, n, cfg.group_by, cfg.adv_scale)

    sampled = {}
    if use_refine and not fused:  # PPO: the whole batch is sampled by the policy before any update
        with torch.no_grad(), autocast:
            sampled = {j: sample(j)[1:] for j in range(0, B, micro)}
    for _ in range(epochs):
        for m0 in range(0, B, mini):
            n_tok = (y_all[m0:m0 + mini].numel() if mask_all is None else int(mask_all[m0:m0 + mini].sum())) * world
            n_nsp = default_normaliser(torch.ones(mini * world * cfg.n_chunks * cfg.n_rollouts, cfg.rollout_len),
                                       cfg.loss_agg)
            for j in range(m0, m0 + mini, micro):
                x, y = x_all[j:j + micro], y_all[j:j + micro]
                msk = None if mask_all is None else mask_all[j:j + micro]
                with autocast:
                    if not use_refine:
                        out = model(x)
                        loss = ntp_loss(out.logits, y, msk, n_tok)
                        part = {"ntp_loss": loss.item(), "nsp_loss": 0.0}
                    else:
                        if fused:
                            out, ro, adv = sample(j)
                        else:
                            ro, adv = sampled[j]
                            out = model(x, snapshot_at=ro.positions if cfg.rollout_mode == "snapshot" else None)
                        loss, part = refine_loss(model, x, y, out, ro, adv, cfg, msk, n_tok, n_nsp, cfg.rollout_mode)
                        stats["clip_frac"] += (part["clip_frac_high"] + part["clip_frac_low"]) * micro / B / epochs
                    if cfg.answer_weight != 1.0:  # answer values weigh answer_weight: add (w - 1) x their NTP share
                        ans = answer_mask(x, y, cfg.tokenizer) & (True if msk is None else msk)
                        loss = loss + (cfg.lambda_sft if use_refine else 1.0) * (cfg.answer_weight - 1.0) * \
                            ntp_loss(out.logits, y, ans, n_tok)
                if not torch.isfinite(loss) and world == 1:  # with several processes the all-reduced
                    opt.zero_grad(set_to_none=True)           # gradient norm below decides, the same on all
                    return None
                loss.backward()
                stats["ntp_loss"] += part["ntp_loss"] * mini / B / epochs  # this process's share of the mean
                stats["nsp_loss"] += part["nsp_loss"] * mini / B / epochs
            if world > 1:  # data parallel: sum the gradients (each process's loss is already a share of the batch)
                for p in model.parameters():
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if not torch.isfinite(norm):
                opt.zero_grad(set_to_none=True)
                return None
            opt.step()
            opt.zero_grad(set_to_none=True)
            stats["grad_norm"] = norm.item()
    if world > 1:  # the logged losses: the shares of all processes add up to the batch mean
        shares = torch.tensor([stats["ntp_loss"], stats["nsp_loss"]], device=device)
        dist.all_reduce(shares)
        stats["ntp_loss"], stats["nsp_loss"] = shares.tolist()
    return stats


# ------------------------------------------------------------------------------------------ checkpoints

def save_checkpoint(path, model, opt, cfg, step, data_state):
    """One file, written to a temporary name and renamed: a crash never leaves a half-written checkpoint."""
    ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "config": dataclasses.asdict(cfg),
            "model_config": dataclasses.asdict(model.config), "step": step, "data": data_state,
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()}, "versions": versions()}
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, model, opt):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
    except Exception as e:  # unpickling errors, missing keys, shape mismatches: all mean "not this run's file"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot resume from {path}: corrupt or incompatible checkpoint ({first[:200]})") from None
    torch.set_rng_state(ckpt["rng"]["torch"])
    if torch.cuda.is_available() and ckpt["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return ckpt


def versions():
    import numpy
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}


# ------------------------------------------------------------------------------------------ the run

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--list_presets" in argv:
        for name, (about, _) in PRESETS.items():
            print(f"{name:22s} {about}")
        return 0
    try:  # everything that can be wrong with the input is found here, before anything is written
        cfg = parse_args(argv)
        rank, world, device = setup_distributed(cfg)
        model, tok = load_model(cfg, device)
        cfg = dataclasses.replace(cfg, eos_id=tok.eos_id)
        opt = make_optimizer(model, cfg)
        ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
        start, data_state = 0, None
        if cfg.resume:
            if not os.path.exists(ckpt_path):
                raise ValueError(f"--resume: no checkpoint at {ckpt_path}")
            ckpt = load_checkpoint(ckpt_path, model, opt)
            start, data_state = ckpt["step"], ckpt["data"]
        elif os.path.exists(ckpt_path):
            raise ValueError(f"{ckpt_path} exists; pass --resume to continue it or choose another --out_dir")
        if cfg.phase in ("post", "ttt"):
            from phases import run_phase  # the nested post-training loop and test-time training
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
    return train(cfg, model, opt, tok, data, warm, val, start, rank, world, device)


def train(cfg, model, opt, tok, data, warm, val, start, rank, world, device):
    master = rank == 0
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        print(f"config: {json.dumps(dataclasses.asdict(cfg))}")
        print(f"versions: {versions()}  device: {device}  processes: {world}  parameters: "
              f"{model.num_parameters():,}")
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump({"train": dataclasses.asdict(cfg), "model": dataclasses.asdict(model.config),
                       "versions": versions(), "device": str(device)}, f, indent=1)
    log = open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") if master else None
    if master:  # every run (and every resume) starts its log with the exact config, versions and device
        log.write(json.dumps({"config": dataclasses.asdict(cfg), "versions": versions(), "device": str(device),
                              "start_step": start}) + "\n")
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    bad, t0 = 0, time.time()
    model.train()
    for step in range(start, cfg.max_steps):
        in_warmup = step < cfg.warmup_steps
        source = warm if in_warmup else data
        B = (cfg.warmup_batch_size or cfg.batch_size) if in_warmup else cfg.batch_size
        batch = source.get_batch(B)[rank * (B // world):(rank + 1) * (B // world)].to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        use_refine = cfg.objective == "refine" and cfg.phase != "pretrain" and not in_warmup
        t = time.time()
        stats = train_step(model, opt, batch, cfg, step, rank, world, use_refine)
        if stats is None:
            bad += 1
            if master:
                print(f"warning: step {step}: loss or gradient is not finite; step skipped ({bad} in a row)")
            if bad == 3:
                print("train.py: error: 3 non-finite steps in a row; stopping (the last checkpoint is intact)",
                      file=sys.stderr)
                return 3
            continue
        bad = 0
        dt = time.time() - t
        rewards = torch.cat(stats["rewards"]) if stats["rewards"] else torch.zeros(0)
        row = {"step": step + 1, "ntp_loss": stats["ntp_loss"], "nsp_loss": stats["nsp_loss"],
               "reward_mean": rewards.mean().item() if len(rewards) else None,
               "reward_std": rewards.std().item() if len(rewards) > 1 else None,
               "zero_std_frac": sum(stats["zero_std"]) / len(stats["zero_std"]) if stats["zero_std"] else None,
               "clip_frac": stats["clip_frac"], "grad_norm": stats["grad_norm"], "lr": lr_at(step, cfg),
               "tokens_per_s": batch.numel() * world / dt, "phase": "ntp-warmup" if in_warmup else cfg.objective}
        if master:
            log.write(json.dumps(row) + "\n")
            log.flush()
            if (step + 1) % cfg.log_interval == 0 or step + 1 == cfg.max_steps:
                eta = (time.time() - t0) / (step + 1 - start) * (cfg.max_steps - step - 1)
                rw = "" if row["reward_mean"] is None else \
                    f" | reward {row['reward_mean']:.3f}±{row['reward_std'] or 0:.3f} zero-std " \
                    f"{row['zero_std_frac']:.2f} clip {row['clip_frac']:.3f}"
                print(f"step {step + 1:5d} | ntp {row['ntp_loss']:.4f} nsp {row['nsp_loss']:+.4f}{rw} | "
                      f"grad {row['grad_norm']:.2f} lr {row['lr']:.2e} | {row['tokens_per_s']:.0f} tok/s "
                      f"| eta {eta:.0f}s")
        done = step + 1 == cfg.max_steps
        if master and cfg.eval_interval and (step + 1) % cfg.eval_interval == 0 and not done:
            print(f"eval step {step + 1}: {validation(model, val, cfg)}")
        if master and (done or (cfg.ckpt_interval and (step + 1) % cfg.ckpt_interval == 0)):
            data_state = {"data": data.state_dict(), "warm": warm.state_dict() if warm else None}
            save_checkpoint(ckpt_path, model, opt, cfg, step + 1, data_state)
    if master:
        export(model, tok, cfg)
        final_evaluation(model, tok, val, cfg, log)
        log.close()
    if world > 1:
        dist.barrier()  # rank 0 may still be saving and evaluating
        dist.destroy_process_group()
    return 0


def export(model, tok, cfg):
    """The model in the reference (Hugging Face) layout at out_dir/hf, loadable by fla / LaCT and evaluate.py."""
    from checkpoint import save_pretrained
    path = os.path.join(cfg.out_dir, "hf")
    save_pretrained(model, path, extra={"tokenizer": tok.name})


def validation(model, val, cfg):
    from evaluate import eval_validation
    state = val.state_dict()
    batches = [val.get_batch(min(cfg.batch_size, 16)).to(model.lm_head.weight.device) for _ in range(cfg.eval_batches)]
    val.load_state_dict(state)  # the same held-out batches every time
    return eval_validation(model, batches)


def final_evaluation(model, tok, val, cfg, log):
    from evaluate import eval_niah, format_table
    results = {f"val_{k}": v for k, v in validation(model, val, cfg).items()}
    print(f"validation: loss {results['val_loss']:.4f}  next-token accuracy {results['val_acc']:.4f}")
    if cfg.data == "synthetic" and cfg.eval_examples > 0:
        lengths = tuple(int(n) for n in cfg.eval_lengths.split(","))
        niah = eval_niah(model, tok, lengths=lengths, n_examples=cfg.eval_examples, seed=cfg.seed)
        print(format_table(niah))
        results.update({f"niah_{k}": v for k, v in niah.items()})
    log.write(json.dumps({"final": results}) + "\n")
    with open(os.path.join(cfg.out_dir, "eval.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
