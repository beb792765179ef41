"""One optimisation step: REFINE (NTP + NSP) or plain next-token prediction, over micro-batches and PPO mini-batches,
on one process or many (DDP / FSDP2 reduce the gradients in the backward). One REFINE step (paper section 3): ONE
forward gives the NTP loss, the entropies, h_gt and the fast-weight state after each selected position; rollouts
decode k tokens from those states; rewards -> GRPO advantages -> L = lambda_RL * L_NSP + lambda_SFT * L_NTP -> one
backward, one AdamW step. Used by train.py, phases.py and evaluate.py (test-time training).
"""
import math
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from grpo import default_normaliser, ntp_loss, refine_loss, rollout_advantages, zero_std_fraction
from reward import compute_reward
from rollout import collect_rollouts, encode_rollouts, rows_per_prefix


def make_optimizer(model, cfg):
    """AdamW; no weight decay on norms, biases and other 1-D parameters."""
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def lr_at(step, cfg):
    """Linear warm-up over lr_warmup steps, then constant or cosine (to lr / 10) until the last step of the run
    (NTP warm-up steps included: cfg.total_steps)."""
    if step < cfg.lr_warmup:
        return cfg.lr * (step + 1) / cfg.lr_warmup
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - cfg.lr_warmup) / max(1, cfg.total_steps - cfg.lr_warmup)
    return cfg.lr / 10 + 0.5 * (cfg.lr - cfg.lr / 10) * (1 + math.cos(math.pi * min(progress, 1.0)))


# ------------------------------------------------------------------------------------------ one step
@contextmanager
def gradient_sync(model, sync):
    """Data parallel: gradients are reduced across processes only in the backward of a mini-batch's last
    micro-batch; the others accumulate locally (DDP's no_sync, FSDP2's set_requires_gradient_sync)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
    with model.no_sync() if isinstance(model, DistributedDataParallel) and not sync else nullcontext():
        yield


def train_step(model, opt, batch, cfg, step, rank, world, use_refine, lengths=None, target_mask=None, answers=None,
               generator=None, encoder=None):
    """One batch [B_rank, T+1] of this process: REFINE or NTP, micro-batched, one AdamW step per PPO mini-batch and
    epoch. model: the FastWeightLM or its DDP / FSDP2 wrapper (every call, decoding included, goes through it).
    Losses are normalised by whole-batch counts: the update does not depend on how the batch is split into
    processes or micro-batches. lengths [B]: real tokens of right-padded rows; target_mask [B, T]: the next-token
    targets that count (default: those of real tokens); answers [B, T]: the targets the data source marks as
    answers, weighted answer_weight in the NTP loss, and where select_mode "answer" may start rollouts.
    generator: selection and sampling randomness (default: seeded by seed, step and global micro-batch, so the same
    for any number of processes and on resume). encoder: a frozen model for the reward's hidden states
    (--reward_encoder=frozen; default: the policy's own). One mini-batch and one epoch (the toy presets): the
    rollout forward IS the training forward. Otherwise (the paper's presets: batch 128, mini-batches of 32) the
    whole batch is sampled first without grad, as in PPO, and each mini-batch re-forwards its sequences once with
    snapshots at the chosen positions. -> stats dict, or None if a loss was not finite."""
    device, B = batch.device, batch.shape[0]
    micro = min(cfg.micro_batch_size or B * world, B)
    mini = min(cfg.ppo_mini_batch or B * world, B * world) // world
    x_all, y_all = batch[:, :-1], batch[:, 1:]
    mask_all = target_mask
    if mask_all is None and lengths is not None:
        mask_all = torch.arange(x_all.shape[1], device=device) < (lengths[:, None] - 1)
    stats = {"ntp_loss": 0.0, "nsp_loss": 0.0, "rewards": [], "zero_std": [], "clip_frac": 0.0, "adv_logp": 0.0,
             "grad_norm": 0.0}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    epochs = cfg.ppo_epochs if use_refine else 1
    fused = mini == B and epochs == 1

    def sample(j):  # steps 1-3 for the micro-batch at row j: (LMOutput, rollouts, advantages)
        gen = generator or torch.Generator(device=device).manual_seed(
            cfg.seed * 1_000_003 + step * 10_007 + (rank * B + j) // micro)
        lens = None if lengths is None else lengths[j:j + micro] - 1
        allowed = None if answers is None else answers[j:j + micro]   # [micro, T] for select_mode "answer"
        out, ro = collect_rollouts(model, x_all[j:j + micro], cfg, gen, lens, cfg.rollout_mode, allowed)
        n = ro.n
        h_pred, h_gt = (ro.h_pred, ro.h_gt) if encoder is None else encode_rollouts(encoder, x_all[j:j + micro], ro)
        rewards = compute_reward(cfg.reward, h_pred, rows_per_prefix(h_gt, n), ro.tokens,
                                 rows_per_prefix(ro.gt_tokens, n))
        stats["rewards"].append(rewards)
        stats["zero_std"].append(zero_std_fraction(rewards.view(-1, cfg.n_chunks * n if cfg.group_by == "sequence"
                                                                else n)))
        return out, ro, rollout_advantages(rewards, cfg.n_chunks, n, cfg.group_by, cfg.adv_scale)

    def micro_loss(j, msk, n_tok, n_nsp):  # the loss of the micro-batch at row j -> (loss, stats part)
        x, y = x_all[j:j + micro], y_all[j:j + micro]
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
            stats["adv_logp"] += part["adv_logp"] * micro / B / epochs
        if cfg.answer_weight != 1.0 and answers is not None:  # answers weigh answer_weight: + (w - 1) x their NTP
            ans = answers[j:j + micro] & (True if msk is None else msk)
            loss = loss + (cfg.lambda_sft if use_refine else 1.0) * (cfg.answer_weight - 1.0) * \
                ntp_loss(out.logits, y, ans, n_tok)
        return loss, part

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
                msk = None if mask_all is None else mask_all[j:j + micro]
                with gradient_sync(model, j + micro >= m0 + mini):  # forward and backward of the last one sync
                    with autocast:
                        loss, part = micro_loss(j, msk, n_tok, n_nsp)
                    if not torch.isfinite(loss) and world == 1:  # with several processes the reduced
                        opt.zero_grad(set_to_none=True)           # gradient norm below decides, the same on all
                        return None
                    # each process's loss is its share of the batch mean; the engines AVERAGE gradients over
                    # processes, so the backward of world x loss gives the gradient of the whole batch's loss
                    (loss * world).backward()
                stats["ntp_loss"] += part["ntp_loss"] * mini / B / epochs  # this process's share of the mean
                stats["nsp_loss"] += part["nsp_loss"] * mini / B / epochs
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm   # FSDP2: a replicated DTensor
            if not torch.isfinite(norm):
                opt.zero_grad(set_to_none=True)
                return None
            opt.step()
            opt.zero_grad(set_to_none=True)
            stats["grad_norm"] = norm.item()
    if world > 1:  # what is logged: the loss shares of all processes add up to the batch mean; every reward
        shares = torch.tensor([stats["ntp_loss"], stats["nsp_loss"]], device=device)
        dist.all_reduce(shares)
        stats["ntp_loss"], stats["nsp_loss"] = shares.tolist()
        if stats["rewards"]:
            mine = torch.cat(stats["rewards"])
            stats["rewards"] = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(stats["rewards"], mine)
    return stats


