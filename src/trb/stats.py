"""Statistics over seeds and problems: means with t-intervals, paired differences with t-tests, Holm's correction,
areas under learning curves.

Conventions every table states: intervals are 95% Student-t intervals; an interval of a pass@1 is clipped to [0, 1];
with fewer than `MIN_INTERVAL` values there is no interval (a t-interval from two seeds spans the range of the two
values times 12.7), and tables show the values themselves instead. Differences are paired (same seed, or same problem)
and carry the two-sided p-value of a paired t-test; a table's p-values are Holm-adjusted across all its comparisons.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy import stats

MIN_INTERVAL = 3  # fewer values: no interval, the values are shown


class Estimate(NamedTuple):
    """A mean over seeds (or problems), its 95% interval (nan without one) and the values it was made from; for a
    paired difference also the paired t-test's p-value and, once `holm` has run over a table, the adjusted one."""

    mean: float
    low: float
    high: float
    values: tuple[float, ...]
    p: float = math.nan
    p_holm: float = math.nan

    @property
    def has_interval(self) -> bool:
        return not math.isnan(self.low)


def _half_width(x: np.ndarray, level: float) -> float:
    return float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


def mean_ci(values: list[float], level: float = 0.95,
            bounds: tuple[float, float] = (-math.inf, math.inf)) -> Estimate:
    """Mean and Student-t interval of independent values, the interval clipped to bounds (a pass@1: (0, 1)); no
    interval (nan) with fewer than MIN_INTERVAL values."""
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    if len(x) < MIN_INTERVAL:
        return Estimate(mean, math.nan, math.nan, tuple(map(float, x)))
    half = _half_width(x, level)
    return Estimate(mean, max(mean - half, bounds[0]), min(mean + half, bounds[1]), tuple(map(float, x)))


def paired_difference(values: list[float], baseline: list[float], level: float = 0.95) -> Estimate:
    """values - baseline paired element by element (same seed or same problem): mean difference, Student-t
    interval and the two-sided p-value of the paired t-test (no interval or p with fewer than MIN_INTERVAL pairs).
    Identical pairs give a zero-width interval and p = 1; a constant nonzero difference p = 0."""
    diff = np.asarray(values, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    mean = float(diff.mean())
    if len(diff) < MIN_INTERVAL:
        return Estimate(mean, math.nan, math.nan, tuple(map(float, diff)))
    if np.all(diff == diff[0]):
        p = 1.0 if mean == 0 else 0.0
        return Estimate(mean, mean, mean, tuple(map(float, diff)), p)
    half = _half_width(diff, level)
    p = float(stats.ttest_1samp(diff, 0.0).pvalue)
    return Estimate(mean, mean - half, mean + half, tuple(map(float, diff)), p)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (nan entries are not tested and stay nan):
    the i-th smallest of m becomes max over j <= i of min(1, (m - j + 1) p_(j))."""
    tested = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    out = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        out[i] = running
    return out


def area_under_curve(steps: list[int], values: list[float]) -> float:
    """Trapezoid area under a learning curve divided by its step span: the curve's average height."""
    if len(steps) < 2:
        return float(values[0]) if values else float("nan")
    return float(np.trapezoid(values, steps) / (steps[-1] - steps[0]))
