"""REFINE step 4: GRPO, the group-relative advantage and the clipped policy loss (paper section 3, "Optimisation").

Group advantage (DeepSeekMath GRPO, verl's outcome advantage):
    A_i = (R_i - mean(R_group)) / (std(R_group) + eps)          std Bessel-corrected (torch.std)
Per-token PPO clipped surrogate with verl's dual clip (the advantage of a rollout is broadcast to its k tokens):
    r = exp(clamp(logp - logp_old, -20, 20))
    L = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A);   for A < 0:  L = min(L, -A c)
Everything runs in fp32; masked tokens are removed with torch.where (never `loss * mask` after an exp, where
0 * inf = NaN would poison the backward pass).
The REFINE objective of one batch, L = lambda_RL * L_NSP + lambda_SFT * L_NTP, is `refine_loss` at the end.
"""

import torch
import torch.nn.functional as F

SCALES = ("group", "batch", "none")
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


# ------------------------------------------------------------------------------------------ advantages
def _constant_groups(rewards: torch.Tensor) -> torch.Tensor:
    """[G, n] -> [G, 1] True where every reward of the group is identical (no learning signal)."""
    return (rewards.amax(dim=-1, keepdim=True) == rewards.amin(dim=-1, keepdim=True))


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6, scale: str = "group") -> torch.Tensor:
    """Group-relative advantages, in fp32 and without gradient.

    rewards: [G, n] (G groups of n rollouts; REFINE with n=1 rollout per position uses one group per sequence,
    i.e. [B, c])  ->  returns [G, n]
    scale: "group" (default; divide by the group's std), "batch" (divide by the std of ALL G*n rewards, TRL
    "batch"), "none" (mean subtraction only, Dr. GRPO).
    Conventions: a group of size one (n == 1) has mean 0 and std 1, so A = R (verl), whatever `scale`.
    A zero-variance group gets A = 0 exactly (the float mean of equal numbers may differ from them by an ulp,
    which divided by a tiny std would otherwise give a large spurious advantage).
    """
    if rewards.dim() != 2 or scale not in SCALES or eps < 0:
        raise ValueError(f"need rewards [G, n], scale one of {SCALES}, eps >= 0; got shape {tuple(rewards.shape)}, "
                         f"scale {scale!r}, eps {eps}")
    R = rewards.detach().float()                                      # [G, n]
    if R.shape[1] == 1:
        return R.clone()                                              # mean 0, std 1 -> A = R
    centred = R - R.mean(dim=-1, keepdim=True)                        # R_i - mean(R_group)   [G, n]
    if scale == "group":
        A = centred / (R.std(dim=-1, keepdim=True) + eps)             # GRPO: / (std_group + eps)
    elif scale == "batch":
        A = centred / (R.std() + eps)                                 # / (std over all G*n rewards + eps)
    else:
        A = centred                                                   # Dr. GRPO: no std scaling
    return torch.where(_constant_groups(R), torch.zeros_like(A), A)


def zero_std_fraction(rewards: torch.Tensor) -> float:
    """Fraction of groups whose rewards are all identical (their advantages are 0). rewards: [G, n]."""
    return _constant_groups(rewards).float().mean().item()


# ------------------------------------------------------------------------------------------ loss aggregation
def default_normaliser(mask: torch.Tensor, agg: str) -> float:
    """The divisor `aggregate` uses for mask [N, k] (True/1 = valid token) when no whole-batch normaliser is passed:
    the valid tokens, the sequences with a valid token (seq-mean-token-mean/-sum) or N * k (-sum-norm).
    For gradient accumulation compute it on the WHOLE batch and pass it to every micro-batch."""
    if agg not in AGGS:
        raise ValueError(f"agg must be one of {AGGS}, got {agg!r}")
    if agg == "token-mean":
        return float(mask.bool().sum().item())
    if agg in ("seq-mean-token-mean", "seq-mean-token-sum"):
        return float(mask.bool().any(dim=-1).sum().item())
    return float(mask.shape[0] * mask.shape[1])


def aggregate(loss: torch.Tensor, mask: torch.Tensor, agg: str = "token-mean", n_total=None) -> torch.Tensor:
    """Reduce per-token losses to a scalar.

    loss: [N, k] per-token loss (masked slots must already be finite; they are ignored); mask: [N, k]
    n_total: the divisor (see default_normaliser); None = this batch's own. With the whole batch's value passed
    to each micro-batch, the micro-batch losses SUM to the loss of the unsplit batch.
    """
    if n_total is not None and not float(n_total) > 0:
        raise ValueError(f"n_total must be > 0, got {n_total}")
    valid = mask.bool()
    loss = torch.where(valid, loss, torch.zeros_like(loss))           # masked tokens contribute exactly 0
    denom = default_normaliser(mask, agg) if n_total is None else float(n_total)   # also checks agg
    if denom == 0:
        return loss.sum() * 0.0                                       # nothing valid: a zero that keeps the graph
    if agg == "seq-mean-token-mean":
        count = valid.sum(dim=-1).clamp(min=1)                        # [N] valid tokens per sequence
        return (loss.sum(dim=-1) / count).sum() / denom               # mean over sequences of the token mean
    # token-mean: sum / #valid tokens; seq-mean-token-sum: / #sequences; -norm: / (N * k)
    return loss.sum() / denom


# ------------------------------------------------------------------------------------------ policy loss
def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_low: float = 0.2, clip_high: float = 0.2, clip_c: float = 3.0, agg: str = "token-mean",
                ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0, n_total=None):
    """PPO clipped surrogate with dual clip, aggregated over valid tokens. Returns (loss scalar, stats dict).

    logp: [N, k] log-probs of the rollout tokens under the current policy (carries the gradient)
    old_logp: [N, k] the same under the policy that sampled them (no gradient); advantages: [N]
    mask: [N, k] True/1 = valid token; ref_logp: [N, k] frozen reference, required when kl_coef > 0 (ignored at 0)
    clip_low / clip_high: eps_low / eps_high of the ratio clip; clip_c: dual-clip constant (> 1)
    agg: one of AGGS; n_total: whole-batch divisor for micro-batching (see default_normaliser)
    The optional k3 KL term (x = ref - logp, kl = exp(x) - x - 1, x clamped to +-20) is aggregated the same way.
    stats (python floats, over this call's valid tokens): clip_frac_high, clip_frac_low, dual_clip_frac,
    approx_kl (mean old_logp - logp, from the clamped log-ratio), ratio_mean, and ref_kl when the KL term is on.
    On-policy (logp == old_logp) r == 1, the loss value is -agg(A) and d loss / d logp = -A / divisor.
    """
    if logp.dim() != 2 or not logp.shape == old_logp.shape == mask.shape or advantages.shape != logp.shape[:1]:
        raise ValueError(f"logp, old_logp, mask must share one [N, k] shape and advantages be [N], got "
                         f"{[tuple(t.shape) for t in (logp, old_logp, mask, advantages)]}")
    if not (0 <= clip_low < 1 and clip_high >= 0 and clip_c > 1 and kl_coef >= 0 and agg in AGGS):
        raise ValueError(f"need 0 <= clip_low < 1, clip_high >= 0, clip_c (dual clip) > 1, kl_coef >= 0 and agg one "
                         f"of {AGGS}; got {clip_low}, {clip_high}, {clip_c}, {kl_coef}, {agg!r}")
    use_kl = kl_coef > 0
    if use_kl and (ref_logp is None or ref_logp.shape != logp.shape):
        raise ValueError(f"kl_coef > 0 needs ref_logp [N, k]={tuple(logp.shape)} (the frozen reference's log-probs); "
                         f"pass kl_coef=0 for no KL")

    valid = mask.bool()                                               # [N, k]
    zero = torch.zeros((), dtype=torch.float32, device=logp.device)
    # sanitise FIRST: masked slots may hold -inf / huge values; nothing downstream may see them
    lp = torch.where(valid, logp.float(), zero)                       # [N, k]
    old = torch.where(valid, old_logp.detach().float(), zero)         # [N, k]
    A = advantages.detach().float()[:, None].expand_as(lp)            # [N, k] advantage broadcast to tokens

    log_ratio = (lp - old).clamp(-20.0, 20.0)                         # log r, clamped as in verl
    ratio = log_ratio.exp()                                           # r = pi / pi_old   [N, k]
    surr = -A * ratio                                                 # -r A
    surr_clip = -A * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)     # -clip(r, 1-eps_low, 1+eps_high) A
    clipped = surr_clip > surr                                        # the clipped term wins the max
    loss_tok = torch.where(clipped, surr_clip, surr)                  # sec. 3 step 4: -min(rA, clip(r)A)
    dual_bound = -A * clip_c                                          # -A c (> 0 when A < 0)
    dual = (A < 0) & (loss_tok > dual_bound)
    loss_tok = torch.where(dual, dual_bound, loss_tok)                # dual clip: min(L, -A c) for A < 0

    loss = aggregate(loss_tok, valid, agg, n_total)
    stats = {}
    if use_kl:
        ref = torch.where(valid, ref_logp.detach().float(), zero)
        x = (ref - lp).clamp(-20.0, 20.0)                             # log pi_ref / pi
        kl_tok = x.exp() - x - 1.0                                    # k3 estimator, >= 0   [N, k]
        loss = loss + kl_coef * aggregate(kl_tok, valid, agg, n_total)

    with torch.no_grad():
        n_valid = max(int(valid.sum().item()), 1)

        def mean(x):                                                  # mean over valid tokens (bool: a fraction)
            return torch.where(valid, x.float(), zero).sum().item() / n_valid

        stats["clip_frac_high"] = mean((A > 0) & (ratio > 1.0 + clip_high))
        stats["clip_frac_low"] = mean((A < 0) & (ratio < 1.0 - clip_low))
        stats["dual_clip_frac"] = mean(dual)
        stats["approx_kl"] = mean(-log_ratio)
        stats["ratio_mean"] = mean(ratio)
        # A . log pi: what the surrogate's gradient raises (on-policy its VALUE, -agg(A), is 0 by construction)
        stats["adv_logp"] = mean(A * lp)
        if use_kl:
            stats["ref_kl"] = mean(kl_tok)
    return loss, stats


# ---- the REFINE objective (paper section 3, step 4): L = lambda_RL * L_NSP + lambda_SFT * L_NTP ----
def rollout_advantages(rewards, n_chunks, n_rollouts, group_by="sequence", scale="group", eps=1e-6):
    """rewards [B*c*n] with rows (b, p, i) -> advantages [B*c*n]. group_by "sequence": a group is the c*n rollouts
    of one sequence (the official n = 1 behaviour: positions compete); "position": the n rollouts of one prefix."""
    if group_by not in ("sequence", "position"):
        raise ValueError(f"unknown group_by {group_by!r}; choose sequence or position")
    size = n_chunks * n_rollouts if group_by == "sequence" else n_rollouts
    return group_advantages(rewards.view(-1, size), eps, scale).flatten()


def ntp_loss(logits, targets, mask=None, n_total=None):
    """Next-token cross-entropy. logits [B, T, V], targets [B, T], mask [B, T] (True = counted) or None.
    Summed over counted tokens and divided by n_total (the WHOLE batch's count, so that micro-batch losses add up
    to the full-batch loss; default: this call's count)."""
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")        # [B*T]
    if mask is not None:
        loss = torch.where(mask.flatten(), loss, torch.zeros_like(loss))
    count = targets.numel() if mask is None else int(mask.sum())
    return loss.sum() / (n_total if n_total is not None else max(count, 1))


def refine_loss(model, x, y, out, rollouts, advantages, cfg, ntp_mask=None, ntp_total=None, nsp_total=None,
                mode="snapshot"):
    """The REFINE loss of one (micro-)batch. x, y: [B, T] inputs and next-token targets; out: the LMOutput of the
    forward over x WITH grad (snapshots at rollouts.positions in snapshot mode); rollouts: rollout.Rollouts;
    advantages: [N]. cfg supplies lambda_rl, lambda_sft, sample_temperature, clip_low, clip_high, clip_c, loss_agg,
    kl_coef. Returns (loss, stats): L = lambda_RL * L_NSP + lambda_SFT * L_NTP (NTP over the whole sequence)."""
    from rollout import logprobs_from_snapshots, reforward_logprobs  # rollout imports the model; keep grpo light
    if mode == "snapshot":   # teacher-forced from the differentiable snapshots: k-1 decoding steps, no prefix pass
        logp = logprobs_from_snapshots(model, out, rollouts.tokens, rollouts.n, cfg.sample_temperature)
    else:                    # the official way: every prefix + rollout forwarded again, with grad
        logp, _ = reforward_logprobs(model, x, rollouts.positions, rollouts.tokens, rollouts.n,
                                     cfg.sample_temperature)
    mask = torch.ones_like(logp, dtype=torch.bool)  # EOS is suppressed: every rollout has exactly k tokens
    nsp, stats = policy_loss(logp, rollouts.logp, advantages, mask, cfg.clip_low, cfg.clip_high, cfg.clip_c,
                             cfg.loss_agg, rollouts.logp, cfg.kl_coef, nsp_total)   # KL to the sampling policy
    ntp = ntp_loss(out.logits, y, ntp_mask, ntp_total)
    loss = cfg.lambda_rl * nsp + cfg.lambda_sft * ntp                  # eq. 8: the NSP and NTP objectives summed
    return loss, dict(stats, ntp_loss=ntp.item(), nsp_loss=nsp.item())
