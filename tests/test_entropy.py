"""Tests for entropy.py: token entropy, smoothing, chunked position selection. Hand-computed numbers."""

import math

import pytest
import torch

from entropy import select_positions, smooth_entropy, token_entropy


# ---------------------------------------------------------------- token_entropy

def test_entropy_uniform_onehot_known():
    # uniform over V=4 -> ln 4; one-hot -> 0; p = [1/2, 1/4, 1/4] -> 1.5 ln 2
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0],
                           [5.0, -float("inf"), -float("inf"), -float("inf")],
                           [math.log(0.5), math.log(0.25), math.log(0.25), -float("inf")]])
    H = token_entropy(logits)
    assert H.shape == (3,)
    # float32 log-softmax and sums of 4 O(1) terms against float64 math: ~1e-7 each; atol 1e-6
    torch.testing.assert_close(H, torch.tensor([math.log(4), 0.0, 1.5 * math.log(2)]), atol=1e-6, rtol=0)
    assert H[1].item() == 0.0                                       # exactly 0, not NaN


def test_entropy_shift_invariant_and_batched_shape():
    logits = torch.randn(2, 3, 7)
    H = token_entropy(logits)
    assert H.shape == (2, 3)
    # logits near 100 in float32 carry 100 x 2^-24 = 6e-6 of rounding each; atol 1e-5
    torch.testing.assert_close(token_entropy(logits + 100.0), H, atol=1e-5, rtol=0)
    assert (H >= 0).all() and (H <= math.log(7) + 1e-6).all()


def test_entropy_fp32_from_bf16_and_finite_grad_with_neg_inf():
    logits = torch.tensor([[1.0, 2.0, -float("inf")]], dtype=torch.bfloat16)
    assert token_entropy(logits).dtype == torch.float32
    x = torch.tensor([[1.0, 2.0, -float("inf")]], requires_grad=True)
    token_entropy(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad[0, 2].item() == 0.0


# ---------------------------------------------------------------- smooth_entropy

def test_smooth_odd_kernel_zero_padding_counted():
    x = torch.tensor([[3.0, 6.0, 9.0, 12.0]])
    # kernel 3, pad 1: [(0+3+6)/3, (3+6+9)/3, (6+9+12)/3, (9+12+0)/3]
    expected = torch.tensor([[3.0, 6.0, 9.0, 7.0]])
    # means of 3 small integers in float32: one rounding of ~5e-7 on values <= 9; atol 1e-6
    torch.testing.assert_close(smooth_entropy(x, 3), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(smooth_entropy(x, 2), expected, atol=1e-6, rtol=0)   # even k=2 -> kernel 3


def test_smooth_even_k4_uses_kernel5():
    x = torch.tensor([[5.0, 10.0, 15.0, 20.0, 25.0, 30.0]])
    # kernel 5, pad 2: edges divide by 5 although only 3 / 4 real values are in the window
    expected = torch.tensor([[30 / 5, 50 / 5, 75 / 5, 100 / 5, 90 / 5, 75 / 5]])
    out = smooth_entropy(x, 4)
    assert out.shape == x.shape
    # float32 means of values up to 30: rounding ~2e-6; atol 1e-5
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_smooth_k1_identity_and_bad_k():
    x = torch.randn(2, 9)
    # kernel 1: the identity up to one division by 1 (exact): assert_close's defaults
    torch.testing.assert_close(smooth_entropy(x, 1), x)
    with pytest.raises(ValueError):
        smooth_entropy(x, 0)
    with pytest.raises(ValueError):
        smooth_entropy(x[0], 3)


# ---------------------------------------------------------------- select_positions: chunks and clamps

@pytest.mark.parametrize("mode", ["entropy", "uniform"])
def test_chunk_boundaries_and_remainder_never_sampled(mode):
    # T=23, 4 chunks of 5: [0,5) [5,10) [10,15) [15,20); 20..22 is the remainder (huge entropy there)
    # margin=0, k=1: allowed starts [1, 22], so the clamp never moves i and t == i
    H = torch.rand(3, 23)
    H[:, 20:] = 50.0
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        t = select_positions(H, 4, k=1, mode=mode, margin=0, generator=g)
        assert t.shape == (3, 4) and t.dtype == torch.long
        for c in range(4):
            assert ((t[:, c] >= 5 * c) & (t[:, c] < 5 * c + 5)).all()


def test_entropy_peak_is_selected():
    # one dominant entropy per chunk (k=1: no smoothing): p ~ 1 there
    H = torch.zeros(1, 31)
    for i in (2, 13, 21):
        H[0, i] = 100.0
    t = select_positions(H, 3, k=1, margin=0, generator=torch.Generator().manual_seed(1))
    assert t.tolist() == [[2, 13, 21]]


def test_argmax_argmin_first_index_on_ties_unsmoothed():
    H = torch.tensor([[1.0, 3.0, 3.0, 0.0, 2.0, 0.0, 9.0]])       # 2 chunks of 3, index 6 is the remainder
    assert select_positions(H, 2, k=1, mode="argmax", margin=0).tolist() == [[1, 4]]
    assert select_positions(H, 2, k=1, mode="argmin", margin=0).tolist() == [[0, 3]]
    # argmax is of the UNsmoothed entropy: smoothed with kernel 3, [0, 5, 0, 4, 4, 0, 0] becomes
    # [1.67, 1.67, 3.0, 2.67, 2.67, 1.33, 0] whose argmax is 2; the unsmoothed argmax is 1
    H2 = torch.tensor([[0.0, 5.0, 0.0, 4.0, 4.0, 0.0, 0.0]])
    assert select_positions(H2, 1, k=3, mode="argmax", margin=0).tolist() == [[1]]


def test_margin_clamp():
    # L=100, margin=20, k=5: starts in [20, 80] -> t in [19, 79]
    H = torch.zeros(1, 100)
    H[0, 0] = 1.0
    H[0, 95] = 1.0
    t = select_positions(H, 2, k=5, mode="argmax", margin=20)
    assert t.tolist() == [[19, 79]]                                  # start 1 -> 20, start 96 -> 80


def test_rollout_fits_when_k_exceeds_margin():
    # margin=2, k=10, L=50: starts in [2, 40] -> t <= 39 and t + 1 + k <= L
    H = torch.zeros(1, 50)
    H[0, 49] = 1.0
    t = select_positions(H, 1, k=10, mode="argmax", margin=2)
    assert t.item() == 39 and t.item() + 1 + 10 == 50


def test_short_sequence_drops_margin():
    # L=30 < 2 * margin: the preferred range [20, 10] is empty -> hard range [1, L - k] = [1, 25]
    H = torch.zeros(1, 30)
    H[0, 0] = 1.0
    H[0, 29] = 1.0
    t = select_positions(H, 2, k=5, mode="argmax", margin=20)
    assert t.tolist() == [[0, 24]]                                    # 24 + 1 + 5 == 30


def test_lengths_respected_with_padding():
    # row 1 has 40 real tokens out of 64; its padding carries a huge entropy that must never be chosen
    H = torch.rand(2, 64)
    H[1, 40:] = 1e3
    g = torch.Generator().manual_seed(2)
    for mode in ("entropy", "uniform", "argmax", "argmin"):
        t = select_positions(H, 4, k=5, mode=mode, margin=3, lengths=torch.tensor([64, 40]), generator=g)
        # starts clamped into [margin, L - max(margin, k)] = [3, 59] and [3, 35] -> t in [2, 58] and [2, 34]
        assert (t[0] >= 2).all() and (t[0] <= 58).all()
        assert (t[1] >= 2).all() and (t[1] <= 34).all()
        assert (t[1] + 1 + 5 <= 40).all()


def test_errors():
    H = torch.rand(1, 10)
    with pytest.raises(ValueError, match="too short"):
        select_positions(H, 1, k=10, margin=0)                       # L=10 < k + 1
    with pytest.raises(ValueError, match="n_chunks"):
        select_positions(H, 11, k=1, margin=0)                       # more chunks than tokens
    with pytest.raises(ValueError, match="n_chunks"):
        select_positions(H, 0, k=1)
    with pytest.raises(ValueError, match="mode"):
        select_positions(H, 1, k=1, mode="max")
    with pytest.raises(ValueError, match="temperature"):
        select_positions(H, 1, k=1, temperature=0.0)
    with pytest.raises(ValueError, match="length"):
        select_positions(H, 1, k=1, lengths=[11])


def test_generator_reproducible():
    H = torch.rand(2, 200)
    a = select_positions(H, 8, k=5, generator=torch.Generator().manual_seed(7))
    b = select_positions(H, 8, k=5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


# ---------------------------------------------------------------- select_positions: the sampling distribution
# 20000 chunks of 4 with the same pattern give 20000 independent draws in one call. The standard error of a
# frequency is <= sqrt(0.25 / 20000) = 0.0035; the tolerance 0.015 is > 4 standard errors.
N_DRAWS, TOL = 20000, 0.015


def _within_chunk_freqs(pattern, k, temperature=1.0, mode="entropy", tail=3):
    H = torch.cat([torch.tensor(pattern).repeat(N_DRAWS), torch.zeros(tail)])[None]   # [1, 4 * N + tail]
    t = select_positions(H, N_DRAWS, k=k, mode=mode, temperature=temperature, margin=0,
                         generator=torch.Generator().manual_seed(123))
    j = t[0] - torch.arange(N_DRAWS) * 4                              # index inside each chunk (no clamp here)
    assert ((j >= 0) & (j < 4)).all()
    return torch.bincount(j, minlength=4).float() / N_DRAWS


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampling_matches_softmax(temperature):
    pattern = [0.0, 0.5, 1.0, 1.5]
    p = torch.softmax(torch.tensor(pattern) / temperature, dim=0)
    # k=1 -> kernel 1 (no smoothing); tau=1: p = [0.1015, 0.1674, 0.2760, 0.4551]
    torch.testing.assert_close(_within_chunk_freqs(pattern, k=1, temperature=temperature), p, atol=TOL, rtol=0)


def test_sampling_uses_smoothed_entropy():
    # pattern [0, 3, 0, 0] repeated, kernel 3: smoothed [1, 1, 1, 0] -> p = [e, e, e, 1] / (3e + 1)
    e = math.e
    p = torch.tensor([e, e, e, 1.0]) / (3 * e + 1)                    # [0.2728, 0.2728, 0.2728, 0.1003]
    torch.testing.assert_close(_within_chunk_freqs([0.0, 3.0, 0.0, 0.0], k=2), p, atol=TOL, rtol=0)


def test_uniform_ignores_entropy():
    freqs = _within_chunk_freqs([0.0, 9.0, 0.0, 0.0], k=1, mode="uniform")
    torch.testing.assert_close(freqs, torch.full((4,), 0.25), atol=TOL, rtol=0)


# ---------------------------------------------------------------- select_positions: mode "answer"

def test_answer_mode_picks_only_allowed_positions_by_entropy():
    # allowed positions 30, 31, 60 of row 0; entropy 2.0 at 60 (smoothed with k=1: unchanged), 0 at 30, 31
    H = torch.zeros(2, 80)
    H[0, 60] = 2.0
    allowed = torch.zeros(2, 80, dtype=torch.bool)
    allowed[0, [30, 31, 60]] = True
    t = select_positions(H[:1], N_DRAWS, k=1, mode="answer", margin=0, generator=torch.Generator().manual_seed(0),
                         allowed=allowed[:1])
    freq = torch.bincount(t[0], minlength=80).float() / N_DRAWS
    p = torch.softmax(torch.tensor([0.0, 0.0, 2.0]), 0)               # [0.1065, 0.1065, 0.7870]
    torch.testing.assert_close(freq[[30, 31, 60]], p, atol=TOL, rtol=0)
    # frequencies of one draw count: sums of 3 float32 ratios, a few roundings; approx's 1e-6 relative
    assert freq[[30, 31, 60]].sum().item() == pytest.approx(1.0)       # nothing else is ever picked
    # row 1 has no allowed position: the chunked entropy draw, one position per chunk of its 40 real tokens
    t = select_positions(H, 4, k=1, mode="answer", margin=0, lengths=[80, 40], allowed=allowed,
                         generator=torch.Generator().manual_seed(0))
    assert set(t[0].tolist()) <= {30, 31, 60} and (t[1] // 10).tolist() == [0, 1, 2, 3]


def test_answer_mode_clamps_without_end_margin():
    H = torch.zeros(1, 50)
    allowed = torch.zeros(1, 50, dtype=torch.bool)
    allowed[0, 47] = True                                             # t=47: start 48, 48 + k=5 > 50
    t = select_positions(H, 3, k=5, mode="answer", margin=8, allowed=allowed)
    assert t.tolist() == [[44, 44, 44]]                               # start clamped to L - k = 45, not L - 8
    allowed[0, 40] = True
    allowed[0, 47] = False
    assert select_positions(H, 2, k=5, mode="answer", margin=8, allowed=allowed).tolist() == [[40, 40]]
    with pytest.raises(ValueError, match="allowed"):
        select_positions(H, 2, k=5, mode="answer")
