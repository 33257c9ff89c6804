"""The rollout seam (`trb.rollout.Engine`) over vLLM: `VLLMRollouts` turns each `rollout` call into one generation of
`trb.vllm.engine.VLLMEngine` and `update_student` into its weight push, so the training loop, evaluation and TRL's
trainer use vLLM exactly as they use trb's own engine.

The models come from their folders on disk (the pair a run names); the in-memory student is pushed at construction,
so a resumed or SFT-warmed student is what vLLM samples from the first call. `stats` reports what vLLM's results
show: tokens generated, the sequences of each call (`rows`, at most `max_num_seqs` decode at once) and the batch
limit (`batch` = max_num_seqs). vLLM's scheduler keeps the rest to itself: decode steps, prompt passes, KV slots held,
preemptions and KV reads stay 0, and there are no speculative drafts.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from trb.models import VocabSpace
from trb.rollout.policies import BehaviorPolicy, StudentPolicy
from trb.rollout.queue import RolloutStats
from trb.sequences import Rollout
from trb.vllm.engine import VLLMEngine, VLLMError, VLLMSettings


class VLLMRollouts:
    """`trb.rollout.Engine` on a vLLM engine (module docstring). student, teacher: checkpoint folders (teacher None:
    the student phase only); model: the in-memory student whose weights vLLM samples (pushed now and at every
    `update_student`); longest: prompt + completion tokens of the longest sequence the run will ask for (checked
    against max_model_len now, not at the first call); seed: vLLM's own seed (each sequence's randomness comes
    from its key). settings.dtype "auto" is `model`'s dtype (a checkpoint stored in bf16 is sampled in fp32 when the
    student trains and decodes in fp32, as the own engine samples it)."""

    def __init__(self, student: str, teacher: str | None, vocab: VocabSpace, settings: VLLMSettings,
                 model: nn.Module, *, longest: int = 0, seed: int = 0):
        if settings.dtype == "auto":  # vLLM samples in the dtype the student decodes in, not the checkpoint's
            settings = replace(settings, dtype=str(next(model.parameters()).dtype).removeprefix("torch."))
        self.engine = VLLMEngine(student, teacher, vocab, settings, seed)
        limit = self.engine.max_model_len()
        if longest > limit:
            raise VLLMError(f"the run's longest sequence ({longest} tokens: prompt + max_new_tokens) does not fit "
                            f"max_model_len={limit}; raise rollout.max_model_len or lower max_new_tokens")
        self.device = next(model.parameters()).device
        self.stats = RolloutStats(batch=settings.max_num_seqs)
        self.update_student(model)

    def rollout(self, policy: BehaviorPolicy, prompts: list[list[int]], max_new_tokens: int, keys: torch.Tensor, *,
                batch: int | None = None) -> Rollout:
        """The policy's rollouts of prompts from vLLM, rows following `prompts`, on the student's device. batch (a KV
        budget in sequences) is not vLLM's: its memory is `rollout.gpu_memory_utilization` / `kv_cache_bytes`."""
        if len(keys) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts need as many keys, got {len(keys)}")
        rollout = self.engine.generate(policy, prompts, max_new_tokens, keys.cpu())
        self.stats.batch = self.engine.settings.max_num_seqs
        self.stats.tokens += int(rollout.completion_mask.sum())
        self.stats.rows = max(self.stats.rows, min(len(prompts), self.stats.batch))
        return rollout.to(self.device)

    def update_student(self, model: nn.Module) -> None:
        """vLLM's student takes `model`'s weights (`VLLMEngine.load_student`); the teacher stays as loaded."""
        self.engine.load_student(model)

    def close(self) -> None:
        self.engine.close()


def vllm_rollouts(cfg, model: nn.Module, vocab: VocabSpace, longest: int = 0) -> VLLMRollouts:
    """The vLLM engine of a training run (cfg: its `trb.config.TrainConfig`, rollout.engine=vllm): the run's pair
    from disk, the `rollout` section's knobs, the in-memory student `model`; its student engine started, so that
    settings vLLM cannot run (memory, lengths) fail before the first step."""
    r = cfg.rollout
    settings = VLLMSettings(gpu_memory_utilization=r.gpu_memory_utilization, kv_cache_bytes=r.kv_cache_bytes,
                            max_num_seqs=r.max_num_seqs, max_model_len=r.max_model_len, dtype=r.dtype, sleep=r.sleep,
                            enforce_eager=r.enforce_eager)
    rollouts = VLLMRollouts(cfg.models.student, cfg.models.teacher, vocab, settings, model, longest=longest,
                            seed=cfg.seed)
    rollouts.engine.start(StudentPolicy())  # the first call (step 0's evaluation) samples the student
    return rollouts
