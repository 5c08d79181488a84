"""Intervals for the report: Wilson 95 % for success rates, Student-t 95 % for means over seeds."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion, as fractions in [0, 1].

    ``successes`` of ``trials`` (integers, 0 <= successes <= trials, trials >= 1). 8 of 10 ->
    (0.490, 0.943). Unlike the normal approximation it stays inside [0, 1] and is sensible at 0 and n.
    """
    if isinstance(successes, bool) or isinstance(trials, bool) or int(successes) != successes \
            or int(trials) != trials:
        raise ValueError(f"successes and trials must be integers, got {successes!r}, {trials!r}")
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {successes} of {trials}")
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + confidence / 2))
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class MeanInterval:
    """``mean`` of ``n`` values and its Student-t ``low``/``high`` bounds (None when n < 2: no interval)."""

    mean: float | None
    low: float | None
    high: float | None
    n: int


def mean_t_interval(values: Iterable[float | None], confidence: float = 0.95) -> MeanInterval:
    """Mean and two-sided Student-t interval (n - 1 degrees of freedom) of the finite values given.

    None and NaN are dropped. One value: the mean, no interval. No value: everything None, n = 0.
    [1, 2, 3] -> mean 2, (2 - 4.303 * 1/sqrt(3), 2 + 4.303 * 1/sqrt(3)) = (-0.484, 4.484).
    """
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return MeanInterval(None, None, None, 0)
    mean = sum(xs) / n
    if n == 1:
        return MeanInterval(mean, None, None, 1)
    from scipy.stats import t

    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return MeanInterval(mean, mean - half, mean + half, n)
