"""The pieces of a run that the loop and the SFT warmup drive: the optimizer and its lr schedule, the inference copy
that decodes the student, the (data-parallel) training forwards, and the calls that decode a step's rollouts,
accumulate gradients over micro-batches and step the optimizer."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from trb import distributed
from trb.core import linear_ramp, stream_seed
from trb.forward import FinalHidden, token_logp
from trb.inference import InferenceCopy
from trb.rollout import BehaviorPolicy, Engine, RolloutStats, build_engine
from trb.sequences import Rollout

if TYPE_CHECKING:
    from trb.config import TrainConfig
    from trb.loading import Setup


def rollout_engine(cfg: TrainConfig, s: Setup, model: torch.nn.Module) -> Engine:
    """The run's rollout engine (`rollout.engine`) decoding `model`, the student's inference copy: trb's own
    (`trb.rollout.build_engine`; a loss that reuses the teacher log-probs recorded while decoding takes its
    diagnostics from the records too), or vLLM's (`trb.vllm.rollouts`: the run's pair from disk, `model`'s weights
    pushed, its student engine started, so settings it cannot run fail before the first step)."""
    if cfg.rollout.engine == "vllm":
        from trb.vllm.rollouts import vllm_rollouts

        return vllm_rollouts(cfg, model, s.vocab, max(map(len, s.prompts)) + cfg.max_new_tokens)
    return build_engine(cfg, model, s.teacher, s.vocab, record_topk=cfg.loss.record_topk,
                        record_kl=cfg.loss.recorded is not None)


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class Trainer:
    """The pieces of one run the loop body uses: models, optimizer, the data-parallel hidden-state module, the rollout
    engine."""

    def __init__(self, cfg: TrainConfig, s: Setup):
        self.cfg, self.s = cfg, s
        # Rollouts and evaluation decode a plain copy of the student (full weights, LoRA merged, bf16 under bf16
        # autocast on a GPU), built before the student is sharded and refreshed after every update.
        decode_dtype = torch.bfloat16 if s.bf16 and s.device.type == "cuda" else next(s.student.parameters()).dtype
        self.inference = InferenceCopy(s.student, decode_dtype, sharded=s.world.active and cfg.distributed == "fsdp")
        self.engine = rollout_engine(cfg, s, self.inference.model)
        hidden = FinalHidden(s.student, cfg.loss.length_groups, cfg.loss.compile, cfg.models.forward)
        self.teacher_hidden = FinalHidden(s.teacher, cfg.loss.length_groups, cfg.loss.compile, cfg.models.forward)
        self.hidden = distributed.wrap(hidden, s.student, cfg.distributed, s.world)
        self.optimizer = torch.optim.AdamW(trainable(s.student), lr=cfg.lr, betas=cfg.adam_betas,
                                           weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: linear_ramp(step + 1, 0.0, 1.0, cfg.warmup_steps))

    @property
    def decoder(self) -> str:
        """What decodes the student's rollouts: "vllm" with rollout.engine=vllm; otherwise as
        `trb.rollout.make_decoder` chooses, "lean" where the config's models.forward allows it and the inference copy
        supports it, "hugging face" otherwise."""
        if self.cfg.rollout.engine == "vllm":
            return "vllm"
        return "lean" if self.cfg.models.forward != "hf" and self.inference.lean else "hugging face"

    def my_sequences(self, count: int) -> list[int]:
        """Indices of the step's sequences this rank decodes: every world-size-th one."""
        return list(range(self.s.world.rank, count, self.s.world.size))

    def decode(self, step: int, policy: BehaviorPolicy, sequences: list[list[int]]) -> list[Rollout]:
        """This rank's rollouts of the step through the run's engine (`trb.rollout.Engine`); the engine's stats are
        those of this call. Sequence i's randomness is keyed by (seed, step, i): the rollouts do not depend on the
        world size or on which sequences share a batch."""
        s, cfg = self.s, self.cfg
        mine = self.my_sequences(len(sequences))
        keys = torch.tensor([stream_seed(cfg.seed, step, i, "rollout") & 0xFFFFFFFF for i in mine])
        self.engine.stats = RolloutStats()
        with s.autocast:
            return [self.engine.rollout(policy, [sequences[i] for i in mine], cfg.max_new_tokens, keys)]

    @torch.no_grad()
    def fill_token_logp(self, rollout: Rollout, teacher: bool = False) -> Rollout:
        """rollout with the sampled tokens' log-probs under the student (and with `teacher`, the teacher) where the
        engine did not record them (vLLM records neither): one no-grad pass of the inference copy (the teacher)
        through the training forward's path (`trb.forward.token_logp`)."""
        s, groups = self.s, self.cfg.loss.length_groups
        with s.autocast:
            if rollout.student_logp is None:
                rollout = replace(rollout, student_logp=token_logp(self.inference.model, rollout, s.vocab, groups))
            if teacher and rollout.teacher_logp is None:
                rollout = replace(rollout, teacher_logp=token_logp(s.teacher, rollout, s.vocab, groups))
        return rollout

    def refresh(self) -> None:
        """After the student's weights changed (an update, a resume, the SFT warmup): the inference copy, then the
        engine, hold them."""
        self.inference.refresh()
        self.engine.update_student(self.inference.model)

    def backward(self, micro_batches: list[Rollout], loss_fn) -> None:
        """loss_fn(micro) -> scalar for each micro-batch; gradients synchronized once, on the last one. Each rank's
        loss is scaled by the world size because data-parallel gradient reduction averages over ranks."""
        for k, micro in enumerate(micro_batches):
            with distributed.gradient_sync(self.hidden, self.s.student, self.cfg.distributed, self.s.world,
                                           enabled=k == len(micro_batches) - 1):
                with self.s.autocast:
                    loss = loss_fn(micro)
                (loss * self.s.world.size).backward()
        distributed.finish_gradients(self.s.student, self.cfg.distributed, self.s.world)

    def micro_batches(self, rollouts: list[Rollout]) -> list[Rollout]:
        size = self.cfg.micro_batch
        return [r.select(slice(i, i + size)) for r in rollouts for i in range(0, len(r.stopped), size)]

    def optimizer_step(self) -> tuple[float, float]:
        """Clip, check, step, refresh the inference copy. Returns (grad norm, lr used)."""
        grad_norm = distributed.clip_grad_norm(trainable(self.s.student), self.cfg.grad_clip)
        lr = self.scheduler.get_last_lr()[0]
        if math.isfinite(grad_norm):
            self.optimizer.step()
            self.scheduler.step()
            self.refresh()
        return grad_norm, lr
