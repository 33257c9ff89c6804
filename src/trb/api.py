"""The Python API beside the `trb` command: load a student/teacher pair, sample rollouts from any behavior policy,
and run the training loop of `trb train` from a config.

    import torch, trb

    pair = trb.load_pair("trb:miniature/arith/student", "trb:miniature/arith/teacher")
    rollout = trb.sample_rollouts(pair, trb.TRBPolicy(eps=0.02), ["a = 36, b = a - 18. Find b."], 64,
                                  torch.Generator().manual_seed(0))
    weight = rollout.completion_mask.float() / rollout.completion_mask.sum()  # (B, T)
    loss, per_token, _ = trb.distill_loss(pair.student, pair.teacher, rollout, pair.vocab, trb.LossSpec(), weight)
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trb import preflight
from trb.config import TrainConfig, apply_overrides, as_dict, build, load_config
from trb.models import VocabSpace, load_causal_lm, load_tokenizer, vocab_space
from trb.rollout import BehaviorPolicy, Rollout, generate
from trb.tasks import tokenize_prompts
from trb.train import train


class Pair(NamedTuple):
    """A student/teacher pair ready to distill: both models in eval mode (the teacher frozen), the student's tokenizer
    and their shared vocabulary (`VocabSpace`: real vocabulary size, merged stop ids)."""

    student: PreTrainedModel
    teacher: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    vocab: VocabSpace


def load_pair(student: str, teacher: str, device: str | torch.device = "cpu", teacher_dtype: str = "float32",
              trust_remote_code: bool = False) -> Pair:
    """Load a student (fp32) and a teacher (`teacher_dtype`: float32, bfloat16 or float16) from local Hugging Face
    checkpoint folders or shipped ones (`trb:miniature/arith/student`), and check that they can be distilled: the
    tokenizers agree, the vocabularies fit (`CompatibilityError` otherwise)."""
    device = torch.device(device)
    tokenizer = load_tokenizer(student, trust_remote_code)
    student_model = load_causal_lm(student, device, "float32", trust_remote_code)
    teacher_model = load_causal_lm(teacher, device, teacher_dtype, trust_remote_code).requires_grad_(False)
    vocab = vocab_space(tokenizer, load_tokenizer(teacher, trust_remote_code), student_model, teacher_model)
    return Pair(student_model, teacher_model, tokenizer, vocab)


def sample_rollouts(pair: Pair, policy: BehaviorPolicy, prompts: list[str] | list[list[int]], max_new_tokens: int,
                    generator: torch.Generator, system_prompt: str | None = None, record_topk: int = 0) -> Rollout:
    """Rollouts of `prompts` sampled token by token from `policy` (`TRBPolicy(eps)`, `StudentPolicy()`, ... or your
    own `BehaviorPolicy`), both models decoding in lock-step with their KV caches.

    prompts: questions (formatted with the student's chat template and `system_prompt`, as training formats them)
    or token-id lists used as given. generator: the source of every sequence's random key. record_topk = k > 0 also
    records the teacher's log-probs on the student's top-k, which lets a top-k `distill_loss` skip its teacher pass.
    Returns a `Rollout` (rows follow `prompts`) with per-token records: behavior, student and teacher log-probs,
    beta, realized KL(mu || pi_S)."""
    if all(isinstance(p, str) for p in prompts):
        prompts = tokenize_prompts(pair.tokenizer, list(prompts), system_prompt)
    elif not all(isinstance(p, list) for p in prompts):
        raise TypeError("prompts must be all strings (questions) or all lists of token ids")
    return generate(policy, prompts, pair.vocab, max_new_tokens, generator, student=pair.student,
                    teacher=pair.teacher, record_topk=record_topk)


def distill(config: TrainConfig | str | Path, overrides: list[str] = (), log=print, threads: int | None = None) -> dict:
    """Run `trb train` from Python: the same checks, loop, checkpoints, evaluations and run folder (`out_dir`).

    config: a TrainConfig, or a YAML path (`trb:configs/miniature_arith.yaml`); overrides: `key=value` strings as on
    the command line (`method.name=...` may name a method registered with `register_method`, `loss.divergence=...`
    one registered with `register_divergence`). log: where progress lines go. threads: torch's CPU threads (default:
    OMP_NUM_THREADS where set, else the cores other work leaves idle; `trb.loading.set_threads`;
    the first progress line says which). OpenMP reads its
    wait policy when torch loads, which in Python is before this call: export OMP_WAIT_POLICY=PASSIVE before starting
    Python on a machine other work shares (the `trb` command sets it itself; docs/cli.md#threads). Returns the run's
    summary: status, run folder, final evaluation."""
    if isinstance(config, TrainConfig):
        config = build(TrainConfig, apply_overrides(as_dict(config), list(overrides))) if overrides else config
    else:
        config = load_config(config, list(overrides))
    preflight.train_paths(config)  # every path the config names, before the models load
    return train(config, log=log, threads=threads)
