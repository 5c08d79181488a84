"""Intervals of the report on known inputs: Wilson 95 % for success rates, Student-t 95 % for seed means."""

from __future__ import annotations

import math

import pytest

from harness.report.stats import mean_t_interval, wilson_interval


@pytest.mark.parametrize(("k", "n", "low", "high"), [
    (8, 10, 0.4902, 0.9433),     # the textbook example
    (0, 10, 0.0, 0.2775),        # stays inside [0, 1] at the edges
    (10, 10, 0.7225, 1.0),
    (50, 100, 0.4038, 0.5962),
    (1, 1, 0.2065, 1.0),
])
def test_wilson_interval_on_known_inputs(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=1e-4)
    assert hi == pytest.approx(high, abs=1e-4)


@pytest.mark.parametrize(("k", "n"), [(-1, 10), (11, 10), (0, 0), (1.5, 3)])
def test_wilson_interval_refuses_impossible_counts(k, n):
    with pytest.raises(ValueError):
        wilson_interval(k, n)


def test_t_interval_on_known_inputs():
    ci = mean_t_interval([1.0, 2.0, 3.0])  # sd 1, t(0.975, 2) = 4.302653
    assert ci.n == 3 and ci.mean == pytest.approx(2.0)
    assert ci.low == pytest.approx(2.0 - 4.302653 / math.sqrt(3), abs=1e-5)
    assert ci.high == pytest.approx(2.0 + 4.302653 / math.sqrt(3), abs=1e-5)
    two = mean_t_interval([10.0, 12.0])  # sd sqrt(2), t(0.975, 1) = 12.7062
    assert (two.low, two.high) == pytest.approx((11.0 - 12.7062, 11.0 + 12.7062), abs=1e-3)


def test_t_interval_with_one_or_no_value_has_no_band():
    one = mean_t_interval([5.0, None, float("nan")])
    assert (one.mean, one.low, one.high, one.n) == (5.0, None, None, 1)
    assert mean_t_interval([]).n == 0 and mean_t_interval([]).mean is None
