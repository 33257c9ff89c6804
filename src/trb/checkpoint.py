"""Training checkpoints: atomic, complete, and free of pickle.

A checkpoint is a folder `checkpoints/step_XXXXXXXX/` holding
- the student as a Hugging Face checkpoint (config.json, model.safetensors, tokenizer files), loadable on its own,
- optimizer.safetensors (every optimizer state tensor, keyed by parameter name) and state.json (optimizer param
  groups, scheduler state, the next step to run, the data position, the number of metric lines written, and the
  method's state). Both are full, unsharded state dicts, so a run resumes on any number of ranks.

- manifest.json, written last: every other file's size and SHA-256.

It is written into a hidden `.partial` folder, flushed to disk, and renamed into place; `checkpoints/latest`
(a one-line text file, itself replaced atomically) then points to it. A crash at any moment leaves either the old
or the new checkpoint complete and `latest` naming a complete one. Resume verifies a checkpoint against its
manifest before loading it and falls back to the newest intact one (damage on disk, a file edited or removed by
hand); `latest` is only followed to a step folder of the same run. Randomness needs no saved state: every generator
is seeded from (seed, step, rank, stream), so a resumed run draws exactly what the uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from trb.errors import TrbError

LATEST = "latest"
MANIFEST = "manifest.json"
STEP_FOLDER = re.compile(r"step_\d{8}")


class CheckpointError(TrbError):
    """A checkpoint that cannot be written, or a run whose checkpoints are all damaged."""


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _digests(paths: list[Path]) -> list[str]:
    """SHA-256 of each file, several files at once (hashlib releases the GIL)."""
    with ThreadPoolExecutor(max_workers=min(4, max(1, len(paths)))) as pool:
        return list(pool.map(sha256_file, paths))


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """A name-keyed optimizer state dict -> flat tensors "<param>::<key>" and a JSON-able remainder."""
    tensors, scalars = {}, {}
    for param, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{param}::{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(param, {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict] = {}
    for name, value in tensors.items():
        param, key = name.rsplit("::", 1)
        state.setdefault(param, {})[key] = value
    for param, entries in meta["scalars"].items():
        state.setdefault(param, {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    root: Path,
    step: int,
    model,
    tokenizer,
    model_state: dict,
    optimizer_state: dict,
    scheduler,
    state: dict,
    keep: int,
) -> Path:
    """Write checkpoint `step` under root atomically, point `latest` at it, keep the newest `keep` checkpoints.

    model_state / optimizer_state: full (unsharded) state dicts keyed by parameter name
    (`trb.distributed.full_state`); model gives the Hugging Face config the weights are saved with.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    partial = root / f".step_{step:08d}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        model.save_pretrained(partial, state_dict=model_state)
        tokenizer.save_pretrained(partial)
        tensors, optimizer_meta = flatten_optimizer(optimizer_state)
        save_file(tensors, str(partial / "optimizer.safetensors"))
        record = {**state, "optimizer": optimizer_meta, "scheduler": scheduler.state_dict()}
        (partial / "state.json").write_text(json.dumps(record, indent=1))
        files = sorted(p for p in partial.iterdir() if p.is_file())
        manifest = {p.name: {"size": p.stat().st_size, "sha256": digest} for p, digest in zip(files, _digests(files))}
        (partial / MANIFEST).write_text(json.dumps({"files": manifest}, indent=1))  # last: it vouches for the rest
        _fsync_tree(partial)
    except (OSError, SafetensorError) as error:  # disk full, quota, I/O error: drop the partial copy
        shutil.rmtree(partial, ignore_errors=True)
        reason = getattr(error, "strerror", None) or str(error).strip().splitlines()[0]
        raise CheckpointError(f"cannot write checkpoint {final}: {reason}; the earlier checkpoints are intact: free "
                              "space and resume with resume=true") from None
    if final.exists():  # re-saving a step (after a resume): move the old copy aside first
        stale = root / f".step_{step:08d}.stale"
        shutil.rmtree(stale, ignore_errors=True)
        os.rename(final, stale)
        os.rename(partial, final)
        shutil.rmtree(stale)
    else:
        os.rename(partial, final)
    _write_text_atomic(root / LATEST, final.name + "\n")
    for old in sorted(root.glob("step_*"))[:-keep]:
        if old != final:
            shutil.rmtree(old)
    for leftover in root.glob(".step_*.partial"):  # an earlier attempt killed while writing
        shutil.rmtree(leftover, ignore_errors=True)
    return final


def damage(folder: Path) -> str | None:
    """What is wrong with a checkpoint folder, checked against its manifest (sizes, then SHA-256); None if intact."""
    try:
        expected = json.loads((folder / MANIFEST).read_text())["files"]
        items = [(name, int(entry["size"]), str(entry["sha256"])) for name, entry in expected.items()]
    except FileNotFoundError:
        return f"{MANIFEST} is missing"
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is unreadable"
    for name, size, _ in items:
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
    for (name, _, digest), actual in zip(items, _digests([folder / name for name, _, _ in items])):
        if actual != digest:
            return f"{name} does not match its SHA-256 in the manifest"
    return None


def _candidates(root: Path, warn: Callable[[str], None]) -> list[Path]:
    """The checkpoint `latest` names (only a step folder directly under root), then every step folder, newest
    first."""
    out = []
    pointer = root / LATEST
    if pointer.is_file():
        name = pointer.read_text(errors="replace").strip()
        if STEP_FOLDER.fullmatch(name):
            out.append(root / name)
        else:
            warn(f"{pointer} names {name[:80]!r}, not a checkpoint of this run; ignoring it")
    steps = sorted((p for p in root.glob("step_*") if STEP_FOLDER.fullmatch(p.name) and p.is_dir()), reverse=True)
    return list(dict.fromkeys(out + steps))


def latest_checkpoint(root: Path, warn: Callable[[str], None] = lambda message: None) -> Path | None:
    """The newest intact checkpoint under root, or None if there is none. A damaged one (see `damage`) is skipped
    with a warning naming the file; if every checkpoint is damaged, CheckpointError."""
    damaged = []
    for folder in _candidates(root, warn):
        if not folder.is_dir():
            continue
        problem = damage(folder)
        if problem is None:
            for name, why in damaged:
                warn(f"checkpoint {name} is damaged ({why}); resuming from {folder.name}")
            return folder
        damaged.append((folder.name, problem))
    if damaged:
        raise CheckpointError(f"no intact checkpoint in {root}: " + "; ".join(f"{n}: {w}" for n, w in damaged) +
                              "; restore one or start a new run in another out_dir")
    return None


def _with_tied_weights(model, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Saved Hugging Face weights omit tied duplicates (lm_head.weight = embed_tokens.weight); restore them."""
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    out = dict(weights)
    for names in names_of.values():
        present = [n for n in names if n in weights]
        for name in names:
            if name not in out and present:
                out[name] = weights[present[0]]
    return out


def read_checkpoint(folder: Path, model) -> tuple[dict, dict, dict]:
    """(model_state, optimizer_state, loop state) of a checkpoint folder, as full state dicts on the CPU."""
    model_state = _with_tied_weights(model, load_file(str(folder / "model.safetensors")))
    record = json.loads((folder / "state.json").read_text())
    optimizer_state = unflatten_optimizer(load_file(str(folder / "optimizer.safetensors")), record.pop("optimizer"))
    return model_state, optimizer_state, record
