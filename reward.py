"""REFINE step 3: self-supervised sequence-level rewards (paper section 3, "Rewards").

A rollout of k tokens is scored against the ground-truth continuation of the same prefix, averaged over the k
positions. h_* are last-layer hidden states AFTER the final norm (the lm_head input).
  cosine: R = (1/k) sum_j cos(h_pred_j, h_gt_j)        in [-1, 1]   (mid-training default)
  binary: R = (1/k) sum_j [x_hat_j == x_j]             in [0, 1]    (a match FRACTION; test-time training default)
  hybrid: R = cosine + binary                          in [-1, 2]   (post-training default)
Rewards are constants for the policy gradient: computed without gradient, returned in fp32.
"""

import torch
import torch.nn.functional as F

REWARDS = ("cosine", "binary", "hybrid")


def _check_pair(a: torch.Tensor, b: torch.Tensor, ndim: int, what: str) -> None:
    shapes = [None if t is None else tuple(t.shape) for t in (a, b)]   # None: a missing tensor
    if None in shapes or len(shapes[0]) != ndim or shapes[0] != shapes[1]:
        raise ValueError(f"{what}: expected two tensors of the same {ndim}-D shape, got {shapes[0]} and {shapes[1]}")


@torch.no_grad()
def cosine_reward(h_pred: torch.Tensor, h_gt: torch.Tensor) -> torch.Tensor:
    """Mean over the k rollout positions of cos(h_pred, h_gt), in fp32 (eps: cosine_similarity's 1e-8).
    h_pred, h_gt: [N, k, D]  ->  returns [N]"""
    _check_pair(h_pred, h_gt, 3, "cosine_reward")
    cos = F.cosine_similarity(h_pred.float(), h_gt.float(), dim=-1)   # [N, k] cos at every position
    return cos.mean(dim=-1)                                           # sec. 3 step 3: R = (1/k) sum_j cos   [N]


@torch.no_grad()
def binary_reward(pred_ids: torch.Tensor, gt_ids: torch.Tensor) -> torch.Tensor:
    """Fraction of rollout tokens equal to the ground-truth token at the same position, in fp32.
    pred_ids, gt_ids: [N, k] token ids  ->  returns [N]"""
    _check_pair(pred_ids, gt_ids, 2, "binary_reward")
    match = (pred_ids == gt_ids).float()                              # [N, k] 1 where the token matches
    return match.mean(dim=-1)                                         # sec. 3 step 3: R = (1/k) sum_j [x_hat == x]


@torch.no_grad()
def hybrid_reward(h_pred: torch.Tensor, h_gt: torch.Tensor,
                  pred_ids: torch.Tensor, gt_ids: torch.Tensor) -> torch.Tensor:
    """cosine_reward + binary_reward, range [-1, 2]. h_pred, h_gt: [N, k, D]; pred_ids, gt_ids: [N, k] -> [N]"""
    cos = cosine_reward(h_pred, h_gt)                                 # [N]
    hit = binary_reward(pred_ids, gt_ids)                             # [N]
    if cos.shape != hit.shape:
        raise ValueError(f"hybrid_reward: hidden states give {tuple(cos.shape)} rewards, ids give {tuple(hit.shape)}")
    return cos + hit                                                  # sec. 3 step 3: R = cosine + binary


def compute_reward(name: str, h_pred=None, h_gt=None, pred_ids=None, gt_ids=None) -> torch.Tensor:
    """The reward `name` -> [N] fp32 without gradient. h_pred, h_gt: [N, k, D] (cosine, hybrid); pred_ids, gt_ids:
    [N, k] (binary, hybrid); the unused pair may be None."""
    if name == "cosine":
        return cosine_reward(h_pred, h_gt)
    if name == "binary":
        return binary_reward(pred_ids, gt_ids)
    if name == "hybrid":
        return hybrid_reward(h_pred, h_gt, pred_ids, gt_ids)
    raise ValueError(f"unknown reward {name!r}; valid: {', '.join(REWARDS)}")
