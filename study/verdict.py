"""The one verdict rule of the study, used for every comparison it reports (and by study/seeds.py):

    the paired differences a - b (one per seed, or one per prompt where one model is adapted per prompt), their mean
    and the 95% interval of that mean from Student's t with n - 1 degrees of freedom; "better than" / "worse than"
    only when the interval excludes 0, else "not distinguishable from".

The prompts are the same for every seed, so the interval covers the seeds' spread, not the draw of the prompt set.
Plain Python numbers in and out (no scipy: the t quantile comes from the exact closed form of Student's CDF)."""
import math

LEVEL = 0.95
RULE = ("each verdict is the mean of the paired differences (per seed, unless said otherwise) with its 95% interval "
        "from Student's t with n - 1 degrees of freedom: \"better than\" / \"worse than\" only when the interval "
        "excludes 0, else \"not distinguishable from\"")


def mean_sd(xs):
    """Mean and sample standard deviation (n - 1 in the denominator; 0 for one value)."""
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def t_central(t, df):
    """P(|T| < t) for Student's t with an integer df >= 1 (Abramowitz & Stegun 26.7.3-4: a finite series in
    cos^2 of theta = atan(t / sqrt(df)))."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 1:   # odd: (2 / pi) (theta + sin cos (1 + 2/3 cos^2 + (2 4)/(3 5) cos^4 + ...)), df - 1 terms / 2
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for j in range(1, (df - 1) // 2):
            term *= c2 * (2 * j) / (2 * j + 1)
            total += term
        return 2 / math.pi * (theta + s * math.cos(theta) * total)
    term, total = 1.0, 1.0   # even: sin (1 + 1/2 cos^2 + (1 3)/(2 4) cos^4 + ...), df / 2 terms
    for j in range(1, df // 2):
        term *= c2 * (2 * j - 1) / (2 * j)
        total += term
    return s * total


def t_quantile(df, level=LEVEL):
    """The two-sided critical value: t with P(|T| < t) = level, df degrees of freedom (bisection to 1e-12)."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df}")
    lo, hi = 0.0, 1.0
    while t_central(hi, int(df)) < level:
        hi *= 2
    while hi - lo > 1e-12 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_central(mid, int(df)) < level else (lo, mid)
    return (lo + hi) / 2


def paired(diffs, level=LEVEL):
    """The verdict on paired differences a - b -> dict(diffs, n, mean, sd, se, low, high, word): word says how a
    compares with b. One difference has no interval: (-inf, inf), "not distinguishable from"."""
    n = len(diffs)
    if n == 0:
        raise ValueError("a verdict needs at least one paired difference, got none")
    m, sd = mean_sd(diffs)
    se = sd / math.sqrt(n)
    half = t_quantile(n - 1, level) * se if n > 1 else math.inf
    low, high = m - half, m + half
    word = "better than" if low > 0 else "worse than" if high < 0 else "not distinguishable from"
    return dict(diffs=list(diffs), n=n, mean=m, sd=sd, se=se, low=low, high=high, word=word)


def interval(v, digits=1):
    """'+1.2 [+0.3, +2.1]': the mean and its 95% interval."""
    return f"{v['mean']:+.{digits}f} [{v['low']:+.{digits}f}, {v['high']:+.{digits}f}]"


def per_unit(v, digits=1):
    return ", ".join(f"{d:+.{digits}f}" for d in v["diffs"])
