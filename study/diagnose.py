"""Diagnostics of the REFINE signal on the synthetic toy: why REFINE can land exactly on SFT (called by reproduce.py).

On fixed held-out documents and one model, for each selection mode (entropy, uniform, answer):
  - where the selected positions fall: the category of the first token each rollout must produce (CATEGORIES: a
    needle's key or value, random by construction; a query's answer value, predictable from context; the rest of a
    query; the rest of a needle; filler), next to each category's share of all positions;
  - the rewards per category (cosine and binary, whatever the training reward) and how much of the reward variance
    the category alone explains (then the GRPO advantage mostly says "which kind of position", not "which rollout");
  - the GRPO advantages' spread (|A| mean, share of zero-variance groups);
  - the gradient norms of lambda_RL * L_NSP and lambda_SFT * L_NTP from two separate backward passes over the SAME
    batch, forward and rollouts, their ratio and the cosine between the two gradients.
Training curves (mean reward at the start and end of a run) are summarised from the runs' metrics.jsonl.
"""
import dataclasses
import json
from pathlib import Path

import torch

import config
import data
from grpo import ntp_loss, policy_loss, rollout_advantages
from reward import binary_reward, cosine_reward, compute_reward
from rollout import collect_rollouts, logprobs_from_snapshots

CATEGORIES = ("random: needle key/value", "query answer value", "query text", "needle text", "filler")
SHORT = ("random", "answer", "query", "needle", "filler")


def token_categories(x, tok):
    """x [B, T] word-tokenizer ids of synthetic documents -> long [B, T]: each token's index into CATEGORIES.
    The queries start at the first " What" (filler and needles never contain it); a needle statement runs from the
    " The" before " code" to the next " ."; its key and value words are the random part."""
    word = {w: tok.encode(" " + w)[-1] for w in ("What", "code", ".", "is", "for", "The")}
    values = {tok.encode(" " + v)[-1] for v in data.VALUES}
    keys = {tok.encode(" " + k)[-1] for k in data.KEYS}
    out = torch.full(x.shape, 4, dtype=torch.long)                       # [B, T] filler by default
    for b, row in enumerate(x.tolist()):
        in_query, in_needle = False, False
        for t, i in enumerate(row):
            in_query = in_query or i == word["What"]
            if in_query:
                out[b, t] = 1 if i in values else 2
                continue
            if i == word["code"] and t > 0 and row[t - 1] == word["The"]:
                in_needle = True
                out[b, t - 1] = 3                                        # the " The" that opened it
            if in_needle:
                out[b, t] = 0 if (i in values or i in keys) else 3
                in_needle = i != word["."]
    return out


def signal(model, batches, cfg, tok, seed=0):
    """The diagnostics of one model and one select_mode on `batches` (list of (ids [B, T+1], answer mask [B, T+1]))
    -> dict of python numbers."""
    params = [p for p in model.parameters() if p.requires_grad]
    cat_all, cat_sel, cos_all, bin_all, adv_all, zero, g_nsp, g_ntp, g_cos = [], [], [], [], [], [], [], [], []
    for i, (batch, answers) in enumerate(batches):
        x, y = batch[:, :-1], batch[:, 1:]                               # [B, T] inputs and next-token targets
        allowed = answers[:, 1:] if cfg.select_mode == "answer" else None   # [B, T] targets that are answers
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        out, ro = collect_rollouts(model, x, cfg, gen, allowed=allowed)  # with grad: the training forward
        cats = token_categories(x, tok)                                  # [B, T]
        first = torch.gather(cats, 1, ro.positions + 1)                  # [B, c] category of x[t+1], the 1st target
        cos = cosine_reward(ro.h_pred, ro.h_gt)                          # [B*c] (n = 1)
        hit = binary_reward(ro.tokens, ro.gt_tokens)                     # [B*c]
        rewards = compute_reward(cfg.reward, ro.h_pred, ro.h_gt, ro.tokens, ro.gt_tokens)
        adv = rollout_advantages(rewards, cfg.n_chunks, 1, cfg.group_by, cfg.adv_scale)   # [B*c]
        logp = logprobs_from_snapshots(model, out, ro.tokens, 1, cfg.sample_temperature)   # [B*c, k]
        nsp, _ = policy_loss(logp, ro.logp, adv, torch.ones_like(logp, dtype=torch.bool), cfg.clip_low,
                             cfg.clip_high, cfg.clip_c, cfg.loss_agg)
        ntp = ntp_loss(out.logits, y)
        # two backward passes over the same graph: the two terms of eq. 8 separately
        ga = torch.autograd.grad(cfg.lambda_rl * nsp, params, retain_graph=True, allow_unused=True)
        gb = torch.autograd.grad(cfg.lambda_sft * ntp, params, allow_unused=True)
        va = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(ga, params)])
        vb = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(gb, params)])
        g_nsp.append(va.norm().item())
        g_ntp.append(vb.norm().item())
        g_cos.append(torch.nn.functional.cosine_similarity(va, vb, dim=0).item())
        cat_all.append(cats[:, 1:].flatten())
        cat_sel.append(first.flatten())
        cos_all.append(cos)
        bin_all.append(hit)
        adv_all.append(adv)
        zero.append((rewards.view(-1, cfg.n_chunks).std(-1) == 0).float().mean().item())
    cat_all, cat_sel = torch.cat(cat_all), torch.cat(cat_sel)
    cos_all, bin_all, adv_all = torch.cat(cos_all), torch.cat(bin_all), torch.cat(adv_all)
    per = {}
    for j, name in enumerate(SHORT):
        m = cat_sel == j
        per[name] = dict(share_all=(cat_all == j).float().mean().item(), share_selected=m.float().mean().item(),
                         cosine=cos_all[m].mean().item() if m.any() else None,
                         binary=bin_all[m].mean().item() if m.any() else None)
    reward = cos_all if cfg.reward == "cosine" else bin_all if cfg.reward == "binary" else cos_all + bin_all
    return dict(categories=per, reward_mean=reward.mean().item(), reward_std=reward.std().item(),
                explained=explained_variance(reward, cat_sel), adv_abs=adv_all.abs().mean().item(),
                zero_std=sum(zero) / len(zero), grad_nsp=sum(g_nsp) / len(g_nsp), grad_ntp=sum(g_ntp) / len(g_ntp),
                grad_ratio=sum(a / b for a, b in zip(g_nsp, g_ntp)) / len(g_nsp), grad_cos=sum(g_cos) / len(g_cos))


def explained_variance(values, groups):
    """Share of the variance of values [N] explained by the group labels [N] (between-group / total, eta^2)."""
    total = ((values - values.mean()) ** 2).sum()
    between = sum(int((groups == g).sum()) * (values[groups == g].mean() - values.mean()) ** 2
                  for g in groups.unique())
    return (between / total).item() if total > 0 else 0.0


def diagnose_models(models, refine_args, seq_len, n_batches, seed, modes=("entropy", "uniform", "answer")):
    """models: {name: hf folder}; refine_args: train.py flags of the REFINE runs (c, k, reward, lambdas, margin).
    -> {model name: {mode: signal(...)}} on n_batches held-out batches of 16 documents at seq_len."""
    from checkpoint import load_pretrained
    tok = data.get_tokenizer("word")
    cfg = config.parse_args(list(refine_args))
    cfg = dataclasses.replace(cfg, eos_id=tok.eos_id)
    val = data.SyntheticData(tok, seq_len, seed, (1, min(4, seq_len // 18)), 2, ("S", "MQ", "MV"))   # what fits
    batches = [val.get_batch(16, with_mask=True) for _ in range(n_batches)]   # ([16, T+1], its answer mask)
    out = {}
    for name, folder in models.items():
        model = load_pretrained(str(folder)).train()
        out[name] = {m: signal(model, batches, dataclasses.replace(cfg, select_mode=m), tok) for m in modes}
    return out


def reward_curve(metrics_path, window=50):
    """Mean reward (and reward std, zero-std share) over the first and the last `window` steps of a run."""
    rows = [json.loads(line) for line in open(metrics_path)] if Path(metrics_path).exists() else []
    rows = [r for r in rows if r.get("reward_mean") is not None]
    if not rows:
        return None

    def mean(part, key):
        xs = [r[key] for r in part if r.get(key) is not None]
        return sum(xs) / len(xs) if xs else None
    head, tail = rows[:window], rows[-window:]
    return dict(steps=len(rows), first=mean(head, "reward_mean"), last=mean(tail, "reward_mean"),
                std_first=mean(head, "reward_std"), std_last=mean(tail, "reward_std"),
                zero_std=mean(rows, "zero_std_frac"), window=window)


def markdown(diag, curves, steps_only):
    """The diagnostics section of results.md (a list of lines)."""
    out = ["Mean reward over training (cosine unless named; first vs last 50 steps; reward std = spread across the "
           "batch's rollouts):", "", "| run | steps | reward first 50 | reward last 50 | change | reward std first "
           "→ last |", "|---|---|---|---|---|---|"]
    for name, c in curves.items():
        if c:
            out.append(f"| {name} | {c['steps']} | {c['first']:.4f} | {c['last']:.4f} | {c['last'] - c['first']:+.4f} "
                       f"| {c['std_first']:.3f} → {c['std_last']:.3f} |")
    out += ["", f"Where the selected positions fall and what they earn ({steps_only}): share of the selected positions "
            "by the category of the first token the rollout must produce (in brackets: that category's share of "
            "all positions), and the mean cosine / binary reward of those rollouts.", ""]
    for model, modes in diag.items():
        out += [f"**{model}**", "", "| selection | " + " | ".join(CATEGORIES) + " |", "|---|" + "---|" * len(SHORT)]
        for mode, d in modes.items():
            cells = []
            for name in SHORT:
                c = d["categories"][name]
                rw = "-" if c["cosine"] is None else f"{c['cosine']:.2f} / {c['binary']:.2f}"
                cells.append(f"{100 * c['share_selected']:.0f}% ({100 * c['share_all']:.0f}%): {rw}")
            out.append(f"| {mode} | " + " | ".join(cells) + " |")
        out += ["", "| selection | mean reward | reward std | variance explained by category | mean abs(A) | "
                "zero-std groups | grad norm λ·NSP | grad norm NTP | ratio | cos(grad NSP, grad NTP) |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for mode, d in modes.items():
            out.append(f"| {mode} | {d['reward_mean']:.4f} | {d['reward_std']:.4f} | {100 * d['explained']:.0f}% | "
                       f"{d['adv_abs']:.3f} | {100 * d['zero_std']:.0f}% | {d['grad_nsp']:.4f} | {d['grad_ntp']:.4f} "
                       f"| {d['grad_ratio']:.3f} | {d['grad_cos']:+.3f} |")
        out.append("")
    return out
