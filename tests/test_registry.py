"""The method and divergence tables: what a registered entry promises (the support it reads gives the value it gives
on the whole vocabulary, in float64), what registration refuses, and a user's method and divergence selected by name
in a config and trained through `trb.distill`, with the loop asking the method's hooks."""

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import trb
from trb.config import ConfigError, load_config
from trb.core import forward_kl
from trb.divergences import DIVERGENCES, LossSpec, Sampled, register_divergence
from trb.losses import distill_loss
from trb.methods import METHODS, Method, register_method
from trb.rollout import MixturePolicy, RolloutStats, SKDPolicy, StudentPolicy, TeacherPolicy, TRBPolicy, generate


@pytest.fixture
def registered():
    """Names registered by a test, removed from the tables afterwards (collection sees only the built-ins)."""
    names = []
    yield names
    for name in names:
        METHODS.pop(name, None)
        DIVERGENCES.pop(name, None)


def random_logp(n: int, vocab: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.log_softmax(2 * torch.randn(n, vocab, generator=generator, dtype=torch.float64), -1)  # (n, V)


@pytest.mark.parametrize("name", [n for n, d in DIVERGENCES.items() if d.reads != "vocab"])
def test_a_divergence_on_the_support_it_reads_equals_it_on_the_whole_vocabulary(name):
    """The promise behind reusing decode records: on the student's top-k ids (in descending order), or on the
    sampled token alone, the per-token value and the student's gradient are those of the full-vocabulary call."""
    entry, spec = DIVERGENCES[name], LossSpec(divergence=name, top_k=5)
    student, teacher = random_logp(7, 40, 0).requires_grad_(), random_logp(7, 40, 1)  # (n, V)
    tokens = torch.randint(0, 40, (7, 1), generator=torch.Generator().manual_seed(2))  # (n, 1)
    behavior = random_logp(7, 40, 3).gather(-1, tokens)[:, 0]  # (n,)
    full = entry.fn(student, teacher, spec, Sampled(tokens, behavior))  # (n,)
    if entry.reads == "student_topk":
        ids = student.detach().topk(spec.top_k, -1).indices  # (n, k)
        restricted = entry.fn(student.gather(-1, ids), teacher.gather(-1, ids), spec, None)  # (n,)
    else:
        restricted = entry.fn(student.gather(-1, tokens), teacher.gather(-1, tokens), spec,
                              Sampled(torch.zeros_like(tokens), behavior))  # (n,)
    torch.testing.assert_close(restricted, full, atol=1e-12, rtol=0)
    weights = torch.rand(7, generator=torch.Generator().manual_seed(4), dtype=torch.float64)  # (n,)
    grad_full, = torch.autograd.grad((weights * full).sum(), student)
    grad_restricted, = torch.autograd.grad((weights * restricted).sum(), student)
    torch.testing.assert_close(grad_restricted, grad_full, atol=1e-12, rtol=0)


def test_the_loss_declares_what_the_decoder_records_for_it():
    """One declaration chooses both the decoder's records and the loss's path: the support the divergence reads, on
    the student's top_k for a top-k divergence, and nothing for a full-vocabulary one or with reuse_teacher off."""
    declared = {name: (LossSpec(divergence=name, top_k=5).recorded, LossSpec(divergence=name, top_k=5).record_topk)
                for name in ("reverse_kl", "forward_kl", "jsd", "sampled_reverse_kl", "topk_reverse_kl",
                             "topk_student_weighted_kl")}
    assert declared == {"reverse_kl": (None, 0), "forward_kl": (None, 0), "jsd": (None, 0),
                        "sampled_reverse_kl": ("sampled_token", 0), "topk_reverse_kl": ("student_topk", 5),
                        "topk_student_weighted_kl": ("student_topk", 5)}
    off = LossSpec(divergence="topk_reverse_kl", top_k=5, reuse_teacher=False)
    assert (off.recorded, off.record_topk) == (None, 0)


def test_registration_refuses_duplicates_bad_supports_and_non_dataclass_methods(registered):
    with pytest.raises(ValueError, match="already registered"):
        register_divergence("reverse_kl", lambda s, t, spec, sampled: s.sum(-1))
    with pytest.raises(ValueError, match="reads must be one of"):
        register_divergence("top2", lambda s, t, spec, sampled: s.sum(-1), reads="top2")
    assert "top2" not in DIVERGENCES
    with pytest.raises(ValueError, match="unknown divergence 'bogus'; choose one of reverse_kl"):
        LossSpec(divergence="bogus")

    class Plain(Method):
        name: ClassVar[str] = "plain"

    with pytest.raises(TypeError, match="frozen dataclass subclass of Method"):
        register_method(Plain)
    with pytest.raises(ValueError, match="'trb' is already registered"):
        register_method(dataclass(frozen=True)(type("Again", (Method,), {"name": "trb"})))
    assert METHODS["trb"].__name__ == "TRB"


def test_a_registered_divergence_is_what_the_loss_computes(registered, loaded_pair):
    """A divergence registered under a new name gives distill_loss exactly what the function computes: here the
    forward KL under another name, against the built-in entry, loss and gradients."""
    tokenizer, student, teacher, vocab = loaded_pair
    register_divergence("my_forward_kl", lambda s, t, spec, sampled: forward_kl(s, t))
    registered.append("my_forward_kl")
    rollout = generate(TRBPolicy(0.1), [[5, 6, 7], [8, 9]] * 2, vocab, 10, torch.Generator().manual_seed(0),
                       student=student, teacher=teacher)
    weight = rollout.completion_mask.float() / rollout.completion_mask.sum()  # (B, T)
    results = []
    for name in ("forward_kl", "my_forward_kl"):
        student.zero_grad()
        loss, per_token, _ = distill_loss(student, teacher, rollout, vocab, LossSpec(divergence=name), weight)
        loss.backward()
        results.append((loss.item(), per_token, [p.grad.clone() for p in student.parameters()]))
    assert results[0][0] == results[1][0] and results[0][0] > 0
    assert torch.equal(results[0][1], results[1][1])
    assert all(torch.equal(a, b) for a, b in zip(results[0][2], results[1][2]))


def test_only_the_trb_blend_is_sampled_speculatively(loaded_pair):
    assert TRBPolicy(0.1).speculative
    assert not any(p.speculative for p in (StudentPolicy(), TeacherPolicy(), SKDPolicy(), MixturePolicy()))
    _, student, teacher, vocab = loaded_pair
    # with speculative decoding on, the other policies decode in lock-step: the same rollouts, no drafts
    stats = RolloutStats()
    drafted = generate(StudentPolicy(), [[5, 6]] * 3, vocab, 4, student=student, teacher=teacher, gamma=3,
                       keys=torch.arange(3), stats=stats)
    plain = generate(StudentPolicy(), [[5, 6]] * 3, vocab, 4, student=student, keys=torch.arange(3))
    assert torch.equal(drafted.completion_ids, plain.completion_ids)
    assert stats.drafted == 0 and stats.decode_steps == int(plain.lengths.max()) - 1


def test_a_registered_method_and_divergence_train_by_name_through_the_api(registered, tiny_pair, tmp_path):
    """A user's method runs its before_training hook once before the first step of a fresh run (not on a resume),
    gives the behavior of every step, and its divergence is the one the loss uses."""
    calls = {"before": 0, "divergence": 0}

    @register_method
    @dataclass(frozen=True)
    class Counting(Method):
        name: ClassVar[str] = "counting"
        temperature: float = 0.9

        def behavior(self, step, state):
            return StudentPolicy(self.temperature)

        def schedule_metrics(self, step, state):
            return {"tau": self.temperature}

        def before_training(self, trainer, write, log):
            calls["before"] += 1
            write(0, {"counting/before": 1.0})
            return False

    def counted_reverse_kl(student_logp, target_logp, spec, sampled):
        calls["divergence"] += 1
        return DIVERGENCES["reverse_kl"].fn(student_logp, target_logp, spec, sampled)

    register_divergence("counted_reverse_kl", counted_reverse_kl)
    registered += ["counting", "counted_reverse_kl"]
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({
        "models": {"student": str(tiny_pair["student"]), "teacher": str(tiny_pair["teacher"])},
        "data": {"num_train": 32, "num_test": 2}, "prompts_per_step": 2, "rollouts_per_prompt": 2,
        "rollout_batch": 4, "micro_batch": 4, "max_new_tokens": 8, "eval_every": 0, "eval_samples": 1,
        "checkpoint_every": 1, "log_rollouts_every": 0,
    }))
    overrides = ["method.name=counting", "method.temperature=0.8", "loss.divergence=counted_reverse_kl",
                 f"out_dir={tmp_path / 'run'}"]
    assert isinstance(load_config(config, overrides).method, Counting)
    try:
        summary = trb.distill(config, [*overrides, "steps=1"], log=lambda m: None, threads=2)
    finally:
        torch.set_num_threads(1)  # the suite's (tests/conftest.py)
    assert summary["status"] == "completed" and calls["before"] == 1 and calls["divergence"] > 0
    assert " cores, 2 torch thread(s))" in summary["hardware"]
    summary = trb.distill(config, [*overrides, "steps=2", "resume=true"], log=lambda m: None)
    assert summary["status"] == "completed" and calls["before"] == 1, "a resumed run does not warm up again"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["tau"] for r in records if "loss" in r] == [0.8, 0.8]
    assert sum("counting/before" in r for r in records) == 1
    with pytest.raises(ConfigError, match="unknown config key 'method.eps0'"):
        load_config(config, ["method.name=counting", "method.eps0=0.1"])
