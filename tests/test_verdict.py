"""study/verdict.py: the t quantile against published table values, and the one verdict rule (the 95% interval of
the mean paired difference) where the study's two earlier rules disagreed."""
import math

import pytest

from study import verdict


# two-sided 95% critical values of Student's t (any statistics table, 4 decimals)
TABLE = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 9: 2.2622, 10: 2.2281, 29: 2.0452, 30: 2.0423,
         100: 1.9840}


@pytest.mark.parametrize("df", sorted(TABLE))
def test_t_quantile_matches_the_table(df):
    assert verdict.t_quantile(df) == pytest.approx(TABLE[df], abs=6e-5)   # the table rounds to 4 decimals


def test_t_central_closed_forms():
    # df 1 is the Cauchy: P(|T| < 1) = 1/2; df 2: t / sqrt(2 + t^2); large df tends to the normal's 1.95996
    assert verdict.t_central(1.0, 1) == pytest.approx(0.5, abs=1e-15)
    assert verdict.t_central(3.0, 2) == pytest.approx(3 / math.sqrt(11), abs=1e-15)
    assert verdict.t_quantile(2000) == pytest.approx(1.9612, abs=1e-4)
    assert verdict.t_quantile(1, level=0.5) == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError, match="positive integer"):
        verdict.t_quantile(0)


def test_interval_and_words():
    v = verdict.paired([1.0, 2.0, 3.0])          # mean 2, sd 1, SE 1/sqrt(3), t(2) = 4.3027
    half = 4.302652729749752 / math.sqrt(3)
    # a few float64 roundings of small numbers: 1e-12 absolute
    assert (v["mean"], v["sd"], v["n"]) == (pytest.approx(2.0, abs=1e-12), pytest.approx(1.0, abs=1e-12), 3)
    assert (v["low"], v["high"]) == (pytest.approx(2 - half, abs=1e-9), pytest.approx(2 + half, abs=1e-9))
    assert v["word"] == "not distinguishable from"                     # 2 - 2.48 < 0
    assert verdict.paired([1.0, 1.1, 0.9])["word"] == "better than"
    assert verdict.paired([-1.0, -1.1, -0.9])["word"] == "worse than"
    assert verdict.paired([0.0, 0.0])["word"] == "not distinguishable from"   # a zero-width interval at 0
    one = verdict.paired([5.0])                                                # one seed: no interval at all
    assert one["word"] == "not distinguishable from" and one["low"] == -math.inf
    assert verdict.interval(verdict.paired([1.0, 1.0])) == "+1.0 [+1.0, +1.0]"
    with pytest.raises(ValueError, match="at least one"):
        verdict.paired([])


def test_the_rule_where_the_two_old_standard_errors_disagreed():
    """Per-seed REFINE - SFT of +1.0, +1.2, +0.8 points with a prompt sampling error of 1 point per seed: the old
    main rule (2 x max(seed SE, prompt SE)) said "not distinguishable", the old rule of the other sections (2 x seed
    SE) said "better". The one rule answers from the seeds' t interval alone: [+0.50, +1.50], better."""
    diffs, prompt_se = [1.0, 1.2, 0.8], 1.0
    seed_se = verdict.mean_sd(diffs)[1] / math.sqrt(3)
    old_main = 1.0 > 2 * max(seed_se, prompt_se)
    old_other = 1.0 > 2 * seed_se
    assert old_main != old_other                                     # the two old rules disagree here
    v = verdict.paired(diffs)
    assert v["word"] == "better than" and v["low"] == pytest.approx(1.0 - 4.3027 * 0.2 / math.sqrt(3), abs=1e-4)


def test_two_standard_errors_of_three_seeds_is_not_a_95_percent_interval():
    # +1.1 with SE 0.49: above 2 SE (an ~82% interval with 2 degrees of freedom) but inside t(2) x SE = 2.11
    diffs = [1.0, 2.0, 0.3]
    m, sd = verdict.mean_sd(diffs)
    assert m > 2 * sd / math.sqrt(3)
    assert verdict.paired(diffs)["word"] == "not distinguishable from"
