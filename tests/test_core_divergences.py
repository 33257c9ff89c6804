"""trb.core.divergences and the chunked loss path: closed forms, float64 references, properties, gradcheck."""

import math

import pytest
import torch

from trb.core import (
    chunked_divergence,
    entropy,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    sampled_reverse_kl,
    token_mean,
    topk_reverse_kl,
)


def logp_pair(shape, scale=1.5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = torch.log_softmax(torch.randn(*shape, generator=g, dtype=torch.float64) * scale, -1).to(dtype)
    t = torch.log_softmax(torch.randn(*shape, generator=g, dtype=torch.float64) * scale, -1).to(dtype)
    return s, t


def kl64(p_logp, q_logp):
    p_logp, q_logp = p_logp.double(), q_logp.double()
    return (p_logp.exp() * (p_logp - q_logp)).sum(-1)


def test_closed_form_bernoulli_kls():
    p, q = 0.2, 0.7
    s = torch.log(torch.tensor([[[p, 1 - p]]]))
    t = torch.log(torch.tensor([[[q, 1 - q]]]))
    rev = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    fwd = q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p))
    assert reverse_kl(s, t).item() == pytest.approx(rev, rel=1e-6)
    assert forward_kl(s, t).item() == pytest.approx(fwd, rel=1e-6)
    # symmetric JSD at beta = 0.5: M = (P + Q) / 2
    m = [(p + q) / 2, (2 - p - q) / 2]
    jsd = 0.5 * (q * math.log(q / m[0]) + (1 - q) * math.log((1 - q) / m[1])) + 0.5 * (
        p * math.log(p / m[0]) + (1 - p) * math.log((1 - p) / m[1])
    )
    assert generalized_jsd(s, t, 0.5).item() == pytest.approx(jsd, rel=1e-6)


def test_entropy_closed_forms():
    p = 0.2
    assert entropy(torch.log(torch.tensor([p, 1 - p]))).item() == pytest.approx(
        -p * math.log(p) - (1 - p) * math.log(1 - p), rel=1e-6)
    assert entropy(torch.full((3, 50), -math.log(50))).tolist() == pytest.approx([math.log(50)] * 3, rel=1e-6)
    # impossible tokens (-inf, as the merged stop ids leave) contribute 0, not nan; bf16 input computes in fp32
    masked = torch.tensor([[0.0, float("-inf"), float("-inf")], [-math.log(2), -math.log(2), float("-inf")]])
    assert entropy(masked).tolist() == pytest.approx([0.0, math.log(2)], abs=1e-6)
    s, _ = logp_pair((4, 1000), dtype=torch.bfloat16)
    assert entropy(s).dtype == torch.float32
    torch.testing.assert_close(entropy(s).double(), -(s.double().exp() * s.double()).sum(-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("vocab", [2, 7, 1000, 151936])
def test_against_float64_reference(vocab):
    shape = (2, 3, vocab) if vocab > 10000 else (4, 5, vocab)
    s, t = logp_pair(shape, seed=vocab)
    torch.testing.assert_close(reverse_kl(s, t).double(), kl64(s, t), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(forward_kl(s, t).double(), kl64(t, s), rtol=1e-5, atol=1e-6)
    for beta in [0.1, 0.5, 0.9]:
        s64, t64 = s.double(), t.double()
        m = torch.logsumexp(torch.stack([s64 + math.log(1 - beta), t64 + math.log(beta)]), 0)
        ref = beta * kl64(t64, m) + (1 - beta) * kl64(s64, m)
        torch.testing.assert_close(generalized_jsd(s, t, beta).double(), ref, rtol=1e-5, atol=1e-6)
    k = min(16, vocab)
    idx = s.topk(k, -1).indices
    s_k, t_k = s.double().gather(-1, idx), t.double().gather(-1, idx)
    ref = kl64(s_k - torch.logsumexp(s_k, -1, keepdim=True), t_k - torch.logsumexp(t_k, -1, keepdim=True))
    torch.testing.assert_close(topk_reverse_kl(s, t, 16).double(), ref, rtol=1e-5, atol=1e-6)


def test_properties():
    s, t = logp_pair((6, 7, 50), scale=3.0, seed=1)
    for value in [reverse_kl(s, t), forward_kl(s, t), generalized_jsd(s, t, 0.3), topk_reverse_kl(s, t, 16)]:
        assert value.shape == (6, 7)
        assert torch.all(value >= -1e-6)
    for fn in [reverse_kl, forward_kl, lambda a, b: generalized_jsd(a, b, 0.4), lambda a, b: topk_reverse_kl(a, b, 5)]:
        assert torch.allclose(fn(s, s), torch.zeros(6, 7), atol=1e-6)
    # TRL's endpoints: beta = 0 is forward KL, beta = 1 reverse KL; and the mixture is symmetric at 0.5
    torch.testing.assert_close(generalized_jsd(s, t, 0.0), forward_kl(s, t))
    torch.testing.assert_close(generalized_jsd(s, t, 1.0), reverse_kl(s, t))
    # top-k with k = V is the full reverse KL
    torch.testing.assert_close(topk_reverse_kl(s, t, 50), reverse_kl(s, t), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(s, t, 1.5)


def test_gradient_flows_to_student_only():
    s, t = logp_pair((2, 3, 9), seed=2)
    logits_s = s.clone().requires_grad_()
    logits_t = t.clone().requires_grad_()
    for fn in [reverse_kl, forward_kl, lambda a, b: generalized_jsd(a, b, 0.5), lambda a, b: topk_reverse_kl(a, b, 4)]:
        fn(torch.log_softmax(logits_s, -1), torch.log_softmax(logits_t, -1)).sum().backward()
        assert logits_t.grad is None
        assert logits_s.grad is not None and logits_s.grad.abs().sum() > 0
        logits_s.grad = None


@pytest.mark.parametrize(
    "fn",
    [reverse_kl, forward_kl, lambda a, b: generalized_jsd(a, b, 0.3), lambda a, b: topk_reverse_kl(a, b, 3)],
    ids=["reverse", "forward", "jsd", "topk"],
)
def test_gradcheck_tiny_vocab(fn):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(2, 3, 5, generator=g, dtype=torch.float64), -1)
    assert torch.autograd.gradcheck(lambda x: fn(torch.log_softmax(x, -1), teacher), (logits,))


def test_reverse_kl_gradient_matches_closed_form():
    # d KL(softmax(z) || q) / dz_i = p_i (log p_i - log q_i - KL)
    g = torch.Generator().manual_seed(4)
    z = torch.randn(1, 1, 6, generator=g, dtype=torch.float64, requires_grad=True)
    q = torch.log_softmax(torch.randn(1, 1, 6, generator=g, dtype=torch.float64), -1)
    kl = reverse_kl(torch.log_softmax(z, -1), q)
    kl.sum().backward()
    p = torch.softmax(z.detach(), -1)
    expected = p * (p.log() - q - kl.detach()[..., None])
    torch.testing.assert_close(z.grad, expected)


def test_reverse_kl_gradient_is_finite_where_the_student_has_zero_mass():
    # Regression: tokens masked to -inf in the student's logits (a sliced or restricted vocabulary) gave NaN
    # gradients to every logit; the gradient must equal the closed form over the tokens that have mass.
    g = torch.Generator().manual_seed(5)
    z = torch.randn(2, 7, generator=g, dtype=torch.float64)
    z[:, [1, 4]] = float("-inf")
    z.requires_grad_(True)
    q = torch.log_softmax(torch.randn(2, 7, generator=g, dtype=torch.float64), -1)
    for fn in (reverse_kl, forward_kl):
        z.grad = None
        fn(torch.log_softmax(z, -1), q).sum().backward()
        assert torch.isfinite(z.grad).all(), fn.__name__
    z.grad = None
    kl = reverse_kl(torch.log_softmax(z, -1), q)
    kl.sum().backward()
    p = torch.softmax(z.detach(), -1)
    expected = torch.where(p > 0, p * (p.log() - q - kl.detach()[..., None]), 0.0)
    torch.testing.assert_close(z.grad, expected)
    torch.testing.assert_close(kl, (p * torch.where(p > 0, p.log() - q, 0.0)).sum(-1))


def test_sampled_estimator_is_unbiased_for_value_and_gradient():
    # E_{y ~ pi_S}[estimator] = KL(pi_S || pi_T), and the mean surrogate gradient equals grad KL.
    g = torch.Generator().manual_seed(5)
    vocab, n = 6, 400_000
    z = torch.randn(vocab, generator=g, dtype=torch.float64, requires_grad=True)
    q = torch.log_softmax(torch.randn(vocab, generator=g, dtype=torch.float64), -1)
    logp = torch.log_softmax(z, -1)
    y = torch.multinomial(logp.exp().detach(), n, replacement=True, generator=g)
    values = sampled_reverse_kl(logp[y][None], q[y][None])
    exact = reverse_kl(logp[None, None], q[None, None]).squeeze()
    assert values.mean().item() == pytest.approx(exact.item(), abs=0.01)
    (grad_est,) = torch.autograd.grad(values.mean(), z, retain_graph=True)
    (grad_exact,) = torch.autograd.grad(exact, z)
    torch.testing.assert_close(grad_est, grad_exact, atol=0.01, rtol=0)


def test_sampled_estimator_importance_weights_correct_behavior_policy():
    # Tokens drawn from a behavior mu, weighted by pi_S / mu, estimate the on-policy KL.
    g = torch.Generator().manual_seed(6)
    vocab, n = 5, 400_000
    s = torch.log_softmax(torch.randn(vocab, generator=g, dtype=torch.float64), -1)
    t = torch.log_softmax(torch.randn(vocab, generator=g, dtype=torch.float64), -1)
    mu = torch.log_softmax(0.5 * s + 0.5 * t, -1)
    y = torch.multinomial(mu.exp(), n, replacement=True, generator=g)
    est = sampled_reverse_kl(s[y][None], t[y][None], mu[y][None]).mean()
    assert est.item() == pytest.approx(kl64(s, t).item(), abs=0.01)


def test_token_mean_is_invariant_to_micro_batching():
    # one batch of 8 == 8 micro-batches of 1 with the global token count
    s, t = logp_pair((8, 6, 11), seed=7)
    z = s.clone().requires_grad_()
    mask = torch.rand(8, 6, generator=torch.Generator().manual_seed(8)) > 0.3
    n_tokens = int(mask.sum())
    full = token_mean(reverse_kl(torch.log_softmax(z, -1), t), mask, n_tokens)
    (grad_full,) = torch.autograd.grad(full, z)
    parts, grads = [], torch.zeros_like(z)
    for i in range(8):
        zi = z[i : i + 1].detach().requires_grad_()
        part = token_mean(reverse_kl(torch.log_softmax(zi, -1), t[i : i + 1]), mask[i : i + 1], n_tokens)
        (gi,) = torch.autograd.grad(part, zi)
        grads[i : i + 1] = gi
        parts.append(part)
    torch.testing.assert_close(sum(parts), full, atol=1e-6, rtol=0)
    torch.testing.assert_close(grads, grad_full, atol=1e-6, rtol=0)


def test_token_mean_fully_masked_and_inf_in_masked_positions():
    per_token = torch.tensor([[1.0, math.inf], [math.nan, 2.0]], requires_grad=True)
    mask = torch.tensor([[True, False], [False, True]])
    value = token_mean(per_token, mask, 2)
    assert value.item() == pytest.approx(1.5)
    value.backward()
    assert torch.isfinite(per_token.grad).all()
    empty = token_mean(per_token, torch.zeros_like(mask), 0)
    assert empty.item() == 0.0 and empty.requires_grad
    per_token.grad = None
    empty.backward()
    assert torch.all(per_token.grad == 0)


def direct_loss(h_s, w_s, h_t, w_t, weight, per_token_fn):
    logits_s, logits_t = h_s @ w_s.T, h_t @ w_t.T
    values = per_token_fn(logits_s, logits_t, slice(0, h_s.shape[0]))
    return (values * weight).sum(), values


def chunk_inputs(seed, n=300, d_s=32, d_t=48, vocab=1000):
    """Hidden states and output weights of a student (with gradients) and a teacher, and per-row weights."""
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(n, d_s, generator=g, requires_grad=True)
    w_s = (torch.randn(vocab, d_s, generator=g) * 0.2).requires_grad_()
    h_t, w_t = torch.randn(n, d_t, generator=g), torch.randn(vocab, d_t, generator=g) * 0.2
    weight = (torch.rand(n, generator=g) > 0.2).float() / 250.0
    return h_s, w_s, h_t, w_t, weight, g


@pytest.mark.parametrize("kind", ["reverse", "forward", "jsd", "topk", "sampled"])
def test_chunked_equals_direct_in_value_and_gradient(kind):
    n, vocab = 300, 1000
    h_s, w_s, h_t, w_t, weight, g = chunk_inputs(9, n=n, vocab=vocab)
    tokens = torch.randint(0, vocab, (n,), generator=g)

    def per_token_fn(logits_s, logits_t, rows):
        s, t = torch.log_softmax(logits_s.float(), -1), torch.log_softmax(logits_t.float(), -1)
        if kind == "reverse":
            return reverse_kl(s, t)
        if kind == "forward":
            return forward_kl(s, t)
        if kind == "jsd":
            return generalized_jsd(s, t, 0.5)
        if kind == "topk":
            return topk_reverse_kl(s, t, 16)
        y = tokens[rows, None]
        return sampled_reverse_kl(s.gather(-1, y)[:, 0], t.gather(-1, y)[:, 0])

    loss, values = chunked_divergence(h_s, w_s, h_t, w_t, weight, per_token_fn, chunk_size=64)
    grads = torch.autograd.grad(2.0 * loss, (h_s, w_s))  # upstream scale is applied in backward
    ref_loss, ref_values = direct_loss(h_s, w_s, h_t, w_t, weight, per_token_fn)
    ref_grads = torch.autograd.grad(2.0 * ref_loss, (h_s, w_s))
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values, ref_values.detach(), atol=1e-5, rtol=1e-5)
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_chunked_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="row counts differ"):
        chunked_divergence(torch.zeros(3, 2), torch.zeros(5, 2), torch.zeros(4, 2), torch.zeros(5, 2),
                           torch.zeros(3), lambda a, b, r: a.sum(-1))


@pytest.mark.parametrize("stops", [(7,), (7, 123, 500)])
def test_closed_form_reverse_kl_gradient_equals_autograd_float64(stops):
    """reverse_kl_with_grad: KL on the stop-merged shared vocabulary, its weighted logit gradient (zero on output
    columns past the vocabulary), and the teacher's entropy, against autograd through merged_logp in float64."""
    from trb.core import merged_logp, reverse_kl_with_grad

    g = torch.Generator().manual_seed(3)
    n, vocab, extra = 40, 600, 8  # the models' output layers have 8 rows past the shared vocabulary
    z_s = (torch.randn(n, vocab + extra, generator=g, dtype=torch.float64) * 2).requires_grad_()
    z_t = torch.randn(n, vocab + extra, generator=g, dtype=torch.float64) * 2
    weight = torch.rand(n, generator=g, dtype=torch.float64)
    stop_ids = torch.tensor(stops)
    s, t = merged_logp(z_s, vocab, stop_ids, 7).double(), merged_logp(z_t, vocab, stop_ids, 7).double()
    ref_kl = torch.where(s.exp() > 0, s.exp() * (s - t), 0.0).sum(-1)
    (ref_grad,) = torch.autograd.grad((ref_kl * weight).sum(), z_s)
    ref_entropy = -torch.where(t > float("-inf"), t.exp() * t, 0.0).sum(-1)
    kl, grad, entropy = reverse_kl_with_grad(z_s.detach(), z_t, weight, vocab, stop_ids)
    assert grad.shape == z_s.shape and grad.dtype == z_s.dtype
    torch.testing.assert_close(kl.double(), ref_kl.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, ref_grad, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=1e-5, rtol=1e-6)
    assert grad[:, vocab:].abs().max() == 0


def test_chunked_closed_form_equals_autograd_path():
    from trb.core import reverse_kl_with_grad

    vocab = 1000
    h_s, w_s, h_t, w_t, weight, _ = chunk_inputs(4, vocab=vocab)
    stops = torch.tensor([3])

    def per_token_fn(logits_s, logits_t, rows):
        return reverse_kl(torch.log_softmax(logits_s, -1), torch.log_softmax(logits_t, -1))

    def logit_grad_fn(logits_s, logits_t, rows, w):
        kl, grad, _ = reverse_kl_with_grad(logits_s, logits_t, w, vocab, stops)
        return kl, grad

    results = []
    for fns in ((per_token_fn, None), (None, logit_grad_fn)):
        loss, values = chunked_divergence(h_s, w_s, h_t, w_t, weight, *fns[:1], chunk_size=64, logit_grad_fn=fns[1])
        results.append((loss, values, *torch.autograd.grad(3.0 * loss, (h_s, w_s))))
    for got, ref in zip(results[1], results[0]):
        torch.testing.assert_close(got, ref.detach(), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="needs per_token_fn or logit_grad_fn"):
        chunked_divergence(h_s, w_s, h_t, w_t, weight, None)


@pytest.mark.gpu
def test_closed_form_bf16_on_cuda_matches_fp32_reference():
    """On a GPU (`pytest -m gpu`): with bf16 hidden states and weights the weight gradient accumulates in fp32 inside
    the GEMM (addmm with an fp32 output); loss and gradients stay within bf16 rounding of the fp32 path."""
    from trb.core import reverse_kl_with_grad

    h_s, w_s, h_t, w_t, weight, _ = chunk_inputs(5, n=600, vocab=4000)
    stops = torch.tensor([3], device="cuda")

    def logit_grad_fn(logits_s, logits_t, rows, w):
        kl, grad, _ = reverse_kl_with_grad(logits_s, logits_t, w, logits_s.shape[-1], stops)
        return kl, grad

    results = []
    for dtype in (torch.float32, torch.bfloat16):
        hs = h_s.detach().to("cuda", dtype).requires_grad_()
        ws = w_s.detach().to("cuda", dtype).requires_grad_()
        loss, _ = chunked_divergence(hs, ws, h_t.to("cuda", dtype), w_t.to("cuda", dtype), weight.cuda(), None,
                                     chunk_size=128, logit_grad_fn=logit_grad_fn)
        loss.backward()
        results.append((loss.float(), hs.grad.float(), ws.grad.float()))
    for got, ref in zip(results[1], results[0]):
        assert ((got - ref).norm() / ref.norm()).item() < 2e-2
