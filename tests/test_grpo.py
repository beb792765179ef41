"""Tests for grpo.py: group advantages, the clipped policy loss, aggregation, micro-batching. Hand-computed."""

import math

import pytest
import torch

from grpo import aggregate, default_normaliser, group_advantages, policy_loss, zero_std_fraction

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


# ---------------------------------------------------------------- group_advantages

def test_advantages_two_and_four():
    # [1, 0]: mean 0.5, unbiased std sqrt(0.5) -> +-0.5 / 0.70711 = +-0.70711
    A = group_advantages(torch.tensor([[1.0, 0.0]]))
    # the expected values are written to 5 decimals: atol 1e-5 is their rounding (float32 adds ~1e-7)
    torch.testing.assert_close(A, torch.tensor([[0.70711, -0.70711]]), atol=1e-5, rtol=0)
    # [1, 0, 1, 0]: std sqrt(1/3) -> +-0.5 / 0.57735 = +-0.86603
    A = group_advantages(torch.tensor([[1.0, 0.0, 1.0, 0.0]]))
    torch.testing.assert_close(A, torch.tensor([[0.86603, -0.86603, 0.86603, -0.86603]]), atol=1e-5, rtol=0)


def test_advantages_unbiased_std_and_eps():
    # [0, 1, 2]: unbiased std 1 (the biased one would be 0.8165) -> [-1, 0, 1] / (1 + eps)
    A = group_advantages(torch.tensor([[0.0, 1.0, 2.0]]), eps=0.25)
    # float32 arithmetic on O(1) values: assert_close's float32 defaults (rtol 1.3e-6, atol 1e-5) cover a few roundings
    torch.testing.assert_close(A, torch.tensor([[-0.8, 0.0, 0.8]]))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_constant_group_gives_exact_zeros(scale):
    # 0.1 and 0.7 are not exact in fp32: the float mean of seven copies is off by ~1e-8, and a naive
    # (R - mean) / (std + eps) gives -0.0075 and 0.06 for these rows instead of 0
    R = torch.tensor([[0.1] * 7, [0.7] * 7, [1.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.5]])
    A = group_advantages(R, scale=scale)
    assert (A[:2] == 0).all()
    assert (A[2] != 0).any()
    # a count over 3 groups in float: approx's 1e-6 relative covers the rounding of 2 / 3
    assert zero_std_fraction(R) == pytest.approx(2 / 3)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_of_one_is_reward(scale):
    R = torch.tensor([[0.3], [-1.5], [2.0]])
    assert torch.equal(group_advantages(R, scale=scale), R)


def test_batch_and_none_scaling():
    R = torch.tensor([[1.0, 0.0], [4.0, 0.0]])
    centred = torch.tensor([[0.5, -0.5], [2.0, -2.0]])
    # batch std of [1, 0, 4, 0]: mean 1.25, sum of squares 10.75, / 3 -> sqrt(3.58333) = 1.892969
    # 1.892969 is written to 7 digits (rounding <= 5e-7 relative): atol 1e-6 on values <= 1.1
    torch.testing.assert_close(group_advantages(R, scale="batch"), centred / (1.892969 + 1e-6), atol=1e-6, rtol=0)
    torch.testing.assert_close(group_advantages(R, scale="none"), centred)


def test_advantage_errors_and_no_grad():
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.rand(2, 3), scale="token")
    with pytest.raises(ValueError):
        group_advantages(torch.rand(6))
    R = torch.rand(2, 3, requires_grad=True)
    assert not group_advantages(R).requires_grad


# ---------------------------------------------------------------- policy_loss: each branch, one token at a time

def _one(A, r, **kw):
    """Loss and d loss / d logp for a single token with advantage A and ratio r."""
    logp = torch.tensor([[math.log(r)]], requires_grad=True)
    loss, stats = policy_loss(logp, torch.zeros(1, 1), torch.tensor([A]), torch.ones(1, 1), **kw)
    loss.backward()
    return loss.item(), logp.grad.item(), stats


@pytest.mark.parametrize("A, r, loss, grad", [
    (2.0, 1.1, -2.2, -2.2),     # A > 0 inside the clip range: -r A, grad -A r
    (2.0, 1.5, -2.4, 0.0),      # A > 0, r > 1.2: clipped at -1.2 A, no gradient
    (2.0, 0.5, -1.0, -1.0),     # A > 0, r < 0.8: min picks the UNclipped r A
    (-1.0, 0.5, 0.8, 0.0),      # A < 0, r < 0.8: clipped at -0.8 A, no gradient
    (-1.0, 1.5, 1.5, 1.5),      # A < 0, r > 1.2: unclipped -r A (below the dual bound 3)
    (-1.0, 5.0, 3.0, 0.0),      # A < 0, -r A = 5 > -c A = 3: dual clip, no gradient
])
def test_loss_branches(A, r, loss, grad):
    value, g, _ = _one(A, r)
    # hand-computed O(1) values in float32: a few roundings of ~1e-7; 1e-5 leaves room for exp/log (~1e-6)
    assert value == pytest.approx(loss, abs=1e-5)
    assert g == pytest.approx(grad, abs=1e-5)


def test_asymmetric_clip_and_dual_constant():
    # float32 exp/log of O(1) values: ~1e-6 at most; abs 1e-5
    assert _one(2.0, 1.5, clip_high=0.28)[0] == pytest.approx(-2.56, abs=1e-5)     # DAPO clip-higher
    assert _one(-1.0, 0.5, clip_low=0.1)[0] == pytest.approx(0.9, abs=1e-5)
    assert _one(-1.0, 5.0, clip_c=2.0)[0] == pytest.approx(2.0, abs=1e-5)
    assert _one(-1.0, 2.5, clip_c=3.0)[0] == pytest.approx(2.5, abs=1e-5)          # below the dual bound


def test_stats():
    # rows: clipped high, clipped low, dual clipped, untouched
    r = torch.tensor([1.5, 0.5, 5.0, 1.1])
    A = torch.tensor([2.0, -1.0, -1.0, 2.0])
    _, stats = policy_loss(r.log()[:, None], torch.zeros(4, 1), A, torch.ones(4, 1))
    # fractions of 4 tokens are exact; ratio_mean / approx_kl: float32 exp/log of O(1) values, ~1e-6 -> abs 1e-5
    assert stats["clip_frac_high"] == pytest.approx(0.25)
    assert stats["clip_frac_low"] == pytest.approx(0.25)
    assert stats["dual_clip_frac"] == pytest.approx(0.25)
    assert stats["ratio_mean"] == pytest.approx((1.5 + 0.5 + 5.0 + 1.1) / 4, abs=1e-5)
    assert stats["approx_kl"] == pytest.approx(-math.log(1.5 * 0.5 * 5.0 * 1.1) / 4, abs=1e-5)
    assert all(isinstance(v, float) for v in stats.values())


# ---------------------------------------------------------------- aggregation, on-policy value and gradient

# N=2 rollouts, k=3, second one has 1 valid token; on-policy so ratio == 1 and the token loss is -A
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])
ADV = torch.tensor([1.0, -2.0])                                      # token losses [[-1, -1, -1], [2, ., .]]


@pytest.mark.parametrize("agg, value, grad", [
    ("token-mean", (-3 + 2) / 4, [[-1 / 4] * 3, [2 / 4, 0, 0]]),                   # / 4 valid tokens
    ("seq-mean-token-mean", (-1 + 2) / 2, [[-1 / 6] * 3, [2 / 2, 0, 0]]),          # mean of per-row means
    ("seq-mean-token-sum", (-3 + 2) / 2, [[-1 / 2] * 3, [2 / 2, 0, 0]]),           # mean of per-row sums
    ("seq-mean-token-sum-norm", (-3 + 2) / 6, [[-1 / 6] * 3, [2 / 6, 0, 0]]),      # / (N * k)
])
def test_aggregation_on_policy(agg, value, grad):
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, -1.0]], requires_grad=True)
    loss, stats = policy_loss(logp, logp.detach().clone(), ADV, MASK, agg=agg)
    # sums of a few O(1) float32 values: <= ~5e-7 of rounding; abs 1e-6
    assert loss.item() == pytest.approx(value, abs=1e-6)
    loss.backward()
    # on-policy: d loss / d logp = -A / divisor (valid tokens), 0 elsewhere
    torch.testing.assert_close(logp.grad, torch.tensor(grad), atol=1e-6, rtol=0)
    assert stats["ratio_mean"] == 1.0 and stats["approx_kl"] == 0.0


def test_default_normaliser_and_errors():
    assert default_normaliser(MASK, "token-mean") == 4
    assert default_normaliser(torch.tensor([[1, 1], [0, 0]]), "seq-mean-token-mean") == 1   # empty rows skipped
    assert default_normaliser(MASK, "seq-mean-token-sum-norm") == 6
    with pytest.raises(ValueError, match="agg"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), ADV, MASK, agg="mean")
    with pytest.raises(ValueError, match="n_total"):
        aggregate(torch.zeros(2, 3), MASK, n_total=0)
    with pytest.raises(ValueError, match="clip_c"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), ADV, MASK, clip_c=1.0)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), MASK)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), ADV, MASK, kl_coef=0.1)
    # nothing valid: zero loss that still backpropagates
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, stats = policy_loss(logp, torch.zeros(2, 3), ADV, torch.zeros(2, 3))
    loss.backward()
    assert loss.item() == 0.0 and (logp.grad == 0).all() and stats["clip_frac_high"] == 0.0


# ---------------------------------------------------------------- micro-batch invariance

def _random_batch(seed, N=6, k=4):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(N, k, generator=g) * 3
    old = logp + (torch.rand(N, k, generator=g) - 0.5) * 1.5          # ratios in [0.47, 2.1]: every branch
    ref = logp + (torch.rand(N, k, generator=g) - 0.5)
    mask = torch.rand(N, k, generator=g) < 0.7
    mask[:, 0] = True                                                # unequal lengths, no empty row
    mask[0] = True
    adv = torch.randn(N, generator=g)
    return logp, old, ref, mask, adv


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("kl_coef", [0.0, 0.3])
def test_micro_batches_sum_to_whole(agg, kl_coef):
    logp, old, ref, mask, adv = _random_batch(0)
    whole_lp = logp.clone().requires_grad_()
    whole, _ = policy_loss(whole_lp, old, adv, mask, agg=agg, ref_logp=ref, kl_coef=kl_coef)
    whole.backward()
    n_total = default_normaliser(mask, agg)
    part_lp = logp.clone().requires_grad_()
    total = 0.0
    for rows in (slice(0, 2), slice(2, 6)):                          # uneven split
        loss, _ = policy_loss(part_lp[rows], old[rows], adv[rows], mask[rows], agg=agg,
                              ref_logp=ref[rows], kl_coef=kl_coef, n_total=n_total)
        total = total + loss
    total.backward()
    # the same terms summed in 2 parts instead of 1: float32 summation order only (~1e-7 on O(1) values)
    torch.testing.assert_close(total, whole, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(part_lp.grad, whole_lp.grad, atol=1e-6, rtol=1e-6)


def test_micro_batches_without_normaliser_differ():
    # the bug the normaliser prevents: each micro-batch dividing by its own token count
    logp, old, _, mask, adv = _random_batch(0)
    whole, _ = policy_loss(logp, old, adv, mask)
    halves = sum(policy_loss(logp[r], old[r], adv[r], mask[r])[0] for r in (slice(0, 2), slice(2, 6)))
    assert abs(halves.item() - whole.item()) > 1e-3


# ---------------------------------------------------------------- masking extreme values

def test_no_nan_gradient_with_extreme_masked_log_ratios():
    inf = float("inf")
    nan = float("nan")
    logp = torch.tensor([[-0.5, -inf, 1e4, nan], [-1.0, -0.2, -inf, 0.0]], requires_grad=True)
    old = torch.tensor([[-0.4, 0.0, -inf, 0.0], [-inf, -0.3, -1e4, nan]])
    ref = torch.tensor([[-0.6, inf, -inf, nan], [0.0, -0.1, 1e4, 0.0]])
    mask = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0]])
    for agg in AGGS:
        logp.grad = None
        loss, stats = policy_loss(logp, old, torch.tensor([1.0, -1.0]), mask, agg=agg, ref_logp=ref, kl_coef=0.1)
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.isfinite(logp.grad).all()
        assert logp.grad[mask == 0].abs().sum().item() == 0.0
        assert logp.grad[mask == 1].abs().min().item() > 0
        assert all(math.isfinite(v) for v in stats.values())


@pytest.mark.parametrize("agg", AGGS)
def test_aggregate_ignores_nonfinite_masked_slots(agg):
    loss = torch.tensor([[1.0, float("inf")], [2.0, float("nan")]], requires_grad=True)
    mask = torch.tensor([[1, 0], [1, 0]])
    out = aggregate(loss, mask, agg)
    out.backward()
    expected = {"token-mean": 1.5, "seq-mean-token-mean": 1.5, "seq-mean-token-sum": 1.5,
                "seq-mean-token-sum-norm": 3.0 / 4}[agg]
    # a few float32 operations on O(1) values: approx's 1e-6 relative covers them
    assert out.item() == pytest.approx(expected)
    assert torch.isfinite(loss.grad).all() and (loss.grad[:, 1] == 0).all()


def test_huge_valid_log_ratio_is_clamped():
    # a stale valid token: logp - old = 100 -> clamped to 20, ratio e^20, finite; A < 0 so the dual clip holds
    logp = torch.tensor([[100.0]], requires_grad=True)
    loss, stats = policy_loss(logp, torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1))
    loss.backward()
    # exp of large log-ratios in float32: approx's 1e-6 relative is ~8 roundings
    assert loss.item() == pytest.approx(3.0) and logp.grad.item() == 0.0
    assert stats["approx_kl"] == pytest.approx(-20.0) and math.isfinite(stats["ratio_mean"])


# ---------------------------------------------------------------- k3 KL to a reference

def test_kl_branch():
    # on-policy, ref - logp = ln 2 everywhere: k3 = 2 - ln 2 - 1 = 0.306853; d k3 / d logp = 1 - e^x = -1
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]], requires_grad=True)
    ref = logp.detach() + math.log(2)
    adv = torch.tensor([1.0, -3.0])
    mask = torch.ones(2, 2)
    loss, stats = policy_loss(logp, logp.detach(), adv, mask, ref_logp=ref, kl_coef=0.5)
    k3 = 2 - math.log(2) - 1
    # float32 exp/log of O(1) values against float64 math: ~1e-7 each; abs 1e-6
    assert loss.item() == pytest.approx(-(1 - 3) / 2 + 0.5 * k3, abs=1e-6)      # -mean(A) + beta * k3
    assert stats["ref_kl"] == pytest.approx(k3, abs=1e-6)
    loss.backward()
    expected = (-adv[:, None] + 0.5 * -1.0) / 4                                 # (-A + beta * (1 - e^x)) / 4
    torch.testing.assert_close(logp.grad, expected.expand(2, 2), atol=1e-6, rtol=0)
    # kl_coef = 0: the reference is ignored
    loss0, stats0 = policy_loss(logp, logp.detach(), adv, mask, ref_logp=ref, kl_coef=0.0)
    assert loss0.item() == pytest.approx(1.0, abs=1e-6) and "ref_kl" not in stats0
