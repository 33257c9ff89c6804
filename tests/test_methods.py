"""Each method's behavior/target rule against its analytic form, and every method end to end on tiny models."""

import json
import math

import pytest
import torch
from scipy.stats import chisquare

from trb.config import load_config
from trb.core import generalized_jsd, reverse_kl, with_temperature
from trb.losses import LossSpec, veto_target
from trb.methods import (
    GKD,
    METHODS,
    TRB,
    AdaptiveTRB,
    FixedEps,
    MiniLLM,
    SKD,
    TemperatureWarmup,
    VanillaOPD,
    Veto,
)
from trb.models import VocabSpace, load_tokenizer, tiny_causal_lm
from trb.rollout import MixturePolicy, SKDPolicy, StudentPolicy, TeacherPolicy, TRBPolicy, generate
from trb.tasks import data_splits
from trb.core import step_prompts
from trb.train import train


def test_schedules_of_each_method():
    trb = TRB(eps0=0.02, horizon=50)
    assert isinstance(trb.behavior(0, {}), TRBPolicy) and trb.behavior(0, {}).eps == 0.02
    assert trb.behavior(25, {}).eps == pytest.approx(0.01)
    assert isinstance(trb.behavior(50, {}), StudentPolicy), "after the horizon the teacher leaves decoding"
    assert FixedEps(eps=0.01).behavior(1000, {}).eps == 0.01
    assert isinstance(VanillaOPD().behavior(0, {}), StudentPolicy)
    warm = TemperatureWarmup(tau0=0.8, horizon=15)
    assert warm.behavior(0, {}).temperature == pytest.approx(0.8)
    assert warm.behavior(15, {}).temperature == pytest.approx(1.0)
    skd = SKD(top_k=15, teacher_temperature=0.6).behavior(300, {})
    assert isinstance(skd, SKDPolicy) and skd.top_k == 15 and skd.teacher_temperature == 0.6
    assert isinstance(MiniLLM(alpha=0.2).behavior(0, {}), MixturePolicy)
    veto = Veto(b_start=0.6, horizon=10)
    assert veto.b(0) == pytest.approx(0.6) and veto.b(5) == pytest.approx(0.3) and veto.target(10) is None


def test_temperature_policy_samples_follow_tempered_student():
    vocab = 12
    model = tiny_causal_lm(vocab, 32, 2, seed=3, init_std=0.3, tie_word_embeddings=False, eos_token_id=1)
    space = VocabSpace(size=vocab, stop_ids=(1,), eos_id=1, pad_id=0)
    rollout = generate(StudentPolicy(0.7), [[4, 5, 6]] * 20_000, space, 1, torch.Generator().manual_seed(0),
                       student=model)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([[4, 5, 6]])).logits[0, -1], -1)
    probs = with_temperature(logp, 0.7).exp().double()
    counts = torch.bincount(rollout.completion_ids[:, 0], minlength=vocab).double()
    keep = probs * 20_000 >= 5
    assert chisquare(counts[keep].numpy(), (probs[keep] / probs[keep].sum() * counts[keep].sum()).numpy()).pvalue > 1e-3
    # the behavior log-prob is the tempered one, the student log-prob the temperature-1 one
    token = rollout.completion_ids[:, 0]
    torch.testing.assert_close(rollout.behavior_logp[:, 0], with_temperature(logp, 0.7)[token], atol=1e-5, rtol=0)
    torch.testing.assert_close(rollout.student_logp[:, 0], logp[token], atol=1e-5, rtol=0)


def test_veto_target_is_normalized_geometric_product():
    g = torch.Generator().manual_seed(0)
    s = torch.log_softmax(torch.randn(3, 7, generator=g, dtype=torch.float64), -1)
    t = torch.log_softmax(torch.randn(3, 7, generator=g, dtype=torch.float64), -1)
    q = veto_target(0.4)(s, t).exp()
    expected = t.exp() * s.exp() ** 0.4
    torch.testing.assert_close(q, expected / expected.sum(-1, keepdim=True))
    torch.testing.assert_close(veto_target(0.0)(s, t), t)


def test_minillm_weights_are_the_ratio_of_the_token_ending_each_prefix():
    vocab = 20
    student = tiny_causal_lm(vocab, 32, 2, seed=0, init_std=0.3, tie_word_embeddings=False, eos_token_id=1)
    teacher = tiny_causal_lm(vocab, 32, 2, seed=1, init_std=0.3, tie_word_embeddings=False, eos_token_id=1)
    space = VocabSpace(size=vocab, stop_ids=(1,), eos_id=1, pad_id=0)
    rollout = generate(MixturePolicy(0.2), [[3, 4], [5]], space, 8, torch.Generator().manual_seed(1),
                       student=student, teacher=teacher)
    weights = MiniLLM(alpha=0.2).token_weights(rollout)
    ratio = torch.exp(rollout.student_logp - rollout.behavior_logp)
    assert torch.all(weights[:, 0] == 1.0), "the first completion position's prefix is the prompt: weight 1"
    m = rollout.completion_mask
    torch.testing.assert_close(weights[:, 1:][m[:, 1:]], ratio[:, :-1][m[:, 1:]])
    assert torch.all(weights[~m] == 0) and torch.all(weights[m] <= 1 / (1 - 0.2) + 1e-6)


def test_gkd_coin_is_seeded_per_step_and_swaps_the_loss():
    gkd = GKD(lmbda=0.3, beta=0.2)
    draws = [gkd.use_data(k, torch.Generator().manual_seed(1000 + k)) for k in range(2000)]
    again = [gkd.use_data(k, torch.Generator().manual_seed(1000 + k)) for k in range(2000)]
    assert draws == again
    assert abs(sum(draws) / 2000 - 0.7) < 0.04, "data with probability 1 - lmbda"
    spec = gkd.loss_spec(LossSpec(divergence="reverse_kl", top_k=16))
    assert spec.divergence == "jsd" and spec.jsd_beta == 0.2 and spec.top_k == 16
    g = torch.Generator().manual_seed(2)
    s = torch.log_softmax(torch.randn(2, 3, 9, generator=g), -1)
    t = torch.log_softmax(torch.randn(2, 3, 9, generator=g), -1)
    assert not torch.allclose(generalized_jsd(s, t, 0.2), reverse_kl(s, t))


def test_adaptive_trb_rule():
    method = AdaptiveTRB(eps0=0.02, floor=0.5, ema=0.0)
    state = {}
    assert method.behavior(0, state).eps == 0.02
    seen = []
    for kl in [1.0, 0.9, 0.95, 0.75, 0.6, 0.8, 0.5, 0.45, 0.9]:
        method.observe(len(seen), {"teacher_kl": kl}, state)
        seen.append(state["eps"])
    # eps = eps0 * clip((kl / kl_0 - floor) / (1 - floor), 0, 1), never increasing
    expected, current = [], 0.02
    for kl in [1.0, 0.9, 0.95, 0.75, 0.6, 0.8, 0.5, 0.45, 0.9]:
        current = min(current, 0.02 * min(max((kl - 0.5) / 0.5, 0), 1))
        expected.append(current)
    assert seen == pytest.approx(expected)
    assert isinstance(method.behavior(9, state), StudentPolicy), "blending is off for good once eps reaches 0"
    json.dumps(state)  # checkpointable


def test_bad_method_parameters_are_rejected():
    for cls, kwargs, message in [
        (TRB, {"eps0": -0.1}, "eps0"), (TRB, {"horizon": 0}, "horizon"), (TRB, {"schedule": "exp"}, "schedule"),
        (FixedEps, {"eps": math.nan}, "eps"), (SKD, {"top_k": 0}, "top_k"), (TemperatureWarmup, {"tau0": 0}, "tau0"),
        (Veto, {"b_start": -1}, "b_start"), (MiniLLM, {"alpha": 1.0}, "alpha"), (GKD, {"lmbda": 2}, "lmbda"),
        (AdaptiveTRB, {"floor": 1.0}, "floor"),
    ]:
        with pytest.raises(ValueError, match=message):
            cls(**kwargs)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_trains_end_to_end(name, tiny_pair, tmp_path):
    extra = {"sft_warmup": ["method.updates=2", "method.prompt_steps=1"], "skd": ["method.top_k=5"]}.get(name, [])
    cfg = load_config(None, [
        f"models.student={tiny_pair['student']}", f"models.teacher={tiny_pair['teacher']}", f"out_dir={tmp_path}",
        "steps=2", "prompts_per_step=2", "rollouts_per_prompt=2", "rollout_batch=4", "micro_batch=2",
        "max_new_tokens=12", "eval_every=0", "eval_samples=1", "data.num_train=32", "data.num_test=2",
        "checkpoint_every=0", f"method.name={name}", *extra,
    ])
    summary = train(cfg, log=lambda m: None)
    assert summary["status"] == "completed"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) and v >= -1e-6 for v in losses)
    if name == "sft_warmup":
        assert [r["sft/update"] for r in records if "sft/update" in r] == [1, 2]
    if name in ("trb", "fixed_eps", "trb_adaptive"):
        first = next(r for r in records if "loss" in r)
        assert first["rollout/mean_beta"] > 0 and first["rollout/realized_kl_max"] <= first["eps"] + 1e-6
    if name in ("skd", "minillm"):
        assert sum(r["rollout/from_teacher"] for r in records if "loss" in r) > 0


def test_gkd_data_steps_train_on_the_solutions_of_every_prompt_of_the_step(tiny_pair, tmp_path):
    """With lmbda = 0 every step is a data step: its token count is that of all the step's dataset solutions (+ EOS),
    counted here from the data and tokenizer directly, not a subset (one rollout batch's worth, or one prompt)."""
    cfg = load_config(None, [
        f"models.student={tiny_pair['student']}", f"models.teacher={tiny_pair['teacher']}", f"out_dir={tmp_path}",
        "steps=3", "prompts_per_step=6", "rollouts_per_prompt=2", "rollout_batch=4", "micro_batch=4",
        "max_new_tokens=12", "eval_every=0", "eval_samples=1", "data.num_train=32", "data.num_test=2",
        "checkpoint_every=0", "method.name=gkd", "method.lmbda=0",
    ])
    train(cfg, log=lambda m: None)
    d = cfg.data
    problems = data_splits(d.source, d.num_train, d.val_count, d.num_test, d.seed)[0]
    lengths = [len(ids) + 1 for ids in load_tokenizer(str(tiny_pair["student"]))(
        [p.solution for p in problems], add_special_tokens=False)["input_ids"]]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    tokens = [r["tokens"] for r in records if "loss" in r]
    expected = [sum(lengths[i] for i in step_prompts(k, 6, len(problems), cfg.seed)) for k in range(3)]
    assert tokens == expected


def test_teacher_policy_marks_every_token_from_teacher():
    vocab = 16
    teacher = tiny_causal_lm(vocab, 32, 2, seed=1, init_std=0.3, eos_token_id=1)
    space = VocabSpace(size=vocab, stop_ids=(1,), eos_id=1, pad_id=0)
    rollout = generate(TeacherPolicy(), [[3, 4]] * 4, space, 6, torch.Generator().manual_seed(0), teacher=teacher)
    assert torch.all(rollout.from_teacher == rollout.completion_mask)
    assert torch.all(rollout.beta[rollout.completion_mask] == 1)
