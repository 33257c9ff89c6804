"""TRB inside TRL's DistillationTrainer (`trb.integrations.trl`) on the shipped miniature pair: training runs with the
eps schedule over TRL's global step, sampled tokens follow mu_beta at every prefix, and with eps = 0 the rollouts
have the plain trainer's sampling distribution (the student at TRL's temperature)."""

import copy
import importlib
import math
import sys
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from scipy.stats import chi2_contingency, chisquare

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402  (a dependency of trl)
from trl import DistillationConfig, DistillationTrainer  # noqa: E402  (DistillationTrainer: the plain one)

from trb.core import merged_logp, with_temperature  # noqa: E402
from trb.integrations.trl import TRBDistillationTrainer, resolve_method, sampler_methods  # noqa: E402
from trb.methods import TRB, FixedEps, Method  # noqa: E402
from trb.models import load_causal_lm, load_tokenizer  # noqa: E402
from trb.rollout import MixturePolicy, StudentPolicy, TRBPolicy  # noqa: E402
from trb.tasks import SETTINGS  # noqa: E402

PAIR = "trb:miniature/arith"
DRAWS = 400  # single-token rollouts of one prompt for each distribution test


@pytest.fixture(scope="module")
def pair():
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(f"{PAIR}/student")
    student = load_causal_lm(f"{PAIR}/student", torch.device("cpu"))
    teacher = load_causal_lm(f"{PAIR}/teacher", torch.device("cpu"))
    questions = [p.question for p in SETTINGS["arith"]("train", 8, 0)]
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in questions]})
    return tokenizer, student, teacher, dataset


def make_trainer(pair, tmp_path, trainer_class=TRBDistillationTrainer, **options):
    tokenizer, student, teacher, dataset = pair
    config = dict(max_steps=1, per_device_train_batch_size=4, max_completion_length=24, learning_rate=1e-4,
                  temperature=1.0, logging_steps=1, seed=0)
    method = {"method": options.pop("method")} if "method" in options else {}
    config.update(options)
    args = DistillationConfig(output_dir=str(tmp_path), bf16=False, gradient_checkpointing=False, use_cpu=True,
                              report_to="none", save_strategy="no", disable_tqdm=True, **config)
    return trainer_class(copy.deepcopy(student), teacher, args, train_dataset=dataset, processing_class=tokenizer,
                         **method)


def prompt_ids(trainer, count):
    ids, _, _ = trainer._tokenize_prompts([row["prompt"] for row in trainer.train_dataset.select(range(count))])
    return ids


def short_prompt(trainer):
    """The shortest of the first prompts (single-token distribution tests pay for DRAWS prompt passes)."""
    return min(prompt_ids(trainer, 4), key=len)


def model_logp(model, rollout, vocab, temperature=1.0):
    """Each model's log-probs (B, T, V) at every completion prefix of the rollout, from a plain HF forward."""
    input_ids, attention_mask, positions = rollout.sequences()  # (B, P + T)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits
    width = rollout.completion_ids.shape[1]
    logits = logits[:, -width - 1 : -1]  # (B, T, V_model) the prediction of completion token t
    logp = merged_logp(logits, vocab.size, vocab.stop_tensor(logits.device), vocab.eos_id)  # (B, T, V)
    return logp if temperature == 1.0 else with_temperature(logp, temperature)


def first_token_counts(trainer, prompt):
    """Counts (V,) of the first completion token over DRAWS rollouts of one prompt."""
    trainer.max_completion_length = 1  # what trb's sampler reads; the plain trainer's is fixed at construction
    trainer.model.train()
    completions = trainer._generate_single_turn([prompt] * DRAWS, None, {})
    return torch.bincount(torch.tensor([c[0] for c in completions]), minlength=len(trainer._tokenizer))


def goodness_of_fit(counts, probs):
    """chi-square p-value of counts (V,) against probabilities (V,); tokens expected fewer than 5 times share a bin."""
    expected = probs.double() / probs.double().sum() * counts.sum()  # (V,)
    keep = expected >= 5
    observed = torch.cat([counts[keep], counts[~keep].sum()[None]]).double()
    expected = torch.cat([expected[keep], expected[~keep].sum()[None]])
    expected = expected * observed.sum() / expected.sum()  # exact totals for scipy
    return chisquare(observed.numpy(), expected.numpy()).pvalue


def test_trains_a_few_steps_with_the_eps_schedule_over_the_global_step(pair, tmp_path):
    method = TRB(eps0=0.05, horizon=2)
    trainer = make_trainer(pair, tmp_path, method=method, max_steps=3, per_device_train_batch_size=2,
                           max_completion_length=16)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [1, 2, 3]
    assert all(math.isfinite(entry["loss"]) for entry in logs)
    # the rollouts of the update that ends at step k + 1 were sampled at global step k
    assert [entry["trb/eps"] for entry in logs] == [method.eps(k) for k in range(3)] == [0.05, 0.025, 0.0]
    assert logs[0]["trb/beta"] > 0 and logs[1]["trb/beta"] > 0 and logs[2]["trb/beta"] == 0
    assert all(entry["trb/realized_kl"] <= method.eps(k) + 1e-6 for k, entry in enumerate(logs))
    assert logs[2]["trb/realized_kl"] == 0
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, trainer.model.parameters(), strict=True))


def test_sampled_tokens_follow_mu_beta_at_every_prefix(pair, tmp_path):
    eps = 0.05
    trainer = make_trainer(pair, tmp_path, method=FixedEps(eps=eps))
    trainer.model.train()
    completions = trainer._generate_single_turn(prompt_ids(trainer, 4), None, {})
    rollout, vocab = trainer.last_rollout, trainer.vocab
    mask = rollout.completion_mask  # (B, T)
    assert completions == [row[m].tolist() for row, m in zip(rollout.completion_ids, mask, strict=True)]

    student_logp = model_logp(trainer.model, rollout, vocab)  # (B, T, V)
    teacher_logp = model_logp(pair[2], rollout, vocab)  # (B, T, V)
    mu_logp, beta, _ = TRBPolicy(eps).distribution(student_logp, teacher_logp)  # (B, T, V), (B, T)
    token_logp = mu_logp.gather(-1, rollout.completion_ids[..., None])[..., 0]  # (B, T)
    torch.testing.assert_close(rollout.behavior_logp[mask], token_logp[mask], atol=1e-3, rtol=0)
    torch.testing.assert_close(rollout.beta[mask], beta[mask], atol=1e-3, rtol=0)
    assert (rollout.beta[mask] > 0).float().mean() > 0.5  # the blend is active at most prefixes
    assert rollout.realized_kl[mask].max() <= eps + 1e-6

    # the first token's frequencies at one prefix follow mu_beta*, which the student alone does not explain; at TRL's
    # temperature 1.5 (the policy blends the tempered distributions) that prefix has many likely tokens
    temperature = 1.5
    trainer = make_trainer(pair, tmp_path, method=FixedEps(eps=eps), temperature=temperature)
    counts = first_token_counts(trainer, short_prompt(trainer))  # (V,)
    first = trainer.last_rollout.select(slice(0, 1))
    s_logp = model_logp(trainer.model, first, vocab, temperature)[0, 0]  # (V,)
    t_logp = model_logp(pair[2], first, vocab, temperature)[0, 0]  # (V,)
    mu_logp, beta, _ = TRBPolicy(eps).distribution(s_logp, t_logp)  # (V,), ()
    assert 0 < beta < 1
    assert goodness_of_fit(counts, mu_logp.exp()) > 1e-3
    assert goodness_of_fit(counts, s_logp.exp()) < 1e-6


def test_eps_zero_samples_the_plain_trainers_distribution(pair, tmp_path):
    temperature = 1.5  # far enough from 1 that ignoring it would fail the test
    trainer = make_trainer(pair, tmp_path / "trb", method=TRB(eps0=0.0), temperature=temperature)
    trainer.model.train()
    trainer._generate_single_turn(prompt_ids(trainer, 4), None, {})
    rollout = trainer.last_rollout
    mask = rollout.completion_mask  # (B, T)
    student_logp = model_logp(trainer.model, rollout, trainer.vocab, temperature)  # (B, T, V)
    token_logp = student_logp.gather(-1, rollout.completion_ids[..., None])[..., 0]  # (B, T)
    torch.testing.assert_close(rollout.behavior_logp[mask], token_logp[mask], atol=1e-4, rtol=0)
    assert rollout.beta.abs().max() == 0 and rollout.realized_kl[mask].abs().max() < 1e-5

    prompt = short_prompt(trainer)
    ours = first_token_counts(trainer, prompt)  # (V,)
    plain = make_trainer(pair, tmp_path / "plain", trainer_class=DistillationTrainer, temperature=temperature,
                         max_completion_length=1)
    with torch.random.fork_rng(devices=[]):  # transformers' sampler draws from the global generator
        torch.manual_seed(0)
        theirs = first_token_counts(plain, prompt)  # (V,)
    probs = model_logp(trainer.model, trainer.last_rollout.select(slice(0, 1)), trainer.vocab, temperature)[0, 0].exp()
    assert goodness_of_fit(ours, probs) > 1e-3
    assert goodness_of_fit(theirs, probs) > 1e-3
    assert goodness_of_fit(ours, probs ** temperature) < 1e-6  # the student at temperature 1
    seen = (ours + theirs) > 0
    assert chi2_contingency(torch.stack([ours[seen], theirs[seen]]).numpy()).pvalue > 1e-3


def test_behavior_policy_and_metrics_through_trls_logging(pair, tmp_path):
    trainer = make_trainer(pair, tmp_path, method=MixturePolicy(alpha=0.5))
    trainer.model.train()
    trainer._generate_single_turn(prompt_ids(trainer, 4), None, {})
    rollout, metrics = trainer.last_rollout, trainer._metrics["train"]
    mask = rollout.completion_mask  # (B, T)
    assert metrics["trb/teacher_tokens"] == [pytest.approx(rollout.from_teacher[mask].float().mean().item())]
    assert 0 < metrics["trb/teacher_tokens"][0] < 1
    assert metrics["trb/realized_kl"] == [pytest.approx(rollout.realized_kl[mask].mean().item())]

    trainer.model.eval()  # evaluation rollouts come from the student: the teacher does not decode
    trainer._generate_single_turn(prompt_ids(trainer, 4), None, {})
    assert trainer.last_rollout.teacher_logp is None and not trainer.last_rollout.from_teacher.any()


@pytest.mark.parametrize("name", ["veto", "gkd", "minillm", "sft_warmup", "trb_adaptive"])
def test_methods_that_change_the_loss_target_or_data_are_refused(name):
    with pytest.raises(ValueError, match="TRL's DistillationTrainer owns"):
        resolve_method(name, None)


def test_which_methods_run_in_trl_follows_the_hooks_they_override():
    # the built-ins split as their hooks say; a method that overrides only behavior runs, one more hook is refused
    assert sampler_methods() == ["fixed_eps", "opd", "skd", "temperature", "trb"]

    @dataclass(frozen=True)
    class Greedyish(Method):
        name: ClassVar[str] = "greedyish_for_trl_test"

        def behavior(self, step, state):
            return StudentPolicy(0.5)

    @dataclass(frozen=True)
    class Reweighted(Greedyish):
        def token_weights(self, rollout):
            return rollout.completion_mask.float() * 2

    assert resolve_method(Greedyish(), None) == Greedyish()
    with pytest.raises(ValueError, match="TRL's DistillationTrainer owns"):
        resolve_method(Reweighted(), None)


def test_resolve_method_by_name_and_params():
    assert resolve_method("trb", {"eps0": 0.01, "horizon": 10}) == TRB(eps0=0.01, horizon=10)
    with pytest.raises(ValueError, match="unknown method"):
        resolve_method("tbr", None)
    with pytest.raises(ValueError, match="method_params go with a method name"):
        resolve_method(TRB(), {"eps0": 0.01})


def test_sampling_options_the_engine_cannot_honor_are_refused(pair, tmp_path):
    with pytest.raises(ValueError, match="top_p != 1"):
        make_trainer(pair, tmp_path, method="trb", top_p=0.9)


def test_use_vllm_options_trbs_vllm_engine_cannot_honor_are_refused(pair, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"use_vllm=True .* does not support vllm_mode='server' \(only 'colocate'\)"):
        make_trainer(pair, tmp_path, method="trb", use_vllm=True, vllm_mode="server")
    with pytest.raises(ValueError, match=r"use_vllm=True .* does not support temperature != 1"):
        make_trainer(pair, tmp_path, method="trb", use_vllm=True, temperature=0.7)
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` fails, as where it is not installed
    with pytest.raises(ValueError, match=r"needs vLLM, which does not import here .*pip install 'trb\[vllm\]'"):
        make_trainer(pair, tmp_path, method="trb", use_vllm=True)


def test_import_without_trl_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)
    monkeypatch.delitem(sys.modules, "trb.integrations.trl")
    with pytest.raises(ImportError, match=r"pip install 'trb\[trl\]'"):
        importlib.import_module("trb.integrations.trl")

