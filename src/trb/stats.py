"""Statistics over seeds: means with t-intervals, paired bootstrap differences, areas under learning curves."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t confidence interval of the mean over independent seeds. One value: no interval
    (low = high = mean)."""
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, mean, mean
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return mean, mean - half, mean + half


def paired_bootstrap(
    values: list[float], baseline: list[float], level: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float, float]:
    """(mean difference, low, high) of values - baseline, paired by seed: percentile bootstrap over seeds."""
    diff = np.asarray(values, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    low, high = np.quantile(means, [0.5 - level / 2, 0.5 + level / 2])
    return float(diff.mean()), float(low), float(high)


def area_under_curve(steps: list[int], values: list[float]) -> float:
    """Trapezoid area under a learning curve divided by its step span: the curve's average height."""
    if len(steps) < 2:
        return float(values[0]) if values else float("nan")
    return float(np.trapezoid(values, steps) / (steps[-1] - steps[0]))


def wilson_interval(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion."""
    if trials == 0:
        return float("nan"), float("nan")
    z = stats.norm.ppf(0.5 + level / 2)
    p = successes / trials
    center = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return float(max(0.0, min(center - half, p))), float(min(1.0, max(center + half, p)))
