"""Exact speculative TRB sampling: the same distribution as lock-step TRB, the same records, fewer teacher calls."""

import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency

from trb.forward import token_logp
from trb.models import VocabSpace, tiny_causal_lm
from trb.rollout import RolloutStats, StudentPolicy, TRBPolicy, generate
from trb.rollout.speculative import choose_gamma

VOCAB, EOS = 10, 1
SPACE = VocabSpace(size=VOCAB, stop_ids=(EOS,), eos_id=EOS, pad_id=0)


def pair():
    student = tiny_causal_lm(VOCAB, 32, 2, seed=0, init_std=0.4, tie_word_embeddings=False, eos_token_id=EOS)
    teacher = tiny_causal_lm(VOCAB, 32, 2, seed=1, init_std=0.4, tie_word_embeddings=False, eos_token_id=EOS)
    return student, teacher


def homogeneous(a: torch.Tensor, b: torch.Tensor) -> float:
    """Chi-square two-sample test p-value that two samples of categories come from one distribution."""
    cats = torch.unique(torch.cat([a, b]))
    table = np.array([[int((x == c).sum()) for c in cats] for x in (a, b)])
    table = table[:, table.sum(0) >= 10]
    return chi2_contingency(table).pvalue


def per_position_codes(rollout, positions):
    """Each sequence's token at a position (-1 after it ended), and the joint code of the first two tokens."""
    ids = torch.where(rollout.completion_mask, rollout.completion_ids, -1)
    return [ids[:, t] for t in positions] + [ids[:, 0] * (VOCAB + 1) + ids[:, 1]]


@pytest.mark.parametrize("eps, compile", [(0.02, False), (0.5, False),
                                          pytest.param(0.5, True, marks=pytest.mark.slow)])  # compiling: minutes
def test_speculative_matches_lockstep_distribution(eps, compile):
    """compile=True: the policy's target through torch.compile."""
    student, teacher = pair()
    prompts = [[3, 4, 5]] * 8_000
    lock = generate(TRBPolicy(eps), prompts, SPACE, 5, torch.Generator().manual_seed(0), student=student,
                    teacher=teacher)
    stats = RolloutStats()
    spec = generate(TRBPolicy(eps), prompts, SPACE, 5, torch.Generator().manual_seed(1), student=student,
                    teacher=teacher, gamma=3, compile=compile, stats=stats)
    plain = generate(StudentPolicy(), prompts, SPACE, 5, torch.Generator().manual_seed(2), student=student)
    for a, b in zip(per_position_codes(lock, range(5)), per_position_codes(spec, range(5))):
        assert homogeneous(a, b) > 1e-3
    if eps == 0.5:  # the test can tell the blend from the student
        assert min(homogeneous(a, b) for a, b in zip(per_position_codes(lock, range(5)),
                                                        per_position_codes(plain, range(5)))) < 1e-6
    assert torch.equal(spec.stopped, spec.completion_ids.gather(1, (spec.lengths - 1)[:, None])[:, 0] == EOS)
    assert stats.acceptance >= 1 - (eps / 2) ** 0.5 - 0.02, "Pinsker: acceptance >= 1 - sqrt(eps / 2)"


def prefix_kl_and_entropy(student, teacher, rollout):
    """KL(pi_S || pi_T) and H(pi_T) over the full vocabulary at each completion prefix, from one float64 forward of
    each model over prompt + completion, (B, T) each (0 at masked positions)."""
    input_ids, attention_mask, positions = rollout.sequences()
    width, steps = rollout.prompt_ids.shape[1], rollout.completion_ids.shape[1]
    s, t = [torch.log_softmax(model.double()(input_ids=input_ids, attention_mask=attention_mask,
                                             position_ids=positions).logits[:, width - 1: width - 1 + steps], -1)
            for model in (student, teacher)]  # (B, T, V) each (one stop id: no merging)
    student.float(), teacher.float()
    m = rollout.completion_mask
    kl = (s.exp() * (s - t)).sum(-1)  # (B, T)
    return torch.where(m, kl, 0.0), torch.where(m, -(t.exp() * t).sum(-1), 0.0)


def test_both_decoders_record_the_full_teacher_kl_and_entropy_at_every_prefix():
    student, teacher = pair()
    prompts = [[3, 4, 5], [6, 7], [2, 3, 4, 5, 6, 7], [8]] * 4
    lock = generate(TRBPolicy(0.3), prompts, SPACE, 12, torch.Generator().manual_seed(0), student=student,
                    teacher=teacher, batch=5)
    spec = generate(TRBPolicy(0.3), prompts, SPACE, 12, torch.Generator().manual_seed(0), student=student,
                    teacher=teacher, gamma=3)
    for rollout in (lock, spec):
        kl, entropy = prefix_kl_and_entropy(student, teacher, rollout)
        assert kl[rollout.completion_mask].min() > 0.01, "the two models differ at every prefix"
        torch.testing.assert_close(rollout.teacher_kl.double(), kl, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rollout.teacher_entropy.double(), entropy, atol=1e-5, rtol=1e-5)
    plain = generate(StudentPolicy(), prompts, SPACE, 12, torch.Generator().manual_seed(0), student=student)
    assert plain.teacher_kl is None and plain.teacher_entropy is None, "no teacher ran"
    # a caller whose loss computes them itself turns them off; the rollouts stay the same
    quiet = generate(TRBPolicy(0.3), prompts, SPACE, 12, torch.Generator().manual_seed(0), student=student,
                     teacher=teacher, batch=5, record_kl=False)
    quiet_spec = generate(TRBPolicy(0.3), prompts, SPACE, 12, torch.Generator().manual_seed(0), student=student,
                          teacher=teacher, gamma=3, record_kl=False)
    for rollout, reference in ((quiet, lock), (quiet_spec, spec)):
        assert rollout.teacher_kl is None and rollout.teacher_entropy is None
        assert torch.equal(rollout.completion_ids, reference.completion_ids)
        torch.testing.assert_close(rollout.behavior_logp, reference.behavior_logp, atol=0, rtol=0)


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_speculative_records_equal_a_fresh_forward_and_stay_in_budget(compile):
    student, teacher = pair()
    prompts = [[3, 4, 5], [6, 7], [2, 3, 4, 5, 6, 7], [8]] * 8
    for gamma in (1, 4):
        stats = RolloutStats()
        rollout = generate(TRBPolicy(0.3), prompts, SPACE, 12, torch.Generator().manual_seed(gamma), student=student,
                           teacher=teacher, gamma=gamma, compile=compile, stats=stats)
        rounds, partial = divmod(stats.decode_steps, gamma + 1)  # a round feeds gamma + 1 tokens to every row
        assert partial == 0
        if gamma == 4:
            assert rounds < rollout.lengths.max(), "rounds emit several tokens each"
        torch.testing.assert_close(rollout.student_logp, token_logp(student, rollout, SPACE), atol=1e-5, rtol=0)
        torch.testing.assert_close(rollout.teacher_logp, token_logp(teacher, rollout, SPACE), atol=1e-5, rtol=0)
        m = rollout.completion_mask
        assert torch.all(rollout.realized_kl[m] <= 0.3 + 1e-6) and rollout.beta[m].mean() > 0
        assert torch.all(rollout.completion_ids[~m] == 0) and m[:, 0].all()
        assert torch.all(m.sum(1) <= 12)


def test_choose_gamma_trades_acceptance_against_cost():
    assert choose_gamma(0.95, student_cost=1.0, teacher_cost=10.0) > choose_gamma(0.5, 1.0, 10.0)
    assert choose_gamma(0.9, student_cost=1.0, teacher_cost=0.1) <= 2
    assert 1 <= choose_gamma(0.0, 1.0, 1.0) <= 8


def test_training_with_speculative_rollouts(tiny_pair, tmp_path):
    import json

    from trb.config import load_config
    from trb.train import train

    cfg = load_config(None, [
        f"models.student={tiny_pair['student']}", f"models.teacher={tiny_pair['teacher']}", f"out_dir={tmp_path}",
        "steps=2", "prompts_per_step=2", "rollouts_per_prompt=2", "rollout_batch=4", "max_new_tokens=12",
        "eval_every=0", "eval_samples=1", "data.num_train=16", "data.num_test=2", "method.name=trb",
        "method.eps0=0.1", "method.horizon=1", "speculative_gamma=3"])
    train(cfg, log=lambda m: None)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert 0 < records[0]["rollout/spec_acceptance"] <= 1 and records[0]["rollout/realized_kl_max"] <= 0.1 + 1e-6
    assert "rollout/spec_acceptance" not in records[1], "after the horizon rollouts are plain student samples"


@pytest.mark.gpu
def test_cuda_graph_speculative_records_equal_a_fresh_forward():
    """On a GPU (`pytest -m gpu`): fixed-shape speculative TRB captures the student's steps and the teacher's
    window as CUDA graphs; what it records still equals a fresh forward over the finished sequences."""
    device = torch.device("cuda")
    student, teacher = (m.to(device) for m in pair())
    prompts = [[3, 4, 5], [6, 7], [2, 3, 4, 5, 6, 7], [8]] * 8
    stats = RolloutStats()
    rollout = generate(TRBPolicy(0.3), prompts, SPACE, 12, torch.Generator(device).manual_seed(0), student=student,
                       teacher=teacher, gamma=4, compile=True, stats=stats)
    with torch.no_grad():
        torch.testing.assert_close(rollout.student_logp, token_logp(student, rollout, SPACE), atol=1e-4, rtol=0)
        torch.testing.assert_close(rollout.teacher_logp, token_logp(teacher, rollout, SPACE), atol=1e-4, rtol=0)
    assert stats.decode_steps // 5 < rollout.lengths.max() and float(rollout.realized_kl.max()) <= 0.3 + 1e-6


def test_speculative_sequences_do_not_depend_on_their_batch():
    student, teacher = pair()
    prompts = [[3, 4, 5], [6, 7], [2, 3, 4, 5, 6, 7], [8]] * 5
    keys = torch.arange(len(prompts)) * 104729 + 11
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(1))
    a = generate(TRBPolicy(0.3), prompts, SPACE, 12, student=student, teacher=teacher, gamma=3, keys=keys)
    stats = RolloutStats()
    b = generate(TRBPolicy(0.3), [prompts[i] for i in order], SPACE, 12, student=student, teacher=teacher, gamma=3,
                 keys=keys[order], batch=4, stats=stats)
    b = b.select(order.argsort())
    assert stats.preemptions > 0, "a budget of four dense rows preempts rows"
    assert torch.equal(a.completion_ids, b.completion_ids)
    torch.testing.assert_close(a.teacher_logp, b.teacher_logp, rtol=0, atol=1e-5)
