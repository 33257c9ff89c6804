"""The rollout engine: the one call that the training loop, evaluation, the probe and TRL's trainer make, and trb's
own engine behind it.

`Engine` is the seam (see the package docstring): `rollout(policy, prompts, max_new_tokens, keys) -> Rollout` and
`update_student(model)` after every optimizer step (and `close()` when the run ends). `OwnEngine` implements it on the decoder interface
(`trb.rollout.decoder`): it receives a factory that makes one decoder per model and call (the backends of
`trb.rollout.backends`, or a mock decoder in the tests), runs the shared queue (`trb.rollout.queue`: admission by KV
memory, preemption, records) through the lock-step loop (`trb.rollout.lockstep`) or exact speculative TRB
(`trb.rollout.speculative`), and knows no concrete policy.

Every random number is keyed by (sequence key, position, stream) (`trb.core.keyed_uniform`): a sequence's tokens do
not depend on which sequences share its batch, on the queue order, on the KV budget, on preemption or on the number
of ranks. Positions count attended tokens (the same rule as the training forward), so sampled and trained inputs
agree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from transformers import PreTrainedModel

from trb.models import VocabSpace
from trb.rollout.decoder import Decoder
from trb.rollout.lockstep import decode_lockstep
from trb.rollout.policies import BehaviorPolicy
from trb.rollout.queue import Queue, RolloutStats
from trb.sequences import Rollout
from trb.rollout.speculative import decode_speculative

DecoderFactory = Callable[[PreTrainedModel], Decoder]


class Engine(Protocol):
    """What every rollout engine does. `stats` accumulates what its calls did (an engine fills what it measures)."""

    stats: RolloutStats

    def rollout(self, policy: BehaviorPolicy, prompts: list[list[int]], max_new_tokens: int, keys: torch.Tensor, *,
                batch: int | None = None) -> Rollout:
        """Decode up to max_new_tokens for every prompt (token ids) with the behavior policy; keys (B,) int64 in
        [0, 2^32): each sequence's random key. Rows of the `Rollout` follow `prompts`. batch: the KV budget in
        sequences of (longest prompt + max_new_tokens) slots for this call (None: the engine's own; an engine that
        budgets its memory otherwise may ignore it)."""

    def update_student(self, model: torch.nn.Module) -> None:
        """Called after every optimizer step with the model that holds the student's new weights."""

    def close(self) -> None:
        """Release what the engine holds (vLLM: its engine and memory); called once, when the run ends."""


def sequence_keys(count: int, generator: torch.Generator) -> torch.Tensor:
    """One 32-bit key per sequence from the generator, (count,) int64."""
    return torch.randint(0, 2**32, (count,), generator=generator, device=generator.device)


class OwnEngine:
    """trb's own engine (module docstring). decoders(model) makes a fresh decoder for one model. batch: the default KV
    budget in sequences (0: every sequence of a call at once). gamma > 0: a speculative policy (TRB) is sampled by
    exact speculative decoding with drafts of gamma tokens. compile: the policy's math through torch.compile. greedy:
    argmax instead of sampling. record_topk = k > 0 (both models running) also records the teacher's log-probs on the
    student's top-k; record_kl records KL(pi_S || pi_T) and H(pi_T) at each prefix (a few passes over (b, V) per step,
    which a caller whose loss computes them anyway turns off)."""

    def __init__(self, student: PreTrainedModel | None, teacher: PreTrainedModel | None, vocab: VocabSpace,
                 decoders: DecoderFactory, *, batch: int = 0, gamma: int = 0, compile: bool = False,
                 greedy: bool = False, record_topk: int = 0, record_kl: bool = True):
        if batch < 0 or gamma < 0 or record_topk < 0:
            raise ValueError(f"batch, gamma and record_topk must be >= 0, got {batch}, {gamma} and {record_topk}")
        self.models = {"student": student, "teacher": teacher}
        self.vocab, self.decoders, self.batch, self.gamma = vocab, decoders, batch, gamma
        self.compile, self.greedy, self.record_topk, self.record_kl = compile, greedy, record_topk, record_kl
        self.stats = RolloutStats()

    @torch.no_grad()
    def rollout(self, policy: BehaviorPolicy, prompts: list[list[int]], max_new_tokens: int, keys: torch.Tensor, *,
                batch: int | None = None) -> Rollout:
        roles = [role for role, needed in (("student", policy.needs_student), ("teacher", policy.needs_teacher))
                 if needed]
        for role in roles:
            if self.models[role] is None:
                raise ValueError(f"the {policy.name!r} behavior policy needs a {role} model")
        if len(keys) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts need as many keys, got {len(keys)}")
        decoders = {role: self.decoders(self.models[role]) for role in roles}
        queue = Queue(prompts, keys.to(self.models[roles[0]].device), max_new_tokens, self.vocab, decoders,
                      self.batch if batch is None else batch, self.stats, self.record_kl, self.record_topk)
        if self.gamma and policy.speculative and len(roles) == 2:
            decode_speculative(queue, self._compiled(policy.distribution), self.gamma)
        else:
            decode_lockstep(queue, self._compiled(policy.choose), self.greedy)
        return queue.rollout()

    def _compiled(self, fn):
        # a wrapper per call (the policy changes every step); its numbers are tensors, so their values are not
        # specialized and one compilation serves every step
        return torch.compile(fn, dynamic=True) if self.compile else fn

    def update_student(self, model: torch.nn.Module) -> None:
        """Nothing to do: the engine decodes the inference copy itself, which the loop refreshes in place."""

    def close(self) -> None:
        """Nothing to release: the decoders live for one call."""
