"""Training checkpoints: atomic, complete, and free of pickle.

A checkpoint is a folder `checkpoints/step_XXXXXXXX/` holding
- the student as a Hugging Face checkpoint (config.json, model.safetensors, tokenizer files), loadable on its own,
- optimizer.safetensors (every optimizer state tensor) and state.json (optimizer param groups, scheduler state,
  the next step to run, the data position, the number of metric lines written, and anything else the loop keeps).

It is written into a hidden `.partial` folder, flushed to disk, and renamed into place; `checkpoints/latest`
(a one-line text file, itself replaced atomically) then points to it. A crash at any moment leaves either the old
or the new checkpoint complete and `latest` naming a complete one. Randomness needs no saved state: every generator
is seeded from (seed, step, rank, stream), so a resumed run draws exactly what the uninterrupted run would.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file

LATEST = "latest"


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


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into flat named tensors and a JSON-able remainder."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param_id, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{param_id}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    for param_id, entries in meta["scalars"].items():
        state.setdefault(int(param_id), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    root: Path,
    step: int,
    model,
    tokenizer,
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: dict,
    keep: int,
) -> Path:
    """Write checkpoint `step` under root atomically, point `latest` at it, keep the newest `keep` checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    partial = root / f".step_{step:08d}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    tensors, optimizer_meta = _optimizer_tensors(optimizer)
    save_file(tensors, str(partial / "optimizer.safetensors"))
    record = {**state, "optimizer": optimizer_meta, "scheduler": scheduler.state_dict()}
    (partial / "state.json").write_text(json.dumps(record, indent=1))
    _fsync_tree(partial)
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
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The folder `latest` names, else the newest complete step folder, else None."""
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / "state.json").is_file():
            return candidate
    complete = [p for p in sorted(root.glob("step_*")) if (p / "state.json").is_file()]
    return complete[-1] if complete else None


def load_checkpoint(folder: Path, model, optimizer: torch.optim.Optimizer, scheduler) -> dict:
    """Restore model weights, optimizer and scheduler in place from folder; returns the saved loop state."""
    load_model(model, str(folder / "model.safetensors"), strict=True, device=str(next(model.parameters()).device))
    record = json.loads((folder / "state.json").read_text())
    tensors = load_file(str(folder / "optimizer.safetensors"), device=str(next(model.parameters()).device))
    optimizer.load_state_dict(_optimizer_state(tensors, record.pop("optimizer")))
    scheduler.load_state_dict(record.pop("scheduler"))
    return record
