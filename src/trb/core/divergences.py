"""Per-token divergences between the student and a fixed target (the teacher, or a method's target).

Every function takes log-probabilities (B, T, V) (any leading shape works) and returns an unreduced (B, T) tensor in
fp32. The target side is detached: gradients flow to the student only. Reduction over tokens is the caller's
(`trb.core.reduce.token_mean`), so results do not depend on how a batch is split.

Conventions follow TRL where users know them: `generalized_jsd(beta)` with beta = 0 the forward KL(teacher || student)
and beta = 1 the reverse KL(student || teacher).
"""

from __future__ import annotations

import math

import torch

from trb.core.numerics import upcast


def _xlogy_diff(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Elementwise p (log p - log q) with 0 where p = 0, (..., V). The difference is zeroed before the product, not
    after: p * (-inf) at p = 0 would give NaN in the forward and, through the product's backward, NaN gradients
    even where the where() discards it."""
    return p * torch.where(p > 0, log_p - log_q, 0.0)


def reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """KL(pi_S || pi_T) at each position: the OPD loss (METHOD.md section 1). (B, T, V) x 2 -> (B, T)."""
    s = upcast(student_logp)  # (B, T, V)
    t = upcast(teacher_logp.detach())  # (B, T, V)
    return _xlogy_diff(s.exp(), s, t).sum(-1)


def entropy(logp: torch.Tensor) -> torch.Tensor:
    """H(p) = -sum_a p(a) log p(a) at each position, fp32; tokens with p = 0 contribute 0. (..., V) -> (...)."""
    logp = upcast(logp)  # (..., V)
    return -torch.where(logp > float("-inf"), logp.exp() * logp, 0.0).sum(-1)


def forward_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """KL(pi_T || pi_S) at each position. (B, T, V) x 2 -> (B, T)."""
    s = upcast(student_logp)  # (B, T, V)
    t = upcast(teacher_logp.detach())  # (B, T, V)
    return _xlogy_diff(t.exp(), t, s).sum(-1)


def generalized_jsd(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence (GKD), TRL's convention. (B, T, V) x 2 -> (B, T).

    M = beta pi_T + (1 - beta) pi_S;  JSD(beta) = beta KL(pi_T || M) + (1 - beta) KL(pi_S || M).
    beta = 0 is the forward KL(pi_T || pi_S) and beta = 1 the reverse KL(pi_S || pi_T) (TRL's endpoints).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized_jsd beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student_logp, teacher_logp)
    if beta == 1.0:
        return reverse_kl(student_logp, teacher_logp)
    s = upcast(student_logp)  # (B, T, V)
    t = upcast(teacher_logp.detach())  # (B, T, V)
    mixture = torch.logaddexp(s + math.log(1.0 - beta), t + math.log(beta))  # (B, T, V)
    kl_teacher = _xlogy_diff(t.exp(), t, mixture).sum(-1)  # (B, T)
    kl_student = _xlogy_diff(s.exp(), s, mixture).sum(-1)  # (B, T)
    return beta * kl_teacher + (1.0 - beta) * kl_student


def topk_reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, k: int) -> torch.Tensor:
    """Reverse KL on the student's top-k support, both distributions renormalized there (the paper's k = 16).

    The support is chosen from the current student (no gradient through the choice). (B, T, V) x 2 -> (B, T).
    """
    s = upcast(student_logp)  # (B, T, V)
    t = upcast(teacher_logp.detach())  # (B, T, V)
    k = min(k, s.shape[-1])
    idx = s.detach().topk(k, dim=-1).indices  # (B, T, k)
    s_k = s.gather(-1, idx)  # (B, T, k)
    t_k = t.gather(-1, idx)  # (B, T, k)
    s_k = s_k - torch.logsumexp(s_k, dim=-1, keepdim=True)  # (B, T, k)
    t_k = t_k - torch.logsumexp(t_k, dim=-1, keepdim=True)  # (B, T, k)
    return _xlogy_diff(s_k.exp(), s_k, t_k).sum(-1)


def topk_student_weighted_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, k: int) -> torch.Tensor:
    """The paper's top-k estimator (top-k OPD, `reward_weight_mode=student_p`, METHOD.md section 1) as a surrogate
    loss. (B, T, V) x 2 -> (B, T).

    Per position, V_t = the current student's top-k tokens and w_v = pi_S(v) / sum_{u in V_t} pi_S(u), held constant.
    The log-probs are full-vocabulary ones (not renormalized over V_t). The value is the weighted sum
    sum_{v in V_t} w_v (log pi_S(v) - log pi_T(v)), and the gradient is exactly

        sum_{v in V_t} w_v (log pi_S(v) - log pi_T(v)) grad log pi_S(v)

    (the advantage log pi_S - log pi_T enters as a constant, as in a single-epoch policy gradient with ratio 1). This
    is not the gradient of the value: that would add sum_v w_v grad log pi_S(v) = grad log sum_{u in V_t} pi_S(u),
    zero only when V_t holds the whole vocabulary. With k = V the gradient is that of the full reverse KL.
    `topk_reverse_kl`, the KL between both distributions renormalized over V_t, differs from it by
    E_w[log pi_S - log pi_T] grad log sum_{u in V_t} pi_S(u).
    """
    s = upcast(student_logp)  # (B, T, V)
    t = upcast(teacher_logp.detach())  # (B, T, V)
    k = min(k, s.shape[-1])
    idx = s.detach().topk(k, dim=-1).indices  # (B, T, k)
    s_k = s.gather(-1, idx)  # (B, T, k) full-vocabulary log pi_S
    t_k = t.gather(-1, idx)  # (B, T, k) full-vocabulary log pi_T
    weight = torch.softmax(s_k.detach(), dim=-1)  # (B, T, k) pi_S(v) / sum_{u in V_t} pi_S(u), constant
    counts = weight > 0  # (B, T, k) tokens of probability 0 (merged stop ids) carry no term and no NaN
    s_k = torch.where(counts, s_k, 0.0)  # (B, T, k)
    advantage = torch.where(counts, s_k.detach() - t_k, 0.0)  # (B, T, k)
    return (weight * advantage * (1.0 + s_k - s_k.detach())).sum(-1)


def sampled_reverse_kl(
    student_token_logp: torch.Tensor,
    teacher_token_logp: torch.Tensor,
    behavior_token_logp: torch.Tensor | None = None,
) -> torch.Tensor:
    """Single-token estimator of the reverse KL in policy-gradient form, (B, T) inputs -> (B, T).

    Inputs are the log-probabilities of the sampled tokens y_t: log pi_S(y) (with gradient), log pi_T(y), and
    optionally log mu(y) under the behavior policy that sampled them. The value is w (log pi_S(y) - log pi_T(y));
    the gradient is w (log pi_S(y) - log pi_T(y)) grad log pi_S(y), an unbiased estimate of the gradient of
    KL(pi_S || pi_T) at the prefix. w = pi_S(y) / mu(y) (detached) corrects for a behavior policy other than the
    student; without behavior_token_logp, w = 1 (on-policy).
    """
    s = upcast(student_token_logp)  # (B, T)
    advantage = (s - upcast(teacher_token_logp)).detach()  # (B, T)
    if behavior_token_logp is None:
        weight = torch.ones_like(advantage)  # (B, T)
    else:
        weight = torch.exp(s.detach() - upcast(behavior_token_logp))  # (B, T)
    return weight * advantage * (1.0 + s - s.detach())
