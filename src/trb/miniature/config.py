"""What `trb prepare` is asked to make: model shapes, the SFT recipes, the sizes of the data and the student's target
window (`PrepareConfig`), the presets of the shipped settings, and what a run's output folder may hold
(`finished_pair`). Building and checking one imports no torch."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from trb.errors import TrbError, require

SAVE_DTYPES = ("float32", "bfloat16")  # storage of the shipped weights


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

STUDENT = ModelSize(layers=3, hidden=128, heads=4, kv_heads=2, intermediate=256)  # every preset's student


def _recipe(steps: int, warmup: int, label_smoothing: float = 0.0) -> SFTConfig:
    """The presets' SFT: batches of 64, lr 2e-3 with warmup then cosine to 0, weight decay 0.1."""
    return SFTConfig(batch_size=64, steps=steps, lr=2e-3, warmup=warmup, weight_decay=0.1, schedule="cosine",
                     label_smoothing=label_smoothing)


PRESETS = {
    "arith": PrepareConfig(
        vocab_size=256, num_train=100_000, num_val=256, num_test=400,
        teacher=ModelSize(layers=5, hidden=192, heads=6, kv_heads=2, intermediate=640), student=STUDENT,
        teacher_sft=_recipe(1800, 100), student_sft=_recipe(1500, 50, ARITH_SMOOTHING),
        student_window=(0.05, 0.50), eval_every=250,
    ),
    "word": PrepareConfig(
        vocab_size=512, num_train=100_000, num_val=256, num_test=400,
        teacher=ModelSize(layers=6, hidden=224, heads=7, kv_heads=1, intermediate=672), student=STUDENT,
        teacher_sft=_recipe(2000, 100), student_sft=_recipe(3000, 50, WORD_SMOOTHING),
        student_window=(0.05, 0.50), eval_every=250,
    ),
    # A regime where early rollouts stay uninformative: 6-10 dependent steps (one wrong digit ruins the rest), so a
    # student of the arith student's size and recipe starts at pass@1 <= 0.08 at T = 1. The shipped teacher is the
    # arith teacher trained 1,200 more steps on chain problems (--teacher-from, --teacher-more-steps; see
    # studies/regime.sh); the 6-layer teacher below, from scratch, is this preset's alternative (~3 h on 2 cores).
    "chain": PrepareConfig(
        vocab_size=256, num_train=100_000, num_val=256, num_test=400,
        teacher=ModelSize(layers=6, hidden=256, heads=8, kv_heads=2, intermediate=768), student=STUDENT,
        teacher_sft=_recipe(2500, 100), student_sft=_recipe(1500, 50, CHAIN_SMOOTHING),
        student_window=(0.01, 0.08), eval_every=250, teacher_target=0.85, max_new_tokens=160,
    ),
}


def with_steps(config: PrepareConfig, teacher_steps: int | None, student_steps: int | None) -> PrepareConfig:
    """The preset with other SFT step budgets (None: the preset's); a warmup longer than half the budget is cut to
    half of it."""
    def budget(sft_config: SFTConfig, steps: int | None) -> SFTConfig:
        if steps is None:
            return sft_config
        return replace(sft_config, steps=steps, warmup=min(sft_config.warmup, steps // 2))

    return replace(config, teacher_sft=budget(config.teacher_sft, teacher_steps),
                   student_sft=budget(config.student_sft, student_steps))


# ------------------------------------------------------------------------------------------------------------------
# A prepare run's settings, and the output folder it may write to
# ------------------------------------------------------------------------------------------------------------------

RESUME = ".resume"  # a stopped run's stages (trb.miniature.storage); settings.json in it holds its settings
REPORT = "prepare.json"  # a finished run's report; its "settings" say what the run was asked to make


def prepare_settings(source: str, config: PrepareConfig, teacher_from, teacher_more_steps: int, student_from) -> dict:
    """What a prepare run is asked to make, as JSON reads it back (tuples become lists): a rerun is compared with it."""
    return json.loads(json.dumps({
        "source": source, "config": asdict(config),
        "teacher_from": None if teacher_from is None else str(teacher_from),
        "teacher_more_steps": teacher_more_steps,
        "student_from": None if student_from is None else str(student_from),
    }))


def differences(saved: dict, new: dict, prefix: str = "") -> list[str]:
    """'key: saved -> new' for every (nested) key whose value differs."""
    out = []
    for key in sorted(set(saved) | set(new)):
        a, b = saved.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a} -> {b}")
    return out


def report_settings(report: dict) -> dict:
    """The settings a finished run's report records (reports written before they held them: rebuilt from the
    source, the config and the reused models' folders)."""
    if "settings" in report:
        return report["settings"]
    return {"source": report.get("source"), "config": report.get("config"),
            "teacher_from": report.get("teacher", {}).get("reused_from"),
            "teacher_more_steps": report.get("teacher", {}).get("more_sft_steps", 0),
            "student_from": report.get("student", {}).get("reused_from")}


def finished_pair(out_dir: Path, settings: dict, overwrite: bool) -> dict | None:
    """The report of the finished pair in out_dir when it was made with these settings (the same command again:
    nothing to do), else None: out_dir holds no finished pair, or overwrite says to make it again. A finished pair of
    other settings, or teacher/ or student/ folders that no prepare run describes, are refused (PrepareError) and
    nothing is touched. A stopped run (out_dir/.resume) is left to `prepare`, which continues it."""
    if overwrite or not out_dir.is_dir() or (out_dir / RESUME).is_dir():
        return None
    if not (out_dir / REPORT).is_file():
        models = [role for role in ("teacher", "student") if (out_dir / role).exists()]
        if models:
            raise PrepareError(f"{out_dir} holds {' and '.join(f'{m}/' for m in models)} but no {REPORT} of a "
                               "finished pair; choose another --out, or pass --overwrite to replace them")
        return None
    try:
        report = json.loads((out_dir / REPORT).read_text())
    except ValueError:
        raise PrepareError(f"{out_dir / REPORT} is unreadable; choose another --out, or pass --overwrite to make the "
                           "pair again") from None
    changed = differences(report_settings(report), settings)
    if changed:
        shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise PrepareError(f"{out_dir} holds a finished pair made with other settings ({shown}); nothing was "
                           "changed: choose another --out, or pass --overwrite to replace it")
    return report
