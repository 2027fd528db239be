"""Seed statistics for the report: mean, standard deviation, a t-based 95% interval, Welch's t-test.

Student's t distribution comes from the regularized incomplete beta function (continued fraction, as in
Numerical Recipes, 6.4), so the project needs no SciPy; tests check it against SciPy's values.
"""

from __future__ import annotations

import math
from statistics import mean, stdev, variance
from typing import NamedTuple


class Summary(NamedTuple):
    """n values: their mean, sample standard deviation and two-sided interval of the mean (None: n < 2)."""

    n: int
    mean: float
    sd: float | None
    low: float | None
    high: float | None


class Welch(NamedTuple):
    """Welch's unequal-variance t-test of two samples' means: t, Welch-Satterthwaite df, two-sided p."""

    t: float
    df: float
    p: float


def summarize(values: list[float], level: float = 0.95) -> Summary:
    """Mean, sd (n - 1) and the `level` interval mean +- t(1/2 + level/2, n - 1) * sd / sqrt(n)."""
    n, m = len(values), mean(values)
    if n < 2:
        return Summary(n, m, None, None, None)
    sd = stdev(values)
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return Summary(n, m, sd, m - half, m + half)


def welch(a: list[float], b: list[float]) -> Welch:
    """Welch's t-test of mean(a) - mean(b) (each sample needs two values or more)."""
    va, vb = variance(a) / len(a), variance(b) / len(b)
    se2 = va + vb
    diff = mean(a) - mean(b)
    if se2 == 0:  # no spread at all: any difference is certain, none is none
        return Welch(math.copysign(math.inf, diff) if diff else 0.0, math.nan, 0.0 if diff else 1.0)
    df = se2**2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    t = diff / math.sqrt(se2)
    return Welch(t, df, min(1.0, 2 * t_sf(abs(t), df)))


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * betainc(df / 2, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1 - tail


def t_quantile(q: float, df: float) -> float:
    """The t with P(T <= t) = q, by bisection on `t_sf`."""
    if not 0 < q < 1:
        raise ValueError(f"q must lie in (0, 1), not {q}")
    if q < 0.5:
        return -t_quantile(1 - q, df)
    low, high = 0.0, 1.0
    while 1 - t_sf(high, df) < q:
        low, high = high, 2 * high
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if 1 - t_sf(mid, df) < q else (low, mid)
    return (low + high) / 2


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1) / (a + b + 2):
        return front * _beta_fraction(a, b, x) / a
    return 1 - front * _beta_fraction(b, a, 1 - x) / b


def _beta_fraction(a: float, b: float, x: float, eps: float = 1e-15, tiny: float = 1e-300) -> float:
    """The continued fraction of I_x(a, b) by the modified Lentz method."""

    def nonzero(v: float) -> float:
        return v if abs(v) > tiny else tiny

    c, d = 1.0, 1 / nonzero(1 - (a + b) * x / (a + 1))
    h = d
    for m in range(1, 1000):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1 / nonzero(1 + num * d)
            c = nonzero(1 + num / c)
            h *= d * c
        if abs(d * c - 1) < eps:
            break
    return h
