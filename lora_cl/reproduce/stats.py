"""Seed statistics: mean with a t-distribution confidence interval, and paired comparisons.

For n values x_1..x_n: mean x̄, sample standard deviation s (ddof 1), and the interval
x̄ ± t_{n-1, (1+level)/2} * s / sqrt(n). A paired comparison of methods a and b over the same
seeds is the same interval on the per-seed differences d_k = a_k - b_k, with the two-sided
p-value of the paired t-test (t = d̄ / (s_d / sqrt(n))). No scipy: the Student-t CDF is
integrated numerically (Simpson's rule), the quantile found by bisection.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


def t_pdf(x: float, df: float) -> float:
    """Student-t density with ``df`` degrees of freedom."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))


def t_cdf(x: float, df: float) -> float:
    """P(T <= x) for T ~ Student-t(df), by Simpson's rule on [0, |x|] (symmetric density)."""
    if df <= 0:
        raise ValueError(f"df must be positive, got {df}")
    a = abs(x)
    if a == 0:
        return 0.5
    # substitute x = tan(theta) so heavy tails (df = 1, 2) integrate on a bounded interval
    top = math.atan(a)
    n = 2000
    h = top / n

    def f(theta: float) -> float:
        return t_pdf(math.tan(theta), df) / math.cos(theta) ** 2

    total = f(0.0) + f(top) + sum((4 if k % 2 else 2) * f(k * h) for k in range(1, n))
    half = min(total * h / 3, 0.5)
    return 0.5 + half if x > 0 else 0.5 - half


def t_ppf(q: float, df: float) -> float:
    """The quantile x with t_cdf(x, df) = q (bisection; |error| < 1e-9)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be in (0, 1), got {q}")
    if q == 0.5:
        return 0.0
    if q < 0.5:
        return -t_ppf(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        hi *= 2.0
    while hi - lo > 1e-9:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class MeanCI:
    """Mean of n values with its t interval (``lo``/``hi`` None when n < 2)."""

    n: int
    mean: float | None
    std: float | None
    lo: float | None
    hi: float | None
    level: float = 0.95

    @property
    def half_width(self) -> float | None:
        return None if self.lo is None or self.hi is None or self.mean is None else self.hi - self.mean

    def excludes_zero(self) -> bool:
        """Whether the interval lies strictly on one side of 0 (False without an interval)."""
        return self.lo is not None and self.hi is not None and (self.lo > 0 or self.hi < 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mean_ci(values: Sequence[float], level: float = 0.95) -> MeanCI:
    """Mean and two-sided ``level`` t-interval of ``values`` (None entries are not allowed)."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return MeanCI(0, None, None, None, None, level)
    mean = sum(xs) / n
    if n == 1:
        return MeanCI(1, mean, None, None, None, level)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_ppf((1 + level) / 2, n - 1) * std / math.sqrt(n)
    return MeanCI(n, mean, std, mean - half, mean + half, level)


@dataclass(frozen=True)
class Paired:
    """Per-seed differences a - b, their mean CI and the paired t-test p-value."""

    seeds: list[Any]  # the pairing keys: seeds, or (method, seed) when streams are compared
    diffs: list[float]
    ci: MeanCI
    p_value: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"seeds": self.seeds, "diffs": self.diffs, "ci": self.ci.to_dict(),
                "p_value": self.p_value}


def paired(a: dict[Any, float], b: dict[Any, float], level: float = 0.95) -> Paired:
    """Compare two methods on the seeds both finished: d_k = a_k - b_k (any sortable pairing key
    works the same way, e.g. (method, seed) to compare two streams cell by cell)."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    ci = mean_ci(diffs, level)
    p = None
    if ci.n >= 2 and ci.std is not None:
        if ci.std == 0:
            p = 0.0 if ci.mean else 1.0
        else:
            t = ci.mean / (ci.std / math.sqrt(ci.n))
            p = 2 * (1 - t_cdf(abs(t), ci.n - 1))
    return Paired(seeds, diffs, ci, p)


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values (None entries stay None and do not count as tests).

    Sorted ascending, the k-th smallest of m p-values becomes max over j <= k of
    min(1, (m - j + 1) p_(j)); a claim holds at level a when its adjusted p is below a. This
    controls the family-wise error rate over the m claims without assuming them independent.
    """
    order = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    m = len(order)
    out: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out
