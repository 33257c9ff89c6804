"""Engines built: trb's own engine wired to the decoder backends, from a run's config or from models, and
`generate`, one call of it.

This is the one module that binds the engine to its backends (`trb.rollout.backends.make_decoder`); the engine
itself receives them as a factory.
"""

from __future__ import annotations

import functools

import torch
from transformers import PreTrainedModel

from trb.models import VocabSpace
from trb.rollout.backends import make_decoder
from trb.rollout.engine import Engine, OwnEngine, sequence_keys
from trb.rollout.policies import BehaviorPolicy
from trb.rollout.queue import RolloutStats
from trb.sequences import Rollout


def decode_compile(setting: bool | str, device: torch.device) -> bool:
    """The config's `compile` for a device: `auto` compiles the policy's math on a GPU and decodes
    eagerly on a CPU, where compiling repays its minutes of compilation only in long runs (docs/scale.md)."""
    return device.type == "cuda" if setting == "auto" else setting


def own_engine(student: PreTrainedModel | None, teacher: PreTrainedModel | None, vocab: VocabSpace, *,
               forward: str = "auto", compile: bool = False, **options) -> OwnEngine:
    """trb's own engine over these models; forward: the decoder backend ("auto", "lean", "hf";
    `trb.rollout.backends.make_decoder`); compile: the policy's math and the paged decoder's single-token steps
    through torch.compile; options: `OwnEngine`'s."""
    decoders = functools.partial(make_decoder, vocab=vocab, forward=forward, compile=compile)
    return OwnEngine(student, teacher, vocab, decoders, compile=compile, **options)


def build_engine(cfg, student: PreTrainedModel, teacher: PreTrainedModel, vocab: VocabSpace, *,
                 record_topk: int = 0, record_kl: bool = True) -> Engine:
    """trb's own rollout engine for a training run (cfg: its `trb.config.TrainConfig`; `trb.trainer.rollout_engine`
    picks vLLM's instead under rollout.engine=vllm), with a KV budget of `rollout_batch` sequences per model,
    speculative TRB at `speculative_gamma`, the `compile` setting for the student's device and the `models.forward`
    backend."""
    return own_engine(student, teacher, vocab, forward=cfg.models.forward, batch=cfg.rollout_batch,
                      gamma=cfg.speculative_gamma, compile=decode_compile(cfg.compile, student.device),
                      record_topk=record_topk, record_kl=record_kl)


def generate(
    policy: BehaviorPolicy,
    prompts: list[list[int]],
    vocab: VocabSpace,
    max_new_tokens: int,
    generator: torch.Generator | None = None,
    student: PreTrainedModel | None = None,
    teacher: PreTrainedModel | None = None,
    *,
    keys: torch.Tensor | None = None,
    stats: RolloutStats | None = None,
    forward: str = "auto",
    **options,
) -> Rollout:
    """One rollout call of trb's own engine: up to max_new_tokens for every prompt with the behavior policy; rows of
    the result follow `prompts`. The student runs if the policy needs it, the teacher likewise; both must then be
    given. keys (B,) int64: each sequence's random key; without keys they are drawn from `generator`. stats, if
    given, accumulates what the call did. forward and options (batch, gamma, compile, greedy, record_topk,
    record_kl): `own_engine`'s."""
    if keys is None:
        if generator is None:
            raise ValueError("generate needs keys or a generator")
        keys = sequence_keys(len(prompts), generator)
    engine = own_engine(student, teacher, vocab, forward=forward, **options)
    if stats is not None:
        engine.stats = stats
    return engine.rollout(policy, prompts, max_new_tokens, keys)
