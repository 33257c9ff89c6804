"""A divergence loss from hidden states and output weights that never holds the full (tokens x V) logits.

The output layer dominates memory in distillation: for 8,192 tokens and V = 151,936 the student's fp32 logits alone
take 5 GB, and autograd keeps several such tensors. Here rows are processed in chunks; for each chunk the student
and teacher logits are formed, the per-token divergence and its weighted sum are computed, and the gradients with
respect to the chunk's hidden states and the output weight are taken at once, inside the forward pass. Only one
chunk's logits exist at a time; backward just scales the stored gradients.
"""

from __future__ import annotations

from typing import Callable

import torch

# per_token_fn(student_logits (n, V_s), teacher_logits (n, V_t) or None, rows: slice) -> (n,) loss per row, fp32.
# `rows` locates the chunk in the full batch so the function can index per-row extras (tokens, behavior log-probs).
PerTokenFn = Callable[[torch.Tensor, torch.Tensor, slice], torch.Tensor]
# logit_grad_fn(student_logits (n, V_s), teacher_logits (n, V_t) or None, rows: slice, weight (n,)) ->
# (per-row loss (n,) fp32, weight_i * d loss_i / d student_logits (n, V_s)): a closed form that replaces autograd.
LogitGradFn = Callable[[torch.Tensor, torch.Tensor, slice, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc + a @ b with acc fp32 and a, b possibly half precision: one GEMM accumulating into fp32 where the
    device offers it (CUDA), so no half-precision (V x d) product and no separate fp32 addition."""
    if a.dtype == acc.dtype and b.dtype == acc.dtype:
        return acc.addmm_(a, b)
    if acc.device.type == "cuda" and _MIXED_ADDMM:
        try:
            with torch.autocast("cuda", enabled=False):
                return torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
        except (RuntimeError, TypeError):  # a torch without mixed-precision addmm: the two-step way from now on
            _MIXED_ADDMM.clear()
    return acc.add_((a @ b).to(acc.dtype))


_MIXED_ADDMM = [True]  # emptied once torch.addmm(..., out_dtype=fp32) turns out not to be available


class _ChunkedLinearDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, token_weight, per_token_fn,
                chunk_size, logit_grad_fn):
        n_rows = student_hidden.shape[0]
        grad_hidden = torch.zeros_like(student_hidden, dtype=torch.float32)  # (N, d_s)
        grad_weight = torch.zeros_like(student_weight, dtype=torch.float32)  # (V_s, d_s)
        per_token = torch.zeros(n_rows, dtype=torch.float32, device=student_hidden.device)  # (N,)
        # False under no_grad (evaluation); a frozen output layer (LoRA students) needs no weight gradient
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        needs_grad = need_hidden or need_weight
        weight_leaf = student_weight.detach().requires_grad_(need_weight)  # (V_s, d_s)
        for start in range(0, n_rows, chunk_size):
            rows = slice(start, min(start + chunk_size, n_rows))
            hidden = student_hidden[rows].detach().requires_grad_(need_hidden)  # (n, d_s)
            teacher_logits = None
            if teacher_hidden is not None:
                with torch.no_grad():
                    teacher_logits = teacher_hidden[rows] @ teacher_weight.T  # (n, V_t)
            if logit_grad_fn is not None:  # closed-form gradient: no autograd graph for the chunk
                with torch.no_grad():
                    logits = hidden @ weight_leaf.T  # (n, V_s)
                    values, grad_logits = logit_grad_fn(logits, teacher_logits, rows, token_weight[rows])
                    if need_hidden:
                        grad_hidden[rows] = (grad_logits @ weight_leaf).float()  # (n, d_s)
                    if need_weight:
                        grad_weight = _add_product(grad_weight, grad_logits.T, hidden)  # (V_s, d_s)
                per_token[rows] = values.float()
                continue
            with torch.set_grad_enabled(needs_grad):
                student_logits = hidden @ weight_leaf.T  # (n, V_s)
                values = per_token_fn(student_logits, teacher_logits, rows)  # (n,)
                chunk_loss = (values * token_weight[rows]).sum()
            if needs_grad:
                wanted = [x for x, need in ((hidden, need_hidden), (weight_leaf, need_weight)) if need]
                grads = iter(torch.autograd.grad(chunk_loss, wanted))
                if need_hidden:
                    grad_hidden[rows] = next(grads).float()
                if need_weight:
                    grad_weight += next(grads).float()
            per_token[rows] = values.detach()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = (student_hidden.dtype, student_weight.dtype)
        loss = (per_token * token_weight.float()).sum()
        ctx.mark_non_differentiable(per_token)
        return loss, per_token

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_token):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        # scaled in place: a (V x d) fp32 temporary would be as large as the weight gradient itself
        return (
            grad_hidden.mul_(grad_loss).to(hidden_dtype),
            grad_weight.mul_(grad_loss).to(weight_dtype),
            None, None, None, None, None, None,
        )


def chunked_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    token_weight: torch.Tensor,
    per_token_fn: PerTokenFn | None,
    chunk_size: int = 1024,
    logit_grad_fn: LogitGradFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted divergence sum with gradients for the student's hidden states and output weight.

    student_hidden: (N, d_s) final hidden states of the positions that predict completion tokens;
    student_weight: (V_s, d_s) the student's output layer (no bias); teacher_hidden: (N, d_t) and
    teacher_weight: (V_t, d_t) likewise for the teacher (no gradient; both None for a loss that needs no teacher,
    such as cross-entropy); token_weight: (N,) per-row weight, e.g.
    mask / global token count. Returns (loss, per_token): the scalar sum_i token_weight_i * D_i, differentiable,
    and the detached per-row divergences D (N,). Peak extra memory is O(chunk_size x V) instead of O(N x V).
    logit_grad_fn, when given, replaces per_token_fn and autograd with a closed form that returns each chunk's
    divergences and their weighted gradient with respect to the student's logits (e.g.
    `trb.core.fused.reverse_kl_with_grad`).
    """
    if per_token_fn is None and logit_grad_fn is None:
        raise ValueError("chunked_divergence needs per_token_fn or logit_grad_fn")
    teacher_rows = student_hidden.shape[0] if teacher_hidden is None else teacher_hidden.shape[0]
    if student_hidden.shape[0] != teacher_rows or student_hidden.shape[0] != token_weight.shape[0]:
        raise ValueError(
            f"row counts differ: student {student_hidden.shape[0]}, teacher {teacher_rows}, "
            f"weights {token_weight.shape[0]}"
        )
    return _ChunkedLinearDivergence.apply(
        student_hidden, student_weight, teacher_hidden, teacher_weight, token_weight, per_token_fn, chunk_size,
        logit_grad_fn,
    )
