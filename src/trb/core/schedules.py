"""Schedules as plain functions of the optimizer step (k = 0, 1, ...). Scalars in, scalars out."""

from __future__ import annotations

import math


def linear_anneal(step: int, start: float, horizon: int) -> float:
    """The paper's TRB budget: start * (1 - k / K) for k < K, then 0 (pure student rollouts)."""
    if horizon <= 0:
        raise ValueError(f"horizon must be positive, got {horizon}")
    return start * (1.0 - step / horizon) if step < horizon else 0.0


def cosine_anneal(step: int, start: float, horizon: int) -> float:
    """start * (1 + cos(pi k / K)) / 2 for k < K, then 0."""
    if horizon <= 0:
        raise ValueError(f"horizon must be positive, got {horizon}")
    return start * 0.5 * (1.0 + math.cos(math.pi * step / horizon)) if step < horizon else 0.0


def constant(step: int, value: float) -> float:
    """value at every step (fixed-eps blending)."""
    return value


def linear_ramp(step: int, start: float, end: float, horizon: int) -> float:
    """Linear from start at k = 0 to end at k = K, then end (temperature warmup, Veto's b, lr warmup)."""
    if horizon <= 0:
        return end
    frac = min(step / horizon, 1.0)
    return start + (end - start) * frac
