"""The vLLM engine's parts that need no vLLM: each policy's per-prefix distribution (the adapter the blend model
calls) is the one the own engine samples, and the engine's bad-input lines."""

from __future__ import annotations

import sys

import pytest
import torch

from trb.core import kl_divergence
from trb.rollout import Draws, MixturePolicy, SKDPolicy, StudentPolicy, TeacherPolicy, TRBPolicy
from trb.vllm.behavior import distribution

POLICIES = [TRBPolicy(0.0), TRBPolicy(0.02), TRBPolicy(0.3), StudentPolicy(), StudentPolicy(0.7), TeacherPolicy(),
            TeacherPolicy(1.5), SKDPolicy(top_k=5), SKDPolicy(top_k=5, teacher_temperature=0.8), MixturePolicy(0.2)]


def pair(rows: int = 64, vocab: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = torch.log_softmax(2 * torch.randn(rows, vocab, generator=generator), -1)  # (B, V)
    teacher = torch.log_softmax(2 * torch.randn(rows, vocab, generator=generator), -1)  # (B, V)
    return student, teacher


@pytest.mark.parametrize("policy", POLICIES, ids=repr)
def test_distribution_is_what_the_own_engine_samples_and_records(policy):
    """At every row, log mu at the token the policy's own `choose` draws is the behavior log-prob it records, and the
    beta and KL records are the same: the blend model inside vLLM samples the own engine's distribution."""
    student, teacher = pair()
    mu, beta, kl = distribution(policy, student, teacher)  # (B, V), (B,), (B,)
    assert torch.allclose(mu.exp().sum(-1), torch.ones(len(mu)), atol=1e-5)
    for stream in range(4):  # several draws per row cover many tokens, teacher injections and mixture sources
        keys = torch.arange(len(student)) + 100 * stream
        choice = policy.choose(student, teacher, Draws(keys, torch.zeros_like(keys)))
        assert torch.allclose(mu.gather(-1, choice.token[:, None])[:, 0], choice.behavior_logp, atol=1e-6)
        assert torch.allclose(beta, choice.beta, atol=1e-7)
        assert torch.allclose(kl, choice.kl, atol=1e-6)


@pytest.mark.parametrize("policy", [SKDPolicy(top_k=3), MixturePolicy(0.3)], ids=repr)
def test_two_stage_samplers_draw_from_their_distribution(policy):
    """SKD (a student draw, replaced by a teacher draw outside the teacher's top-k) and mixing (a coin, then one of
    the two models) draw each token from the distribution the adapter returns: 20,000 draws at one prefix."""
    from scipy.stats import chisquare

    student, teacher = pair(rows=1, vocab=12, seed=3)
    draws = 20_000
    mu = distribution(policy, student, teacher)[0][0]  # (V,)
    keys = torch.arange(draws)
    rows = (student.expand(draws, -1), teacher.expand(draws, -1))
    tokens = policy.choose(*rows, Draws(keys, torch.zeros_like(keys))).token  # (draws,)
    counts = torch.bincount(tokens, minlength=12).double()  # (V,)
    expected = mu.double().exp() * draws  # (V,)
    keep = expected > 5
    assert keep.sum() >= 8 and expected[~keep].sum() < 5  # the small cells are too rare to pool
    observed, wanted = counts[keep], expected[keep]
    assert chisquare(observed.numpy(), (wanted * observed.sum() / wanted.sum()).numpy()).pvalue > 1e-3


def test_trb_distribution_keeps_the_budget_and_the_endpoints():
    student, teacher = pair()
    mu, beta, kl = distribution(TRBPolicy(0.1), student, teacher)
    assert (kl <= 0.1).all() and torch.allclose(kl, kl_divergence(mu, student), atol=1e-5)
    assert torch.equal(distribution(TRBPolicy(0.0), student, teacher)[0], student)
    assert torch.allclose(distribution(TRBPolicy(1e9), student, teacher)[0], teacher)


def test_a_policy_without_a_distribution_is_refused():
    from trb.integrations.trl import TemperedPolicy  # needs trl, which the test extra installs

    student, teacher = pair()
    with pytest.raises(ValueError, match="has no per-prefix distribution the vLLM engine can sample; served: "):
        distribution(TemperedPolicy(TRBPolicy(0.1), 0.7), student, teacher)


def test_missing_vllm_gives_one_line(monkeypatch):
    from trb.vllm.engine import VLLMError, import_vllm

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(VLLMError, match=r"rollout.engine=vllm needs vLLM, .*pip install 'trb\[vllm\]'") as error:
        import_vllm()
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("knob, value, message", [
    ("gpu_memory_utilization", 0.0, "gpu_memory_utilization must be in"),
    ("gpu_memory_utilization", 1.5, "gpu_memory_utilization must be in"),
    ("kv_cache_bytes", 0, "kv_cache_bytes must be > 0"),
    ("max_num_seqs", 0, "max_num_seqs must be >= 1"),
    ("max_model_len", -1, "max_model_len must be >= 0"),
    ("dtype", "fp8", "dtype must be auto"),
])
def test_settings_refuse_bad_values(knob, value, message):
    from trb.vllm.engine import VLLMError, VLLMSettings

    with pytest.raises(VLLMError, match=message):
        VLLMSettings(**{knob: value})
