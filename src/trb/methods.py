"""Methods as small configurations of behavior policy + schedule + target (METHOD.md section 3).

Every method trains with the same per-prefix loss; what differs is where the prefixes come from (the behavior
policy at each optimizer step) and, for Veto, the target the student is pulled towards. Each method is a frozen
dataclass holding exactly its own parameters; the training loop asks it, at every step, for:

- `behavior(step, state)`: the behavior policy of this step's rollouts,
- `target(step)`: a target transform of the teacher's distribution (None: the teacher itself),
- and a few hooks with neutral defaults (see `Method`).

A method is registered by name with `@register_method`, after which `method.name=<name>` selects it in a config.
This module imports no torch: configs are built and checked without it (a bad value is reported at once), so the
hooks import the policies and torch when they first run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, ClassVar

from trb.divergences import LossSpec
from trb.errors import require

if TYPE_CHECKING:
    import torch

    from trb.losses import Target
    from trb.rollout.policies import BehaviorPolicy
    from trb.sequences import Rollout

SCHEDULES = ("linear", "cosine")  # trb.core.linear_anneal, trb.core.cosine_anneal

METHODS: dict[str, type[Method]] = {}
"""Every registered method class by its `name` (`method.name` in a config): the built-ins and those added with
`register_method`."""


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make a Method subclass (a frozen dataclass with a unique `name`) selectable by name in a
    config (`method.name=<name>`); its fields become the config's `method.*` keys."""
    own = vars(cls).get("__dataclass_params__") if isinstance(cls, type) else None  # not one inherited from Method
    if not (own is not None and own.frozen and issubclass(cls, Method)):
        raise TypeError(f"register_method takes a frozen dataclass subclass of Method, got {cls!r}")
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} is already registered (by {METHODS[cls.name].__qualname__})")
    METHODS[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Method:
    """Vanilla on-policy behavior with the shared loss; subclasses override only what they change.

    The loop asks, at every optimizer step:
    - behavior(step, state): the behavior policy of this step's rollouts;
    - use_data(step, generator): whether this step trains on the dataset's own solutions instead (GKD's coin);
    - target(step): a transform of the teacher's distribution to pull towards (None: the teacher);
    - token_weights(rollout): per-token weights (B, T) of the loss before global normalization;
    - loss_spec(base): the divergence (GKD swaps in its generalized JSD);
    - schedule_metrics(step, state): scheduled values to log; observe(step, metrics, state): feedback for
      methods that adapt (state is a JSON-able dict the loop checkpoints).
    and, once, before the first step of a fresh run:
    - before_training(trainer, write, log): work on the student before OPD starts (SFT warmup) with the run's
      `trb.trainer.Trainer`; returns whether it changed the student, in which case the loop checkpoints it.
    """

    name: ClassVar[str] = "base"
    # whether token_weights reads the rollout's student_logp (an engine that does not record it, vLLM, leaves it to
    # the loop to fill from the student's forward before the loss)
    reads_student_logp: ClassVar[bool] = False

    def behavior(self, step: int, state: dict) -> BehaviorPolicy:
        from trb.rollout.policies import StudentPolicy

        return StudentPolicy()

    def use_data(self, step: int, generator: torch.Generator) -> bool:
        return False

    def target(self, step: int) -> Target | None:
        return None

    def token_weights(self, rollout: Rollout) -> torch.Tensor:
        return rollout.completion_mask.float()  # (B, T)

    def loss_spec(self, base: LossSpec) -> LossSpec:
        return base

    def schedule_metrics(self, step: int, state: dict) -> dict[str, float]:
        return {}

    def observe(self, step: int, metrics: dict, state: dict) -> None:
        return None

    def before_training(self, trainer, write: Callable[[int, dict], None], log: Callable[[str], None]) -> bool:
        return False


@register_method
@dataclass(frozen=True)
class VanillaOPD(Method):
    """Pure student rollouts at temperature 1 throughout."""

    name: ClassVar[str] = "opd"


@register_method
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
        require(math.isfinite(self.eps0) and self.eps0 >= 0, f"eps0 must be a finite number >= 0, got {self.eps0}")
        require(self.horizon > 0, f"horizon must be > 0, got {self.horizon}")
        require(self.schedule in SCHEDULES, f"schedule must be one of {sorted(SCHEDULES)}, got {self.schedule!r}")

    def eps(self, step: int) -> float:
        from trb.core import cosine_anneal, linear_anneal

        return (linear_anneal if self.schedule == "linear" else cosine_anneal)(step, self.eps0, self.horizon)

    def behavior(self, step: int, state: dict) -> BehaviorPolicy:
        from trb.rollout.policies import StudentPolicy, TRBPolicy

        eps = self.eps(step)
        return TRBPolicy(eps) if eps > 0 else StudentPolicy()

    def schedule_metrics(self, step: int, state: dict) -> dict[str, float]:
        return {"eps": self.eps(step)}


@register_method
@dataclass(frozen=True)
class AdaptiveTRB(Method):
    """TRB whose budget follows the student's progress instead of a fixed horizon (the paper's future work).

    Signal: the per-token teacher-KL of each step's rollouts, smoothed by an exponential moving average m_k.
    With m_0 the first value, the budget is eps_k = eps0 * clip((m_k / m_0 - floor) / (1 - floor), 0, 1), kept
    non-increasing (eps_k <= eps_{k-1}): blending fades as the student closes the gap to the teacher and is off
    for good once the KL has fallen to `floor` times its starting value. A student that learns fast leaves the
    warmup early; one that stalls keeps its help longer, without a horizon to tune.
    """

    name: ClassVar[str] = "trb_adaptive"
    eps0: float = 0.02
    floor: float = 0.5
    ema: float = 0.8

    def __post_init__(self):
        require(math.isfinite(self.eps0) and self.eps0 > 0, f"eps0 must be a finite number > 0, got {self.eps0}")
        require(0 <= self.floor < 1, f"floor must be in [0, 1), got {self.floor}")
        require(0 <= self.ema < 1, f"ema must be in [0, 1), got {self.ema}")

    def behavior(self, step: int, state: dict) -> BehaviorPolicy:
        from trb.rollout.policies import StudentPolicy, TRBPolicy

        eps = state.get("eps", self.eps0)
        return TRBPolicy(eps) if eps > 0 else StudentPolicy()

    def schedule_metrics(self, step: int, state: dict) -> dict[str, float]:
        return {"eps": state.get("eps", self.eps0)}

    def observe(self, step: int, metrics: dict, state: dict) -> None:
        kl = metrics["teacher_kl"]
        smoothed = kl if "kl_ema" not in state else self.ema * state["kl_ema"] + (1 - self.ema) * kl
        start = state.setdefault("kl_start", kl)
        progress = (smoothed / start - self.floor) / (1 - self.floor) if start > 0 else 0.0
        state["kl_ema"] = smoothed
        state["eps"] = min(state.get("eps", self.eps0), self.eps0 * min(max(progress, 0.0), 1.0))


@register_method
@dataclass(frozen=True)
class FixedEps(Method):
    """Fixed-eps blending: the TRB solver with a constant budget for the whole run."""

    name: ClassVar[str] = "fixed_eps"
    eps: float = 0.01

    def __post_init__(self):
        require(math.isfinite(self.eps) and self.eps > 0, f"eps must be a finite number > 0, got {self.eps}")

    def behavior(self, step: int, state: dict) -> BehaviorPolicy:
        from trb.rollout.policies import TRBPolicy

        return TRBPolicy(self.eps)

    def schedule_metrics(self, step: int, state: dict) -> dict[str, float]:
        return {"eps": self.eps}


@register_method
@dataclass(frozen=True)
class SKD(Method):
    """Interleaved teacher injection (SKD-style), every step: a student token outside the teacher's top-k is
    replaced by a sample of the teacher at temperature tau_T (paper sweep: top_k in {15, 25, 50}, tau_T in
    {0.2, 0.6, 1.0})."""

    name: ClassVar[str] = "skd"
    top_k: int = 25
    teacher_temperature: float = 1.0

    def __post_init__(self):
        require(self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}")
        require(self.teacher_temperature > 0, f"teacher_temperature must be > 0, got {self.teacher_temperature}")

    def behavior(self, step: int, state: dict) -> BehaviorPolicy:
        from trb.rollout.policies import SKDPolicy

        return SKDPolicy(self.top_k, self.teacher_temperature)


@register_method
@dataclass(frozen=True)
class TemperatureWarmup(Method):
    """Rollout temperature rising linearly from tau0 to 1.0 by step `horizon` (paper: tau0 in {0.8, 0.9, 0.95},
    horizon 15 or 25)."""

    name: ClassVar[str] = "temperature"
    tau0: float = 0.9
    horizon: int = 25

    def __post_init__(self):
        require(0 < self.tau0 <= 1, f"tau0 must be in (0, 1], got {self.tau0}")
        require(self.horizon > 0, f"horizon must be > 0, got {self.horizon}")

    def temperature(self, step: int) -> float:
        from trb.core import linear_ramp

        return linear_ramp(step, self.tau0, 1.0, self.horizon)

    def behavior(self, step: int, state: dict) -> BehaviorPolicy:
        from trb.rollout.policies import StudentPolicy

        return StudentPolicy(self.temperature(step))

    def schedule_metrics(self, step: int, state: dict) -> dict[str, float]:
        return {"temperature": self.temperature(step)}


@register_method
@dataclass(frozen=True)
class SFTWarmup(Method):
    """Before OPD: sample `samples_per_prompt` teacher responses for the prompts of the first `prompt_steps` steps,
    fine-tune the student on them for `updates` updates (token-mean cross-entropy), then ordinary OPD
    (paper: 4 samples, the prompts of 50 steps, 15/25/50 updates)."""

    name: ClassVar[str] = "sft_warmup"
    updates: int = 25
    prompt_steps: int = 50
    samples_per_prompt: int = 4

    def __post_init__(self):
        require(self.updates > 0, f"updates must be > 0, got {self.updates}")
        require(self.prompt_steps > 0, f"prompt_steps must be > 0, got {self.prompt_steps}")
        require(self.samples_per_prompt > 0, f"samples_per_prompt must be > 0, got {self.samples_per_prompt}")

    def before_training(self, trainer, write: Callable[[int, dict], None], log: Callable[[str], None]) -> bool:
        from trb.warmup import sft_warmup

        sft_warmup(trainer, self.updates, self.prompt_steps, self.samples_per_prompt, write, log)
        return True


@register_method
@dataclass(frozen=True)
class Veto(Method):
    """Veto changes the target, not the sampler: Q proportional to pi_T * pi_S^b with the student detached, b
    decaying linearly from b_start to 0 over `horizon` steps (paper: b_start in {0.2, 0.4, 0.6, 0.8})."""

    name: ClassVar[str] = "veto"
    b_start: float = 0.4
    horizon: int = 50

    def __post_init__(self):
        require(self.b_start >= 0, f"b_start must be >= 0, got {self.b_start}")
        require(self.horizon > 0, f"horizon must be > 0, got {self.horizon}")

    def b(self, step: int) -> float:
        from trb.core import linear_ramp

        return linear_ramp(step, self.b_start, 0.0, self.horizon)

    def target(self, step: int) -> Target | None:
        from trb.losses import veto_target

        b = self.b(step)
        return veto_target(b) if b > 0 else None

    def schedule_metrics(self, step: int, state: dict) -> dict[str, float]:
        return {"veto_b": self.b(step)}


@register_method
@dataclass(frozen=True)
class MiniLLM(Method):
    """MiniLLM teacher-mixed sampling: rollouts from alpha pi_T + (1 - alpha) pi_S (alpha = 0.2), the loss at each
    prefix weighted by the single-step importance weight pi_S / mixture of the token that ended the prefix
    (MiniLLM's token-level approximation of the prefix weight; bounded by 1 / (1 - alpha))."""

    name: ClassVar[str] = "minillm"
    reads_student_logp: ClassVar[bool] = True
    alpha: float = 0.2

    def __post_init__(self):
        require(0 < self.alpha < 1, f"alpha must be in (0, 1), got {self.alpha}")

    def behavior(self, step: int, state: dict) -> BehaviorPolicy:
        from trb.rollout.policies import MixturePolicy

        return MixturePolicy(self.alpha)

    def token_weights(self, rollout: Rollout) -> torch.Tensor:
        import torch

        ratio = torch.exp(rollout.student_logp - rollout.behavior_logp)  # (B, T) weight of the token sampled at t
        previous = torch.cat([torch.ones_like(ratio[:, :1]), ratio[:, :-1]], dim=1)  # (B, T) prefix h_t ends at t-1
        return rollout.completion_mask.float() * previous


@register_method
@dataclass(frozen=True)
class GKD(Method):
    """GKD (TRL's GKDTrainer): each step a coin with probability `lmbda` picks on-policy student rollouts,
    otherwise the dataset's own solutions; the loss is the generalized JSD(beta) (0 forward, 1 reverse KL). The coin
    is seeded per step, so it is identical on every rank and after a resume."""

    name: ClassVar[str] = "gkd"
    lmbda: float = 0.5
    beta: float = 0.5

    def __post_init__(self):
        require(0 <= self.lmbda <= 1, f"lmbda must be in [0, 1], got {self.lmbda}")
        require(0 <= self.beta <= 1, f"beta must be in [0, 1], got {self.beta}")

    def use_data(self, step: int, generator: torch.Generator) -> bool:
        import torch

        return bool(torch.rand((), generator=generator) >= self.lmbda)

    def loss_spec(self, base: LossSpec) -> LossSpec:
        return replace(base, divergence="jsd", jsd_beta=self.beta)

