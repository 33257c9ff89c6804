"""Per-token distillation losses on rollouts (METHOD.md section 1).

The loss is computed from final hidden states and output weights in row chunks (`trb.core.chunked_divergence`), only
at positions that predict a completion token, so the full (tokens x V) logits never exist. Each chunk's logits are
put on the pair's shared vocabulary (sliced, EOS-merged) before any divergence. Reduction is by the caller-given
token weights (1 / global token count, times an importance weight for MiniLLM), so a step's loss does not depend
on how it is split into micro-batches or ranks.

The divergence (`LossSpec.divergence`, one switch, METHOD.md section 1) is looked up in the table of
`trb.divergences`: "reverse_kl" (exact), "topk_student_weighted_kl" (the paper's estimator), "topk_reverse_kl",
"sampled_reverse_kl", "forward_kl", "jsd", and any divergence added with `register_divergence`. What an entry reads
of the teacher (the vocabulary, the student's top-k, the sampled token) decides whether the teacher log-probs recorded
while decoding can replace the teacher pass.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn
from transformers import PreTrainedModel

from trb.core import chunked_divergence, entropy, merged_logp, reverse_kl
from trb.divergences import Divergence, LossSpec, Sampled
from trb.models import VocabSpace, plain_forward
from trb import lean
from trb.rollout import Rollout

# target(student_logp (n, V) detached, teacher_logp (n, V)) -> target log-probs (n, V); the teacher by default.
Target = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@functools.cache
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=None)


def veto_target(b: float) -> Target:
    """Veto's target: Q proportional to pi_T * pi_S^b with the student detached (METHOD.md section 3)."""
    return lambda student_logp, teacher_logp: torch.log_softmax(teacher_logp + b * student_logp, dim=-1)


def completion_select(rollout: Rollout) -> torch.Tensor:
    """(B, P + T) bool: the sequence positions whose next-token distribution predicts a valid completion token
    (completion token t is predicted at column P - 1 + t). Their row-major order is that of completion_mask."""
    (batch, prompt_width), steps = rollout.prompt_ids.shape, rollout.completion_mask.shape[1]
    select = torch.zeros((batch, prompt_width + steps), dtype=torch.bool, device=rollout.prompt_ids.device)
    select[:, prompt_width - 1 : prompt_width - 1 + steps] = rollout.completion_mask  # (B, P + T)
    return select


def aligned_groups(attention_mask: torch.Tensor, groups: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Rows of a padded batch in up to `groups` groups of similar length, each row's attended tokens moved to the
    front: (rows (b,), columns (b, w)) per group, where w is the group's longest row and columns[i, j] is the column
    that row i's j-th attended token comes from (past the row's length: its last column, padding that no attended
    token sees under a causal mask). None when some row's attended tokens are not contiguous.

    Rollouts are left-padded prompts followed by right-padded completions, so each row's tokens are contiguous; moved
    to the front, they need no attention mask at all (causal attention never looks past a token), and the group
    processes only its longest row's length instead of the batch's full width."""
    attended = attention_mask.bool()  # (B, L)
    width = attended.shape[1]
    columns = torch.arange(width, device=attended.device)  # (L,)
    first = torch.where(attended, columns, width).amin(1)  # (B,)
    lengths = attended.sum(1)  # (B,)
    last = torch.where(attended, columns, -1).amax(1)  # (B,)
    if bool(((last - first + 1) != lengths).any()) or bool((lengths == 0).any()):
        return None
    order = lengths.argsort(stable=True)  # (B,)
    bounds = least_padding_split(lengths[order].cpu(), groups)
    spans = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        rows = order[start:end]  # (b,)
        w = int(lengths[rows].max())
        spans.append((rows, (first[rows, None] + columns[:w]).clamp_max(last[rows, None])))  # (b, w)
    return spans


def least_padding_split(lengths: torch.Tensor, groups: int) -> list[int]:
    """Boundaries 0 = e_0 < e_1 < ... < e_k = B cutting ascending lengths (B,) into at most `groups` runs of at least
    two rows (a lone row would be a batch of one, which compiled forwards treat as a shape of its own) with the least
    padded size, sum over runs of (rows in the run) x (its longest length): dynamic programming over the end of the
    last run, O(k B^2); batches past 1,024 rows are cut into runs of equal counts instead."""
    n = len(lengths)
    least = min(2, n)  # rows per run
    k = max(1, min(groups, n // least))
    if n > 1024:
        return [n * g // k for g in range(k + 1)]
    ends = torch.arange(n + 1)
    size = ends[:, None] - ends[None, :]  # (n + 1, n + 1): rows in the run (i, j]
    longest = torch.cat([lengths.new_zeros(1), lengths]).double()  # (n + 1,): the longest row of a run ending at j
    cost = torch.full((n + 1,), float("inf"), dtype=torch.float64)  # least padded size of the first j rows
    cost[0] = 0.0
    choices = []
    for _ in range(k):
        total = torch.where(size >= least, cost[None, :] + size * longest[:, None], float("inf"))  # (n + 1, n + 1)
        cost, choice = total.min(1)
        choices.append(choice)
    bounds = [n]
    for choice in reversed(choices):
        bounds.append(int(choice[bounds[-1]]))
    return bounds[::-1]


class FinalHidden(nn.Module):
    """A causal LM's final hidden states (after the last norm). Wrapping the base model in a module of its own lets
    data-parallel wrappers see the forward that produces them; the output layer is applied in chunks by the loss.

    With `select` (a (B, L) bool mask) the forward returns only the selected positions' states, (N, d) in row-major
    order, and runs the rows in `groups` groups of similar length with each row's tokens moved to the front
    (`aligned_groups`): rollouts vary in length, and the padding of one rectangle costs as much compute as real
    tokens; aligned rows also need no attention mask. Positions are taken to count attended tokens
    (`trb.rollout.position_ids`), so no result changes. With forward "auto" or "lean" Llama-family models then run
    `trb.lean.final_hidden` (where `lean.trains` says it reproduces them), whose last layer skips the positions nobody
    reads; others (and forward "hf") the Hugging Face base model. With `compile` the forward runs through
    torch.compile (dynamic shapes)."""

    def __init__(self, model: PreTrainedModel, groups: int = 1, compile: bool = False, forward: str = "auto"):
        super().__init__()
        self.model = model
        self.groups = groups
        self.compile = compile
        self.forward_kind = forward

    def _states(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        base = compiled_base(self.model) if self.compile else self.model.base_model
        out = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return out.last_hidden_state  # (b, l, d)

    def forward(self, input_ids, attention_mask, position_ids, select=None) -> torch.Tensor:
        if select is None:
            return self._states(input_ids, attention_mask, position_ids)  # (B, L, d)
        spans = aligned_groups(attention_mask, self.groups)
        if spans is None:  # tokens with gaps: one padded rectangle under the mask
            return self._states(input_ids, attention_mask, position_ids)[select]  # (N, d)
        lean_forward = None
        if self.forward_kind != "hf" and lean.trains(self.model):
            lean_forward = lean.compiled_final_hidden() if self.compile else lean.final_hidden
        flat = torch.arange(select.numel(), device=select.device).view(select.shape)  # (B, L) row-major index
        parts, where = [], []
        for rows, columns in spans:
            b, w = columns.shape
            steps = torch.arange(w, device=columns.device)  # (w,)
            ids = input_ids[rows].gather(1, columns)  # (b, w)
            chosen = select[rows].gather(1, columns) & (columns - columns[:, :1] == steps)  # (b, w)
            if lean_forward is not None:
                # every aligned row sits at positions 0 ... w - 1: one row of rotary angles serves all
                parts.append(lean_forward(self.model, ids, steps[None], chosen.flatten().nonzero()[:, 0]))
            else:
                parts.append(self._states(ids, None, steps.expand(b, w))[chosen])  # (n_g, d)
            where.append(flat[rows].gather(1, columns)[chosen])  # (n_g,)
        return torch.cat(parts)[torch.cat(where).argsort()]  # (N, d) back in row-major order


def compiled_base(model: PreTrainedModel) -> nn.Module:
    """torch.compile of the model's base (the decoder without the output layer), kept on the model: dynamic shapes,
    so one compilation serves every batch size and length. Models whose forward is not plainly their own (FSDP2
    hooks, offloading) keep the eager forward."""
    if not plain_forward(model):
        return model.base_model
    store = vars(model)  # not a registered submodule: no second copy of the weights in state_dict or parameters()
    if "_trb_compiled_base" not in store:
        store["_trb_compiled_base"] = torch.compile(model.base_model, dynamic=True)
    return store["_trb_compiled_base"]


def output_weight(model: PreTrainedModel, vocab: VocabSpace) -> torch.Tensor:
    """The output layer's weight rows of the shared vocabulary, (V, d)."""
    return model.get_output_embeddings().weight[: vocab.size]


@torch.no_grad()
def token_logp(model: PreTrainedModel, rollout: Rollout, vocab: VocabSpace,
               groups: int = LossSpec.length_groups) -> torch.Tensor:
    """Log-probs (B, T) of the completion tokens under model, through the same forward path as the loss (one pass
    over prompt + completion, final hidden states, output rows of the shared vocabulary); 0 at masked positions."""
    input_ids, attention_mask, positions = rollout.sequences()  # (B, L)
    hidden = FinalHidden(model, groups)(input_ids, attention_mask, positions, completion_select(rollout))  # (N, d)
    logits = hidden @ output_weight(model, vocab).T  # (N, V)
    logp = merged_logp(logits, vocab.size, vocab.stop_tensor(logits.device), vocab.eos_id)  # (N, V)
    out = torch.zeros(rollout.completion_ids.shape, device=logits.device)  # (B, T)
    out[rollout.completion_mask] = logp.gather(-1, rollout.completion_ids[rollout.completion_mask][:, None])[:, 0]
    return out


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
    "teacher_entropy" H(pi_T), full-vocabulary values at each visited prefix whichever divergence trains. When the
    loss reuses recorded teacher log-probs instead of a teacher pass, both come from the rollout's records (the
    decoder computed them at each step); a rollout without them gives the loss's own per-token value as "teacher_kl"
    and no "teacher_entropy".
    """
    input_ids, attention_mask, positions = rollout.sequences()  # (B, L)
    select = completion_select(rollout)  # (B, L)
    hidden_fn = student_hidden_fn or FinalHidden(student, spec.length_groups, spec.compile)
    student_hidden = hidden_fn(input_ids, attention_mask, positions, select)  # (N, d_s)
    divergence = spec.entry
    # Reuse the teacher's log-probs recorded while decoding where the divergence reads nothing else: the sampled
    # token's (teacher_logp), or the student's top-k (recorded with record_topk = spec.top_k).
    if target is None and spec.reuse_teacher and (
        (divergence.reads == "sampled_token" and rollout.teacher_logp is not None)
        or (divergence.reads == "student_topk" and rollout.teacher_topk_logp is not None
            and rollout.teacher_topk_logp.shape[-1] == spec.top_k)
    ):
        return _loss_from_records(student, student_hidden, rollout, vocab, spec, divergence, token_weight)
    with torch.no_grad():
        teacher_fn = teacher_hidden_fn or FinalHidden(teacher, spec.length_groups, spec.compile)
        teacher_hidden = teacher_fn(input_ids, attention_mask, positions, select)
    tokens = rollout.completion_ids[rollout.completion_mask]  # (N,)
    behavior = rollout.behavior_logp[rollout.completion_mask]  # (N,)
    stop_ids = vocab.stop_tensor(input_ids.device)
    teacher_kl = torch.zeros(tokens.shape[0], device=tokens.device)  # (N,) diagnostics: KL(pi_S || pi_T)
    teacher_entropy = torch.zeros(tokens.shape[0], device=tokens.device)  # (N,) diagnostics: H(pi_T) at the prefix

    def fused_fn(student_logits, teacher_logits, chunk, weight):
        fused = _compiled(divergence.logit_grad) if spec.compile else divergence.logit_grad
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


def _loss_from_records(student, student_hidden, rollout: Rollout, vocab: VocabSpace, spec: LossSpec,
                       divergence: Divergence, token_weight: torch.Tensor):
    """distill_loss without a teacher pass: the divergence on the support it reads (the sampled token, or the
    student's top-k ids recorded during decoding, in descending order), from the teacher log-probs recorded there."""
    mask = rollout.completion_mask
    stop_ids = vocab.stop_tensor(student_hidden.device)
    if divergence.reads == "sampled_token":
        ids, teacher = rollout.completion_ids[mask][:, None], rollout.teacher_logp[mask][:, None]  # (N, 1)
    else:
        ids, teacher = rollout.topk_ids[mask], rollout.teacher_topk_logp[mask]  # (N, k)
    behavior = rollout.behavior_logp[mask]  # (N,)

    def per_token_fn(student_logits, _teacher_logits, chunk):
        s = merged_logp(student_logits, vocab.size, stop_ids, vocab.eos_id).gather(-1, ids[chunk])  # (n, m)
        # on the sampled token's support the token sits at index 0; a top-k divergence is given no sampled token
        on_token = divergence.reads == "sampled_token"
        sampled = Sampled(torch.zeros_like(ids[chunk]), behavior[chunk]) if on_token else None  # index (n, 1)
        return divergence.fn(s, teacher[chunk], spec, sampled)

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
