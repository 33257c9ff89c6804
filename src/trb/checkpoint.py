"""Training checkpoints: atomic, complete, and free of pickle.

A checkpoint is a folder `checkpoints/step_XXXXXXXX/` holding
- the student as a Hugging Face checkpoint (config.json, model.safetensors, tokenizer files), loadable on its own,
- optimizer.safetensors (every optimizer state tensor, keyed by parameter name) and state.json (optimizer param
  groups, scheduler state, the next step to run, the data position, the number of metric lines written, and the
  method's state). Both are full, unsharded state dicts, so a run resumes on any number of ranks.

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
from safetensors.torch import load_file, save_file

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


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """A name-keyed optimizer state dict -> flat tensors "<param>::<key>" and a JSON-able remainder."""
    tensors, scalars = {}, {}
    for param, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{param}::{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(param, {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
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
    model.save_pretrained(partial, state_dict=model_state)
    tokenizer.save_pretrained(partial)
    tensors, optimizer_meta = _flatten_optimizer(optimizer_state)
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
    for leftover in root.glob(".step_*.partial"):  # an earlier attempt killed while writing
        shutil.rmtree(leftover, ignore_errors=True)
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
    optimizer_state = _unflatten_optimizer(load_file(str(folder / "optimizer.safetensors")), record.pop("optimizer"))
    return model_state, optimizer_state, record
