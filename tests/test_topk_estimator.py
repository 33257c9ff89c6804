"""The paper's top-k estimator (`topk_student_weighted_kl`): its gradient in float64 against the formula computed
independently (numpy, the closed-form Jacobian of log-softmax), and where it must agree with the full reverse KL and
the renormalized top-k KL."""

import numpy as np
import pytest
import torch

from trb.core import reverse_kl, topk_reverse_kl, topk_student_weighted_kl


def logits_pair(shape, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_()
    t = torch.log_softmax(torch.randn(*shape, generator=g, dtype=torch.float64) * scale, -1)
    return z, t


def formula(z: np.ndarray, t: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(value (N,), gradient w.r.t. the logits (N, V)) of the paper's estimator, one position at a time in numpy:
    V_t = the k most probable tokens, w_v = p_v / sum_{u in V_t} p_u, value sum_v w_v (log p_v - log q_v), gradient
    sum_v w_v (log p_v - log q_v) grad log p_v with grad_z log p_v = e_v - p."""
    values, grads = np.zeros(len(z)), np.zeros_like(z)
    for i, (zi, ti) in enumerate(zip(z, t)):
        logp = zi - np.log(np.exp(zi - zi.max()).sum()) - zi.max()
        p = np.exp(logp)
        top = np.argsort(-p, kind="stable")[:k]
        w = p[top] / p[top].sum()
        advantage = logp[top] - ti[top]
        values[i] = (w * advantage).sum()
        for v, wv, av in zip(top, w, advantage):
            e_v = np.zeros_like(p)
            e_v[v] = 1.0
            grads[i] += wv * av * (e_v - p)
    return values, grads


def surrogate_grad(fn, z, t):
    values = fn(torch.log_softmax(z, -1), t)  # (..., )
    (grad,) = torch.autograd.grad(values.sum(), z)
    return values.detach(), grad


@pytest.mark.parametrize("k", [1, 3, 16])
def test_gradient_equals_the_formula_float64(k):
    z, t = logits_pair((40, 50), seed=k)
    values, grad = surrogate_grad(lambda s, q: topk_student_weighted_kl(s, q, k), z, t)
    ref_values, ref_grad = formula(z.detach().numpy(), t.numpy(), k)
    np.testing.assert_allclose(values.numpy(), ref_values, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=1e-10, atol=1e-12)


def test_whole_vocabulary_equals_the_reverse_kl_in_value_and_gradient():
    z, t = logits_pair((3, 7, 30), seed=1)
    values, grad = surrogate_grad(lambda s, q: topk_student_weighted_kl(s, q, 30), z, t)
    full_values, full_grad = surrogate_grad(reverse_kl, z, t)
    renorm_values, renorm_grad = surrogate_grad(lambda s, q: topk_reverse_kl(s, q, 30), z, t)
    torch.testing.assert_close(values, full_values, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, full_grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, renorm_grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(values, renorm_values, rtol=1e-12, atol=1e-12)


def test_differs_from_the_renormalized_kl_by_the_gradient_of_the_topk_mass():
    """grad(renormalized top-k KL) = grad(paper) - E_w[log p - log q] grad log (top-k mass): the two estimators differ
    exactly where the top-k misses probability, and not otherwise."""
    k = 4
    z, t = logits_pair((25, 12), seed=3)
    _, paper = surrogate_grad(lambda s, q: topk_student_weighted_kl(s, q, k), z, t)
    _, renorm = surrogate_grad(lambda s, q: topk_reverse_kl(s, q, k), z, t)
    logp = torch.log_softmax(z.detach(), -1)
    top = logp.topk(k, -1).indices
    w = torch.softmax(logp.gather(-1, top), -1)
    mean_advantage = (w * (logp.gather(-1, top) - t.gather(-1, top))).sum(-1, keepdim=True)  # (N, 1)
    grad_log_mass = torch.zeros_like(logp).scatter(-1, top, w) - logp.exp()  # (N, V): sum_u w_u e_u - p
    torch.testing.assert_close(renorm, paper - mean_advantage * grad_log_mass, rtol=1e-10, atol=1e-12)
    assert (paper - renorm).abs().max() > 1e-3, "with k < V the two estimators must differ"


def test_zero_probability_tokens_give_no_nan():
    """Merged stop ids have probability 0 (-inf) under both models: no term, finite value and gradient."""
    z, t = logits_pair((6, 10), seed=5)
    dead = torch.tensor([2, 7])
    t = torch.log_softmax(t.index_fill(-1, dead, float("-inf")), -1)

    def student(z):
        return torch.log_softmax(z.index_fill(-1, dead, float("-inf")), -1)

    values = topk_student_weighted_kl(student(z), t, 10)
    (grad,) = torch.autograd.grad(values.sum(), z)
    assert torch.isfinite(values).all() and torch.isfinite(grad).all()
    alive = torch.tensor([v for v in range(10) if v not in dead.tolist()])
    full = reverse_kl(torch.log_softmax(z[:, alive], -1), t[:, alive])  # the same KL without the dead tokens
    (full_grad,) = torch.autograd.grad(full.sum(), z)
    torch.testing.assert_close(values, full.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, full_grad, rtol=1e-10, atol=1e-12)
    assert torch.all(grad[:, dead] == 0)


def test_value_is_zero_and_gradient_zero_when_student_equals_teacher():
    z, _ = logits_pair((5, 9), seed=6)
    values, grad = surrogate_grad(lambda s, q: topk_student_weighted_kl(s, q, 3), z,
                                  torch.log_softmax(z.detach(), -1))
    assert values.abs().max() < 1e-12 and grad.abs().max() < 1e-12
