"""Each behavior policy as the distribution it samples at a prefix: the adapter between trb's policies and the blend
model inside vLLM, which hands vLLM's sampler log mu and draws nothing itself.

`distribution(policy, student_logp, teacher_logp)` returns log mu (B, V), beta (B,) and the realized KL(mu || pi_S)
(B,), computed by the policies' own code (`TRBPolicy.target`, `skd_logp`, `with_temperature`), so the math lives in
one place. The records match those of the own engine's `Choice` for the same policy: beta is TRB's blend weight (1
for teacher sampling, 0 otherwise), and the KL is 0 where the student does not run in the own engine (teacher
sampling).
"""

from __future__ import annotations

import math

import torch

from trb.core import kl_divergence, with_temperature
from trb.rollout.policies import (
    BehaviorPolicy, MixturePolicy, SKDPolicy, StudentPolicy, TeacherPolicy, TRBPolicy, skd_logp,
)

# the policies a vLLM blend engine serves: every one whose token is a draw from a distribution over (pi_S, pi_T)
SERVED = (StudentPolicy, TeacherPolicy, TRBPolicy, SKDPolicy, MixturePolicy)


def distribution(policy: BehaviorPolicy, student_logp: torch.Tensor | None,
                 teacher_logp: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log mu (B, V), beta (B,) and KL(mu || pi_S) (B,) of `policy` at B prefixes, from the temperature-1
    log-probabilities of the student and the teacher on the shared vocabulary (either None if the policy does not
    read it)."""
    if isinstance(policy, TRBPolicy):
        return policy.target(student_logp, teacher_logp)
    if isinstance(policy, StudentPolicy):
        if policy.temperature == 1.0:
            zeros = student_logp.new_zeros(student_logp.shape[:-1], dtype=torch.float32)  # (B,)
            return student_logp.float(), zeros, zeros
        mu = with_temperature(student_logp, policy.temperature)  # (B, V)
        return mu, torch.zeros_like(mu[..., 0]), kl_divergence(mu, student_logp)
    if isinstance(policy, TeacherPolicy):
        mu = with_temperature(teacher_logp, policy.temperature)  # (B, V)
        return mu, torch.ones_like(mu[..., 0]), torch.zeros_like(mu[..., 0])
    if isinstance(policy, SKDPolicy):
        mu = skd_logp(student_logp, teacher_logp, policy.top_k, policy.teacher_temperature)[0]  # (B, V)
    elif isinstance(policy, MixturePolicy):  # the mixture formula of MixturePolicy.choose
        mu = torch.logaddexp(student_logp.float() + math.log1p(-policy.alpha),
                             teacher_logp.float() + math.log(policy.alpha))  # (B, V)
    else:
        raise ValueError(f"the {policy.name!r} behavior policy has no per-prefix distribution the vLLM engine can "
                         f"sample; served: {', '.join(p.name for p in SERVED)}")
    return mu, torch.zeros_like(mu[..., 0]), kl_divergence(mu, student_logp)
