"""Reverse KL and its gradient with respect to the student's logits in closed form, for the chunked loss.

For student logits z_s and teacher logits z_t on the shared vocabulary, with p = softmax(z_s) and
r = log softmax(z_s) - log softmax(z_t):

    KL(p || q) = sum_a p_a r_a,        d KL / d z_s = p * (r - KL).

With several stop ids merged into one stop event (`trb.core.vocab.merged_logp`), r on every stop id is the merged
event's log-ratio and the same formula holds for the unmerged logits: each stop token carries its share p_j of the
event. One pass over a chunk's logits gives the loss and the gradient, with no autograd graph and no saved
(n x V) tensors; compiled, it is a few fused kernels.
"""

from __future__ import annotations

import torch


def reverse_kl_with_grad(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    weight: torch.Tensor,
    vocab_size: int,
    stop_ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KL(pi_S || pi_T) per row, its weighted logit gradient, and the teacher's entropy, on the stop-merged space.

    student_logits: (n, V_s), teacher_logits: (n, V_t), both with V >= vocab_size (columns past it are not part
    of the shared vocabulary); weight: (n,); stop_ids: (k,) int64 ids merged into one stop event.
    Returns kl (n,) fp32; grad (n, V_s) in student_logits' dtype, weight_i * d KL_i / d z_s (zero past vocab_size);
    teacher_entropy (n,) fp32.
    """
    s = torch.log_softmax(student_logits[:, :vocab_size].float(), dim=-1)  # (n, V)
    t = torch.log_softmax(teacher_logits[:, :vocab_size].float(), dim=-1)  # (n, V)
    t_prob = t.exp()  # (n, V)
    ratio = s - t  # (n, V) log-ratio per token
    if stop_ids.numel() > 1:
        is_stop = torch.zeros(vocab_size, dtype=torch.bool, device=s.device).index_fill(0, stop_ids, True)  # (V,)
        s_stop = torch.logsumexp(s.index_select(-1, stop_ids), dim=-1)  # (n,) log P_S(stop)
        t_stop = torch.logsumexp(t.index_select(-1, stop_ids), dim=-1)  # (n,) log P_T(stop)
        ratio = torch.where(is_stop, (s_stop - t_stop)[:, None], ratio)  # (n, V)
        entropy = -(torch.where(is_stop, 0.0, t_prob * t).sum(-1) + t_stop.exp() * t_stop)  # (n,)
    else:
        entropy = -(t_prob * t).sum(-1)  # (n,)
    p = s.exp()  # (n, V)
    kl = (p * ratio).sum(-1)  # (n,)
    grad = p * (ratio - kl[:, None]) * weight.float()[:, None]  # (n, V)
    pad = student_logits.shape[-1] - vocab_size
    if pad:
        grad = torch.nn.functional.pad(grad, (0, pad))  # (n, V_s)
    return kl, grad.to(student_logits.dtype), entropy
