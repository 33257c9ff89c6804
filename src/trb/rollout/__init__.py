"""Rollouts: the decoder interface (`decoder`), its backends (`backends`), the lock-step engine with continuous
batching (`engine`), exact speculative TRB (`speculative`) and the behavior policies (`policies`). The sequence record
they return and its padding helpers live in `trb.sequences` (re-exported here)."""

from trb.rollout.backends import HFDecoder, PagedDecoder, make_decoder
from trb.rollout.decoder import Decoder, Reads
from trb.rollout.engine import RolloutStats, generate, sequence_keys
from trb.rollout.policies import (
    BehaviorPolicy,
    Choice,
    Draws,
    MixturePolicy,
    SKDPolicy,
    StudentPolicy,
    TeacherPolicy,
    TRBPolicy,
    skd_logp,
)
from trb.sequences import Rollout, left_pad, position_ids, rollout_from_tokens

__all__ = [
    "BehaviorPolicy",
    "Choice",
    "Decoder",
    "Draws",
    "HFDecoder",
    "MixturePolicy",
    "PagedDecoder",
    "Reads",
    "Rollout",
    "RolloutStats",
    "SKDPolicy",
    "StudentPolicy",
    "TRBPolicy",
    "TeacherPolicy",
    "generate",
    "left_pad",
    "make_decoder",
    "position_ids",
    "rollout_from_tokens",
    "sequence_keys",
    "skd_logp",
]
