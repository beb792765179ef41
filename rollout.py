"""Next-sequence rollouts (paper section 3, step 2): k sampled tokens after each selected prefix.

Snapshot mode (the default, this project's contribution): one full-sequence forward hands out the fast-weight state
after every selected position t (model(ids, snapshot_at=...)); every rollout starts from that fixed-size state and
decodes k tokens with the incremental state, O(k) per rollout whatever the prefix length.
Reforward mode (the official algorithm, kept as the reference for tests and the baseline for bench.py): every
truncated prefix x[:t+1] is run again from scratch, for sampling, for the old log-probs and for the gradient.

Layout: G = B * c prefixes (row g = b * c + p), N = G * n rollouts (row i continues prefix i // n).
Log-probs are those of the sampling policy at the sampling temperature, log softmax(logits / temperature),
without the top-p / top-k truncation (the usual GRPO convention), so a teacher-forced recomputation is exact.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from entropy import select_positions, token_entropy
from model import map_model_state


@dataclass
class Rollouts:
    positions: torch.Tensor   # [B, c] the last prefix token t of each selected prefix
    tokens: torch.Tensor      # [N, k] sampled continuation
    logp: torch.Tensor        # [N, k] their log-probs under the sampling policy (fp32, no grad)
    h_pred: torch.Tensor      # [N, k, D] final-norm hidden states of the sampled tokens (no grad)
    gt_tokens: torch.Tensor   # [G, k] the true continuation x[t+1 : t+1+k]
    h_gt: torch.Tensor        # [G, k, D] its hidden states from the full forward (no grad)
    n: int                    # rollouts per prefix


def sample_token(logits, temperature=1.0, top_p=1.0, top_k=0, suppress=None, generator=None):
    """logits [N, V] -> (tokens [N], log-probs [N] under softmax(logits / temperature)). `suppress`: a token id
    that may not be drawn (EOS, so every rollout has exactly k tokens). The log-probs are the policy's, before
    suppression and truncation: what the teacher-forced pass scores, so the PPO ratio is exactly 1 on-policy."""
    logp = masked = F.log_softmax(logits.float() / temperature, dim=-1)             # [N, V]
    if suppress is not None and suppress >= 0:
        masked = logp.index_fill(-1, torch.tensor([suppress], device=logp.device), float("-inf")).log_softmax(-1)
    if top_k and top_k < masked.shape[-1]:
        kth = masked.topk(top_k, dim=-1).values[:, -1:]                             # [N, 1]
        masked = masked.masked_fill(masked < kth, float("-inf"))                    # a new tensor: logp stays
    if top_p < 1.0:  # keep the smallest set of tokens whose mass reaches top_p
        sorted_lp, order = masked.sort(dim=-1, descending=True)
        mass_before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()
        drop = torch.zeros_like(masked, dtype=torch.bool).scatter(-1, order, mass_before >= top_p)
        masked = masked.masked_fill(drop, float("-inf"))
    tokens = draw(masked.exp(), generator)                                          # [N]
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]


def draw(probs, generator=None):
    """One index per row of probs [N, V] (>= 0, not necessarily normalised), drawn with probability proportional to
    it: the inverse CDF at one uniform u per row, the first index whose cumulative mass exceeds u * total, an index
    where the cumsum rises (a positive probability). The cumsum is fp64 (fp32 on MPS, which has no fp64); should
    rounding make u * total reach the total, the last index of positive probability is taken, so an index of zero
    probability is never drawn. (torch.multinomial draws an exponential per entry: [N, V] random numbers for N.)"""
    acc = torch.float32 if probs.device.type == "mps" else torch.float64
    cdf = probs.to(acc).cumsum(-1)                                                   # [N, V]
    total = cdf[:, -1:].contiguous()                                                 # [N, 1]
    u = torch.rand(probs.shape[0], 1, device=probs.device, generator=generator).to(acc)
    return torch.minimum(torch.searchsorted(cdf, u * total, right=True), torch.searchsorted(cdf, total))[:, 0]


def rows_per_prefix(x, n):
    """x [G, ...] -> [G * n, ...], row g repeated n times (row i continues prefix i // n); x itself when n == 1 (no
    copy of the snapshot states, nor of their gradient in the backward)."""
    return x if n == 1 else x.repeat_interleave(n, 0)


def ground_truth(input_ids, hidden, positions, k):
    """input_ids [B, T], hidden [B, T, D], positions [B, c] -> (gt tokens [G, k], h_gt [G, k, D])."""
    idx = (positions[:, :, None] + 1 + torch.arange(k, device=positions.device)).flatten(1)    # [B, c*k]
    gt = torch.gather(input_ids, 1, idx).view(-1, k)                                               # [G, k]
    h = torch.gather(hidden, 1, idx[:, :, None].expand(-1, -1, hidden.shape[-1]))                 # [B, c*k, D]
    return gt, h.reshape(gt.shape[0], k, -1).detach()


@torch.no_grad()
def sample_from_snapshots(model, out, input_ids, k, n=1, temperature=1.0, top_p=1.0, top_k=0, eos_id=None,
                          generator=None):
    """out: LMOutput of model(input_ids, snapshot_at=...) with .snapshots and .positions [B, c].
    Samples n continuations of k tokens per prefix by incremental decoding from the detached snapshots."""
    state = map_model_state(lambda s: rows_per_prefix(s.detach(), n), out.snapshots)
    logits = rows_per_prefix(out.snapshot_logits.detach(), n)                                    # [N, V]
    tokens, logps, hiddens = [], [], []
    for _ in range(k):
        tok, lp = sample_token(logits, temperature, top_p, top_k, eos_id, generator)
        step = model(tok[:, None], state=state)
        state, logits = step.state, step.logits[:, 0]
        tokens.append(tok)
        logps.append(lp)
        hiddens.append(step.hidden[:, 0])
    gt, h_gt = ground_truth(input_ids, out.hidden, out.positions, k)
    return Rollouts(out.positions, torch.stack(tokens, 1), torch.stack(logps, 1), torch.stack(hiddens, 1).float(),
                    gt, h_gt.float(), n)


def logprobs_from_snapshots(model, out, tokens, n=1, temperature=1.0):
    """Teacher-forced log-probs [N, k] of `tokens` [N, k] from the (differentiable) snapshots of `out`: the first
    token from the full pass's logits (out.snapshot_logits), the others from one model call over the first k-1
    tokens from the snapshots (equal to k-1 decoding steps). Gradients reach the whole forward."""
    state = map_model_state(lambda s: rows_per_prefix(s, n), out.snapshots)
    logits = rows_per_prefix(out.snapshot_logits, n)[:, None]                                    # [N, 1, V]
    if tokens.shape[1] > 1:
        logits = torch.cat([logits, model(tokens[:, :-1], state=state).logits], 1)             # [N, k, V]
    return F.log_softmax(logits.float() / temperature, -1).gather(-1, tokens[:, :, None])[..., 0]


@torch.no_grad()
def encode_rollouts(model, input_ids, ro):
    """The hidden states another model (a frozen reward encoder) gives the same tokens -> (h_pred [N, k, D], h_gt
    [G, k, D]) fp32: the true continuations from one pass over input_ids [B, T] with snapshots at ro.positions, the
    rollout tokens teacher-forced from those snapshots."""
    out = model(input_ids, snapshot_at=ro.positions)
    state = map_model_state(lambda s: rows_per_prefix(s, ro.n), out.snapshots)
    h_gt = ground_truth(input_ids, out.hidden, ro.positions, ro.tokens.shape[1])[1]
    return model(ro.tokens, state=state).hidden.float(), h_gt.float()


# ---- reforward mode: the official algorithm, every truncated prefix runs from scratch ----
def reforward_rows(input_ids, positions, tokens, n):
    """Rows prefix x[b, :t+1] + rollout tokens, right-padded (causal: padding never reaches real positions).
    -> (ids [N, L], the index of each row's last prefix token [N])."""
    prefixes = [input_ids[b, :t + 1] for b, row in enumerate(positions.tolist()) for t in row for _ in range(n)]
    L = max(len(p) for p in prefixes) + tokens.shape[1]
    ids = input_ids.new_zeros(len(prefixes), L)
    for i, p in enumerate(prefixes):
        ids[i, :len(p)] = p
        ids[i, len(p):len(p) + tokens.shape[1]] = tokens[i]
    return ids, torch.tensor([len(p) - 1 for p in prefixes], device=ids.device)


def reforward_logprobs(model, input_ids, positions, tokens, n=1, temperature=1.0):
    """Log-probs [N, k] and hidden states [N, k, D] of `tokens` after each prefix by a full forward of every
    prefix + rollout row (differentiable when grad is enabled)."""
    ids, last = reforward_rows(input_ids, positions, tokens, n)
    out = model(ids)
    k = tokens.shape[1]
    idx = last[:, None] + torch.arange(k + 1, device=ids.device)                                  # [N, k+1]
    logits = torch.gather(out.logits, 1, idx[:, :k, None].expand(-1, -1, out.logits.shape[-1]))  # [N, k, V]
    logp = F.log_softmax(logits.float() / temperature, -1).gather(-1, tokens[:, :, None])[..., 0]
    hidden = torch.gather(out.hidden, 1, idx[:, 1:, None].expand(-1, -1, out.hidden.shape[-1]))  # [N, k, D]
    return logp, hidden


@torch.no_grad()
def sample_by_reforward(model, input_ids, positions, k, n=1, temperature=1.0, top_p=1.0, top_k=0, eos_id=None,
                        generator=None, hidden=None):
    """The official way: a prefill of every truncated prefix, then k decoding steps; the old log-probs and hidden
    states come from another full forward of every prefix + rollout (reforward_logprobs)."""
    no_tokens = input_ids.new_zeros(positions.numel() * n, 0)
    ids, last = reforward_rows(input_ids, positions, no_tokens, n)                # [N, T] right-padded prefixes, [N]
    out = model(ids, snapshot_at=last[:, None])
    state, logits = out.snapshots, out.snapshot_logits
    tokens = []
    for _ in range(k):
        tok, _ = sample_token(logits, temperature, top_p, top_k, eos_id, generator)
        step = model(tok[:, None], state=state)
        state, logits = step.state, step.logits[:, 0]
        tokens.append(tok)
    tokens = torch.stack(tokens, 1)
    logp, h_pred = reforward_logprobs(model, input_ids, positions, tokens, n, temperature)
    if hidden is None:
        hidden = model(input_ids).hidden
    gt, h_gt = ground_truth(input_ids, hidden, positions, k)
    return Rollouts(positions, tokens, logp, h_pred.float(), gt, h_gt.float(), n)


def collect_rollouts(model, x, cfg, generator=None, lengths=None, mode="snapshot", allowed=None):
    """Steps 1-2 of REFINE for a batch x [B, T]: one forward (entropies, NTP logits, h_gt and, in snapshot mode, the
    states after the selected positions), position selection, then sampling. Runs with or without grad: with
    grad, the returned LMOutput is reused for the NTP loss and the teacher-forced log-probs (one forward per step).
    cfg supplies n_chunks, rollout_len, n_rollouts, select_mode, select_temperature, margin, sample_temperature,
    top_p, top_k, and eos_id (suppressed while sampling). allowed: bool [B, T], the positions select_mode "answer" may
    pick (see entropy.select_positions). -> (LMOutput, Rollouts)."""
    def select(logits, hidden):  # eq. 1-2: entropy per position, smoothed, one softmax draw per chunk
        return select_positions(token_entropy(logits.detach()), cfg.n_chunks, cfg.rollout_len, cfg.select_mode,
                                cfg.select_temperature, cfg.margin, lengths, generator, allowed)

    knobs = dict(k=cfg.rollout_len, n=cfg.n_rollouts, temperature=cfg.sample_temperature, top_p=cfg.top_p,
                 top_k=cfg.top_k, eos_id=cfg.eos_id, generator=generator)
    if mode == "snapshot":
        out = model(x, snapshot_at=select)
        return out, sample_from_snapshots(model, out, x, **knobs)
    if mode == "reforward":
        out = model(x)
        return out, sample_by_reforward(model, x, select(out.logits, out.hidden), hidden=out.hidden, **knobs)
    raise ValueError(f"unknown rollout mode {mode!r}; choose snapshot or reforward")
