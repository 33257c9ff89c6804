"""Methods as small configurations of behavior policy + schedule + target (METHOD.md section 3).

Every method trains with the same per-prefix loss; what differs is where the prefixes come from (the behavior
policy at each optimizer step) and, for Veto, the target the student is pulled towards. Each method is a frozen
dataclass holding exactly its own parameters; the training loop asks it, at every step, for:

- `behavior(step)`: the behavior policy of this step's rollouts,
- `target(step)`: a target transform of the teacher's distribution (None: the teacher itself),
- `schedule_metrics(step)`: the scheduled values worth logging (eps, temperature, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from trb.core import constant, cosine_anneal, linear_anneal
from trb.rollout import BehaviorPolicy, StudentPolicy, TRBPolicy

SCHEDULES = {"linear": linear_anneal, "cosine": cosine_anneal}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class Method:
    """Vanilla on-policy behavior; subclasses override what they change."""

    name: ClassVar[str] = "base"

    def behavior(self, step: int) -> BehaviorPolicy:
        return StudentPolicy()

    def target(self, step: int):
        return None

    def schedule_metrics(self, step: int) -> dict[str, float]:
        return {}


@dataclass(frozen=True)
class VanillaOPD(Method):
    """Pure student rollouts at temperature 1 throughout."""

    name: ClassVar[str] = "opd"


@dataclass(frozen=True)
class TRB(Method):
    """Trust-Region behavior Blending: rollouts from mu_beta* with budget eps_k, annealed from eps0 to 0 over
    `horizon` optimizer steps (the paper: linear, eps0 in {0.001 .. 0.05}, horizon in {15, 25, 50}); afterwards
    pure student rollouts, and the teacher leaves the decoding loop."""

    name: ClassVar[str] = "trb"
    eps0: float = 0.02
    horizon: int = 50
    schedule: str = "linear"

    def __post_init__(self):
        _require(math.isfinite(self.eps0) and self.eps0 >= 0, f"eps0 must be a finite number >= 0, got {self.eps0}")
        _require(self.horizon > 0, f"horizon must be > 0, got {self.horizon}")
        _require(self.schedule in SCHEDULES, f"schedule must be one of {sorted(SCHEDULES)}, got {self.schedule!r}")

    def eps(self, step: int) -> float:
        return SCHEDULES[self.schedule](step, self.eps0, self.horizon)

    def behavior(self, step: int) -> BehaviorPolicy:
        eps = self.eps(step)
        return TRBPolicy(eps) if eps > 0 else StudentPolicy()

    def schedule_metrics(self, step: int) -> dict[str, float]:
        return {"eps": self.eps(step)}


@dataclass(frozen=True)
class FixedEps(Method):
    """Fixed-eps blending: the TRB solver with a constant budget for the whole run."""

    name: ClassVar[str] = "fixed_eps"
    eps: float = 0.01

    def __post_init__(self):
        _require(math.isfinite(self.eps) and self.eps > 0, f"eps must be a finite number > 0, got {self.eps}")

    def behavior(self, step: int) -> BehaviorPolicy:
        return TRBPolicy(constant(step, self.eps))

    def schedule_metrics(self, step: int) -> dict[str, float]:
        return {"eps": self.eps}


METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (VanillaOPD, TRB, FixedEps)}
