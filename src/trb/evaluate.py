"""Evaluation with the paper's protocol (METHOD.md section 4): avg@n pass@1 at temperature 1.0.

pass@1 = mean over problems of c / n, with n samples per problem drawn at temperature 1.0 (top-p 1.0) and graded
against the gold answer (\\boxed{} or #### extraction, math-verify). Alongside: the teacher-KL of the student on
its own fresh samples (the OPD loss on held-out prompts), the truncation rate (samples that hit max_new_tokens
without stopping) and the mean completion length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trb.losses import LossSpec, distill_loss
from trb.models import VocabSpace
from trb.rollout import Engine, Rollout, StudentPolicy, own_engine, sequence_keys
from trb.tasks import Problem, is_correct, tokenize_prompts


@dataclass
class EvalResult:
    pass_at_1: float  # mean over problems of (correct samples / n)
    per_problem: list[float]  # c / n for each problem, in input order
    n_samples: int
    mean_length: float  # completion tokens per sample
    truncation_rate: float  # fraction of samples that hit max_new_tokens
    teacher_kl: float | None  # mean per-token KL(pi_S || pi_T) on the student's samples
    examples: list[dict] = field(default_factory=list)  # a few (question, response, answer, correct) records
    n_completions: int = 0  # samples drawn (problems x n)
    kl_tokens: int = 0  # completion tokens the teacher-KL averages over

    def as_dict(self) -> dict:
        return {
            "pass_at_1": self.pass_at_1,
            "n_samples": self.n_samples,
            "mean_length": self.mean_length,
            "truncation_rate": self.truncation_rate,
            "teacher_kl": self.teacher_kl,
        }


@torch.no_grad()
def evaluate(
    student: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: list[Problem],
    vocab: VocabSpace,
    *,
    engine: Engine | None = None,
    n_samples: int = 4,
    max_new_tokens: int = 128,
    batch_size: int = 256,
    seed: int = 0,
    teacher: PreTrainedModel | None = None,
    system_prompt: str | None = None,
    temperature: float = 1.0,
    n_examples: int = 3,
    kl_samples: int = 256,
) -> EvalResult:
    """avg@n pass@1 of the student on problems; teacher-KL on its samples when a teacher is given.

    Every sample is one sequence of a single rollout call (`engine`: the caller's, or trb's own engine over the
    student), with a KV budget of `batch_size` sequences; sequence keys come from one generator seeded with `seed`,
    so an evaluation is reproducible and does not depend on the budget. The teacher-KL averages over the completion
    tokens of the first `kl_samples` samples (a teacher pass over every sample would cost more than the sampling
    itself).
    """
    if not problems:  # a rank with no share of a small test set
        return EvalResult(math.nan, [], n_samples, math.nan, math.nan, None)
    was_training = student.training
    student.eval()
    generator = torch.Generator(device=student.device).manual_seed(seed)
    prompts = tokenize_prompts(tokenizer, [p.question for p in problems], system_prompt)
    jobs = [i for i in range(len(problems)) for _ in range(n_samples)]  # problem-major order
    engine = engine if engine is not None else own_engine(student, None, vocab)
    rollout = engine.rollout(StudentPolicy(temperature), [prompts[i] for i in jobs], max_new_tokens,
                             sequence_keys(len(jobs), generator), batch=batch_size)
    correct, examples = [0] * len(problems), []
    for row, (problem_index, ids) in enumerate(zip(jobs, _completions(rollout))):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        ok = is_correct(text, problems[problem_index].answer)
        correct[problem_index] += ok
        if len(examples) < n_examples and row % n_samples == 0:
            examples.append({"question": problems[problem_index].question, "response": text,
                             "answer": problems[problem_index].answer, "correct": ok})
    teacher_kl, kl_tokens = None, 0
    if teacher is not None:  # the teacher-KL uses the first kl_samples samples
        part = rollout.select(slice(0, kl_samples))
        loss, _, _ = distill_loss(student, teacher, part, vocab, LossSpec(), part.completion_mask.float())
        kl_tokens = int(part.completion_mask.sum())
        teacher_kl = loss.item() / kl_tokens if kl_tokens else None
    student.train(was_training)
    per_problem = [c / n_samples for c in correct]
    return EvalResult(
        pass_at_1=sum(per_problem) / len(per_problem),
        per_problem=per_problem,
        n_samples=n_samples,
        mean_length=sum(rollout.lengths.tolist()) / len(jobs),
        truncation_rate=int((~rollout.stopped).sum()) / len(jobs),
        teacher_kl=teacher_kl,
        examples=examples,
        n_completions=len(jobs),
        kl_tokens=kl_tokens,
    )


def _completions(rollout: Rollout) -> list[list[int]]:
    ids, lengths = rollout.completion_ids.tolist(), rollout.lengths.tolist()
    return [row[:n] for row, n in zip(ids, lengths)]


def merge_results(parts: list[EvalResult]) -> EvalResult:
    """One result from the per-rank results of problems[rank::world] (per-problem scores back in input order)."""
    if len(parts) == 1:
        return parts[0]
    world = len(parts)
    per_problem = [0.0] * sum(len(p.per_problem) for p in parts)
    for rank, part in enumerate(parts):
        for k, score in enumerate(part.per_problem):
            per_problem[rank + world * k] = score
    completions = sum(p.n_completions for p in parts)
    kl_tokens = sum(p.kl_tokens for p in parts)
    filled = [p for p in parts if p.n_completions]
    return EvalResult(
        pass_at_1=sum(per_problem) / len(per_problem),
        per_problem=per_problem,
        n_samples=parts[0].n_samples,
        mean_length=sum(p.mean_length * p.n_completions for p in filled) / completions,
        truncation_rate=sum(p.truncation_rate * p.n_completions for p in filled) / completions,
        teacher_kl=sum(p.teacher_kl * p.kl_tokens for p in filled if p.kl_tokens) / kl_tokens if kl_tokens else None,
        examples=[e for p in parts for e in p.examples][: len(parts[0].examples)],
        n_completions=completions,
        kl_tokens=kl_tokens,
    )

