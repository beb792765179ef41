"""REFINE step 1: entropy-based token selection (paper section 3, "Entropy-based token selection").

One forward pass over a sequence gives the next-token entropy H_t at every position t. The entropies are
smoothed with a centred moving average, the L real tokens are cut into c equal chunks, and in each chunk ONE
position is drawn with p(t) = softmax(H_t / tau) over the chunk. A rollout of k tokens then starts right after
the drawn position. Everything here runs in fp32 and is a pure function (tensors in, tensors out).

Index convention: a returned position t is the LAST prefix token. The rollout predicts x[t+1 : t+1+k], so
H_t = H(pi(. | x_<=t)) is the uncertainty about the first token the rollout must produce.
"""

import torch
import torch.nn.functional as F

MODES = ("entropy", "uniform", "argmax", "argmin", "answer")


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Next-token entropy in nats, computed in fp32 from raw logits.

    logits: [..., V]  ->  returns [...]
    -inf logits (masked vocabulary entries) contribute exactly 0 (no NaN, in values or gradients).
    A row whose logits are ALL -inf has no distribution and gives NaN.
    """
    V = logits.shape[-1]
    # blocks of rows: ~512 KB on a CPU (they stay in its cache), ~128 MB on a GPU (few launches, bounded memory)
    rows, parts = max(1, (2 ** 17 if logits.device.type == "cpu" else 2 ** 25) // V), []
    for block in logits.reshape(-1, V).split(rows):
        logp = F.log_softmax(block.float(), dim=-1)              # [rows, V] log pi(v | x_<=t)
        # 0 * log 0 := 0: log p = -inf becomes 0 BEFORE the product (the backward stays finite too)
        parts.append(-(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(dim=-1))   # sec. 3 step 1: -sum_v p log p
    return torch.cat(parts).view(logits.shape[:-1])              # H_t  [...]


def _odd_kernel(k: int) -> int:
    """The smoothing kernel: k itself when odd, k + 1 when even (a centred window needs an odd size)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return k if k % 2 == 1 else k + 1


def smooth_entropy(entropy: torch.Tensor, k: int) -> torch.Tensor:
    """Centred moving average of the entropies (stride 1, same length out), in fp32.

    entropy: [B, T]  ->  returns [B, T]
    The kernel is k (k + 1 when k is even). The sequence is padded with zeros on both sides and the zeros
    COUNT in the mean (avg_pool1d with count_include_pad=True), so values near the edges are pulled towards 0:
    out[t] = (1 / kernel) * sum_{|j - t| <= kernel // 2} H_j, with H_j = 0 outside [0, T).
    """
    if entropy.dim() != 2:
        raise ValueError(f"entropy must be [B, T], got shape {tuple(entropy.shape)}")
    kernel = _odd_kernel(k)
    x = entropy.float().unsqueeze(1)                             # [B, 1, T] one channel for avg_pool1d
    out = F.avg_pool1d(x, kernel_size=kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    return out.squeeze(1)                                        # [B, T]


def _first_extreme(x: torch.Tensor, largest: bool) -> torch.Tensor:
    """Index of the first max (largest=True) or first min along the last dim. x: [C, W] -> [C]."""
    target = x.amax(dim=-1, keepdim=True) if largest else x.amin(dim=-1, keepdim=True)
    idx = torch.arange(x.shape[-1], device=x.device).expand_as(x)  # [C, W] position inside the chunk
    big = torch.full_like(idx, x.shape[-1])
    return torch.where(x == target, idx, big).amin(dim=-1)       # smallest index among the ties   [C]


def _start_range(length: int, k: int, margin: int, end_margin: bool = True) -> tuple[int, int]:
    """Allowed rollout starts s = t + 1 for a sequence of `length` real tokens: returns (lo, hi), lo <= hi.

    Hard rules: s >= 1 (the prefix holds at least one token) and s + k <= length (all k ground-truth tokens
    exist). Soft rule (official code): margin <= s <= length - margin. Preferred range:
    [max(margin, 1), length - max(margin, k)] ([max(margin, 1), length - k] with end_margin=False). When the sequence
    is too short for that range (length < 2 * margin, roughly), the margin is dropped and the range is
    [1, length - k]. When even that is empty (length < k + 1) no rollout can exist and a ValueError is raised.
    """
    lo, hi = max(margin, 1), length - (max(margin, k) if end_margin else k)
    if lo > hi:                                                  # too short for the margin: keep the hard rules only
        lo, hi = 1, length - k
    if lo > hi:
        raise ValueError(f"sequence of {length} real tokens is too short for a rollout of k={k} tokens "
                         f"(need at least k + 1 = {k + 1})")
    return lo, hi


def select_positions(entropy: torch.Tensor, n_chunks: int, k: int, mode: str = "entropy",
                     temperature: float = 1.0, margin: int = 20, lengths=None,
                     generator: torch.Generator | None = None, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Pick one rollout position per chunk -> t, the last prefix token, LongTensor [B, n_chunks].

    entropy: [B, T] per-position NTP entropy (token_entropy); lengths: [B] real tokens per row (tensor or ints,
    tokens at [0, L), default L = T); k: rollout length (also the smoothing kernel). For each row:
      1. [0, L) is cut into n_chunks chunks of size L // n_chunks; the remainder is never sampled.
      2. in each chunk ONE index i is chosen:
         "entropy": i ~ softmax(smooth_entropy(H, k) / temperature) over the chunk (entries at >= L count as zero
                    padding in the smoothing); "uniform": i ~ uniform; "argmax" / "argmin": the first index of the
                    max / min of the UNsmoothed entropy;
         "answer" (this project's, not the paper's): no chunks; n_chunks positions drawn with replacement among
                    the row's `allowed` positions (bool [B, T], e.g. the token before each query-answer word, whose
                    continuation is predictable, unlike a needle's random value) with the same softmax; a row
                    without allowed real positions falls back to "entropy"; no end margin (answers end a document).
      3. the start s = i + 1 is clamped into the allowed range (_start_range: [max(margin, 1), L - max(margin, k)],
         or [1, L - k] when L is too short for the margin) and t = s - 1 is returned: 0 <= t, t + 1 + k <= L.
    Sampling uses torch.multinomial with `generator` (a seeded torch.Generator on entropy's device).
    """
    if entropy.dim() != 2:
        raise ValueError(f"entropy must be [B, T], got shape {tuple(entropy.shape)}")
    if n_chunks < 1:
        raise ValueError(f"n_chunks must be >= 1, got {n_chunks}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    B, T = entropy.shape
    if mode == "answer" and (allowed is None or allowed.shape != (B, T)):
        raise ValueError(f"mode 'answer' needs allowed: a bool [B={B}, T={T}] mask of the positions it may pick")
    if lengths is None:
        lengths = [T] * B
    lengths = [int(n) for n in (lengths.tolist() if torch.is_tensor(lengths) else lengths)]
    if len(lengths) != B:
        raise ValueError(f"lengths must have B={B} entries, got {len(lengths)}")
    for n in lengths:
        if not 1 <= n <= T:
            raise ValueError(f"every length must lie in [1, T={T}], got {n}")

    H = entropy.detach().float()                                                # [B, T]
    real = torch.arange(T, device=H.device)[None, :] < torch.tensor(lengths, device=H.device)[:, None]  # [B, T]
    H = torch.where(real, H, torch.zeros_like(H))                               # pad slots act as zero padding
    if mode in ("entropy", "answer"):
        H_s = smooth_entropy(H, k)                                              # [B, T]

    out = torch.empty(B, n_chunks, dtype=torch.long)
    for b, L in enumerate(lengths):
        lo, hi = _start_range(L, k, margin, end_margin=mode != "answer")
        pool = None if mode != "answer" else allowed[b, :L].nonzero().flatten().to(H.device)   # [A] candidates
        if pool is not None and len(pool):
            probs = torch.softmax(H_s[b, pool] / temperature, dim=-1)            # softmax(H_t / tau) over candidates
            i = pool[torch.multinomial(probs, n_chunks, replacement=True, generator=generator)].cpu()   # [C]
            out[b] = (i + 1).clamp(lo, hi) - 1                                  # t = clamped start - 1
            continue
        size = L // n_chunks
        if size == 0:
            raise ValueError(f"n_chunks={n_chunks} is larger than the {L} real tokens of row {b}")
        if mode in ("entropy", "answer"):                                       # "answer" without candidates too
            chunks = H_s[b, : n_chunks * size].view(n_chunks, size)            # [C, size] remainder dropped
            probs = torch.softmax(chunks / temperature, dim=-1)                 # sec. 3 step 1: softmax(H_t / tau)
            j = torch.multinomial(probs, 1, generator=generator).squeeze(-1)    # [C] index inside each chunk
        elif mode == "uniform":
            probs = torch.ones(n_chunks, size, device=H.device)                 # [C, size] equal weights
            j = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            chunks = H[b, : n_chunks * size].view(n_chunks, size)               # [C, size] unsmoothed
            j = _first_extreme(chunks, largest=(mode == "argmax"))              # [C]
        i = j.cpu() + torch.arange(n_chunks) * size                             # [C] index in the sequence
        start = (i + 1).clamp(lo, hi)                                           # rollout start s = i + 1, clamped
        out[b] = start - 1                                                      # t = last prefix token
    return out.to(entropy.device)
