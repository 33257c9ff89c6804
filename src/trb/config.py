"""Configs: frozen dataclasses, loaded from YAML with `key=value` overrides, validated with clear one-line errors.

    trb train configs/miniature_arith.yaml method.eps0=0.01 steps=100

A config file is a nested mapping that mirrors `TrainConfig`. Overrides use dotted paths and YAML scalars
(`method.name=trb`, `data.system_prompt=null`, `adam_betas=[0.9,0.95]`). Unknown keys are errors that name the
closest known key; values are type-checked and range-checked at construction. The `method` section is the method's
own dataclass (`trb.methods.METHODS[name]`, every method registered with `register_method`), so each method carries
exactly the parameters it uses. Building and checking a config imports no torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trb.divergences import LossSpec
from trb.errors import ConfigError, require
from trb.methods import METHODS, Method, VanillaOPD
from trb.paths import resolve_builtin


@dataclass(frozen=True)
class ModelsConfig:
    student: str = ""  # a local Hugging Face checkpoint directory, or trb:miniature/<setting>/student
    teacher: str = ""
    teacher_dtype: str = "auto"  # auto (fp32 on CPU, bf16 on GPU) | float32 | bfloat16 | float16
    trust_remote_code: bool = False
    lora_rank: int = 0  # > 0: train LoRA adapters (PEFT) instead of the full student
    lora_alpha: float = 16.0
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # comma-separated module names
    # the forward decoding and the loss's training forwards use: auto (the lean Llama-family forward, trb.lean, where
    # it reproduces the model; Hugging Face's otherwise) | lean (required) | hf (always the model's own forward)
    forward: str = "auto"

    def __post_init__(self):
        require(bool(self.student), "models.student is required: a checkpoint directory")
        require(bool(self.teacher), "models.teacher is required: a checkpoint directory")
        dtypes = ("auto", "float32", "bfloat16", "float16")
        require(self.teacher_dtype in dtypes, f"models.teacher_dtype must be one of {dtypes}, got {self.teacher_dtype!r}")
        require(self.lora_rank >= 0, f"models.lora_rank must be >= 0, got {self.lora_rank}")
        forwards = ("auto", "lean", "hf")
        require(self.forward in forwards, f"models.forward must be one of {forwards}, got {self.forward!r}")
        require(bool(self.lora_targets.strip()), "models.lora_targets must name at least one module")


@dataclass(frozen=True)
class DataConfig:
    source: str = "arith"  # a built-in setting (arith, word) or a JSONL/parquet file of problems
    test_source: str | None = None  # test file for a file source (default: a held-out slice of source)
    num_train: int = 20000  # problems generated for a built-in setting
    num_test: int = 200  # test problems used for evaluation
    # validation problems (disjoint from train and test), evaluated beside the test set: they choose the reported
    # checkpoint (`trb compare`). Default (null): half of num_test; 0: no validation split
    num_val: int | None = None
    val_source: str | None = None  # validation file when test_source is given (default: a held-out slice of source)
    seed: int = 0  # problem generation / split seed
    system_prompt: str | None = None
    fields: dict[str, str] | None = None  # column mapping for files: question, solution, answer
    max_prompt_tokens: int = 1024

    def __post_init__(self):
        require(self.num_train > 0, f"data.num_train must be > 0, got {self.num_train}")
        require(self.num_test > 0, f"data.num_test must be > 0, got {self.num_test}")
        require(self.num_val is None or self.num_val >= 0, f"data.num_val must be >= 0, got {self.num_val}")
        require(self.val_source is None or self.test_source is not None,
                 "data.val_source needs data.test_source (a built-in setting or a single file holds out its own)")
        require(self.max_prompt_tokens > 0, f"data.max_prompt_tokens must be > 0, got {self.max_prompt_tokens}")
        if self.fields is not None:
            roles = ("question", "solution", "answer")
            for role, column in self.fields.items():
                close = difflib.get_close_matches(role, roles, n=1)
                require(role in roles, f"data.fields.{role} is not a field; the fields are {', '.join(roles)}"
                         + (f"; did you mean 'data.fields.{close[0]}'?" if close else ""))
                require(bool(column.strip()), f"data.fields.{role} must name a column, got {column!r}")
            require("question" in self.fields, "data.fields must map 'question' to a column")
            require(bool(self.fields.keys() & {"solution", "answer"}),
                     "data.fields must map 'solution' and/or 'answer' to a column, besides 'question'")

    @property
    def val_count(self) -> int:
        """Validation problems: num_val, or half of num_test when it is not given."""
        return self.num_test // 2 if self.num_val is None else self.num_val


@dataclass(frozen=True)
class RolloutConfig:
    """The engine that generates every rollout of training and evaluation: trb's own (`trb`, the default and the
    reference: exact, keyed per-sequence randomness) or vLLM (`vllm`, `trb.vllm`: vLLM's own sampler on the policy's
    distribution, colocated with each rank). The other keys are vLLM's knobs (`trb.vllm.engine.VLLMSettings`), read
    only with engine=vllm."""

    engine: str = "trb"  # trb | vllm
    gpu_memory_utilization: float = 0.9  # share of the GPU vLLM may take (on its CPU build: host memory for KV)
    kv_cache_bytes: int | None = None  # a fixed KV cache size instead of gpu_memory_utilization's share
    max_num_seqs: int = 256  # sequences decoding at once
    max_model_len: int = 0  # prompt + completion tokens per sequence; 0: the smaller of the models' context lengths
    # vLLM's weights and activations: auto (the student's decode dtype: bf16 under bf16 autocast on a GPU, the
    # training dtype otherwise) | float32 | bfloat16 | float16
    dtype: str = "auto"
    enforce_eager: bool = False  # no CUDA graphs or compilation: engine start in seconds, slower decoding on a GPU
    sleep: bool = False  # release vLLM's GPU memory between rollout phases (CUDA only)

    def __post_init__(self):
        require(self.engine in ("trb", "vllm"), f"rollout.engine must be trb or vllm, got {self.engine!r}")
        require(0 < self.gpu_memory_utilization <= 1,
                f"rollout.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        require(self.kv_cache_bytes is None or self.kv_cache_bytes > 0,
                f"rollout.kv_cache_bytes must be > 0 (or null: gpu_memory_utilization decides), got "
                f"{self.kv_cache_bytes}")
        require(self.max_num_seqs >= 1, f"rollout.max_num_seqs must be >= 1, got {self.max_num_seqs}")
        require(self.max_model_len >= 0,
                f"rollout.max_model_len must be >= 0 (0: the models' own), got {self.max_model_len}")
        dtypes = ("auto", "float32", "bfloat16", "float16")
        require(self.dtype in dtypes, f"rollout.dtype must be one of {dtypes}, got {self.dtype!r}")


@dataclass(frozen=True)
class TrainConfig:
    """One run's whole configuration, validated at construction: the sections `models`, `data`, `method` (a
    registered `Method`), `loss` (a `LossSpec`) and `rollout` (the rollout engine), and the top-level keys of the loop
    (steps, batch sizes, learning rate, evaluation, checkpoints, out_dir, ...). A YAML config mirrors it key for key;
    build one with `load_config`, and override any key on the command line as `section.key=value`."""

    models: ModelsConfig = field(default_factory=ModelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: Method = field(default_factory=VanillaOPD)
    loss: LossSpec = field(default_factory=LossSpec)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    steps: int = 200  # optimizer steps
    prompts_per_step: int = 16
    rollouts_per_prompt: int = 4
    # the KV budget per rank and model, in sequences: rollout_batch x (longest prompt + max_new_tokens) slots; the
    # step's sequences join while it holds them (README "Decoding")
    rollout_batch: int = 64
    speculative_gamma: int = 0  # > 0: TRB rollouts by exact speculative sampling with this draft length
    autocast: str = "auto"  # bf16 mixed precision: auto (bf16 on GPU, fp32 on CPU) | bf16 (also CPUs with AMX) | fp32
    # the behavior policy's math (beta solve, blend, sampling) through torch.compile, paying a compilation once:
    # auto (trb.rollout.factory.decode_compile) compiles on a GPU and decodes eagerly on a CPU; true / false force either
    compile: bool | str = "auto"
    micro_batch: int = 64  # sequences per forward/backward (within a rollout batch); the loss does not depend on it
    max_new_tokens: int = 128
    lr: float = 1e-5
    warmup_steps: int = 15  # linear lr warmup, then constant (the paper's schedule)
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    eval_every: int = 20  # 0 disables periodic evaluation (the first and last still run)
    eval_samples: int = 4  # n of avg@n pass@1
    eval_batch: int = 256  # an evaluation's KV budget in sequences, as rollout_batch
    checkpoint_every: int = 50  # 0: only the final checkpoint
    log_rollouts_every: int = 10  # save a few rollouts with their per-token records for `trb inspect`; 0: never
    log_rollouts: int = 8  # how many
    keep_checkpoints: int = 2
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun each rank uses cuda:LOCAL_RANK)
    distributed: str = "ddp"  # under torchrun: ddp | fsdp (FSDP2 fully_shard)
    out_dir: str = "runs/train"
    resume: bool | str = False  # true: continue the run in out_dir (which must hold one); auto: resume or start fresh

    def __post_init__(self):
        for name in ("steps", "prompts_per_step", "rollouts_per_prompt", "rollout_batch", "micro_batch", "max_new_tokens",
                     "eval_samples", "eval_batch", "keep_checkpoints"):
            require(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "log_rollouts_every", "log_rollouts",
                     "speculative_gamma"):
            require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        require(math.isfinite(self.lr) and self.lr > 0, f"lr must be a finite number > 0, got {self.lr}")
        require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        require(all(0 <= b < 1 for b in self.adam_betas), f"adam_betas must lie in [0, 1), got {self.adam_betas}")
        require(self.grad_clip > 0, f"grad_clip must be > 0, got {self.grad_clip}")
        require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
                 f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        require(self.distributed in ("ddp", "fsdp"), f"distributed must be ddp or fsdp, got {self.distributed!r}")
        require(self.autocast in ("auto", "bf16", "fp32"), f"autocast must be auto, bf16 or fp32, got {self.autocast!r}")
        require(self.resume in (True, False, "auto"), f"resume must be true, false or auto, got {self.resume!r}")
        require(self.compile in ("auto", True, False), f"compile must be auto, true or false, got {self.compile!r}")
        require(self.rollout.engine == "trb" or not self.speculative_gamma,
                "speculative_gamma > 0 needs rollout.engine=trb (vLLM samples the blend token by token); set "
                "speculative_gamma=0")
        require(not self.rollout.sleep or self.device != "cpu",
                "rollout.sleep releases GPU memory, and device=cpu has none; set rollout.sleep=false")
        require(not self.rollout.max_model_len or self.rollout.max_model_len > self.max_new_tokens,
                f"rollout.max_model_len={self.rollout.max_model_len} leaves no room for a prompt before "
                f"max_new_tokens={self.max_new_tokens}; raise it (or 0: the models' context)")


# ------------------------------------------------------------------------------------------------------------------
# Building dataclasses from nested mappings


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp, key: str):
    """value checked against (and where lossless converted to) the annotated type tp."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{key} must not be null")
    if dataclasses.is_dataclass(tp) or tp is Method:
        require(isinstance(value, dict), f"{key} must be a mapping, got {value!r}")
        return build(tp, value, key)
    if origin is tuple:
        args = typing.get_args(tp)
        require(isinstance(value, (list, tuple)) and len(value) == len(args),
                 f"{key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        require(isinstance(value, dict), f"{key} must be a mapping, got {value!r}")
        return {_coerce(k, key_type, key): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key} must be a number, got {value!r}") from None
        require(isinstance(value, (int, float)) and not isinstance(value, bool),
                 f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        require(isinstance(value, int) and not isinstance(value, bool), f"{key} must be an integer, got {value!r}")
        return value
    if tp is bool:
        require(isinstance(value, bool), f"{key} must be true or false, got {value!r}")
        return value
    if tp is str:
        require(isinstance(value, str), f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


def build(cls, data: dict, prefix: str = ""):
    """cls(**data) with every key known, typed and validated; nested sections built recursively."""
    if cls is Method:
        name = data.get("name", VanillaOPD.name)
        require(name in METHODS, f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
        cls, data = METHODS[name], {k: v for k, v in data.items() if k != "name"}
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{path}'{hint}")
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except ConfigError as error:
        raise ConfigError(f"{prefix + ': ' if prefix else ''}{error}") from None
    except ValueError as error:  # validation in library dataclasses (LossSpec, methods)
        raise ConfigError(f"{prefix + ': ' if prefix else ''}{error}") from None


def as_dict(config) -> dict:
    """A config as a plain nested mapping (method sections include their name), ready for YAML."""
    out = {}
    for f in dataclasses.fields(config):
        if not f.init:
            continue
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            value = as_dict(value)
            if isinstance(getattr(config, f.name), Method):
                value = {"name": getattr(config, f.name).name, **value}
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b=value' -> (['a', 'b'], YAML-parsed value)."""
    key, sep, raw = text.partition("=")
    require(bool(sep) and bool(key.strip()), f"override {text!r} is not of the form key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Overrides applied in order; choosing another method (method.name=...) first resets the method section to
    that method's defaults, so the parameters of the file's method do not leak into it."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    parsed = [parse_override(text) for text in overrides]
    for path, value in parsed:
        if path == ["method", "name"] and value != (data.get("method") or {}).get("name", VanillaOPD.name):
            data["method"] = {"name": value}
    for text, (path, value) in zip(overrides, parsed):
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            require(isinstance(node, dict), f"override {text!r}: '{part}' is not a section")
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """TrainConfig from a YAML file (or defaults when path is None) plus key=value overrides."""
    data: dict = {}
    if path is not None:
        path = resolve_builtin(str(path))
        require(path.is_file(), f"config file {str(path)!r} not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{where}: not valid YAML ({getattr(error, 'problem', error)})") from None
        require(isinstance(data, dict), f"{path}: a config file must be a mapping of keys to values")
    return build(TrainConfig, apply_overrides(data, list(overrides)))


def save_config(config: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(as_dict(config), sort_keys=False))


# ------------------------------------------------------------------------------------------------------------------
# Method specs of `trb compare`: one spec, several configs
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    label: str  # e.g. trb(eps0=0.02,horizon=50)
    overrides: tuple[str, ...]

    @property
    def slug(self) -> str:
        return self.label.replace("(", "_").replace(")", "").replace(",", "_").replace("=", "-")


def parse_variants(spec: str) -> list[Variant]:
    """'name' or 'name:key=v1|v2,key2=w' -> one Variant per combination of choices."""
    name, _, params = spec.partition(":")
    if not name:
        raise ConfigError(f"method spec {spec!r} has no method name")
    choices = []
    for item in filter(None, params.split(",")):
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise ConfigError(f"method spec {spec!r}: {item!r} is not key=value")
        choices.append([(key, v) for v in values.split("|")])
    variants = []
    for combo in itertools.product(*choices) if choices else [()]:
        label = name + (f"({','.join(f'{k}={v}' for k, v in combo)})" if combo else "")
        variants.append(Variant(label, (f"method.name={name}", *(f"method.{k}={v}" for k, v in combo))))
    return variants


def check_variants(config: str, specs: list[str], overrides: list[str], out: Path) -> list[Variant]:
    """The variants of `specs`, each one's config loaded and validated (a ConfigError names the first bad one)."""
    variants = [v for spec in specs for v in parse_variants(spec)]
    labels = [v.label for v in variants]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"methods repeat: {labels}")
    for variant in variants:
        load_config(config, [*overrides, *variant.overrides, f"out_dir={out}/check"])
    return variants
