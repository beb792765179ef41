"""Tests for reward.py: cosine / binary / hybrid sequence rewards. Hand-computed numbers, tolerance 1e-6."""

import math

import pytest
import torch

from reward import binary_reward, compute_reward, cosine_reward, hybrid_reward


def test_cosine_identical_orthogonal_opposite():
    h = torch.randn(1, 5, 8)
    e0, e1 = torch.eye(2)
    orth_pred = e0.expand(1, 3, 2)                                   # [1, 3, 2]
    orth_gt = e1.expand(1, 3, 2)
    # float32 norms and dot products of a few O(1) values: ~1e-7 of rounding; abs 1e-6
    assert cosine_reward(h, h).item() == pytest.approx(1.0, abs=1e-6)          # identical -> 1
    assert cosine_reward(orth_pred, orth_gt).item() == pytest.approx(0.0, abs=1e-6)  # orthogonal -> 0
    assert cosine_reward(h, -h).item() == pytest.approx(-1.0, abs=1e-6)        # opposite -> -1
    assert cosine_reward(3.0 * h, h).item() == pytest.approx(1.0, abs=1e-6)    # scale does not matter


def test_cosine_mean_over_positions():
    # k=2: cos([1,0],[1,0]) = 1, cos([1,1],[1,0]) = 1/sqrt(2) -> (1 + 0.70710678) / 2
    h_pred = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    h_gt = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    r = cosine_reward(h_pred, h_gt)
    assert r.shape == (1,)
    # float32 against float64 math on O(1) values: ~1e-7; abs 1e-6
    assert r.item() == pytest.approx((1 + 1 / math.sqrt(2)) / 2, abs=1e-6)


def test_binary_fraction():
    pred = torch.tensor([[1, 2, 3, 4, 5], [7, 7, 7, 7, 7], [1, 2, 3, 4, 5]])
    gt = torch.tensor([[1, 2, 0, 4, 0], [0, 0, 0, 0, 0], [1, 2, 3, 4, 5]])
    r = binary_reward(pred, gt)
    assert r.dtype == torch.float32
    # 3/5 in float32: one rounding; assert_close's float32 defaults (rtol 1.3e-6, atol 1e-5)
    torch.testing.assert_close(r, torch.tensor([0.6, 0.0, 1.0]))     # a fraction, not all-or-nothing


def test_hybrid_is_sum_and_range():
    h_pred = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    h_gt = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    ids_p, ids_g = torch.tensor([[3, 4]]), torch.tensor([[3, 9]])
    r = hybrid_reward(h_pred, h_gt, ids_p, ids_g)
    # float32 against float64 math on O(1) values: ~1e-7; abs 1e-6
    assert r.item() == pytest.approx((1 + 1 / math.sqrt(2)) / 2 + 0.5, abs=1e-6)
    h = torch.randn(4, 3, 6)
    ids = torch.randint(0, 5, (4, 3))
    # cosine of a vector with itself in float32: 1 up to a few roundings; float32 defaults of assert_close
    torch.testing.assert_close(hybrid_reward(h, h, ids, ids), torch.full((4,), 2.0))          # best: 1 + 1
    torch.testing.assert_close(hybrid_reward(h, -h, ids, ids + 1), torch.full((4,), -1.0))    # worst: -1 + 0


def test_no_grad_and_fp32():
    h_pred = torch.randn(2, 3, 4, dtype=torch.bfloat16, requires_grad=True)
    h_gt = torch.randn(2, 3, 4, dtype=torch.bfloat16)
    r = cosine_reward(h_pred, h_gt)
    assert r.dtype == torch.float32 and not r.requires_grad
    r = hybrid_reward(h_pred, h_gt, torch.zeros(2, 3), torch.zeros(2, 3))
    assert r.dtype == torch.float32 and not r.requires_grad


def test_compute_reward_dispatch():
    h_pred, h_gt = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    p, g = torch.randint(0, 3, (3, 5)), torch.randint(0, 3, (3, 5))
    # the same function on the same tensors: equal up to nothing; assert_close's defaults are ample
    torch.testing.assert_close(compute_reward("cosine", h_pred, h_gt, None, None), cosine_reward(h_pred, h_gt))
    torch.testing.assert_close(compute_reward("binary", None, None, p, g), binary_reward(p, g))
    torch.testing.assert_close(compute_reward("hybrid", h_pred, h_gt, p, g),
                               cosine_reward(h_pred, h_gt) + binary_reward(p, g))
    with pytest.raises(ValueError, match="cosine, binary, hybrid"):
        compute_reward("bleu", h_pred, h_gt, p, g)


def test_shape_errors():
    with pytest.raises(ValueError):
        cosine_reward(torch.randn(2, 3, 4), torch.randn(2, 3, 5))
    with pytest.raises(ValueError):
        cosine_reward(torch.randn(3, 4), torch.randn(3, 4))
    with pytest.raises(ValueError):
        binary_reward(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError):
        compute_reward("binary", None, None, None, None)
