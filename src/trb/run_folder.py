"""The run folder: what a training run writes and how it is guarded.

    out_dir/config.yaml     the run's config (its presence marks a run)
    out_dir/inputs.json     what the run was started from: SHA-256 of the data and of every model file
    out_dir/metrics.jsonl   one JSON object per training step, evaluation and SFT-warmup update (and tb/, TensorBoard)
    out_dir/eval/           every evaluation's per-problem scores and examples
    out_dir/rollouts/       a few rollouts of some steps with their per-token records (`trb inspect`)
    out_dir/checkpoints/    `trb.checkpoint`
    out_dir/.lock           held (flock) by the process running the run until it exits

Files are replaced atomically (`write_atomic`); a resumed run must have the same config, except the keys in
MAY_CHANGE, and the same inputs by content (`identity_differences`).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import yaml
from torch.utils.tensorboard import SummaryWriter

from trb import preflight
from trb.checkpoint import sha256_file
from trb.config import ConfigError, TrainConfig, as_dict, load_config
from trb.errors import TrbError
from trb.preflight import LOCK
from trb.models import resolve_checkpoint
from trb.sequences import Rollout
from trb.tasks import SETTINGS


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
# data-parallel strategies (checkpoints hold full state dicts) and rollout engines (the `rollout` section; a run saved
# before the section existed has none). Model and data paths are compared by content instead.
MAY_CHANGE = ("resume", "steps", "device", "distributed", "out_dir", "rollout")
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
        resume=true, is not empty, or cannot be created or written (`trb.preflight.run_folder`). Whether a run can be
        resumed with this config is checked against its content once the folder is locked (`open`)."""
        preflight.run_folder(cfg.out_dir, cfg.resume)

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

    def open(self, cfg: TrainConfig) -> dict:
        """The run's inputs (`input_digests`), with an existing folder locked first and, on a resume, its config and
        inputs checked against cfg's (then the lock is claimed). Run by the main rank before loading anything."""
        resuming = (self.path / "config.yaml").exists()
        try:
            known = json.loads((self.path / INPUTS).read_text()) if (self.path / INPUTS).exists() else None
        except ValueError:
            raise ConfigError(f"{self.path / INPUTS} is unreadable; restore it or choose another out_dir") from None
        if self.path.is_dir():
            self.lock()
            RunDir.check(cfg)  # the folder may have changed before the lock was taken
        inputs = input_digests(cfg, known)
        if resuming:
            why = identity_differences(as_dict(load_config(self.path / "config.yaml")), known, cfg, inputs)
            if why:
                raise ConfigError(f"resume=true but {'; '.join(why)} in {str(self.path)!r}; resume with the same "
                                  "config and inputs or choose another out_dir")
            self.claim()
        return inputs

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
