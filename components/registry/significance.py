"""Is a candidate really better than the champion? Exact McNemar on the photos where they disagree.

Both models are scored on the same photos, so the comparison is paired: a photo both get right or
both get wrong says nothing about which is better. Only the discordant photos count,

    b = photos only the candidate gets right,    c = photos only the champion gets right,

and if the two models were equally good each discordant photo would be a fair coin: b ~ Bin(b + c, 1/2).
The two-sided exact p-value is p = min(1, 2 · P(X <= min(b, c))), and p = 1 when b + c = 0. With a
few dozen test photos a gain of one or two photos is well within chance (b=1, c=0 gives p = 1), which
is exactly what the gate must not mistake for progress.

The interval for the difference in accuracy d = (b − c) / n is the Clopper–Pearson interval for
π = b / (b + c) at level 1 − alpha, mapped through d = (b + c)/n · (2π − 1). It excludes 0 exactly
when p < alpha (both come from the same binomial tails), so the two never tell different stories.

Pure Python (integer binomial sums, bisection on the CDF): no scipy needed for counts of this size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def mcnemar_p_value(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b and c discordant photos (exact integer arithmetic)."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got {b} and {c}")
    m = b + c
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**m)


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Bin(n, p), summed in log space so large n neither overflows nor underflows."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    log_n = math.lgamma(n + 1)
    terms = [
        math.exp(log_n - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q)
        for i in range(k + 1)
    ]
    return min(1.0, math.fsum(terms))


def _bisect(f, target: float, increasing: bool) -> float:
    """The p in [0, 1] where the monotone f(p) crosses target."""
    low, high = 0.0, 1.0
    for _ in range(60):  # 2**-60: far below any printed digit
        mid = (low + high) / 2
        if (f(mid) < target) == increasing:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def clopper_pearson(x: int, n: int, level: float) -> tuple[float, float]:
    """Exact (Clopper–Pearson) two-sided interval for a binomial proportion x / n."""
    if not 0 <= x <= n or n < 1:
        raise ValueError(f"need 0 <= x <= n and n >= 1, got x={x}, n={n}")
    tail = (1.0 - level) / 2
    # lower: P(X >= x | p) = tail (increasing in p); upper: P(X <= x | p) = tail (decreasing in p)
    low = 0.0 if x == 0 else _bisect(lambda p: 1.0 - binomial_cdf(x - 1, n, p), tail, increasing=True)
    high = 1.0 if x == n else _bisect(lambda p: binomial_cdf(x, n, p), tail, increasing=False)
    return low, high


@dataclass(frozen=True)
class PairedComparison:
    candidate_only: int  # b: photos only the candidate gets right
    champion_only: int  # c: photos only the champion gets right
    photos: int  # n: photos both were scored on
    p_value: float
    alpha: float
    ci_low: float  # of the difference in top-1 accuracy, at level 1 - alpha
    ci_high: float

    @property
    def difference(self) -> float:
        return (self.candidate_only - self.champion_only) / self.photos

    @property
    def significant(self) -> bool:
        return self.p_value < self.alpha


def paired_comparison(b: int, c: int, n: int, alpha: float = 0.05) -> PairedComparison:
    """McNemar p-value and the interval of the accuracy difference for b, c discordant of n photos."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n < 1 or b + c > n:
        raise ValueError(f"need b + c <= n and n >= 1, got b={b}, c={c}, n={n}")
    m = b + c
    if m == 0:
        low, high = 0.0, 0.0  # no photo tells them apart: the difference is 0 on these photos
    else:
        pi_low, pi_high = clopper_pearson(b, m, 1.0 - alpha)
        low, high = m / n * (2 * pi_low - 1), m / n * (2 * pi_high - 1)
    return PairedComparison(b, c, n, mcnemar_p_value(b, c), alpha, low, high)
