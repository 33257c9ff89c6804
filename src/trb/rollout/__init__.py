"""Rollouts: the engine seam, trb's own engine, the behavior policies and the records.

**The seam.** Everything that samples (the training loop, evaluation, the continuation probe, TRL's trainer) makes
one call, `engine.rollout(policy, prompts, max_new_tokens, keys) -> Rollout`, on an `Engine` (`engine`):

- inputs: a behavior policy (`policies`), token-id prompts, max_new_tokens, and one 32-bit key per sequence (every
  random number of a sequence is keyed by (key, position, stream), so its tokens depend on nothing else);
- output: the `Rollout` record (`records`), with the same fields whatever the engine: tokens, completion mask,
  stop flags, and per token the behavior, student and teacher log-probs, beta, the realized KL(mu || pi_S), the
  teacher flag, optionally the teacher's log-probs on the student's top-k and KL(pi_S || pi_T), H(pi_T);
- `engine.update_student(model)`: the loop calls it after every optimizer step (an engine that keeps its own copy
  of the student takes the new weights here; the own engine decodes the refreshed inference copy and does nothing);
- `build_engine(cfg, student, teacher, vocab)` (`factory`): trb's own engine as a run's config sets it up (with
  `rollout.engine=vllm` the trainer builds vLLM's instead, `trb.vllm.rollouts`; this package never imports vLLM).

Every policy exposes its behavior distribution through one method, `policy.distribution(student_logp, teacher_logp)
-> (log mu (B, V), beta (B,), KL(mu || pi_S) (B,))`; an engine that samples inside its model calls it on the two
models' log-probs at each prefix, and `policy.choose` (the own engine's draw) goes through it.

**The own engine** (`engine.OwnEngine`) receives its decoders from a factory (`factory` binds the backends of
`backends`, tests bind a mock), and runs the shared queue (`queue`: admission by KV memory, preemption, records)
through the lock-step loop (`lockstep`) or exact speculative TRB (`speculative`). `generate` is one call of it.
"""

from trb.rollout.backends import HFDecoder, PagedDecoder, make_decoder
from trb.rollout.decoder import Decoder, Reads
from trb.rollout.engine import Engine, OwnEngine, sequence_keys
from trb.rollout.factory import build_engine, generate, own_engine
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
from trb.rollout.queue import RolloutStats
from trb.sequences import Rollout, left_pad, position_ids, rollout_from_tokens

__all__ = [
    "BehaviorPolicy",
    "Choice",
    "Decoder",
    "Draws",
    "Engine",
    "HFDecoder",
    "MixturePolicy",
    "OwnEngine",
    "PagedDecoder",
    "Reads",
    "Rollout",
    "RolloutStats",
    "SKDPolicy",
    "StudentPolicy",
    "TRBPolicy",
    "TeacherPolicy",
    "build_engine",
    "generate",
    "left_pad",
    "make_decoder",
    "own_engine",
    "position_ids",
    "rollout_from_tokens",
    "sequence_keys",
    "skd_logp",
]
