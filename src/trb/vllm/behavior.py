"""Each behavior policy as the distribution it samples at a prefix, for the blend model inside vLLM, which hands
vLLM's sampler log mu and draws nothing itself.

`distribution(policy, student_logp, teacher_logp)` is the policy's own `distribution` (`trb.rollout.policies`): log
mu (B, V), beta (B,) and the realized KL(mu || pi_S) (B,), the same numbers the own engine samples from and records,
so the math lives in one place. A policy without one (a sampler that is not a distribution over the two models'
next-token distributions) is refused in one line.
"""

from __future__ import annotations

import torch

from trb.rollout.policies import BehaviorPolicy, MixturePolicy, SKDPolicy, StudentPolicy, TeacherPolicy, TRBPolicy

# the policies a vLLM blend engine serves: every one whose token is a draw from a distribution over (pi_S, pi_T)
SERVED = (StudentPolicy, TeacherPolicy, TRBPolicy, SKDPolicy, MixturePolicy)


def distribution(policy: BehaviorPolicy, student_logp: torch.Tensor | None,
                 teacher_logp: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log mu (B, V), beta (B,) and KL(mu || pi_S) (B,) of `policy` at B prefixes, from the temperature-1
    log-probabilities of the student and the teacher on the shared vocabulary (either None if the policy does not
    read it)."""
    if not isinstance(policy, SERVED):
        raise ValueError(f"the {policy.name!r} behavior policy has no per-prefix distribution the vLLM engine can "
                         f"sample; served: {', '.join(p.name for p in SERVED)}")
    return policy.distribution(student_logp, teacher_logp)
