"""Models and vocabularies: the shared token space of a student/teacher pair, tiny model factories.

The student and teacher of a distillation pair must speak the same tokenizer. Their checkpoints may still differ in
two ways the method handles (METHOD.md section 2): padded vocabulary sizes (logit rows beyond the real vocabulary)
and EOS ids (a base student ends with <|endoftext|>, a chat teacher with <|im_end|>). `VocabSpace` records the
shared real vocabulary and the merged stop event; everything that compares or blends the two models goes through it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from trb.checkpoint import LATEST, latest_checkpoint
from trb.errors import TrbError
from trb.paths import resolve_builtin


class CompatibilityError(TrbError):
    """The student and teacher cannot be distilled as given (different tokenizers, vocabulary too small, ...)."""


@dataclass(frozen=True)
class VocabSpace:
    """The shared token space of a student/teacher pair.

    size: the real vocabulary (logits are sliced to it); stop_ids: every id that ends a sequence for either model;
    eos_id: the student's EOS, which carries the merged stop event; pad_id: the padding id.
    """

    size: int
    stop_ids: tuple[int, ...]
    eos_id: int
    pad_id: int

    def stop_tensor(self, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.stop_ids, dtype=torch.long, device=device)


def _eos_ids(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None) -> list[int]:
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if model is not None and model.generation_config is not None:
        extra = model.generation_config.eos_token_id
        ids += extra if isinstance(extra, list) else ([extra] if extra is not None else [])
    return list(dict.fromkeys(ids))


def _output_rows(model: PreTrainedModel) -> int:
    return model.get_output_embeddings().weight.shape[0]


def vocab_space(
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase | None = None,
    student: PreTrainedModel | None = None,
    teacher: PreTrainedModel | None = None,
) -> VocabSpace:
    """Check that a student/teacher pair shares its tokenizer and build their shared token space.

    Raises CompatibilityError naming what differs: the vocabularies (with example tokens), the special tokens, or a
    model whose output layer is smaller than the tokenizer's vocabulary.
    """
    size = len(student_tokenizer)
    if teacher_tokenizer is not None:
        s_vocab, t_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
        if s_vocab != t_vocab:
            only_s = sorted(set(s_vocab) - set(t_vocab))[:3]
            only_t = sorted(set(t_vocab) - set(s_vocab))[:3]
            moved = sorted(k for k in set(s_vocab) & set(t_vocab) if s_vocab[k] != t_vocab[k])[:3]
            raise CompatibilityError(
                f"student and teacher tokenizers differ ({len(s_vocab)} vs {len(t_vocab)} tokens; "
                f"only in student: {only_s}, only in teacher: {only_t}, different ids: {moved}); "
                "distillation needs the same tokenizer for both"
            )
        for name in ("pad_token", "bos_token", "unk_token"):
            s_tok, t_tok = getattr(student_tokenizer, name), getattr(teacher_tokenizer, name)
            if s_tok is not None and t_tok is not None and s_tok != t_tok:
                raise CompatibilityError(
                    f"student and teacher tokenizers differ in {name}: {s_tok!r} vs {t_tok!r}; use the same tokenizer"
                )
    for role, model in (("student", student), ("teacher", teacher)):
        if model is not None and _output_rows(model) < size:
            raise CompatibilityError(
                f"the {role} model has {_output_rows(model)} output rows but the tokenizer has {size} tokens; "
                "the checkpoint does not match the tokenizer"
            )
    student_eos = _eos_ids(student_tokenizer, student)
    if not student_eos:
        raise CompatibilityError("the student tokenizer has no EOS token; set tokenizer.eos_token")
    teacher_eos = _eos_ids(teacher_tokenizer or student_tokenizer, teacher) if teacher is not None else []
    stop_ids = tuple(dict.fromkeys(student_eos + teacher_eos))
    if any(i >= size for i in stop_ids):
        raise CompatibilityError(f"EOS ids {stop_ids} fall outside the vocabulary of {size} tokens")
    pad_id = student_tokenizer.pad_token_id if student_tokenizer.pad_token_id is not None else student_eos[0]
    return VocabSpace(size=size, stop_ids=stop_ids, eos_id=student_eos[0], pad_id=pad_id)


def tiny_causal_lm(
    vocab_size: int,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_positions: int = 512,
    architecture: str = "qwen3",
    seed: int = 0,
    tie_word_embeddings: bool = True,
    init_std: float = 0.02,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> PreTrainedModel:
    """A randomly initialized causal LM of a standard Hugging Face architecture (qwen3, qwen2 or llama), fp32."""
    config = AutoConfig.for_model(
        architecture,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 3 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=init_std,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # HF initializers draw from the global generator; keep that contained
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.float().eval()


class ModelLoadError(TrbError):
    """A model or tokenizer path that cannot be loaded; the message names the path and the fix."""


def resolve_checkpoint(path: str) -> Path:
    """A checkpoint directory: a filesystem path, or trb:miniature/<setting>/<role> for the shipped miniature. A
    training run folder, its checkpoints/ folder or the checkpoints/latest pointer file stand for the run's latest
    checkpoint."""
    resolved = resolve_builtin(path)
    if resolved.is_file() and resolved.name == LATEST:
        resolved = resolved.parent
    if resolved.is_dir() and not (resolved / "config.json").is_file():
        root = resolved / "checkpoints" if (resolved / "checkpoints").is_dir() else resolved
        latest = latest_checkpoint(root)
        if latest is not None:
            resolved = latest
    if not resolved.is_dir():
        raise ModelLoadError(f"model path {path!r} is not a directory; give a local Hugging Face checkpoint folder")
    if not (resolved / "config.json").is_file():
        raise ModelLoadError(f"model path {path!r} has no config.json; is it a Hugging Face checkpoint folder?")
    if not os.access(resolved / "config.json", os.R_OK):
        raise ModelLoadError(f"model path {path!r} is not readable; check its permissions")
    return resolved


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_causal_lm(path: str, device: torch.device, dtype: str = "float32", trust_remote_code: bool = False):
    """A local Hugging Face causal LM in dtype on device, eval mode. trust_remote_code stays off unless asked.
    Weights that do not fill the model its config.json describes (a tensor missing, a truncated file, a vocabulary
    size that differs from the weights') are refused rather than completed with random values."""
    folder = resolve_checkpoint(path)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, dtype=_DTYPES[dtype], trust_remote_code=trust_remote_code, attn_implementation="sdpa",
            output_loading_info=True,
        )
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"cannot load model from {path!r}: {first_line}") from None
    if info.get("mismatched_keys"):
        name, *shapes = list(info["mismatched_keys"])[0]
        raise ModelLoadError(
            f"model {path!r}: weight {name} has shape {list(shapes[0])} but its config.json implies "
            f"{list(shapes[1])} (vocab_size or another size in config.json differs from the weights); use the "
            "config.json the weights were saved with"
        )
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise ModelLoadError(
            f"model {path!r}: its weight files lack {len(missing)} tensors its config.json needs ({missing[0]}, ...); "
            "the weights are incomplete or belong to another model"
        )
    return model.to(device).eval()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    folder = resolve_checkpoint(path)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"model path {path!r} has no tokenizer ({', '.join(TOKENIZER_FILES)}); save the "
                             "tokenizer into the checkpoint folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"cannot load tokenizer from {path!r}: {first_line}") from None
    return tokenizer


def plain_forward(model: PreTrainedModel) -> bool:
    """Whether the model's forward is its modules' own code over plain weights: no forward hooks or replaced forwards
    (FSDP2, offloading), no sharded or quantized parameters. Fast paths that bypass or trace the forward need this."""
    for module in model.modules():
        if module._forward_hooks or module._forward_pre_hooks or "forward" in vars(module):
            return False
    return all(type(p) is torch.nn.Parameter for p in model.parameters())


def add_lora(model: PreTrainedModel, rank: int, alpha: float, targets: list[str], seed: int = 0) -> PreTrainedModel:
    """Inject LoRA adapters (PEFT) into `targets` in place; only the adapters stay trainable. Their initialization
    draws from `seed` (PEFT draws from the global generator), so every process and every rank starts alike."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ModelLoadError("models.lora_rank > 0 needs PEFT: pip install 'trb[lora]'") from None
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none")
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return inject_adapter_in_model(config, model)


LORA_ADAPTER = "default"  # the adapter name `add_lora` injects


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """{module name: PEFT LoRA layer}; empty for a model without adapters (PEFT is then not imported)."""
    if not any(".lora_A." in name for name, _ in model.named_parameters()):
        return {}
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter; gathered from every rank when FSDP2 shards it (a collective)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def merged_weights(model: torch.nn.Module, changing_only: bool = False):
    """(name in the plain architecture, whole tensor) for every parameter of a model, LoRA deltas merged into the base
    weights (W + scaling * B @ A; the base layer's bias renamed). Under FSDP2 each parameter is gathered in turn, so
    every rank must iterate to the end (the transient is one parameter). Tied parameters appear under each name.
    changing_only: skip what training cannot change (frozen parameters other than LoRA layers' bases)."""
    lora = lora_layers(model)
    for name, param in model.named_parameters(remove_duplicate=False):  # the same order on every rank
        if ".lora_" in name:
            continue
        owner, _, leaf = name.rpartition(".")
        layer = lora.get(owner.removesuffix(".base_layer")) if leaf == "weight" else None
        if changing_only and layer is None and not param.requires_grad:
            continue
        value = _full(param)  # (out, in) for a linear weight
        if layer is not None:
            a = _full(layer.lora_A[LORA_ADAPTER].weight).float()  # (r, in)
            b = _full(layer.lora_B[LORA_ADAPTER].weight).float()  # (out, r)
            value = (value.float() + layer.scaling[LORA_ADAPTER] * (b @ a)).to(value.dtype)  # (out, in)
        yield name.replace(".base_layer.", "."), value


@torch.no_grad()
def merged_lora_model(model: PreTrainedModel) -> PreTrainedModel:
    """A plain Hugging Face model of the same architecture with the LoRA deltas added to the base weights (a
    collective under FSDP2: every rank calls it)."""
    state = dict(merged_weights(model))
    merged = AutoModelForCausalLM.from_config(model.config, dtype=next(model.parameters()).dtype)
    merged.load_state_dict(state, strict=True)
    merged.generation_config = model.generation_config
    return merged.to(next(model.parameters()).device).eval()
