"""Loading a run: the CPU threads, the device, the student/teacher pair, the tokenizers and the data, each checked
before any heavy work (`setup`); the pair must share a tokenization and fit the context the run asks for, and a
warning says when max_new_tokens cuts many reference solutions short."""

from __future__ import annotations

import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trb import distributed
from trb.config import ConfigError, TrainConfig
from trb.core import stream_seed
from trb.models import CompatibilityError, add_lora, load_causal_lm, load_tokenizer, vocab_space
from trb.run_folder import RunDir
from trb.stopping import StopSignals
from trb.tasks import data_splits, format_prompt, tokenize_prompts


def set_threads(threads: int | None) -> str:
    """Set torch's CPU (intra-op) threads to `threads`; by default to OMP_NUM_THREADS where set (as `trb compare` and
    `trb demo` set it for their runs), else to the cores other work leaves idle (`busy_cores`, `idle_cores`). Torch's
    own default, every core, oversubscribes a busy machine. Returns the line that says what was chosen and why."""
    if threads is not None:
        torch.set_num_threads(threads)
        return f"torch threads: {threads}"
    if os.environ.get("OMP_NUM_THREADS"):
        return f"torch threads: {torch.get_num_threads()} (OMP_NUM_THREADS)"
    # the cores this process may run on (a container's or taskset's share on Linux; busy_cores counts the machine's)
    cores = len(os.sched_getaffinity(0)) if sys.platform == "linux" else os.cpu_count() or 1
    busy = busy_cores()
    torch.set_num_threads(idle_cores(cores, busy))
    return (f"torch threads: {idle_cores(cores, busy)} ({cores} cores, {busy:.1f} busy with other work; --threads N to "
            "choose)")


def idle_cores(cores: int, busy: float) -> int:
    """The cores other work leaves idle: the cores less the busy ones, rounded, at least 1."""
    return max(1, min(cores, math.floor(cores - busy + 0.5)))


def busy_cores(window_s: float = 0.3) -> float:
    """How many cores other processes keep busy at normal priority: their share of the CPU time over `window_s`
    (this process sleeps meanwhile) from /proc/stat, times the cores; where there is no /proc/stat, the 1-minute load
    average. Work at a lower priority (nice) does not count: the scheduler gives its cores to a run that wants them."""
    stat = Path("/proc/stat")
    if not stat.is_file():
        return os.getloadavg()[0]
    busy_before, total_before = cpu_times(stat.read_text())
    time.sleep(window_s)
    busy_after, total_after = cpu_times(stat.read_text())
    return (os.cpu_count() or 1) * (busy_after - busy_before) / max(total_after - total_before, 1)


def cpu_times(proc_stat: str) -> tuple[int, int]:
    """(busy, total) CPU time of all cores, in clock ticks, from /proc/stat's first line (user, nice, system, idle,
    iowait, irq, softirq, steal, ...): busy is user + system + irq + softirq + steal, nice and idle are not."""
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, proc_stat.split("\n", 1)[0].split()[1:9])
    busy = user + system + irq + softirq + steal
    return busy, busy + nice + idle + iowait


# Share of the reference solutions max_new_tokens may cut short before a run warns: above 1% the cap sits below the
# 99th percentile of their lengths, and pass@1 can lose that share of the problems whose answers are as long.
TRUNCATION_WARN_SHARE = 0.01


def truncation_warning(lengths: list[int], max_new_tokens: int) -> str | None:
    """A warning when max_new_tokens cuts more than TRUNCATION_WARN_SHARE of the reference solutions, whose `lengths`
    are their tokens (with EOS): how many, and the caps that cover 95%, 99% and all of them."""
    cut = sum(n > max_new_tokens for n in lengths)
    if cut <= TRUNCATION_WARN_SHARE * len(lengths):
        return None
    ordered = sorted(lengths)

    def cover(share: float) -> int:  # the smallest cap under which `share` of the solutions fit
        return ordered[math.ceil(share * len(ordered)) - 1]

    return (f"max_new_tokens={max_new_tokens} cuts {cut:,} of the {len(lengths):,} reference solutions short "
            f"({cut / len(lengths):.1%}, in the student's tokens with EOS; trb warns above "
            f"{TRUNCATION_WARN_SHARE:.0%}): max_new_tokens={cover(0.95)} covers 95% of them, {cover(0.99)} 99% and "
            f"{ordered[-1]} all; raise it, or rollouts and evaluations stop such answers before they end")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use device=cpu")
    return torch.device(name)


@dataclass
class Setup:
    """Everything a run needs, loaded and checked before any heavy work."""

    run: RunDir
    world: distributed.World
    device: torch.device
    student: torch.nn.Module
    teacher: torch.nn.Module
    tokenizer: object
    vocab: object
    prompts: list[list[int]]  # training prompts, token ids
    solutions: list[list[int]]  # their dataset solutions + EOS, token ids (GKD's fixed data)
    test_problems: list
    bf16: bool = False  # bf16 autocast for decoding and training forwards (config `autocast`)
    val_problems: list = field(default_factory=list)  # validation: evaluated beside the test set, never trained on
    warnings: list[str] = field(default_factory=list)  # what the run should say before it starts (`truncation_warning`)

    @property
    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()


def setup(cfg: TrainConfig, signals: StopSignals | None = None) -> Setup:
    """Check the run folder and (locked, on a resume) that the run's inputs are unchanged; load and check models,
    tokenizers and data; only then create (or claim) the run folder. Any error releases the lock."""
    world = distributed.init(cfg.device)
    RunDir.check(cfg)
    run = RunDir(Path(cfg.out_dir))
    try:
        inputs = run.open(cfg) if world.main else None
        s = _load(cfg, world, run)
        if world.main:
            with signals.phase(abandon=False) if signals else nullcontext():
                run.create(cfg, inputs)
        distributed.barrier(world)
        return s
    except BaseException:
        run.unlock()
        raise


def _load(cfg: TrainConfig, world: distributed.World, run: RunDir) -> Setup:
    """Load and check models, tokenizers and data."""
    device = resolve_device(cfg.device)
    if world.active and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    sequences = cfg.prompts_per_step * cfg.rollouts_per_prompt
    if sequences % world.size:
        raise ConfigError(
            f"prompts_per_step x rollouts_per_prompt = {sequences} sequences must split evenly over the ranks: make "
            f"it a multiple of the world size {world.size}"
        )
    teacher_dtype = cfg.models.teacher_dtype
    if teacher_dtype == "auto":
        teacher_dtype = "bfloat16" if device.type == "cuda" else "float32"
    tokenizer = load_tokenizer(cfg.models.student, cfg.models.trust_remote_code)
    teacher_tokenizer = load_tokenizer(cfg.models.teacher, cfg.models.trust_remote_code)
    student = load_causal_lm(cfg.models.student, device, "float32", cfg.models.trust_remote_code)
    if cfg.models.lora_rank:
        student = add_lora(student, cfg.models.lora_rank, cfg.models.lora_alpha,
                           [name.strip() for name in cfg.models.lora_targets.split(",")], stream_seed(cfg.seed, "lora"))
    teacher = load_causal_lm(cfg.models.teacher, device, teacher_dtype, cfg.models.trust_remote_code)
    teacher.requires_grad_(False)
    vocab = vocab_space(tokenizer, teacher_tokenizer, student, teacher)
    if cfg.loss.entry.reads == "student_topk" and cfg.loss.top_k > vocab.size:  # every top-k divergence
        raise ConfigError(f"loss.top_k={cfg.loss.top_k} exceeds the vocabulary of {vocab.size} tokens; use a value "
                          f"in 1..{vocab.size}")
    d = cfg.data
    train_problems, val_problems, test_problems = data_splits(d.source, d.num_train, d.val_count, d.num_test, d.seed,
                                                              d.test_source, d.val_source, d.fields)
    check_same_tokenization(tokenizer, teacher_tokenizer, train_problems[:64], d.system_prompt)
    prompts = tokenize_prompts(tokenizer, [p.question for p in train_problems], d.system_prompt)
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    if len(prompts[longest]) > d.max_prompt_tokens:
        raise ConfigError(
            f"training prompt {longest} has {len(prompts[longest])} tokens, more than data.max_prompt_tokens="
            f"{d.max_prompt_tokens}; raise it or shorten the prompts"
        )
    context = min(student.config.max_position_embeddings, teacher.config.max_position_embeddings)
    if len(prompts[longest]) + cfg.max_new_tokens > context:
        raise ConfigError(
            f"training prompt {longest} ({len(prompts[longest])} tokens) plus max_new_tokens={cfg.max_new_tokens} "
            f"exceeds the models' context of {context} positions; lower max_new_tokens or data.max_prompt_tokens"
        )
    solutions = [ids + [vocab.eos_id] for ids in
                 tokenizer([p.solution for p in train_problems], add_special_tokens=False)["input_ids"]]
    held_out = tokenizer([p.solution for p in val_problems + test_problems], add_special_tokens=False)["input_ids"]
    warning = truncation_warning([len(ids) for ids in solutions] + [len(ids) + 1 for ids in held_out],
                                 cfg.max_new_tokens)
    bf16 = cfg.autocast == "bf16" or (cfg.autocast == "auto" and device.type == "cuda")
    return Setup(run, world, device, student, teacher, tokenizer, vocab, prompts, solutions,
                 test_problems, bf16, val_problems, [warning] if warning else [])


def check_same_tokenization(student_tokenizer, teacher_tokenizer, problems, system_prompt) -> None:
    """Prompts are formatted once (student's template) and fed to both models; the two tokenizers must agree on
    prompt + response, or the teacher would be scored on different token ids."""
    for problem in problems:
        text = format_prompt(student_tokenizer, problem.question, system_prompt) + problem.solution
        a = student_tokenizer(text, add_special_tokens=False)["input_ids"]
        b = teacher_tokenizer(text, add_special_tokens=False)["input_ids"]
        if a != b:
            raise CompatibilityError(
                f"student and teacher tokenizers split the same prompt + response differently ({len(a)} vs "
                f"{len(b)} tokens) for {problem.question[:40]!r}...; use the same tokenizer files for both"
            )
