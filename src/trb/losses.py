"""Per-token distillation losses on rollouts (METHOD.md section 1).

The loss turns final hidden states (`trb.forward`) and output weights into per-token losses in row chunks
(`trb.core.chunked_divergence`), only at positions that predict a completion token, so the full (tokens x V) logits
never exist. Each chunk's logits are put on the pair's shared vocabulary (sliced, EOS-merged) before any divergence.
Reduction is by the caller-given token weights (1 / global token count, times an importance weight for MiniLLM), so a
step's loss does not depend on how it is split into micro-batches or ranks.

The divergence (`LossSpec.divergence`, one switch, METHOD.md section 1) is looked up in the table of
`trb.divergences`: "reverse_kl" (exact), "topk_student_weighted_kl" (the paper's estimator), "topk_reverse_kl",
"sampled_reverse_kl", "forward_kl", "jsd", and any divergence added with `register_divergence`. What an entry reads
of the teacher (the vocabulary, the student's top-k, the sampled token; `LossSpec.recorded`) decides whether the
teacher log-probs recorded while decoding can replace the teacher pass.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn
from transformers import PreTrainedModel

from trb.core import chunked_divergence, entropy, merged_logp, reverse_kl
from trb.divergences import LossSpec, Sampled
from trb.forward import FinalHidden, completion_select, output_weight
from trb.models import VocabSpace
from trb.sequences import Rollout

# target(student_logp (n, V) detached, teacher_logp (n, V)) -> target log-probs (n, V); the teacher by default.
Target = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@functools.cache
def compiled(fn: Callable) -> Callable:
    """torch.compile of fn, made once per function (the closed-form loss under `loss.compile`)."""
    return torch.compile(fn, dynamic=None)


def veto_target(b: float) -> Target:
    """Veto's target: Q proportional to pi_T * pi_S^b with the student detached (METHOD.md section 3)."""
    return lambda student_logp, teacher_logp: torch.log_softmax(teacher_logp + b * student_logp, dim=-1)


def distill_loss(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    rollout: Rollout,
    vocab: VocabSpace,
    spec: LossSpec,
    token_weight: torch.Tensor,
    target: Target | None = None,
    student_hidden_fn: nn.Module | None = None,
    teacher_hidden_fn: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted divergence of the student from the target at every valid completion position.

    token_weight: (B, T) weight of each completion token (0 where masked), e.g. mask / global token count.
    student_hidden_fn: the module that computes the student's final hidden states (a DDP wrapper of
    FinalHidden(student) under data parallelism); FinalHidden(student) by default; teacher_hidden_fn likewise for the
    teacher.
    Returns (loss, per_token, diagnostics): the differentiable scalar, the detached per-token divergence (B, T),
    and per-token diagnostics (B, T): "teacher_kl" KL(pi_S || pi_T) (equal to per_token for plain OPD) and
    "teacher_entropy" H(pi_T), full-vocabulary values at each visited prefix whichever divergence trains.

    Two paths, chosen once: where the rollout holds the teacher log-probs the divergence reads (`recorded_teacher`)
    and the target is the teacher, the loss takes them instead of a teacher pass (`loss_from_records`; its
    diagnostics come from the rollout's records, or, without them, "teacher_kl" is the loss's own per-token value and
    there is no "teacher_entropy"); otherwise the teacher runs over the rollout (`loss_with_teacher`).
    """
    records = recorded_teacher(rollout, spec) if target is None else None
    input_ids, attention_mask, positions = rollout.sequences()  # (B, L)
    select = completion_select(rollout)  # (B, L)
    hidden_fn = student_hidden_fn or FinalHidden(student, spec.length_groups, spec.compile)
    student_hidden = hidden_fn(input_ids, attention_mask, positions, select)  # (N, d_s)
    if records is not None:
        return loss_from_records(student, student_hidden, records, rollout, vocab, spec, token_weight)
    with torch.no_grad():
        teacher_fn = teacher_hidden_fn or FinalHidden(teacher, spec.length_groups, spec.compile)
        teacher_hidden = teacher_fn(input_ids, attention_mask, positions, select)  # (N, d_t)
    return loss_with_teacher(student, teacher, student_hidden, teacher_hidden, rollout, vocab, spec, token_weight,
                             target)


def recorded_teacher(rollout: Rollout, spec: LossSpec) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The teacher log-probs the decoder recorded on the support the loss's divergence reads (`LossSpec.recorded`),
    as (ids (N, m), teacher_logp (N, m)) at the valid completion positions: the sampled token (m = 1), or the
    student's top-k (m = k, recorded with record_topk = spec.top_k); None when the loss needs a teacher pass."""
    mask = rollout.completion_mask  # (B, T)
    if spec.recorded == "sampled_token" and rollout.teacher_logp is not None:
        return rollout.completion_ids[mask][:, None], rollout.teacher_logp[mask][:, None]  # (N, 1)
    topk = rollout.teacher_topk_logp
    if spec.recorded == "student_topk" and topk is not None and topk.shape[-1] == spec.top_k:
        return rollout.topk_ids[mask], topk[mask]  # (N, k)
    return None


def loss_with_teacher(student: PreTrainedModel, teacher: PreTrainedModel, student_hidden: torch.Tensor,
                      teacher_hidden: torch.Tensor, rollout: Rollout, vocab: VocabSpace, spec: LossSpec,
                      token_weight: torch.Tensor, target: Target | None):
    """distill_loss from both models' final hidden states (N, d) at the valid completion positions: the divergence on
    the full shared vocabulary, in chunks, with the full-vocabulary teacher-KL and teacher entropy beside it."""
    divergence = spec.entry
    tokens = rollout.completion_ids[rollout.completion_mask]  # (N,)
    behavior = rollout.behavior_logp[rollout.completion_mask]  # (N,)
    stop_ids = vocab.stop_tensor(tokens.device)
    teacher_kl = torch.zeros(tokens.shape[0], device=tokens.device)  # (N,) diagnostics: KL(pi_S || pi_T)
    teacher_entropy = torch.zeros(tokens.shape[0], device=tokens.device)  # (N,) diagnostics: H(pi_T) at the prefix

    def fused_fn(student_logits, teacher_logits, chunk, weight):
        fused = compiled(divergence.logit_grad) if spec.compile else divergence.logit_grad
        value, grad, entropy = fused(student_logits, teacher_logits, weight, vocab.size, stop_ids)
        teacher_kl[chunk] = value
        teacher_entropy[chunk] = entropy
        return value, grad

    # a divergence with a closed-form logit gradient (the exact OPD loss): loss and gradient in one pass, no autograd
    logit_grad_fn = fused_fn if divergence.logit_grad is not None and target is None else None

    def per_token_fn(student_logits, teacher_logits, chunk):
        s = merged_logp(student_logits, vocab.size, stop_ids, vocab.eos_id)  # (n, V)
        t = merged_logp(teacher_logits, vocab.size, stop_ids, vocab.eos_id)  # (n, V)
        teacher_kl[chunk] = reverse_kl(s.detach(), t)
        teacher_entropy[chunk] = entropy(t)
        if target is not None:
            t = target(s.detach(), t)
        return divergence.fn(s, t, spec, Sampled(tokens[chunk, None], behavior[chunk]))

    loss, values = chunked_divergence(
        student_hidden,
        output_weight(student, vocab),
        teacher_hidden,
        output_weight(teacher, vocab),
        token_weight[rollout.completion_mask],
        per_token_fn,
        spec.chunk_size,
        logit_grad_fn,
    )
    per_token = torch.zeros_like(token_weight, dtype=torch.float32)  # (B, T)
    per_token[rollout.completion_mask] = values
    diagnostics = {}
    for name, values_n in (("teacher_kl", teacher_kl), ("teacher_entropy", teacher_entropy)):
        diagnostics[name] = torch.zeros_like(per_token)  # (B, T)
        diagnostics[name][rollout.completion_mask] = values_n
    return loss, per_token, diagnostics


def loss_from_records(student: PreTrainedModel, student_hidden: torch.Tensor,
                      records: tuple[torch.Tensor, torch.Tensor], rollout: Rollout, vocab: VocabSpace,
                      spec: LossSpec, token_weight: torch.Tensor):
    """distill_loss without a teacher pass: the divergence on the support it reads, records = (ids (N, m), teacher
    log-probs (N, m)) from `recorded_teacher` (the sampled token, or the student's top-k ids in descending order)."""
    mask = rollout.completion_mask  # (B, T)
    ids, teacher = records
    stop_ids = vocab.stop_tensor(student_hidden.device)
    behavior = rollout.behavior_logp[mask]  # (N,)
    on_token = spec.recorded == "sampled_token"

    def per_token_fn(student_logits, _teacher_logits, chunk):
        s = merged_logp(student_logits, vocab.size, stop_ids, vocab.eos_id).gather(-1, ids[chunk])  # (n, m)
        # on the sampled token's support the token sits at index 0; a top-k divergence is given no sampled token
        sampled = Sampled(torch.zeros_like(ids[chunk]), behavior[chunk]) if on_token else None  # index (n, 1)
        return spec.entry.fn(s, teacher[chunk], spec, sampled)

    loss, values = chunked_divergence(student_hidden, output_weight(student, vocab), None, None, token_weight[mask],
                                      per_token_fn, spec.chunk_size)
    per_token = torch.zeros_like(token_weight, dtype=torch.float32)  # (B, T)
    per_token[mask] = values
    diagnostics = {"teacher_kl": per_token if rollout.teacher_kl is None else rollout.teacher_kl}
    if rollout.teacher_entropy is not None:
        diagnostics["teacher_entropy"] = rollout.teacher_entropy
    return loss, per_token, diagnostics


def sft_loss(
    student: PreTrainedModel,
    rollout: Rollout,
    vocab: VocabSpace,
    token_weight: torch.Tensor,
    chunk_size: int = 1024,
    hidden_fn: nn.Module | None = None,
    groups: int = LossSpec.length_groups,
) -> torch.Tensor:
    """Weighted cross-entropy -log pi_S(y_t) of the completion tokens (SFT on teacher samples or data), computed in
    chunks from hidden states like the distillation loss. token_weight: (B, T); hidden_fn as in distill_loss, groups
    as in FinalHidden when hidden_fn is not given."""
    input_ids, attention_mask, positions = rollout.sequences()  # (B, L)
    select = completion_select(rollout)  # (B, L)
    hidden = (hidden_fn or FinalHidden(student, groups))(input_ids, attention_mask, positions, select)  # (N, d)
    tokens = rollout.completion_ids[rollout.completion_mask]  # (N,)
    stop_ids = vocab.stop_tensor(input_ids.device)

    def per_token_fn(student_logits, _teacher_logits, chunk):
        logp = merged_logp(student_logits, vocab.size, stop_ids, vocab.eos_id)  # (n, V)
        return -logp.gather(-1, tokens[chunk, None])[:, 0]

    loss, _ = chunked_divergence(hidden, output_weight(student, vocab), None, None,
                                 token_weight[rollout.completion_mask], per_token_fn, chunk_size)
    return loss
