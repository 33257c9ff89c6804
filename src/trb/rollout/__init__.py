"""The rollout engine and the behavior policies of every method the project compares."""

from trb.rollout.engine import Rollout, compiled_cache, generate, left_pad, position_ids, rollout_from_tokens
from trb.rollout.policies import (
    BehaviorPolicy,
    Choice,
    MixturePolicy,
    SKDPolicy,
    StudentPolicy,
    TeacherPolicy,
    TRBPolicy,
    skd_logp,
)

__all__ = [
    "BehaviorPolicy",
    "Choice",
    "MixturePolicy",
    "Rollout",
    "SKDPolicy",
    "StudentPolicy",
    "TRBPolicy",
    "TeacherPolicy",
    "compiled_cache",
    "generate",
    "left_pad",
    "position_ids",
    "rollout_from_tokens",
    "skd_logp",
]
