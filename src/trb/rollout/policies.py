"""Behavior policies: how each method picks the next token from the student's and teacher's distributions.

A policy sees, at one decoding step, the student's and (if it needs one) the teacher's next-token log-probabilities
on the shared vocabulary, both (B, V) at temperature 1, and returns a `Choice`. Policies are small, named and
stateless; schedules (an annealed eps, a temperature ramp) live in the training loop, which builds the policy that
applies at each optimizer step.

`draws` holds the step's randomness: `draws.token(logp) -> (B,)` picks a token (an exponential race, or argmax for
greedy decoding) and `draws.uniform() -> (B,)` flips a coin. Each call takes a fresh stream keyed by the sequence and
position (`trb.core.keyed_uniform`), so a sequence's tokens depend on nothing but its own key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from trb.core import blend_logp, keyed_sample, keyed_uniform, kl_divergence, trust_region, with_temperature


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
    """What the decode engine asks of a behavior policy. needs_student / needs_teacher: which models must run.
    speculative: the policy can also be sampled exactly by speculative decoding (`trb.rollout.speculative`): it has
    `target(student_logp, teacher_logp) -> (log mu (..., V), beta (...), KL(mu || pi_S) (...))`, the distribution it
    samples at a prefix,
    which depends on nothing but that prefix (TRB's blend)."""

    name: str
    needs_student: bool
    needs_teacher: bool
    speculative: bool

    def choose(self, student_logp: torch.Tensor | None, teacher_logp: torch.Tensor | None, draws: Draws) -> Choice: ...


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _pick(logp: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    return logp.gather(-1, token[:, None])[:, 0]  # (B,)


def _choice_from(mu_logp, student_logp, token, beta, from_teacher) -> Choice:
    kl = kl_divergence(mu_logp, student_logp) if student_logp is not None else torch.zeros_like(beta)
    return Choice(token, _pick(mu_logp, token), beta, kl, from_teacher)


@dataclass(frozen=True)
class StudentPolicy:
    """Sample from the student at temperature tau (vanilla OPD at tau = 1; temperature warmup ramps tau)."""

    temperature: float = 1.0
    name: str = "student"
    needs_student: bool = True
    needs_teacher: bool = False
    speculative: bool = False

    def __post_init__(self):
        _check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")

    def choose(self, student_logp, teacher_logp, draws) -> Choice:
        mu = student_logp if self.temperature == 1.0 else with_temperature(student_logp, self.temperature)  # (B, V)
        token = draws.token(mu)  # (B,)
        zeros = torch.zeros(token.shape, device=token.device)
        no_teacher = torch.zeros_like(token, dtype=torch.bool)
        if mu is student_logp:  # KL(pi_S || pi_S) = 0: no pass over the vocabulary for it
            return Choice(token, _pick(mu, token), zeros, zeros, no_teacher)
        return _choice_from(mu, student_logp, token, zeros, no_teacher)


@dataclass(frozen=True)
class TRBPolicy:
    """Sample from mu_beta*, the blend closest to the teacher with KL(mu || pi_S) <= eps (METHOD.md section 2).
    Fixed-eps blending is this policy with the same eps at every step."""

    eps: float
    name: str = "trb"
    needs_student: bool = True
    needs_teacher: bool = True
    speculative: bool = True

    def __post_init__(self):
        if not isinstance(self.eps, torch.Tensor):
            _check(math.isfinite(self.eps) and self.eps >= 0, f"eps must be a finite number >= 0, got {self.eps}")

    def target(self, student_logp: torch.Tensor,
               teacher_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """log mu_beta* (..., V), beta* (...) and the realized KL(mu || pi_S) (...) (float64-exact, at most eps): the
        distribution this policy samples from at each prefix (lock-step and speculative decoding both draw through
        it) and the budget it spends."""
        beta, kl = trust_region(student_logp, teacher_logp, self.eps)  # (...) each
        return blend_logp(student_logp, teacher_logp, beta), beta, kl

    def choose(self, student_logp, teacher_logp, draws) -> Choice:
        mu, beta, kl = self.target(student_logp, teacher_logp)  # (B, V), (B,), (B,)
        token = draws.token(mu)  # (B,)
        return Choice(token, _pick(mu, token), beta, kl, torch.zeros_like(token, dtype=torch.bool))


@dataclass(frozen=True)
class TeacherPolicy:
    """Sample from the teacher (SFT-warmup data, sequence-level KD). The student does not run."""

    temperature: float = 1.0
    name: str = "teacher"
    needs_student: bool = False
    needs_teacher: bool = True
    speculative: bool = False

    def __post_init__(self):
        _check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")

    def choose(self, student_logp, teacher_logp, draws) -> Choice:
        mu = teacher_logp if self.temperature == 1.0 else with_temperature(teacher_logp, self.temperature)  # (B, V)
        token = draws.token(mu)  # (B,)
        ones = torch.ones(token.shape, device=token.device)
        return _choice_from(mu, None, token, ones, torch.ones_like(token, dtype=torch.bool))


def skd_logp(student_logp: torch.Tensor, teacher_logp: torch.Tensor, top_k: int, teacher_temperature: float):
    """The SKD behavior distribution, analytically: log mu (B, V) and the teacher's top-k mask (B, V).

    y ~ pi_S is kept if it is in the teacher's top-k, otherwise replaced by a sample of pi_T at temperature tau_T:
    mu(a) = pi_S(a) 1[a in topk_T] + P_S(y not in topk_T) pi_T^tau(a).
    """
    k = min(top_k, teacher_logp.shape[-1])
    in_top = torch.zeros_like(teacher_logp, dtype=torch.bool).scatter_(-1, teacher_logp.topk(k, -1).indices, True)
    outside = torch.logsumexp(torch.where(in_top, float("-inf"), student_logp), dim=-1, keepdim=True)  # (B, 1)
    injected = outside + with_temperature(teacher_logp, teacher_temperature)  # (B, V)
    kept = torch.where(in_top, student_logp, float("-inf"))  # (B, V)
    return torch.logaddexp(kept, injected), in_top


@dataclass(frozen=True)
class SKDPolicy:
    """Interleaved teacher injection (SKD-style): keep the student's token if the teacher ranks it in its top-k,
    else replace it with a sample from the teacher at temperature tau_T."""

    top_k: int = 25
    teacher_temperature: float = 1.0
    name: str = "skd"
    needs_student: bool = True
    needs_teacher: bool = True
    speculative: bool = False

    def __post_init__(self):
        _check(self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}")
        _check(self.teacher_temperature > 0, f"teacher_temperature must be > 0, got {self.teacher_temperature}")

    def choose(self, student_logp, teacher_logp, draws) -> Choice:
        mu, in_top = skd_logp(student_logp, teacher_logp, self.top_k, self.teacher_temperature)  # (B, V)
        proposal = draws.token(student_logp)  # (B,)
        injected = draws.token(with_temperature(teacher_logp, self.teacher_temperature))  # (B,)
        replace = ~_pick(in_top, proposal)  # (B,)
        token = torch.where(replace, injected, proposal)  # (B,)
        zeros = torch.zeros(token.shape, device=token.device)
        return _choice_from(mu, student_logp, token, zeros, replace)


@dataclass(frozen=True)
class MixturePolicy:
    """MiniLLM teacher-mixed sampling from alpha pi_T + (1 - alpha) pi_S: a coin with probability alpha picks the
    teacher as the source of the token. The per-token importance weight pi_S / mixture is
    exp(student_logp - behavior_logp) of the rollout record."""

    alpha: float = 0.2
    name: str = "mixture"
    needs_student: bool = True
    needs_teacher: bool = True
    speculative: bool = False

    def __post_init__(self):
        _check(0 < self.alpha < 1, f"alpha must be in (0, 1), got {self.alpha}")

    def choose(self, student_logp, teacher_logp, draws) -> Choice:
        mu = torch.logaddexp(student_logp + math.log1p(-self.alpha), teacher_logp + math.log(self.alpha))  # (B, V)
        from_teacher = draws.uniform() < self.alpha  # (B,)
        token = torch.where(from_teacher, draws.token(teacher_logp), draws.token(student_logp))  # (B,)
        zeros = torch.zeros(token.shape, device=token.device)
        return _choice_from(mu, student_logp, token, zeros, from_teacher)
