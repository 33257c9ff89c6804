"""Make the miniature distillation pair: a strong teacher and a weak, undertrained "base" student.

The embedded default setting (METHOD.md: 8B -> 1.7B and 4B -> 0.6B teachers and students) is reproduced in
miniature: both models are small causal LMs of a standard Hugging Face architecture, trained here from scratch by
supervised fine-tuning (SFT) on worked solutions, with one tokenizer they share.

- The teacher is trained to high accuracy at temperature 1.0 (warmup + cosine lr, the full step budget).
- The student is a smaller model of the same family, trained on the same solutions with label smoothing: it learns
  the procedure, but it is under-confident, so at temperature 1.0 it samples a wrong token now and then, its rollouts
  derail and its pass@1 is low. This is the regime of the paper's base students: the capability is there, the
  sampled rollouts are poor, and distillation can move the student far. Its validation pass@1 is recorded every
  `eval_every` steps. With `student_early_stop` the student instead stops the first time its validation pass@1
  reaches `student_window` (a snapshot in the middle of training; slower to distill).
- `teacher_from` reuses the teacher and tokenizer of an earlier run (optionally training the teacher further:
  `teacher_more_steps`); `student_from` reuses an earlier student as well.

SFT feeds the models exactly as the rollout engine samples them: the prompt left-padded, the completion (solution +
EOS) right after it, position ids counted over real tokens from 0 (`trb.rollout.position_ids`), and the loss on the
completion tokens only. The tokenizer's prompt format ends in a newline, an isolated token, so prompt tokens +
solution tokens are the tokens of the joined text.

    trb prepare arith --out src/trb/assets/miniature/arith     # the shipped checkpoints, preset "arith"
    trb prepare my_gsm8k.jsonl --out runs/pair --preset word    # a user's problems with worked solutions
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from trb.checkpoint import flatten_optimizer, unflatten_optimizer
from trb.errors import TrbError, require
from trb.evaluate import EvalResult, evaluate
from trb.models import tiny_causal_lm, vocab_space
from trb.paths import resolve_builtin
from trb.sequences import left_pad, position_ids
from trb.tasks import SETTINGS, Problem, load_problems, tokenize_prompts, train_tokenizer
from trb.tasks.tokenizer import PROMPT_FORMAT
from trb.stopping import StopSignals

SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------------------------


class PrepareError(TrbError):
    """A prepare source, setting or output folder that cannot be used as given; the message names the fix."""


@dataclass(frozen=True)
class ModelSize:
    """A Qwen3-architecture causal LM's shape; the head dimension is hidden // heads."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int

    def __post_init__(self):
        for name in ("layers", "hidden", "heads", "kv_heads", "intermediate"):
            require(getattr(self, name) > 0, f"model {name} must be > 0, got {getattr(self, name)}")
        require(self.hidden % self.heads == 0, f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        require(self.heads % self.kv_heads == 0,
                 f"heads ({self.heads}) must be divisible by kv_heads ({self.kv_heads}) for grouped-query attention")
        require((self.hidden // self.heads) % 2 == 0,
                 f"head dimension hidden // heads = {self.hidden // self.heads} must be even (rotary embeddings)")


@dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning on worked solutions. schedule: "cosine" (warmup, then cosine decay to 0) or
    "constant" (warmup, then constant)."""

    batch_size: int
    steps: int  # the budget; the student usually stops earlier
    lr: float
    warmup: int
    weight_decay: float
    schedule: str
    grad_clip: float = 1.0
    label_smoothing: float = 0.0  # mass spread over the whole vocabulary at every target: a less confident model

    def __post_init__(self):
        require(self.batch_size > 0, f"batch_size must be > 0, got {self.batch_size}")
        require(self.steps > 0, f"steps must be > 0, got {self.steps}")
        require(math.isfinite(self.lr) and self.lr > 0, f"lr must be a finite number > 0, got {self.lr}")
        require(0 <= self.warmup < self.steps, f"warmup must lie in [0, steps = {self.steps}), got {self.warmup}")
        require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        require(self.schedule in ("cosine", "constant"),
                 f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        require(self.grad_clip > 0, f"grad_clip must be > 0, got {self.grad_clip}")
        require(0 <= self.label_smoothing < 1, f"label_smoothing must lie in [0, 1), got {self.label_smoothing}")


@dataclass(frozen=True)
class PrepareConfig:
    vocab_size: int  # the tokenizer's maximum (special tokens included); small texts give fewer
    num_train: int  # train problems for SFT (the validation slice comes on top)
    num_val: int  # held-out slice of the train split, for the student's early stopping
    num_test: int  # test problems of the final evaluation
    teacher: ModelSize
    student: ModelSize
    teacher_sft: SFTConfig
    student_sft: SFTConfig
    student_window: tuple[float, float]  # the student's pass@1 target: a warning when it ends outside [lo, hi]
    eval_every: int  # steps between the student's validation evaluations
    student_early_stop: bool = False  # stop the student the first time its validation pass@1 reaches the window
    eval_samples: int = 4  # n of avg@n pass@1, validation and test
    teacher_target: float = 0.90  # test pass@1 below this is reported as a failure
    max_new_tokens: int = 96
    save_dtype: str = "bfloat16"  # storage of the shipped weights; they load back to fp32 with dtype=torch.float32
    seed: int = 0

    def __post_init__(self):
        require(self.vocab_size >= 128,
                 f"vocab_size must be >= 128 (the byte alphabet alone has 100 symbols), got {self.vocab_size}")
        for name in ("num_train", "num_val", "num_test", "eval_every", "eval_samples", "max_new_tokens"):
            require(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        lo, hi = self.student_window
        require(0 <= lo < hi <= 1, f"student_window must be (lo, hi) with 0 <= lo < hi <= 1, got {self.student_window}")
        require(0 < self.teacher_target <= 1, f"teacher_target must lie in (0, 1], got {self.teacher_target}")
        require(self.save_dtype in SAVE_DTYPES,
                 f"save_dtype must be one of {sorted(SAVE_DTYPES)}, got {self.save_dtype!r}")


# Label smoothing of the students: chosen so that the trained student's pass@1 at temperature 1.0 lands in the window.
ARITH_SMOOTHING = 0.06
WORD_SMOOTHING = 0.06
CHAIN_SMOOTHING = 0.04

PRESETS = {
    "arith": PrepareConfig(
        vocab_size=256,
        num_train=100_000,
        num_val=256,
        num_test=400,
        teacher=ModelSize(layers=5, hidden=192, heads=6, kv_heads=2, intermediate=640),
        student=ModelSize(layers=3, hidden=128, heads=4, kv_heads=2, intermediate=256),
        teacher_sft=SFTConfig(batch_size=64, steps=1800, lr=2e-3, warmup=100, weight_decay=0.1, schedule="cosine"),
        student_sft=SFTConfig(batch_size=64, steps=1500, lr=2e-3, warmup=50, weight_decay=0.1, schedule="cosine",
                              label_smoothing=ARITH_SMOOTHING),
        student_window=(0.05, 0.50),
        eval_every=250,
    ),
    "word": PrepareConfig(
        vocab_size=512,
        num_train=100_000,
        num_val=256,
        num_test=400,
        teacher=ModelSize(layers=6, hidden=224, heads=7, kv_heads=1, intermediate=672),
        student=ModelSize(layers=3, hidden=128, heads=4, kv_heads=2, intermediate=256),
        teacher_sft=SFTConfig(batch_size=64, steps=2000, lr=2e-3, warmup=100, weight_decay=0.1, schedule="cosine"),
        student_sft=SFTConfig(batch_size=64, steps=3000, lr=2e-3, warmup=50, weight_decay=0.1, schedule="cosine",
                              label_smoothing=WORD_SMOOTHING),
        student_window=(0.05, 0.50),
        eval_every=250,
    ),
    # A regime where early rollouts stay uninformative: 6-10 dependent steps (one wrong digit ruins the rest), so a
    # student of the arith student's size and recipe starts at pass@1 <= 0.08 at T = 1. The shipped teacher is the
    # arith teacher trained 1,200 more steps on chain problems (--teacher-from, --teacher-more-steps; see
    # studies/regime.sh); the 6-layer teacher below, from scratch, is this preset's alternative (~3 h on 2 cores).
    "chain": PrepareConfig(
        vocab_size=256,
        num_train=100_000,
        num_val=256,
        num_test=400,
        teacher=ModelSize(layers=6, hidden=256, heads=8, kv_heads=2, intermediate=768),
        student=ModelSize(layers=3, hidden=128, heads=4, kv_heads=2, intermediate=256),
        teacher_sft=SFTConfig(batch_size=64, steps=2500, lr=2e-3, warmup=100, weight_decay=0.1, schedule="cosine"),
        student_sft=SFTConfig(batch_size=64, steps=1500, lr=2e-3, warmup=50, weight_decay=0.1, schedule="cosine",
                              label_smoothing=CHAIN_SMOOTHING),
        student_window=(0.01, 0.08),
        eval_every=250,
        teacher_target=0.85,
        max_new_tokens=160,
    ),
}


# ------------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------------


def split_problems(source: str, config: PrepareConfig) -> dict[str, list[Problem]]:
    """train / val / test problems of a synthetic setting or a problem file.

    Setting: train and val are disjoint draws of the train split, test of the (hash-disjoint) test split. File: the
    distinct questions ordered by a hash of their text (independent of file order and seed), then test, val and train
    are consecutive slices, so the same file always splits the same way.
    """
    if source in SETTINGS:
        drawn = SETTINGS[source]("train", config.num_val + config.num_train, config.seed)
        return {
            "train": drawn[config.num_val :],
            "val": drawn[: config.num_val],
            "test": SETTINGS[source]("test", config.num_test, config.seed),
        }
    path = Path(source)
    if not path.is_file():
        raise PrepareError(f"source must be a setting ({', '.join(SETTINGS)}) or a problem file; {source!r} is neither")
    unique = {p.question: p for p in load_problems(path)}  # a repeated question would straddle two splits
    ordered = sorted(unique.values(), key=lambda p: hashlib.sha256(p.question.encode()).digest())
    n_heldout = config.num_test + config.num_val
    if len(ordered) <= n_heldout:
        raise PrepareError(
            f"{path} has {len(ordered)} distinct problems, not enough for num_test = {config.num_test} + "
            f"num_val = {config.num_val} + at least one train problem; lower num_test / num_val"
        )
    return {
        "train": ordered[n_heldout : n_heldout + config.num_train],
        "val": ordered[config.num_test : n_heldout],
        "test": ordered[: config.num_test],
    }


def sft_batch(
    prompts: list[list[int]], completions: list[list[int]], pad_id: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """The training input of prompt + completion pairs, laid out like a rollout (`Rollout.sequences`).

    Prompts are left-padded to P, completions (solution + EOS) right-padded to T. Returns input_ids, attention_mask
    and position_ids (B, P + T), and loss_mask (B, P + T - 1): 1 where the logits at a position predict a completion
    token, i.e. the target input_ids[:, 1:] is a completion token.
    """
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, device)  # (B, P)
    width = max(len(c) for c in completions)
    completion_ids = torch.full((len(completions), width), pad_id, dtype=torch.long)  # (B, T)
    completion_mask = torch.zeros((len(completions), width), dtype=torch.bool)  # (B, T)
    for row, completion in enumerate(completions):
        completion_ids[row, : len(completion)] = torch.tensor(completion, dtype=torch.long)
        completion_mask[row, : len(completion)] = True
    input_ids = torch.cat([prompt_ids, completion_ids.to(device)], dim=1)  # (B, P + T)
    attention_mask = torch.cat([prompt_mask, completion_mask.to(device)], dim=1)  # (B, P + T)
    loss_mask = torch.zeros_like(attention_mask[:, 1:])  # (B, P + T - 1)
    loss_mask[:, prompt_ids.shape[1] - 1 :] = completion_mask.to(device)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids(attention_mask),
        "loss_mask": loss_mask,
    }


def sft_loss(model: PreTrainedModel, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy (nats per completion token) over the batch's completion tokens, fp32; with label_smoothing
    the target is (1 - label_smoothing) * one-hot + label_smoothing * uniform over the vocabulary."""
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
    ).logits[:, :-1]  # (B, L - 1, V)
    mask = batch["loss_mask"]  # (B, L - 1)
    targets = batch["input_ids"][:, 1:][mask]  # (N,)
    return F.cross_entropy(logits[mask].float(), targets, label_smoothing=label_smoothing)


def lr_factor(step: int, config: SFTConfig) -> float:
    """Multiplier of config.lr at optimizer step `step` (0-based): linear warmup, then constant or cosine to 0."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    if config.schedule == "constant":
        return 1.0
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------------------------

POOL = 4  # batches sorted together by length: padding falls from ~26% of the tokens to ~10%


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


def sft(
    model: PreTrainedModel,
    prompts: list[list[int]],
    completions: list[list[int]],
    pad_id: int,
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

    Data order: `epoch_batches` per epoch, drawn from `generator`. stop(step) is asked after every stop_every-th step
    (steps counted from 1); training ends early when it returns True. interrupted() is asked after every step: when
    it returns True training stops there, and the result's "resume" entry (the step, the optimizer state, the
    generator state and the rest of the epoch's batches), passed back as `resume` with the same model, continues
    exactly where it stopped. A progress bar (tqdm, on stderr) shows the steps, their rate and the time left.
    """
    device = model.device
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
    log_every = max(1, min(200, config.steps // 10))
    window_loss, window_steps, recent_loss = 0.0, 0, float("nan")  # mean loss since the last log line
    start, step, stopped = time.perf_counter(), done, False
    bar = tqdm(total=config.steps, initial=done, desc=name, unit="step", dynamic_ncols=True, mininterval=1.0)
    model.train()
    for step in range(done + 1, config.steps + 1):
        if not batches:
            batches = epoch_batches(lengths, config.batch_size, generator)
        rows = batches.pop()
        batch = sft_batch([prompts[i] for i in rows], [completions[i] for i in rows], pad_id, device)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(step - 1, config)
        loss = sft_loss(model, batch, config.label_smoothing)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window_loss, window_steps = window_loss + loss.item(), window_steps + 1
        recent_loss = window_loss / window_steps
        bar.update(1)
        bar.set_postfix(loss=f"{recent_loss:.4f}", refresh=False)
        if step % log_every == 0 or step == config.steps:
            rate = (step - done) / (time.perf_counter() - start)
            log(f"{name} step {step}/{config.steps}  loss {recent_loss:.4f}  "
                f"lr {optimizer.param_groups[0]['lr']:.2e}  {rate:.2f} steps/s")
            window_loss, window_steps = 0.0, 0
        if stop is not None and step % stop_every == 0:
            model.eval()
            early = stop(step)
            model.train()
            if early:
                break
        if interrupted() and step < config.steps:
            stopped = True
            break
    bar.close()
    model.eval()
    result = {"steps": step, "final_loss": recent_loss, "stopped": stopped}
    if stopped:
        result["resume"] = {"step": step, "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                            "batches": batches}
    return result


# ------------------------------------------------------------------------------------------------------------------
# The pipeline
# ------------------------------------------------------------------------------------------------------------------


def _new_model(size: ModelSize, tokenizer: PreTrainedTokenizerBase, max_positions: int, seed: int,
               device: torch.device) -> PreTrainedModel:
    model = tiny_causal_lm(
        len(tokenizer), size.hidden, size.layers, size.heads, size.kv_heads, size.intermediate,
        max_positions=max_positions, seed=seed,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
        do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
    )
    return model.to(device)


def _size_of(model: PreTrainedModel) -> dict:
    c = model.config
    return asdict(ModelSize(c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
                            c.intermediate_size))


def _parameters(model: PreTrainedModel) -> int:
    return sum(p.numel() for p in model.parameters())  # tied embeddings counted once


def _save_and_reload(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path, dtype: str,
                     device: torch.device) -> PreTrainedModel:
    """Save model + tokenizer as a Hugging Face checkpoint and load it back in fp32: what ships is what is
    evaluated."""
    folder.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(model).to(SAVE_DTYPES[dtype]).save_pretrained(folder)  # a copy: .to() would round model in place
    tokenizer.save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()


# A stopped run keeps out_dir/.resume/: settings.json (what it was asked to do) and one folder per SFT stage that ran
# (teacher, student): the model in fp32, stage.json (steps, loss, wall time, done or not, the student's validation
# curve) and, for an unfinished stage, resume.safetensors (optimizer state and data-order generator state). Rerunning
# the same command continues from there; a finished run removes the folder.
RESUME = ".resume"


def _save_stage(folder: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, result: dict,
                extra: dict) -> None:
    """One SFT stage's state under out_dir/.resume/<role>, written aside and renamed into place (a kill while saving
    keeps the previous state)."""
    partial, stale = folder.with_name(f".{folder.name}.partial"), folder.with_name(f".{folder.name}.stale")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    state = {"steps": result["steps"], "final_loss": result["final_loss"], "done": not result["stopped"], **extra}
    if result["stopped"]:
        resume = result["resume"]
        tensors, optimizer_meta = flatten_optimizer(resume["optimizer"])
        save_file({**tensors, "generator": resume["generator"]}, str(partial / "resume.safetensors"))
        state["resume"] = {"step": resume["step"], "batches": resume["batches"], "optimizer": optimizer_meta}
    (partial / "stage.json").write_text(json.dumps(state))
    if folder.exists():
        shutil.rmtree(stale, ignore_errors=True)
        os.rename(folder, stale)
    os.rename(partial, folder)
    shutil.rmtree(stale, ignore_errors=True)


def _load_stage(folder: Path, device: torch.device) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict]:
    """(model in fp32, tokenizer, stage.json with its "resume" entry ready for `sft`) of a saved stage."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    state = json.loads((folder / "stage.json").read_text())
    if not state["done"]:
        tensors = load_file(str(folder / "resume.safetensors"))
        generator = tensors.pop("generator")
        optimizer = unflatten_optimizer(tensors, state["resume"]["optimizer"])
        optimizer["state"] = {int(k): v for k, v in optimizer["state"].items()}  # torch keys parameters by index
        state["resume"] = {**state["resume"], "optimizer": optimizer, "generator": generator}
    return model, AutoTokenizer.from_pretrained(folder), state


def _prepared_folder(folder: str | Path, role: str) -> Path:
    folder = resolve_builtin(str(folder))  # a folder, or trb:miniature/<setting>/<role>
    if not (folder / "config.json").is_file():
        raise PrepareError(f"{role}_from must be a prepared {role} folder (config.json, weights, tokenizer); "
                         f"{folder} has no config.json")
    return folder


def _earlier_run(folder: Path, role: str) -> dict | None:
    """The report entry of an earlier run for its model in `folder` (with its wall times and hardware) when the run's
    prepare.json sits next to the model's folder."""
    earlier = folder.parent / "prepare.json"
    if not earlier.is_file():
        return None
    report = json.loads(earlier.read_text())
    return {"report": report.get(role), "wall_s": report.get("wall_s"), "hardware": report.get("hardware")}


def _reuse(folder: Path, role: str, device: torch.device, log: Callable[[str], None]
           ) -> tuple[PreTrainedModel, dict | None]:
    """A model of an earlier run, and that run's report entry for it (`_earlier_run`)."""
    folder = _prepared_folder(folder, role)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    log(f"{role}: reused from {folder}")
    return model, _earlier_run(folder, role)


def _differences(saved: dict, new: dict, prefix: str = "") -> list[str]:
    """'key: saved -> new' for every (nested) key whose value differs."""
    out = []
    for key in sorted(set(saved) | set(new)):
        a, b = saved.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a} -> {b}")
    return out


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def prepare(
    source: str, out_dir: str | Path, config: PrepareConfig, device: str = "cpu", log: Callable[[str], None] = print,
    teacher_from: str | Path | None = None,
    teacher_more_steps: int = 0,
    student_from: str | Path | None = None,
) -> dict:
    """Train the tokenizer, teacher and student for `source` (a setting name or a problem file), save them under
    out_dir/{teacher,student}, and write out_dir/prepare.json (the returned report).

    teacher_from: the teacher/ folder of an earlier run on the same source; its tokenizer and teacher are reused (and
    its run's report entry for the teacher is carried over when that run's prepare.json exists).
    teacher_more_steps: continue the reused teacher's SFT for this many steps (warmup, then cosine from half the
    preset's lr), e.g. when it misses its target. student_from: likewise reuse an earlier run's student (evaluated,
    not trained).

    SIGINT / SIGTERM during SFT stop the run after the current step: the model trained so far is saved as a loadable
    checkpoint in out_dir/<role> (in save_dtype; with a finished teacher, both), its exact training state in
    out_dir/.resume, and the report {"status": "stopped", ...} is returned. Calling prepare again with the same
    arguments continues from there and gives the same models as an uninterrupted run; other arguments are refused.
    """
    out_dir, device = Path(out_dir), torch.device(device)
    if (teacher_more_steps or student_from is not None) and teacher_from is None:
        raise PrepareError("teacher_more_steps and student_from need teacher_from (the tokenizer comes with it)")
    resume_dir = out_dir / RESUME
    settings = json.loads(json.dumps({
        "source": source, "config": asdict(config), "teacher_from": None if teacher_from is None else str(teacher_from),
        "teacher_more_steps": teacher_more_steps, "student_from": None if student_from is None else str(student_from),
    }))  # as JSON reads it back (tuples become lists)
    stages: dict[str, tuple] = {}
    if (resume_dir / "settings.json").is_file():
        saved = json.loads((resume_dir / "settings.json").read_text())
        differences = _differences(saved, settings)
        if differences:
            raise PrepareError(f"{out_dir} holds a stopped prepare run with other settings ({', '.join(differences)}); "
                               "rerun it with its own options to continue it, or choose another output folder")
        stages = {role: _load_stage(resume_dir / role, device) for role in ("teacher", "student")
                  if (resume_dir / role / "stage.json").is_file()}
        log(f"continuing the stopped run in {out_dir}: " + ", ".join(
            f"{role} {'finished' if state['done'] else 'at step ' + str(state['steps'])}"
            for role, (_, _, state) in stages.items()) if stages else f"continuing the stopped run in {out_dir}")
    wall: dict[str, float] = {}
    warnings: list[str] = []

    def warn(message: str) -> None:
        warnings.append(message)
        log(f"WARNING: {message}")

    # Data and tokenizer ---------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    splits = split_problems(source, config)
    train = splits["train"]
    if stages:  # the stopped run's tokenizer
        tokenizer = next(iter(stages.values()))[1]
    elif teacher_from is None:
        tokenizer = train_tokenizer([PROMPT_FORMAT.format(question=p.question) + p.solution for p in train],
                                    config.vocab_size)
    else:
        teacher_from = _prepared_folder(teacher_from, "teacher")
        tokenizer = AutoTokenizer.from_pretrained(teacher_from)
    prompts = tokenize_prompts(tokenizer, [p.question for p in train])
    solutions = tokenizer([p.solution for p in train], add_special_tokens=False)["input_ids"]
    completions = [s + [tokenizer.eos_token_id] for s in solutions]
    longest = max(len(c) for c in completions)
    if longest > config.max_new_tokens:
        n_long = sum(len(c) > config.max_new_tokens for c in completions)
        warn(f"{n_long} of {len(train)} train solutions exceed max_new_tokens = {config.max_new_tokens} "
             f"(longest {longest} tokens); evaluation truncates such answers")
    max_positions = max(512, max(map(len, prompts)) + max(longest, config.max_new_tokens))
    wall["data"] = time.perf_counter() - t0
    mean_tokens = sum(len(p) + len(c) for p, c in zip(prompts, completions)) / len(train)
    log(f"data: {len(train)} train / {len(splits['val'])} val / {len(splits['test'])} test problems, "
        f"vocabulary {len(tokenizer)}, {mean_tokens:.1f} tokens per sequence")

    def score(model: PreTrainedModel, problems: list[Problem], seed: int) -> EvalResult:
        return evaluate(model, tokenizer, problems, vocab_space(tokenizer, student=model),
                        n_samples=config.eval_samples, max_new_tokens=config.max_new_tokens, seed=seed)

    def timed_sft(role: str, model: PreTrainedModel, sft_config: SFTConfig, seed: int, extra=lambda: {},
                  **stopping) -> dict:
        """SFT of one stage (continued from its saved state when the stopped run got that far); when it ends or is
        stopped the stage is saved under out_dir/.resume and the model to out_dir/<role>."""
        earlier = stages.get(role, (None, None, {"done": False, "wall_s": 0.0}))[2]
        if earlier["done"]:
            log(f"{role}: finished before the stop ({earlier['steps']} steps)")
            wall[f"{role}_sft"] = earlier["wall_s"]
            return {"steps": earlier["steps"], "final_loss": earlier["final_loss"], "stopped": False}
        log(f"{role}: {_parameters(model):,} parameters")
        t = time.perf_counter()
        generator = torch.Generator().manual_seed(seed)  # data order; init is isolated by tiny_causal_lm(seed=)
        signals = StopSignals().install()  # SIGTERM / SIGINT end the stage after its current step
        try:
            with signals.phase(abandon=False):
                result = sft(model, prompts, completions, tokenizer.pad_token_id, sft_config, generator, log, role,
                             resume=earlier.get("resume"), interrupted=lambda: signals.received is not None,
                             **stopping)
        finally:
            signals.uninstall()
        wall[f"{role}_sft"] = earlier["wall_s"] + time.perf_counter() - t
        _save_stage(resume_dir / role, model, tokenizer, result, {"wall_s": wall[f"{role}_sft"], **extra()})
        _save_and_reload(model, tokenizer, out_dir / role, config.save_dtype, device)  # usable now, even if stopped
        return result

    def stopped(role: str, result: dict) -> dict:
        log(f"stopped at {role} step {result['steps']}: the {role} so far is in {out_dir / role}; rerun the same "
            "command to continue")
        return {"status": "stopped", "stage": role, "step": result["steps"], "out": str(out_dir),
                "models": {r: str(out_dir / r) for r in ("teacher", "student") if (out_dir / r).is_dir()}}

    if not stages:  # the data are good: from here on a stopped run can be continued
        resume_dir.mkdir(parents=True, exist_ok=True)
        (resume_dir / "settings.json").write_text(json.dumps(settings, indent=1))

    # Teacher: the full budget, cosine to 0 (or an earlier run's, optionally trained further) -------------------------
    earlier_runs: dict[str, dict | None] = {}
    if "teacher" in stages:
        teacher = stages["teacher"][0]
        if teacher_from is not None:
            earlier_runs["teacher"] = _earlier_run(_prepared_folder(teacher_from, "teacher"), "teacher")
    if teacher_from is None:
        if "teacher" not in stages:
            teacher = _new_model(config.teacher, tokenizer, max_positions, config.seed, device)
        teacher_sft = timed_sft("teacher", teacher, config.teacher_sft, config.seed)
    else:
        if "teacher" not in stages:
            teacher, earlier_runs["teacher"] = _reuse(teacher_from, "teacher", device, log)
        teacher_sft = {"steps": 0, "final_loss": float("nan"), "stopped": False}
        if teacher_more_steps > 0:
            more = replace(config.teacher_sft, steps=teacher_more_steps, lr=config.teacher_sft.lr / 2,
                           warmup=min(50, teacher_more_steps - 1))
            teacher_sft = timed_sft("teacher", teacher, more, config.seed + 2)
    if teacher_sft["stopped"]:
        return stopped("teacher", teacher_sft)

    # Student: label-smoothed SFT, validation pass@1 recorded (optionally stopped in the window) ----------------------
    lo, hi = config.student_window
    curve: list[tuple[int, float]] = []  # (step, validation pass@1)
    if "student" in stages:
        student = stages["student"][0]
        curve += [tuple(point) for point in stages["student"][2]["validation_curve"]]
    elif student_from is None:
        student = _new_model(config.student, tokenizer, max_positions, config.seed + 1, device)
    else:
        student, earlier_runs["student"] = _reuse(student_from, "student", device, log)

    def validate(step: int) -> bool:
        pass_at_1 = score(student, splits["val"], seed=config.seed).pass_at_1
        curve.append((step, pass_at_1))
        log(f"student step {step}: validation pass@1 {pass_at_1:.3f} (window {lo:.2f}-{hi:.2f})")
        return config.student_early_stop and pass_at_1 >= lo

    if student_from is None:
        student_sft = timed_sft("student", student, config.student_sft, config.seed + 1, stop=validate,
                                stop_every=config.eval_every, extra=lambda: {"validation_curve": curve})
        if student_sft["stopped"]:
            return stopped("student", student_sft)
    else:
        student_sft = {"steps": 0, "final_loss": float("nan")}
    if not curve or curve[-1][0] != student_sft["steps"]:
        validate(student_sft["steps"])
    last_val = curve[-1][1]
    if last_val < lo:
        warn(f"the student ends below the window: validation pass@1 {last_val:.3f} < {lo:.2f} after "
             f"{student_sft['steps']} steps; train longer, raise student_sft.lr or lower label_smoothing")
    elif last_val > hi:
        warn(f"the student ends above the window: validation pass@1 {last_val:.3f} > {hi:.2f} after "
             f"{student_sft['steps']} steps; raise label_smoothing (or stop early)")

    # Save, reload and evaluate what ships on the test split ---------------------------------------------------------
    report_models = {}
    for role, model, sft_result in (("teacher", teacher, teacher_sft), ("student", student, student_sft)):
        t = time.perf_counter()
        shipped = _save_and_reload(model, tokenizer, out_dir / role, config.save_dtype, device)
        result = score(shipped, splits["test"], seed=config.seed)
        log(f"{role}: test pass@1 {result.pass_at_1:.3f} (avg@{result.n_samples}, {len(splits['test'])} problems, "
            f"mean length {result.mean_length:.1f}, truncated {result.truncation_rate:.3f})")
        test = {**result.as_dict(), "n_problems": len(splits["test"])}
        if config.save_dtype != "float32":  # storage rounding must not cost accuracy: compare with the fp32 weights
            test["pass_at_1_fp32_weights"] = score(model, splits["test"], seed=config.seed).pass_at_1
            log(f"{role}: test pass@1 {test['pass_at_1_fp32_weights']:.3f} with the fp32 weights before saving")
        wall[f"{role}_eval"] = time.perf_counter() - t
        report_models[role] = {
            "parameters": _parameters(model),
            "size": _size_of(model),
            "sft_steps": sft_result["steps"],
            "final_train_loss": sft_result["final_loss"],
            "test": test,
            "examples": result.examples,
        }
    teacher_pass = report_models["teacher"]["test"]["pass_at_1"]
    report_models["teacher"]["meets_target"] = teacher_pass >= config.teacher_target
    if teacher_pass < config.teacher_target:
        warn(f"THE TEACHER MISSES ITS TARGET: test pass@1 {teacher_pass:.3f} < {config.teacher_target:.2f}; "
             "do not ship it: train longer or larger (teacher_sft.steps, teacher size)")
    for role, folder in (("teacher", teacher_from), ("student", student_from)):
        if folder is not None:
            report_models[role]["reused_from"] = str(folder)
            report_models[role]["earlier_run"] = earlier_runs[role]
    if teacher_more_steps > 0:
        report_models["teacher"]["more_sft_steps"] = teacher_more_steps
    report_models["student"]["validation_curve"] = curve
    report_models["student"]["in_window"] = lo <= last_val <= hi

    report = {
        "status": "completed",
        "source": source,
        "config": asdict(config),
        "data": {name: len(problems) for name, problems in splits.items()} | {"vocab_size": len(tokenizer)},
        **report_models,
        "parameter_ratio": report_models["teacher"]["parameters"] / report_models["student"]["parameters"],
        "wall_s": wall | {"total": sum(wall.values())},
        "warnings": warnings,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "hardware": {"device": str(device), "processor": platform.processor(), "cpu": _cpu_name(),
                     "threads": torch.get_num_threads()},
    }
    (out_dir / "prepare.json").write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(resume_dir)
    return report


def with_steps(config: PrepareConfig, teacher_steps: int | None, student_steps: int | None) -> PrepareConfig:
    """The preset with other SFT step budgets (None: the preset's); a warmup longer than half the budget is cut to
    half of it."""
    def budget(sft_config: SFTConfig, steps: int | None) -> SFTConfig:
        if steps is None:
            return sft_config
        return replace(sft_config, steps=steps, warmup=min(sft_config.warmup, steps // 2))

    return replace(config, teacher_sft=budget(config.teacher_sft, teacher_steps),
                   student_sft=budget(config.student_sft, student_steps))
