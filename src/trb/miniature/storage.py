"""The miniature's models on disk: new ones of a preset's shape, shipped ones saved and read back, the models of an
earlier run reused, and a stopped run's stages kept under out_dir/.resume so that rerunning continues it.

A stopped run keeps out_dir/.resume/: settings.json (what it was asked to do) and one folder per SFT stage that ran
(teacher, student): the model in fp32, stage.json (steps, loss, wall time, done or not, the student's validation
curve) and, for an unfinished stage, resume.safetensors (optimizer state and data-order generator state). Rerunning
the same command continues from there; a finished run removes the folder.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from trb.checkpoint import flatten_optimizer, unflatten_optimizer
from trb.miniature.config import ModelSize, PrepareError
from trb.models import tiny_causal_lm
from trb.paths import resolve_builtin



def new_model(size: ModelSize, tokenizer: PreTrainedTokenizerBase, max_positions: int, seed: int,
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


def size_of(model: PreTrainedModel) -> dict:
    c = model.config
    return asdict(ModelSize(c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
                            c.intermediate_size))


def parameters(model: PreTrainedModel) -> int:
    return sum(p.numel() for p in model.parameters())  # tied embeddings counted once


def save_and_reload(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path, dtype: str,
                    device: torch.device) -> PreTrainedModel:
    """Save model + tokenizer as a Hugging Face checkpoint in `dtype` and load it back in fp32: what ships is what is
    evaluated."""
    folder.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(model).to(getattr(torch, dtype)).save_pretrained(folder)  # a copy: .to() would round model in place
    tokenizer.save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()


def save_stage(folder: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, result: dict,
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


def load_stage(folder: Path, device: torch.device) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict]:
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


def prepared_folder(folder: str | Path, role: str) -> Path:
    folder = resolve_builtin(str(folder))  # a folder, or trb:miniature/<setting>/<role>
    if not (folder / "config.json").is_file():
        raise PrepareError(f"{role}_from must be a prepared {role} folder (config.json, weights, tokenizer); "
                           f"{folder} has no config.json")
    return folder


def earlier_run(folder: Path, role: str) -> dict | None:
    """The report entry of an earlier run for its model in `folder` (with its wall times and hardware) when the run's
    prepare.json sits next to the model's folder."""
    earlier = folder.parent / "prepare.json"
    if not earlier.is_file():
        return None
    report = json.loads(earlier.read_text())
    return {"report": report.get(role), "wall_s": report.get("wall_s"), "hardware": report.get("hardware")}


def reuse(folder: Path, role: str, device: torch.device, log: Callable[[str], None]
          ) -> tuple[PreTrainedModel, dict | None]:
    """A model of an earlier run, and that run's report entry for it (`earlier_run`)."""
    folder = prepared_folder(folder, role)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    log(f"{role}: reused from {folder}")
    return model, earlier_run(folder, role)
