"""Supervised fine-tuning of the miniature's models on worked solutions, fed exactly as the rollout engine samples
them: each batch is the sequence record of its prompts and completions (`trb.sequences.rollout_from_tokens`: prompt
left-padded, completion = solution + EOS right after it, positions counted over real tokens), and the loss is the
cross-entropy of the completion tokens only (`completion_select`, the positions the distillation loss reads)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import PreTrainedModel

from trb.forward import completion_select
from trb.miniature.config import SFTConfig
from trb.models import VocabSpace
from trb.sequences import Rollout, rollout_from_tokens

POOL = 4  # batches sorted together by length: padding falls from ~26% of the tokens to ~10%


def sft_loss(model: PreTrainedModel, batch: Rollout, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy (nats per completion token) over the batch's completion tokens, fp32; with label_smoothing
    the target is (1 - label_smoothing) * one-hot + label_smoothing * uniform over the vocabulary."""
    input_ids, attention_mask, positions = batch.sequences()  # (B, L)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits[:, :-1]
    mask = completion_select(batch)[:, :-1]  # (B, L - 1): the logits that predict a completion token
    targets = input_ids[:, 1:][mask]  # (N,)
    return F.cross_entropy(logits[mask].float(), targets, label_smoothing=label_smoothing)


def lr_factor(step: int, config: SFTConfig) -> float:
    """Multiplier of config.lr at optimizer step `step` (0-based): linear warmup, then constant or cosine to 0."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    if config.schedule == "constant":
        return 1.0
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


def epoch_batches(lengths: torch.Tensor, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """One epoch of batches of problem indices: a random permutation cut into pools of POOL batches, each pool sorted
    by sequence length and cut into batches (similar lengths, little padding), then all batches shuffled. A last
    partial batch is dropped (kept when it is the only one)."""
    order = torch.randperm(len(lengths), generator=generator)  # (n,)
    batches = []
    for pool in order.split(POOL * batch_size):
        pool = pool[torch.argsort(lengths[pool], stable=True)]
        batches += [b.tolist() for b in pool.split(batch_size) if len(b) == batch_size or len(lengths) < batch_size]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


class Progress:
    """A stage's progress bar (tqdm, on stderr when it is a terminal: none in a log file) and log lines: the mean loss
    since the last line, the lr and the rate, about ten lines per stage."""

    def __init__(self, name: str, config: SFTConfig, done: int, log: Callable[[str], None]):
        self.name, self.config, self.done, self.log = name, config, done, log
        self.every = max(1, min(200, config.steps // 10))
        self.window_loss, self.window_steps, self.recent_loss = 0.0, 0, float("nan")  # since the last log line
        self.start = time.perf_counter()
        self.bar = tqdm(total=config.steps, initial=done, desc=name, unit="step", dynamic_ncols=True, mininterval=1.0,
                        disable=None)

    def update(self, step: int, loss: float, lr: float) -> None:
        self.window_loss, self.window_steps = self.window_loss + loss, self.window_steps + 1
        self.recent_loss = self.window_loss / self.window_steps
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{self.recent_loss:.4f}", refresh=False)
        if step % self.every == 0 or step == self.config.steps:
            rate = (step - self.done) / (time.perf_counter() - self.start)
            self.log(f"{self.name} step {step}/{self.config.steps}  loss {self.recent_loss:.4f}  lr {lr:.2e}  "
                     f"{rate:.2f} steps/s")
            self.window_loss, self.window_steps = 0.0, 0


def sft(
    model: PreTrainedModel,
    prompts: list[list[int]],
    completions: list[list[int]],
    vocab: VocabSpace,
    config: SFTConfig,
    generator: torch.Generator,
    log: Callable[[str], None],
    name: str,
    stop: Callable[[int], bool] | None = None,
    stop_every: int = 0,
    resume: dict | None = None,
    interrupted: Callable[[], bool] = lambda: False,
) -> dict:
    """Train model in place; returns {"steps": optimizer steps taken, "final_loss": mean loss of the last logged
    window (or of the steps since), "stopped": whether interrupted() ended it}, and when stopped a "resume" entry.

    Data order: `epoch_batches` per epoch, drawn from `generator`; vocab gives the padding and EOS ids. stop(step) is
    asked after every stop_every-th step (steps counted from 1); training ends early when it returns True.
    interrupted() is asked after every step: when it returns True training stops there, and the result's "resume"
    entry (the step, the optimizer state, the generator state and the rest of the epoch's batches), passed back as
    `resume` with the same model, continues exactly where it stopped.
    """
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices decay; norms and biases do not
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.95),
    )
    lengths = torch.tensor([len(p) + len(c) for p, c in zip(prompts, completions)])  # (n,)
    batches: list[list[int]] = []
    done = 0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        generator.set_state(resume["generator"])
        batches, done = [list(b) for b in resume["batches"]], resume["step"]
    progress = Progress(name, config, done, log)
    step, stopped = done, False
    model.train()
    for step in range(done + 1, config.steps + 1):
        if not batches:
            batches = epoch_batches(lengths, config.batch_size, generator)
        rows = batches.pop()
        batch = rollout_from_tokens([prompts[i] for i in rows], [completions[i] for i in rows], vocab, model.device)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(step - 1, config)
        loss = sft_loss(model, batch, config.label_smoothing)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        progress.update(step, loss.item(), optimizer.param_groups[0]["lr"])
        if stop is not None and step % stop_every == 0:
            model.eval()
            early = stop(step)
            model.train()
            if early:
                break
        if interrupted() and step < config.steps:
            stopped = True
            break
    progress.bar.close()
    model.eval()
    result = {"steps": step, "final_loss": progress.recent_loss, "stopped": stopped}
    if stopped:
        result["resume"] = {"step": step, "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                            "batches": batches}
    return result
