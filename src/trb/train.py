"""The training loop: on-policy distillation with the method's behavior policy at every step.

One step, top to bottom:
  1. take the step's prompts (a seeded permutation per epoch), `rollouts_per_prompt` copies each;
  2. sample rollouts from the behavior policy the method gives for this step (student, TRB blend, ...);
  3. loss = per-token divergence of the student from the target at every completion position, weighted by
     1 / (completion tokens in the whole step), accumulated over micro-batches;
  4. clip, AdamW step, lr schedule; log; evaluate and checkpoint on schedule.
Every random draw comes from a generator seeded by (seed, step, stream), so a resumed run is the uninterrupted run.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import platform
import tempfile
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import yaml
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from trb import distributed
from trb.checkpoint import latest_checkpoint, read_checkpoint, save_checkpoint, sha256_file
from trb.config import ConfigError, TrainConfig, as_dict, load_config
from trb.core import linear_ramp
from trb.errors import TrbError
from trb.evaluate import evaluate, merge_results
from trb.losses import FinalHidden, distill_loss, sft_loss
from trb.inference import InferenceCopy
from trb.methods import SFTWarmup
from trb.models import (CompatibilityError, add_lora, load_causal_lm, load_tokenizer, merged_lora_model,
                        resolve_checkpoint, vocab_space)
from trb.records import write_record
from trb.report import write_run_report
from trb.rollout import BehaviorPolicy, Rollout, RolloutStats, TeacherPolicy, build_engine, rollout_from_tokens
from trb.stopping import Stopped, StopSignals
from trb.tasks import SETTINGS, data_splits, format_prompt, tokenize_prompts


class NumericalError(TrbError):
    """Training produced a non-finite loss or gradient; the run stopped without applying it."""


def stream_seed(*parts) -> int:
    """A 63-bit seed from (seed, step, rank, stream name, ...): independent streams, reproducible anywhere."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use device=cpu")
    return torch.device(name)


def step_prompts(step: int, per_step: int, num_prompts: int, seed: int) -> list[int]:
    """Indices of the prompts of optimizer step `step`: consecutive slices of a seeded permutation per epoch."""
    orders: dict[int, torch.Tensor] = {}
    out = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, offset = divmod(k, num_prompts)
        if epoch not in orders:
            generator = torch.Generator().manual_seed(stream_seed(seed, "data", epoch))
            orders[epoch] = torch.randperm(num_prompts, generator=generator)
        out.append(int(orders[epoch][offset]))
    return out


class RunBusy(TrbError):
    """The run folder is locked by another live process."""


class RunIOError(TrbError):
    """A run file could not be written (disk full, quota, permissions); the message names the file."""


def write_atomic(path: Path, text: str) -> None:
    """Replace path's content with text all at once (a temporary file renamed over it); on an I/O error one line
    naming the file, and the old content stays."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise RunIOError(f"cannot write {path}: {error.strerror or error}; free space or fix permissions, then "
                         "resume with resume=true") from None


# Config keys a resumed run may change: it may be extended (steps), moved (out_dir), and move between devices and
# data-parallel strategies (checkpoints hold full state dicts). Model and data paths are compared by content instead.
MAY_CHANGE = ("resume", "steps", "device", "distributed", "out_dir")
BY_CONTENT = ("models.student", "models.teacher", "data.source", "data.test_source")


def input_digests(cfg: TrainConfig, known: dict | None = None) -> dict:
    """The content of a run's inputs: SHA-256 of the data files and of every file of both model folders (a file
    whose size and modification time match `known`, the record of an earlier start, keeps its recorded digest)."""
    known = known or {}
    models = {}
    for role in ("student", "teacher"):
        folder = resolve_checkpoint(getattr(cfg.models, role))
        before = known.get("models", {}).get(role, {})
        files = {}
        for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
            stat = path.stat()
            old = before.get(path.name, {})
            same = old.get("size") == stat.st_size and old.get("mtime_ns") == stat.st_mtime_ns
            files[path.name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                "sha256": old["sha256"] if same else sha256_file(path)}
        models[role] = files
    data = {}
    for key in ("source", "test_source"):
        source = getattr(cfg.data, key)
        is_file = source is not None and source not in SETTINGS and Path(source).is_file()
        data[key] = {"path": source, "sha256": sha256_file(Path(source)) if is_file else None}
    return {"models": models, "data": data}


def identity_differences(saved_cfg: dict, saved_inputs: dict | None, cfg: TrainConfig, inputs: dict) -> list[str]:
    """Why cfg cannot continue the run recorded by (saved_cfg, saved_inputs): empty if it can."""
    content_known = saved_inputs is not None
    keys = _config_differences(saved_cfg, as_dict(cfg), skip=MAY_CHANGE + (BY_CONTENT if content_known else ()))
    out = [f"the config differs from the run's at {', '.join(keys)}"] if keys else []
    if not content_known:  # a run folder that records no content: paths were compared above
        return out
    for key, entry in inputs["data"].items():
        before = saved_inputs["data"][key]
        if entry["sha256"] != before["sha256"] or (entry["sha256"] is None and entry["path"] != before["path"]):
            out.append(f"data.{key} {entry['path']!r} is not the data the run started with"
                       + (" (its content changed)" if entry["path"] == before["path"] else ""))
    for role, files in inputs["models"].items():
        before = saved_inputs["models"][role]
        changed = sorted(name for name in files.keys() | before.keys()
                         if files.get(name, {}).get("sha256") != before.get(name, {}).get("sha256"))
        if changed:
            out.append(f"the {role} model {getattr(cfg.models, role)!r} differs from the run's in "
                       f"{', '.join(changed[:3])}")
    return out


LOCK = ".lock"
INPUTS = "inputs.json"


@dataclass
class RunDir:
    """The run folder: config.yaml, inputs.json (what the run was started from), metrics.jsonl, tb/ (TensorBoard),
    eval/, checkpoints/, and .lock, which the process running the run holds locked (flock) until it exits."""

    path: Path
    lock_fd: int | None = None

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @staticmethod
    def check(cfg: TrainConfig) -> None:
        """Refuse, before any work and without touching anything, a folder that holds another run, holds no run when
        resume=true, is not empty, or cannot be created or written. Whether a run can be resumed with this config is
        checked against its content once the folder is locked (`setup`)."""
        path = Path(cfg.out_dir)
        existing = path / "config.yaml"
        if path.exists() and not path.is_dir():
            raise ConfigError(f"out_dir {str(path)!r} exists and is not a folder; choose another out_dir")
        if existing.exists():
            if not cfg.resume:
                raise ConfigError(
                    f"out_dir {str(path)!r} already holds a run; pass resume=true to continue it or choose another "
                    "out_dir"
                )
        elif cfg.resume is True:
            raise ConfigError(f"resume=true but out_dir {str(path)!r} holds no run (no config.yaml); check the path, "
                              "or pass resume=auto to resume a run if there is one and start one if not")
        elif path.exists() and any(p.name != LOCK for p in path.iterdir()):
            raise ConfigError(f"out_dir {str(path)!r} is not empty and holds no run; choose an empty or new folder")
        ancestor = next(p for p in (path, *path.absolute().parents) if p.exists())
        if not ancestor.is_dir():
            raise ConfigError(f"out_dir {str(path)!r} cannot be created: {str(ancestor)!r} is a file; choose another "
                              "out_dir")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise ConfigError(f"out_dir {str(path)!r} is not writable ({str(ancestor)!r} denies writing); choose "
                              "another out_dir")

    def lock(self) -> None:
        """Take the run's exclusive lock; the OS releases it when the process ends, however it ends."""
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            alive = holder.isdigit() and Path(f"/proc/{holder}").exists()
            raise RunBusy(f"out_dir {str(self.path)!r} is in use by another trb process"
                          f"{f' (PID {holder})' if alive else ''}; wait for it or stop it, or choose another out_dir"
                          ) from None
        self.lock_fd = fd

    def claim(self) -> None:
        """Write this process's id into the held lock, for a process that finds the folder in use."""
        os.ftruncate(self.lock_fd, 0)
        os.pwrite(self.lock_fd, f"{os.getpid()}\n".encode(), 0)

    def unlock(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # closing the descriptor releases the flock
            self.lock_fd = None

    def create(self, cfg: TrainConfig, inputs: dict) -> None:
        """Make the folder of a new run (locked, inputs.json, then config.yaml, which marks a run), or claim the
        locked folder of a resumed one."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if self.lock_fd is None:
                self.lock()
                RunDir.check(cfg)  # another process may have started a run here while this one was loading
            self.claim()
            if not (self.path / "config.yaml").exists():
                write_atomic(self.path / INPUTS, json.dumps(inputs, indent=1))
                write_atomic(self.path / "config.yaml", yaml.safe_dump(as_dict(cfg), sort_keys=False))
        except OSError as error:
            raise ConfigError(f"out_dir {str(self.path)!r} is not writable ({error.strerror}); choose another "
                              "out_dir") from None


def _config_differences(saved: dict, new: dict, prefix: str = "", skip: tuple[str, ...] = MAY_CHANGE) -> list[str]:
    """Keys whose values differ, except those in skip."""
    out = []
    for key in sorted(set(saved) | set(new)):
        path = f"{prefix}{key}"
        if path in skip:
            continue
        a, b = saved.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_differences(a, b, path + ".", skip)
        elif a != b:
            out.append(path)
    return out


def _metric_key(record: dict) -> tuple:
    """What a metrics line records: the training step, an evaluation, or one SFT-warmup update, at its step."""
    if any(key.startswith("eval/") for key in record):
        return record["step"], "eval"
    if "sft/update" in record:
        return record["step"], "sft", record["sft/update"]
    return record["step"], "train"


class MetricsLog:
    """metrics.jsonl (one JSON object per line) and TensorBoard scalars, truncated consistently on resume. Appends
    are idempotent: a record already in the log (same step and kind) is not written again."""

    def __init__(self, run: RunDir, keep_lines: int, start_step: int):
        self.path = run.metrics
        lines = run.metrics.read_text(errors="replace").splitlines() if run.metrics.exists() else []
        kept = lines[:keep_lines]
        write_atomic(run.metrics, "".join(line + "\n" for line in kept))
        self.lines = len(kept)
        self.seen = {_metric_key(json.loads(line)) for line in kept}
        self.file = run.metrics.open("a")
        self.tb = SummaryWriter(str(run.path / "tb"), purge_step=start_step if start_step > 0 else None)

    def write(self, step: int, values: dict) -> None:
        record = {"step": step, **values}
        if _metric_key(record) in self.seen:
            return
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as error:
            raise RunIOError(f"cannot append to {self.path}: {error.strerror or error}; free space, then resume with "
                             "resume=true") from None
        self.seen.add(_metric_key(record))
        self.lines += 1
        for key, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        self.file.close()
        self.tb.close()


def rollout_sums(rollouts: list[Rollout]) -> dict[str, float]:
    """Sums over a rank's rollouts from which the step's behavior diagnostics are formed (see rollout_stats)."""
    mask = torch.cat([r.completion_mask.flatten() for r in rollouts])
    beta = torch.cat([r.beta.flatten() for r in rollouts])[mask]
    kl = torch.cat([r.realized_kl.flatten() for r in rollouts])[mask]
    return {
        "tokens": float(mask.sum()),
        "sequences": float(sum(len(r.stopped) for r in rollouts)),
        "beta": beta.sum().item(),
        "beta_one": (beta == 1).sum().item(),
        "kl": kl.sum().item(),
        "kl_max": kl.max().item() if len(kl) else 0.0,
        "from_teacher": torch.cat([r.from_teacher.flatten() for r in rollouts])[mask].sum().item(),
        "stopped": float(sum(int(r.stopped.sum()) for r in rollouts)),
    }


def rollout_stats(sums: list[dict[str, float]]) -> dict[str, float]:
    """Behavior diagnostics of a step (METHOD.md section 4) from every rank's sums, averaged over completion
    tokens: mean beta, fraction of beta = 1, realized KL(mu || pi_S) (mean and max), tokens from the teacher;
    per sequence: length and the fraction that stopped with EOS."""
    total = {key: sum(s[key] for s in sums) for key in sums[0]}
    tokens, sequences = max(total["tokens"], 1.0), max(total["sequences"], 1.0)
    return {
        "rollout/mean_beta": total["beta"] / tokens,
        "rollout/frac_beta_one": total["beta_one"] / tokens,
        "rollout/realized_kl": total["kl"] / tokens,
        "rollout/realized_kl_max": max(s["kl_max"] for s in sums),
        "rollout/from_teacher": total["from_teacher"] / tokens,
        "rollout/length": total["tokens"] / sequences,
        "rollout/stop_rate": total["stopped"] / sequences,
    }


def save_rollouts(path: Path, step: int, rollout: Rollout, count: int, tokenizer, schedule: dict) -> None:
    """A few rollouts with their per-token records (beta, log-probs, injection), for `trb inspect`."""
    records = []
    for row in range(min(count, len(rollout.stopped))):
        mask = rollout.completion_mask[row]
        ids = rollout.completion_ids[row][mask].tolist()

        def column(values):
            return None if values is None else [round(v, 5) for v in values[row][mask].tolist()]

        records.append({
            "prompt": tokenizer.decode(rollout.prompt_ids[row][rollout.prompt_mask[row]].tolist()),
            "tokens": [tokenizer.decode([i]) for i in ids],
            "beta": column(rollout.beta),
            "student_logp": column(rollout.student_logp),
            "teacher_logp": column(rollout.teacher_logp),
            "behavior_logp": column(rollout.behavior_logp),
            "realized_kl": column(rollout.realized_kl),
            "from_teacher": rollout.from_teacher[row][mask].tolist(),
            "stopped": bool(rollout.stopped[row]),
        })
    path.parent.mkdir(exist_ok=True)
    write_atomic(path, json.dumps({"step": step, **schedule, "rollouts": records}))


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
        inputs = None
        if world.main:
            resuming = (run.path / "config.yaml").exists()
            try:
                known = json.loads((run.path / INPUTS).read_text()) if (run.path / INPUTS).exists() else None
            except ValueError:
                raise ConfigError(f"{run.path / INPUTS} is unreadable; restore it or choose another out_dir") from None
            if run.path.is_dir():
                run.lock()
                RunDir.check(cfg)  # the folder may have changed before the lock was taken
            inputs = input_digests(cfg, known)
            if resuming:
                why = identity_differences(as_dict(load_config(run.path / "config.yaml")), known, cfg, inputs)
                if why:
                    raise ConfigError(f"resume=true but {'; '.join(why)} in {str(run.path)!r}; resume with the "
                                      "same config and inputs or choose another out_dir")
                run.claim()
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
    if cfg.loss.divergence == "topk_reverse_kl" and cfg.loss.top_k > vocab.size:
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
    bf16 = cfg.autocast == "bf16" or (cfg.autocast == "auto" and device.type == "cuda")
    return Setup(run, world, device, student, teacher, tokenizer, vocab, prompts, solutions,
                 test_problems, bf16, val_problems)


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


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class Trainer:
    """The pieces of one run the loop body uses: models, optimizer, the data-parallel hidden-state module."""

    def __init__(self, cfg: TrainConfig, s: Setup):
        self.cfg, self.s = cfg, s
        # Rollouts and evaluation decode a plain copy of the student (full weights, LoRA merged, bf16 under bf16
        # autocast on a GPU), built before the student is sharded and refreshed after every update.
        decode_dtype = torch.bfloat16 if s.bf16 and s.device.type == "cuda" else next(s.student.parameters()).dtype
        self.inference = InferenceCopy(s.student, decode_dtype, sharded=s.world.active and cfg.distributed == "fsdp")
        # a loss that reuses the teacher log-probs recorded while decoding takes its diagnostics from the records too
        reuse = cfg.loss.reuse_teacher and cfg.loss.entry.reads in ("student_topk", "sampled_token")
        topk = cfg.loss.top_k if reuse and cfg.loss.entry.reads == "student_topk" else 0
        self.engine = build_engine(cfg, self.inference.model, s.teacher, s.vocab, record_topk=topk, record_kl=reuse)
        hidden = FinalHidden(s.student, cfg.loss.length_groups, cfg.loss.compile, cfg.models.forward)
        self.teacher_hidden = FinalHidden(s.teacher, cfg.loss.length_groups, cfg.loss.compile, cfg.models.forward)
        self.hidden = distributed.wrap(hidden, s.student, cfg.distributed, s.world)
        self.optimizer = torch.optim.AdamW(trainable(s.student), lr=cfg.lr, betas=cfg.adam_betas,
                                           weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: linear_ramp(step + 1, 0.0, 1.0, cfg.warmup_steps))

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
            self.inference.refresh()
            self.engine.update_student(self.inference.model)
        return grad_norm, lr


def sft_warmup(t: Trainer, method: SFTWarmup, write, log) -> None:
    """The SFT-warmup baseline's first phase (`SFTWarmup.before_training`): teacher samples for the prompts of the
    first `prompt_steps` steps, `updates` AdamW updates of token-mean cross-entropy on them (a fresh optimizer),
    before OPD starts. write(step, values) logs a metrics line."""
    cfg, s = t.cfg, t.s
    indices = [i for step in range(method.prompt_steps)
               for i in step_prompts(step, cfg.prompts_per_step, len(s.prompts), cfg.seed)]
    samples = t.decode(-1, TeacherPolicy(), [s.prompts[i] for i in indices for _ in range(method.samples_per_prompt)])
    pairs = [(r.prompt_ids[row][r.prompt_mask[row]].tolist(), r.completion_ids[row][r.completion_mask[row]].tolist())
             for r in samples for row in range(len(r.stopped))]  # this rank's (prompt, teacher response) pairs
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(stream_seed(cfg.seed, "sft"))).tolist()
    optimizer = torch.optim.AdamW(trainable(s.student), lr=cfg.lr, betas=cfg.adam_betas,
                                  weight_decay=cfg.weight_decay)
    s.student.train()
    for update in range(method.updates):
        chosen = [pairs[j] for j in order[update :: method.updates]]
        num_tokens = distributed.all_reduce_sum(sum(len(r) for _, r in chosen), s.world, s.device)
        micro = [rollout_from_tokens([p for p, _ in chosen[i : i + cfg.micro_batch]],
                                     [r for _, r in chosen[i : i + cfg.micro_batch]], s.vocab, s.device)
                 for i in range(0, len(chosen), cfg.micro_batch)]
        optimizer.zero_grad(set_to_none=True)
        total = [0.0]

        def loss_fn(m):
            loss = sft_loss(s.student, m, s.vocab, m.completion_mask.float() / max(num_tokens, 1),
                            cfg.loss.chunk_size, hidden_fn=t.hidden)
            total[0] += loss.item()
            return loss

        t.backward(micro, loss_fn)
        distributed.clip_grad_norm(trainable(s.student), cfg.grad_clip)
        optimizer.step()
        loss_value = distributed.all_reduce_sum(total[0], s.world, s.device)
        write(0, {"sft/update": update + 1, "sft/loss": loss_value})
    t.inference.refresh()
    t.engine.update_student(t.inference.model)
    log(f"SFT warmup: {method.updates} updates on {len(pairs) * s.world.size} teacher samples")


def dry_run(cfg: TrainConfig, log=print, signals: StopSignals | None = None) -> dict:
    """Validate a config end to end without writing to its out_dir: load and check the models, tokenizers and data
    as the real run would, then run one tiny optimizer step (one prompt, a few tokens, its checkpoint) in a temporary
    folder. Returns what was checked. An out_dir that already holds a run is not refused (nothing is written there):
    the report's "out_dir" says whether the real run could use it as given."""
    out_dir = "ok"
    if (Path(cfg.out_dir) / "config.yaml").exists():  # a run is there: the dry run leaves it alone and says so
        try:
            RunDir.check(cfg)
        except ConfigError as error:
            out_dir = f"not usable as given: {error}"
    else:
        RunDir.check(cfg)
    with tempfile.TemporaryDirectory(prefix="trb-dry-run-") as tmp:
        started = time.perf_counter()
        s = setup(replace(cfg, out_dir=tmp, resume=False), signals)
        s.test_problems, s.val_problems = s.test_problems[:1], s.val_problems[:1]
        world = s.world.size
        small = replace(cfg, out_dir=tmp, resume=False, steps=1, prompts_per_step=world, rollouts_per_prompt=1,
                        rollout_batch=1, micro_batch=1, max_new_tokens=min(cfg.max_new_tokens, 8), eval_every=0,
                        eval_samples=1, checkpoint_every=0, log_rollouts_every=0, keep_checkpoints=1)
        loaded = time.perf_counter()
        summary = train(small, log=lambda message: None, s=s, signals=signals)
        report = {
            "dry_run": "ok" if summary["status"] == "completed" else summary["status"],
            "student": cfg.models.student, "teacher": cfg.models.teacher,
            "vocab_size": s.vocab.size, "stop_ids": list(s.vocab.stop_ids), "eos_emitted": s.vocab.eos_id,
            "train_prompts": len(s.prompts), "longest_prompt_tokens": max(map(len, s.prompts)),
            "method": cfg.method.name, "ranks": world, "out_dir": out_dir, "decoder": summary["decoder"],
            "load_s": round(loaded - started, 1), "step_s": round(time.perf_counter() - loaded, 1),
        }
    log(f"dry run ok: {report}")
    return report


def train(cfg: TrainConfig, log=print, s: Setup | None = None, signals: StopSignals | None = None) -> dict:
    """Run (or resume) a training run; returns a summary with the final evaluation. s: an already loaded Setup.
    signals: the process's SIGTERM/SIGINT handler (`trb train` installs one at start); without one, train installs
    its own for the call when it runs in the main thread. A signal while loading raises `Stopped`."""
    own = signals is None
    signals = signals or StopSignals()
    if own and threading.current_thread() is threading.main_thread():
        signals.install()
    try:
        with signals.phase(abandon=True):
            s = s or setup(cfg, signals)
        with signals.phase(abandon=False):
            return _train(cfg, log, s, signals)
    finally:
        if s is not None:
            s.run.unlock()
        if own:
            signals.uninstall()


def _train(cfg: TrainConfig, log, s: Setup, signals: StopSignals) -> dict:
    t = Trainer(cfg, s)
    run, student, teacher, vocab, method, world = s.run, s.student, s.teacher, s.vocab, cfg.method, s.world
    log = log if world.main else (lambda message: None)
    start_step, metric_lines, method_state, last_eval = 0, 0, {}, {}
    checkpoint = latest_checkpoint(run.checkpoints, warn=lambda m: log(f"trb: warning: {m}")) if cfg.resume else None
    if checkpoint is not None:
        model_state, optimizer_state, state = read_checkpoint(checkpoint, student)
        distributed.load_full_state(student, t.optimizer, model_state, optimizer_state)
        t.inference.refresh()
        t.engine.update_student(t.inference.model)
        t.scheduler.load_state_dict(state["scheduler"])
        start_step, metric_lines, method_state = state["next_step"], state["metric_lines"], state["method_state"]
        last_eval = state.get("last_eval", {})
        log(f"resumed {run.path} from {checkpoint.name} (next step {start_step})")
    if start_step >= cfg.steps and (run.path / "summary.json").exists():
        log(f"{run.path} already completed {cfg.steps} steps")
        return json.loads((run.path / "summary.json").read_text())
    if start_step > cfg.steps:
        raise ConfigError(f"the run in {str(run.path)!r} has done {start_step} steps, more than steps={cfg.steps}")
    metrics = MetricsLog(run, metric_lines, start_step) if world.main else None
    # what the newest checkpoint holds (next step, step of its last evaluation): saving again adds nothing
    saved = (start_step, last_eval.get("step")) if checkpoint is not None else None

    def write(step: int, values: dict) -> None:
        if metrics is not None:
            metrics.write(step, values)

    def evaluate_at(step: int) -> bool:
        """The evaluation after `step` optimizer steps, unless the checkpoint resumed from holds it; whether it ran:
        pass@1 on the test problems (metrics eval/*, files eval/step_*.json) and on the validation problems (val/*,
        eval/val_step_*.json; no teacher-KL), each from its own seeded stream. In one process a signal abandons it
        (Stopped); data-parallel ranks finish it, as they meet in collectives."""
        nonlocal last_eval
        if last_eval.get("step") == step:
            return False
        values = {}
        for prefix, problems in (("eval", s.test_problems), ("val", s.val_problems)):
            if not problems:
                continue
            mine = problems[world.rank :: world.size]
            with signals.phase(abandon=not world.active), s.autocast:
                result = evaluate(t.inference.model, s.tokenizer, mine, vocab, engine=t.engine,
                                  n_samples=cfg.eval_samples, max_new_tokens=cfg.max_new_tokens,
                                  batch_size=cfg.eval_batch,
                                  seed=stream_seed(cfg.seed, prefix, step, world.rank),
                                  teacher=teacher if prefix == "eval" else None, system_prompt=cfg.data.system_prompt)
            result = merge_results(distributed.gather_objects(result, world))
            if world.main:
                (run.path / "eval").mkdir(exist_ok=True)
                name = f"step_{step:08d}.json" if prefix == "eval" else f"val_step_{step:08d}.json"
                write_atomic(run.path / "eval" / name,
                             json.dumps({"step": step, **result.as_dict(), "per_problem": result.per_problem,
                                         "examples": result.examples}, indent=1))
            values.update({f"{prefix}/{k}": v for k, v in result.as_dict().items() if v is not None})
        write(step, values)
        last_eval = {"step": step, "values": values}
        return True

    def save(next_step: int) -> None:
        nonlocal saved
        if saved == (next_step, last_eval.get("step")):
            return
        model_state, optimizer_state = distributed.full_state(student, t.optimizer)  # collective
        if world.main:
            state = {"next_step": next_step, "metric_lines": metrics.lines, "method_state": method_state,
                     "data_position": next_step * cfg.prompts_per_step, "seed": cfg.seed, "last_eval": last_eval}
            save_checkpoint(run.checkpoints, next_step, student, s.tokenizer, model_state, optimizer_state,
                            t.scheduler, state, cfg.keep_checkpoints)
        distributed.barrier(world)
        saved = (next_step, last_eval.get("step"))

    def stop_requested() -> bool:
        return distributed.all_reduce_sum(float(signals.received is not None), world, s.device) > 0

    def eval_due(step: int) -> bool:
        return step in (0, cfg.steps) or bool(cfg.eval_every and step % cfg.eval_every == 0)

    status, done = "completed", start_step
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc=method.name,
               dynamic_ncols=True, disable=None if world.main else True)
    try:
        # step 0, or a resume from a checkpoint saved when a signal abandoned this evaluation
        if start_step < cfg.steps and eval_due(start_step) and evaluate_at(start_step):
            log(f"step {start_step}: pass@1 {last_eval['values']['eval/pass_at_1']:.3f}")
        if checkpoint is None and method.before_training(t, write, log):
            save(0)
        for step in bar:
            if stop_requested():
                status = "preempted"
                break
            started = time.perf_counter()
            indices = step_prompts(step, cfg.prompts_per_step, len(s.prompts), cfg.seed)
            student.eval()
            if method.use_data(step, torch.Generator().manual_seed(stream_seed(cfg.seed, step, "coin"))):
                mine = [indices[j] for j in t.my_sequences(len(indices))]
                rollouts = [rollout_from_tokens([s.prompts[i] for i in mine], [s.solutions[i] for i in mine], vocab,
                                                s.device)]
            else:
                sequences = [s.prompts[i] for i in indices for _ in range(cfg.rollouts_per_prompt)]
                rollouts = t.decode(step, method.behavior(step, method_state), sequences)
            rollout_time = time.perf_counter() - started
            if world.main and cfg.log_rollouts_every and step % cfg.log_rollouts_every == 0:
                save_rollouts(run.path / "rollouts" / f"step_{step:08d}.json", step, rollouts[0], cfg.log_rollouts,
                              s.tokenizer, method.schedule_metrics(step, method_state))
            student.train()

            num_tokens = distributed.all_reduce_sum(sum(int(r.completion_mask.sum()) for r in rollouts), world,
                                                    s.device)
            loss_spec, target = method.loss_spec(cfg.loss), method.target(step)
            sums = {"loss": 0.0}

            def loss_fn(micro: Rollout) -> torch.Tensor:
                weight = method.token_weights(micro) / max(num_tokens, 1)  # (b, T)
                loss, _, per_token = distill_loss(student, teacher, micro, vocab, loss_spec, weight, target,
                                                  student_hidden_fn=t.hidden, teacher_hidden_fn=t.teacher_hidden)
                sums["loss"] += loss.item()
                for name, per_token_values in per_token.items():
                    share = (per_token_values * micro.completion_mask).sum().item() / max(num_tokens, 1)
                    sums[name] = sums.get(name, 0.0) + share
                return loss

            t.optimizer.zero_grad(set_to_none=True)
            t.backward(t.micro_batches(rollouts), loss_fn)
            values = {name: distributed.all_reduce_sum(v, world, s.device) for name, v in sums.items()}
            grad_norm, lr = t.optimizer_step()
            if not (math.isfinite(values["loss"]) and math.isfinite(grad_norm)):
                last = latest_checkpoint(run.checkpoints)
                raise NumericalError(
                    f"non-finite {'loss' if not math.isfinite(values['loss']) else 'gradient'} at step {step}; "
                    f"nothing was applied and the last good checkpoint is {last or 'none'}; lower lr or check the "
                    "models"
                )
            values.update({
                "grad_norm": grad_norm,
                "lr": lr,
                "tokens": num_tokens,
                "tokens_per_s": num_tokens / max(rollout_time, 1e-9),
                "time/rollout_s": rollout_time,
                "time/step_s": time.perf_counter() - started,
                **method.schedule_metrics(step, method_state),
                **rollout_stats(distributed.gather_objects(rollout_sums(rollouts), world)),
            })
            if t.engine.stats.tested:
                values["rollout/spec_acceptance"] = t.engine.stats.acceptance
            method.observe(step, values, method_state)
            write(step + 1, values)
            done = step + 1
            if done < cfg.steps and not stop_requested() and eval_due(done) and evaluate_at(done):
                if world.main:
                    tqdm.write(f"step {done}: pass@1 {last_eval['values']['eval/pass_at_1']:.3f}")
            bar.set_postfix(loss=f"{values['loss']:.4f}",
                            pass1=f"{last_eval.get('values', {}).get('eval/pass_at_1', float('nan')):.3f}")
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                save(done)
        bar.close()
        if status == "completed":
            if evaluate_at(cfg.steps):
                log(f"step {cfg.steps}: pass@1 {last_eval['values']['eval/pass_at_1']:.3f}")
            save(cfg.steps)
            if stop_requested():  # arrived during the final evaluation of data-parallel ranks or the final save
                status = "preempted"
    except Stopped:  # an evaluation abandoned
        status = "preempted"
    bar.close()
    if status == "preempted":
        if done > 0 or last_eval:  # (a no-op when the newest checkpoint holds this state)
            save(done)
        log(f"stopped by signal {signals.name} after step {done}; "
            f"{'checkpoint saved' if saved is not None else 'nothing to save yet'}, resume with resume=true")
    elif cfg.models.lora_rank:  # a plain checkpoint with the adapters merged in, for users
        merged = merged_lora_model(student)  # a collective under FSDP2
        if world.main:
            merged.save_pretrained(run.path / "merged")
            s.tokenizer.save_pretrained(run.path / "merged")
    if metrics is not None:
        metrics.close()
    summary = {"status": status, "run": str(run.path), "final": last_eval.get("values", {}),
               "decoder": "lean" if t.inference.lean else "hugging face",  # what decoded the student's rollouts
               "hardware": f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores), {s.device}, "
                           f"{world.size} rank(s)"}
    if status == "completed" and world.main:  # summary.json marks a finished run
        write_atomic(run.path / "summary.json", json.dumps(summary, indent=1))
        write_run_report(run.path, f"trb train: {method.name}", (
            f"Student {cfg.models.student}, teacher {cfg.models.teacher}, data {cfg.data.source}. Method "
            f"{json.dumps({'name': method.name, **vars(method)})}; {cfg.steps} steps of {cfg.prompts_per_step} "
            f"prompts x {cfg.rollouts_per_prompt} rollouts; avg@{cfg.eval_samples} pass@1 at temperature 1.0 on "
            f"{len(s.test_problems)} test problems (every {cfg.eval_every or cfg.steps} steps). Final pass@1 "
            f"{summary['final'].get('eval/pass_at_1', float('nan')):.3f}. Config: config.yaml; every metric: "
            f"metrics.jsonl. Hardware: {summary['hardware']}."))
        write_record(run.path, run.path / "record")
    distributed.shutdown(world)
    return summary
