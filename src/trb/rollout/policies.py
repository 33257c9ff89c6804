"""Behavior policies: how each method picks the next token from the student's and teacher's distributions.

A policy sees, at one decoding step, the student's and (if it needs one) the teacher's next-token log-probabilities
on the shared vocabulary, both (B, V) at temperature 1. Two methods:

- `distribution(student_logp, teacher_logp) -> (log mu (B, V), beta (B,), KL(mu || pi_S) (B,))`: the behavior
  distribution at each prefix, its blend weight (0 for the student, 1 for the teacher) and the trust-region budget it
  spends (0 where the student does not run). Every engine asks this one method for mu: the own engine's `choose`
  goes through it, speculative TRB verifies drafts against it, and an engine that samples inside its own model (a
  `compute_logits` hook) calls it there.
- `choose(student_logp, teacher_logp, draws) -> Choice`: one token per row, drawn as the method defines it (SKD's
  proposal and injection, the mixture's coin), with its record.

Policies are small, named and stateless; schedules (an annealed eps, a temperature ramp) live in the training loop,
which builds the policy that applies at each optimizer step. A policy's numbers (eps, temperatures, alpha) are
0-dim tensors from construction, so compiled code takes them as inputs: a schedule that changes them at every step
compiles once.

`draws` holds the step's randomness: `draws.token(logp) -> (B,)` picks a token (an exponential race, or argmax for
greedy decoding) and `draws.uniform() -> (B,)` flips a coin. Each call takes a fresh stream keyed by the sequence and
position (`trb.core.keyed_uniform`), so a sequence's tokens depend on nothing but its own key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch

from trb.core import blend_logp, keyed_sample, keyed_uniform, kl_divergence, trust_region, with_temperature

# log mu (B, V), beta (B,), KL(mu || pi_S) (B,)
Distribution = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class Draws:
    """The random draws of one decoding step for B rows. keys (B,): each row's sequence key; positions (B,): the
    completion position being sampled. Every call uses the next stream number, so the draws a policy makes at one
    position are independent of each other; greedy decoding replaces token draws by argmax."""

    def __init__(self, keys: torch.Tensor, positions: torch.Tensor, greedy: bool = False, stream: int = 0):
        self.keys, self.positions, self.greedy, self.stream = keys, positions, greedy, stream

    def _next(self) -> int:
        self.stream += 1
        return self.stream - 1

    def token(self, logp: torch.Tensor) -> torch.Tensor:
        """One token per row from exp(logp) (B, V) -> (B,) int64."""
        stream = self._next()
        return logp.argmax(-1) if self.greedy else keyed_sample(logp, self.keys, self.positions, stream)

    def uniform(self) -> torch.Tensor:
        """One uniform number in (0, 1) per row, (B,)."""
        return keyed_uniform(self.keys, self.positions, self._next())


@dataclass
class Choice:
    """One decoding step for B rows. behavior_logp: log mu(token) under the policy that sampled it; beta: the
    blend weight (0 for pure student); kl: KL(mu || pi_S), the trust-region budget spent; from_teacher: whether
    the token was drawn from the teacher (SKD injection, mixture source, teacher sampling)."""

    token: torch.Tensor  # (B,) int64
    behavior_logp: torch.Tensor  # (B,)
    beta: torch.Tensor  # (B,)
    kl: torch.Tensor  # (B,)
    from_teacher: torch.Tensor  # (B,) bool


class BehaviorPolicy(Protocol):
    """What an engine asks of a behavior policy. needs_student / needs_teacher: which models must run.
    speculative: mu at a prefix depends on nothing but that prefix's two distributions (TRB's blend), so the policy
    can also be sampled exactly by speculative decoding (`trb.rollout.speculative`), which draws through
    `distribution` alone."""

    name: str
    needs_student: bool
    needs_teacher: bool
    speculative: bool

    def distribution(self, student_logp: torch.Tensor | None, teacher_logp: torch.Tensor | None) -> Distribution: ...

    def choose(self, student_logp: torch.Tensor | None, teacher_logp: torch.Tensor | None, draws: Draws) -> Choice: ...


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _tensor(value: float | torch.Tensor) -> torch.Tensor:
    """A policy's number as a 0-dim float64 tensor (rounded to the math's dtype where it is used)."""
    return torch.as_tensor(value, dtype=torch.float64).detach()


def _set(policy, name: str, value) -> None:
    object.__setattr__(policy, name, value)  # frozen dataclasses: derived fields are set once, at construction


def _pick(logp: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    return logp.gather(-1, token[:, None])[:, 0]  # (B,)


def _drawn(target: Distribution, draws: Draws, from_teacher: bool) -> Choice:
    """A token drawn from the policy's distribution itself, with its record."""
    mu, beta, kl = target  # (B, V), (B,), (B,)
    token = draws.token(mu)  # (B,)
    return Choice(token, _pick(mu, token), beta, kl, torch.full_like(token, from_teacher, dtype=torch.bool))


@dataclass(frozen=True)
class _Tempered:
    """Sampling from one model at temperature tau (the subclass says which: `distribution`)."""

    speculative: ClassVar[bool] = False
    temperature: float = 1.0
    _tau: torch.Tensor = field(init=False, repr=False, compare=False)
    _plain: bool = field(init=False, repr=False, compare=False)  # tau = 1: the log-probs as given

    def __post_init__(self):
        _check(float(self.temperature) > 0, f"temperature must be > 0, got {float(self.temperature)}")
        _set(self, "_tau", _tensor(self.temperature))
        _set(self, "_plain", float(self.temperature) == 1.0)

    def _mu(self, logp: torch.Tensor) -> torch.Tensor:
        return logp if self._plain else with_temperature(logp, self._tau)  # (B, V)

    def choose(self, student_logp, teacher_logp, draws) -> Choice:
        return _drawn(self.distribution(student_logp, teacher_logp), draws, from_teacher=not self.needs_student)


@dataclass(frozen=True)
class StudentPolicy(_Tempered):
    """Sample from the student at temperature tau (vanilla OPD at tau = 1; temperature warmup ramps tau)."""

    name: ClassVar[str] = "student"
    needs_student: ClassVar[bool] = True
    needs_teacher: ClassVar[bool] = False

    def distribution(self, student_logp, teacher_logp) -> Distribution:
        mu = self._mu(student_logp)  # (B, V)
        zeros = student_logp.new_zeros(student_logp.shape[:-1])  # (B,)
        return mu, zeros, zeros if self._plain else kl_divergence(mu, student_logp)  # KL(pi_S || pi_S) = 0: no pass


@dataclass(frozen=True)
class TeacherPolicy(_Tempered):
    """Sample from the teacher at temperature tau (SFT-warmup data, sequence-level KD). The student does not run:
    the budget spent is recorded as 0."""

    name: ClassVar[str] = "teacher"
    needs_student: ClassVar[bool] = False
    needs_teacher: ClassVar[bool] = True

    def distribution(self, student_logp, teacher_logp) -> Distribution:
        mu = self._mu(teacher_logp)  # (B, V)
        return mu, teacher_logp.new_ones(mu.shape[:-1]), teacher_logp.new_zeros(mu.shape[:-1])


class _BothModels:
    """A policy of the student's and the teacher's distributions."""

    needs_student: ClassVar[bool] = True
    needs_teacher: ClassVar[bool] = True
    speculative: ClassVar[bool] = False


def _around_student(mu: torch.Tensor, student_logp: torch.Tensor) -> Distribution:
    """mu (B, V) of a policy that does not blend (beta 0), with the budget it spends, KL(mu || pi_S)."""
    return mu, student_logp.new_zeros(mu.shape[:-1]), kl_divergence(mu, student_logp)


@dataclass(frozen=True)
class TRBPolicy(_BothModels):
    """Sample from mu_beta*, the blend closest to the teacher with KL(mu || pi_S) <= eps (METHOD.md section 2).
    Fixed-eps blending is this policy with the same eps at every step."""

    name: ClassVar[str] = "trb"
    speculative: ClassVar[bool] = True
    eps: float
    _eps: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        eps = float(self.eps)
        _check(math.isfinite(eps) and eps >= 0, f"eps must be a finite number >= 0, got {eps}")
        _set(self, "_eps", _tensor(self.eps))

    def distribution(self, student_logp, teacher_logp) -> Distribution:
        """log mu_beta* (..., V), beta* (...) and the realized KL(mu || pi_S) (...) (float64-exact, at most eps)."""
        beta, kl = trust_region(student_logp, teacher_logp, self._eps)  # (...) each
        return blend_logp(student_logp, teacher_logp, beta), beta, kl

    def choose(self, student_logp, teacher_logp, draws) -> Choice:
        return _drawn(self.distribution(student_logp, teacher_logp), draws, from_teacher=False)


def _teacher_top(teacher_logp: torch.Tensor, top_k: int) -> torch.Tensor:
    """The teacher's top-k tokens as a mask, (B, V) bool."""
    k = min(top_k, teacher_logp.shape[-1])
    return torch.zeros_like(teacher_logp, dtype=torch.bool).scatter_(-1, teacher_logp.topk(k, -1).indices, True)


def skd_logp(student_logp: torch.Tensor, teacher_logp: torch.Tensor, top_k: int,
             teacher_temperature: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The SKD behavior distribution, analytically: log mu (B, V) and the teacher's top-k mask (B, V).

    y ~ pi_S is kept if it is in the teacher's top-k, otherwise replaced by a sample of pi_T at temperature tau_T:
    mu(a) = pi_S(a) 1[a in topk_T] + P_S(y not in topk_T) pi_T^tau(a).
    """
    in_top = _teacher_top(teacher_logp, top_k)  # (B, V)
    outside = torch.logsumexp(torch.where(in_top, float("-inf"), student_logp), dim=-1, keepdim=True)  # (B, 1)
    injected = outside + with_temperature(teacher_logp, teacher_temperature)  # (B, V)
    kept = torch.where(in_top, student_logp, float("-inf"))  # (B, V)
    return torch.logaddexp(kept, injected), in_top


@dataclass(frozen=True)
class SKDPolicy(_BothModels):
    """Interleaved teacher injection (SKD-style): keep the student's token if the teacher ranks it in its top-k,
    else replace it with a sample from the teacher at temperature tau_T."""

    name: ClassVar[str] = "skd"
    top_k: int = 25
    teacher_temperature: float = 1.0
    _tau: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        _check(self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}")
        tau = float(self.teacher_temperature)
        _check(tau > 0, f"teacher_temperature must be > 0, got {tau}")
        _set(self, "_tau", _tensor(self.teacher_temperature))

    def distribution(self, student_logp, teacher_logp) -> Distribution:
        return _around_student(skd_logp(student_logp, teacher_logp, self.top_k, self._tau)[0], student_logp)

    def choose(self, student_logp, teacher_logp, draws) -> Choice:
        mu, beta, kl = self.distribution(student_logp, teacher_logp)  # (B, V), (B,), (B,)
        proposal = draws.token(student_logp)  # (B,)
        injected = draws.token(with_temperature(teacher_logp, self._tau))  # (B,)
        replace = ~_pick(_teacher_top(teacher_logp, self.top_k), proposal)  # (B,)
        token = torch.where(replace, injected, proposal)  # (B,)
        return Choice(token, _pick(mu, token), beta, kl, replace)


@dataclass(frozen=True)
class MixturePolicy(_BothModels):
    """MiniLLM teacher-mixed sampling from alpha pi_T + (1 - alpha) pi_S: a coin with probability alpha picks the
    teacher as the source of the token. The per-token importance weight pi_S / mixture is
    exp(student_logp - behavior_logp) of the rollout record."""

    name: ClassVar[str] = "mixture"
    alpha: float = 0.2
    _alpha: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        _check(0 < float(self.alpha) < 1, f"alpha must be in (0, 1), got {float(self.alpha)}")
        _set(self, "_alpha", _tensor(self.alpha))

    def distribution(self, student_logp, teacher_logp) -> Distribution:
        mu = torch.logaddexp(student_logp + torch.log1p(-self._alpha), teacher_logp + torch.log(self._alpha))  # (B, V)
        return _around_student(mu, student_logp)

    def choose(self, student_logp, teacher_logp, draws) -> Choice:
        mu, beta, kl = self.distribution(student_logp, teacher_logp)  # (B, V), (B,), (B,)
        from_teacher = draws.uniform() < self._alpha  # (B,)
        token = torch.where(from_teacher, draws.token(teacher_logp), draws.token(student_logp))  # (B,)
        return Choice(token, _pick(mu, token), beta, kl, from_teacher)
