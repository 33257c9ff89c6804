"""The rollout engine on tiny random Hugging Face models: exactness against generate and a fresh forward pass,
sampled distributions against their analytic forms, stopping, vocabulary handling, reproducibility."""

import pytest
import torch
from scipy.stats import chisquare

from trb.core import blend_logp, merged_logp, solve_beta
from trb.models import CompatibilityError, VocabSpace, tiny_causal_lm, vocab_space
from trb.rollout import (MixturePolicy, RolloutStats, SKDPolicy, StudentPolicy, TeacherPolicy, TRBPolicy, generate,
                         skd_logp)

VOCAB = 48
EOS, PAD = 1, 0
PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15, 16], [3], [20, 21, 22, 23]]


def pair(architecture="qwen3", teacher_rows=VOCAB, init_std=0.3):
    student = tiny_causal_lm(VOCAB, 32, 2, architecture=architecture, seed=0, init_std=init_std,
                             tie_word_embeddings=False, eos_token_id=EOS, pad_token_id=PAD)
    teacher = tiny_causal_lm(teacher_rows, 48, 3, architecture=architecture, seed=1, init_std=init_std,
                             tie_word_embeddings=False, eos_token_id=EOS, pad_token_id=PAD)
    with torch.no_grad():  # make stopping common enough that batches mix EOS and length stops
        student.lm_head.weight[EOS] *= 1.5
        teacher.lm_head.weight[EOS] *= 1.5
    return student, teacher


SPACE = VocabSpace(size=VOCAB, stop_ids=(EOS,), eos_id=EOS, pad_id=PAD)


@torch.no_grad()
def fresh_token_logp(model, rollout, vocab):
    """Log-probs of the completion tokens from one full forward pass over prompt + completion, (B, T)."""
    input_ids, attention_mask, positions = rollout.sequences()
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits
    width, steps = rollout.prompt_ids.shape[1], rollout.completion_ids.shape[1]
    logp = merged_logp(logits[:, width - 1 : width - 1 + steps], vocab.size, vocab.stop_tensor(logits.device),
                       vocab.eos_id)  # (B, T, V)
    picked = logp.gather(-1, rollout.completion_ids[..., None])[..., 0]
    return torch.where(rollout.completion_mask, picked, 0.0)


@pytest.mark.parametrize("architecture", ["qwen3", "llama"])
@pytest.mark.parametrize("forward", ["lean", "hf"])
def test_greedy_eps0_equals_hf_generate(architecture, forward):
    student, teacher = pair(architecture)
    width = max(map(len, PROMPTS))
    ids = torch.full((len(PROMPTS), width), PAD)
    mask = torch.zeros((len(PROMPTS), width), dtype=torch.long)
    for i, p in enumerate(PROMPTS):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    expected = student.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                                pad_token_id=PAD, eos_token_id=EOS)[:, width:]
    rollout = generate(TRBPolicy(0.0), PROMPTS, SPACE, 16, torch.Generator().manual_seed(0), student=student,
                       teacher=teacher, greedy=True, forward=forward)
    assert rollout.stopped.any() and not rollout.stopped.all(), "the case should mix EOS stops and length stops"
    got = rollout.completion_ids[:, : expected.shape[1]]
    for row in range(len(PROMPTS)):
        n = int(rollout.lengths[row])
        assert got[row, :n].tolist() == expected[row, :n].tolist()
        if rollout.stopped[row]:
            assert expected[row, n - 1] == EOS and torch.all(expected[row, n:] == PAD)
    assert torch.all(rollout.beta[rollout.completion_mask] == 0)


@pytest.mark.parametrize("forward", ["lean", "hf"])
def test_recorded_logps_equal_a_fresh_forward_pass(forward):
    student, teacher = pair()
    prompts = PROMPTS * 4
    for policy in [TRBPolicy(0.05), SKDPolicy(top_k=5), MixturePolicy(0.3), StudentPolicy(0.7)]:
        rollout = generate(policy, prompts, SPACE, 20, torch.Generator().manual_seed(1), student=student,
                           teacher=teacher, forward=forward, batch=7)
        assert rollout.stopped.any()
        # fp32: log-probs of magnitude ~5 from differently shaped batches agree to a few ulps (rtol 1e-5)
        torch.testing.assert_close(rollout.student_logp, fresh_token_logp(student, rollout, SPACE), atol=1e-5,
                                   rtol=1e-5)
        if policy.needs_teacher:
            torch.testing.assert_close(rollout.teacher_logp, fresh_token_logp(teacher, rollout, SPACE), atol=1e-5,
                                       rtol=1e-5)


def test_realized_kl_within_budget_and_beta_zero_at_eps_zero():
    student, teacher = pair()
    for eps in [0.0, 0.01, 0.1, 1.0]:
        rollout = generate(TRBPolicy(eps), PROMPTS * 8, SPACE, 24, torch.Generator().manual_seed(2), student=student,
                           teacher=teacher)
        m = rollout.completion_mask
        assert torch.all(rollout.realized_kl[m] <= eps + 1e-6)
        if eps == 0:
            assert torch.all(rollout.beta[m] == 0) and torch.all(rollout.realized_kl[m] == 0)
        else:
            assert rollout.beta[m].mean() > 0
        assert torch.all(rollout.beta[~m] == 0) and torch.all(rollout.completion_ids[~m] == PAD)


@torch.no_grad()
def first_token_counts(policy, student, teacher, n=24_000, seed=3):
    prompt = [5, 6, 7, 8]
    rollout = generate(policy, [prompt] * n, SPACE, 1, torch.Generator().manual_seed(seed), student=student,
                       teacher=teacher)
    ids = torch.tensor([prompt])
    s_logp = merged_logp(student(input_ids=ids).logits[:, -1], VOCAB, SPACE.stop_tensor("cpu"), EOS)  # (1, V)
    t_logp = merged_logp(teacher(input_ids=ids).logits[:, -1], VOCAB, SPACE.stop_tensor("cpu"), EOS)  # (1, V)
    return torch.bincount(rollout.completion_ids[:, 0], minlength=VOCAB).double(), s_logp, t_logp, rollout


def assert_matches(counts, probs):
    """Chi-square goodness of fit, pooling categories with expected count < 5 into one cell."""
    n = counts.sum()
    expected = probs.double() * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    if exp[-1] < 5:
        obs, exp = obs[:-1], exp[:-1]
        obs[-1], exp[-1] = obs[-1] + counts[~big].sum(), exp[-1] + expected[~big].sum()
    pvalue = chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue
    assert pvalue > 1e-3, f"chi-square p = {pvalue:.2e}"


@pytest.mark.parametrize("eps", [0.01, 0.1, 1.0])
def test_trb_samples_follow_mu_beta(eps):
    student, teacher = pair(init_std=0.3)
    counts, s_logp, t_logp, rollout = first_token_counts(TRBPolicy(eps), student, teacher)
    beta = solve_beta(s_logp, t_logp, eps)
    assert 0 < beta.item() <= 1
    mu = blend_logp(s_logp, t_logp, beta).exp()[0]
    assert_matches(counts, mu)
    # and it is distinguishable from the student when beta is large enough to matter
    if eps >= 0.1:
        with pytest.raises(AssertionError):
            assert_matches(counts, s_logp.exp()[0])
    torch.testing.assert_close(rollout.beta[:, 0], beta.expand(len(rollout.beta)))


def test_skd_samples_follow_analytic_distribution():
    student, teacher = pair(init_std=0.3)
    policy = SKDPolicy(top_k=4, teacher_temperature=0.6)
    counts, s_logp, t_logp, rollout = first_token_counts(policy, student, teacher)
    mu, in_top = skd_logp(s_logp, t_logp, 4, 0.6)
    torch.testing.assert_close(mu.exp().sum(), torch.tensor(1.0))
    assert_matches(counts, mu.exp()[0])
    # the injection rate is the student's mass outside the teacher's top-k
    rate = rollout.from_teacher[:, 0].double().mean().item()
    outside = s_logp.exp()[~in_top].sum().item()
    assert abs(rate - outside) < 4 * (outside * (1 - outside) / len(counts) / 500) ** 0.5 + 0.01


def test_mixture_samples_and_importance_weights():
    student, teacher = pair(init_std=0.3)
    counts, s_logp, t_logp, rollout = first_token_counts(MixturePolicy(0.2), student, teacher)
    mix = 0.2 * t_logp.exp() + 0.8 * s_logp.exp()
    assert_matches(counts, mix[0])
    weight = torch.exp(rollout.student_logp[:, 0] - rollout.behavior_logp[:, 0])
    expected = (s_logp.exp() / mix)[0, rollout.completion_ids[:, 0]]
    torch.testing.assert_close(weight, expected.float(), atol=1e-5, rtol=1e-5)
    assert abs(rollout.from_teacher[:, 0].double().mean().item() - 0.2) < 0.02


def test_teacher_policy_runs_without_student():
    _, teacher = pair()
    rollout = generate(TeacherPolicy(), PROMPTS, SPACE, 10, torch.Generator().manual_seed(4), teacher=teacher)
    assert rollout.student_logp is None
    torch.testing.assert_close(rollout.teacher_logp, fresh_token_logp(teacher, rollout, SPACE), atol=1e-5, rtol=0)
    torch.testing.assert_close(rollout.behavior_logp, rollout.teacher_logp)
    with pytest.raises(ValueError, match="needs a teacher"):
        generate(TRBPolicy(0.1), PROMPTS, SPACE, 4, torch.Generator(), student=teacher)


def test_same_seed_same_rollout():
    student, teacher = pair()
    run = lambda seed: generate(TRBPolicy(0.05), PROMPTS * 3, SPACE, 16,  # noqa: E731
                                torch.Generator().manual_seed(seed), student=student, teacher=teacher)
    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.beta, b.beta)
    assert not torch.equal(a.completion_ids, c.completion_ids)


def test_padded_teacher_vocabulary_is_sliced():
    student, teacher = pair(teacher_rows=VOCAB + 16)
    with torch.no_grad():
        teacher.lm_head.weight[VOCAB:] = 10.0  # padded rows with large logits must never matter
    rollout = generate(TRBPolicy(1.0), PROMPTS * 4, SPACE, 16, torch.Generator().manual_seed(5), student=student,
                       teacher=teacher)
    assert rollout.completion_ids.max() < VOCAB
    torch.testing.assert_close(rollout.teacher_logp, fresh_token_logp(teacher, rollout, SPACE), atol=1e-5, rtol=0)


def test_different_eos_ids_merge_into_one_stop_event():
    # The teacher ends with id 2 (a chat EOS), the student with id 1: both are one stop event, emitted as 1.
    student, teacher = pair()
    space = VocabSpace(size=VOCAB, stop_ids=(EOS, 2), eos_id=EOS, pad_id=PAD)
    with torch.no_grad():
        teacher.lm_head.weight[2] *= 2.0  # the teacher likes to stop via id 2
    rollout = generate(TRBPolicy(1.0), PROMPTS * 8, space, 16, torch.Generator().manual_seed(6), student=student,
                       teacher=teacher)
    assert not (rollout.completion_ids == 2).any()
    assert rollout.stopped.any()
    ends = rollout.completion_ids.gather(1, (rollout.lengths - 1)[:, None])[:, 0]
    assert torch.all(ends[rollout.stopped] == EOS)
    # the recorded stop log-prob is the teacher's summed EOS mass (fp32 rounding relative to log-probs near -10)
    torch.testing.assert_close(rollout.teacher_logp, fresh_token_logp(teacher, rollout, space), atol=1e-5, rtol=1e-5)


def test_finished_sequences_cost_no_teacher_work():
    student, teacher = pair()
    rows_seen = []
    handle = teacher.register_forward_hook(lambda mod, args, kwargs, out: rows_seen.append(kwargs["input_ids"].shape[0]),
                                           with_kwargs=True)
    rollout = generate(TRBPolicy(0.05), PROMPTS * 4, SPACE, 20, torch.Generator().manual_seed(9), student=student,
                       teacher=teacher)
    handle.remove()
    assert rollout.stopped.any()
    # after prefill, each teacher step runs only the rows still decoding at that step
    still_decoding = [int((rollout.lengths > t).sum()) for t in range(1, len(rows_seen))]
    assert rows_seen[0] == len(PROMPTS) * 4
    assert rows_seen[1:] == still_decoding


def test_tokenizer_mismatch_is_a_clear_error():
    from trb.tasks import train_tokenizer

    a = train_tokenizer(["one two three 1 + 2 = 3"] * 10, 120)
    b = train_tokenizer(["apples and pears 4 * 5 = 20"] * 10, 120)
    with pytest.raises(CompatibilityError, match="tokenizers differ"):
        vocab_space(a, b)
    space = vocab_space(a, a)
    assert space.size == len(a) and space.eos_id == a.eos_token_id and space.stop_ids == (a.eos_token_id,)


@pytest.mark.parametrize("policy", [
    StudentPolicy(),
    pytest.param(TRBPolicy(0.1), marks=pytest.mark.slow),  # two more compilations: minutes on a CPU
])
def test_compiled_dynamic_decoding_samples_what_eager_decoding_samples(policy):
    """compile=True with a dynamic cache (the CPU's compiled decoding): the lean single-token step and the policy
    compiled with dynamic shapes, finished rows leaving the batch, the race drawn outside the compiled policy. The
    same tokens as eager decoding, and records equal to a fresh forward."""
    student, teacher = pair()
    rollouts = [generate(policy, PROMPTS * 3, SPACE, 16, torch.Generator().manual_seed(5), student=student,
                         teacher=teacher, compile=c) for c in (False, True)]
    assert torch.equal(rollouts[0].completion_ids, rollouts[1].completion_ids)
    assert rollouts[1].stopped.any() and not rollouts[1].stopped.all(), "rows leave the batch mid-rollout"
    # the compiled step rounds differently (both forwards stay within 1e-5 of a fresh one, below); TRB's beta solve then
    # may land elsewhere in its band below eps (2e-4 eps), which moves the blend's log-probs by up to about 1e-4
    atol = 1e-4 if policy.needs_teacher else 1e-5
    torch.testing.assert_close(rollouts[0].behavior_logp, rollouts[1].behavior_logp, atol=atol, rtol=1e-5)
    for role, model in (("student", student), ("teacher", teacher)):
        recorded = getattr(rollouts[1], f"{role}_logp")
        if recorded is not None:
            torch.testing.assert_close(recorded, fresh_token_logp(model, rollouts[1], SPACE), atol=1e-5, rtol=0)


@pytest.mark.gpu
def test_cuda_graph_rollouts_record_what_a_fresh_forward_computes():
    """On a GPU (`pytest -m gpu`): compiled decoding captures both models' decode steps and the TRB step as CUDA
    graphs. The log-probs it records for the sampled tokens equal a fresh forward pass over the finished
    sequences, every position stays inside the trust region, and a second rollout reuses the static caches."""
    device = torch.device("cuda")
    student, teacher = (m.to(device) for m in pair())
    for seed in (0, 1):
        rollout = generate(TRBPolicy(0.05), PROMPTS * 4, SPACE, 24, torch.Generator(device).manual_seed(seed),
                           student=student, teacher=teacher, compile=True, batch=8)
        with torch.no_grad():
            for model, recorded in ((student, rollout.student_logp), (teacher, rollout.teacher_logp)):
                torch.testing.assert_close(recorded, fresh_token_logp(model, rollout, SPACE), atol=1e-4, rtol=0)
        assert float(rollout.realized_kl.max()) <= 0.05
        assert rollout.completion_mask.sum() > len(PROMPTS) * 4


@pytest.mark.parametrize("policy", [TRBPolicy(0.1), SKDPolicy(top_k=5), MixturePolicy(0.3), StudentPolicy(0.8)])
def test_a_sequence_is_the_same_whatever_shares_its_batch(policy):
    """Admission by KV memory: each sequence's randomness is keyed by (key, position, stream), so two schedules
    (everything at once; a budget of three dense rows, which preempts rows, in another queue order) give every
    sequence the same tokens and records."""
    student, teacher = pair()
    prompts = PROMPTS * 4
    keys = torch.arange(len(prompts)) * 7919 + 3
    runs, stats = [], RolloutStats()
    for concurrency, order in ((len(prompts), torch.arange(len(prompts))),
                               (3, torch.randperm(len(prompts), generator=torch.Generator().manual_seed(0)))):
        rollout = generate(policy, [prompts[i] for i in order], SPACE, 16, student=student, teacher=teacher,
                           keys=keys[order], batch=concurrency, stats=stats)
        runs.append(rollout.select(order.argsort()))  # back in the original order
    assert stats.preemptions > 0, "the small budget preempts rows"
    a, b = runs
    assert a.stopped.any() and not a.stopped.all()
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.completion_mask, b.completion_mask)
    for name in ("behavior_logp", "student_logp", "teacher_logp", "beta", "realized_kl"):
        if getattr(a, name) is not None:
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-4, atol=1e-5)  # fp32 rounding
    assert torch.equal(a.from_teacher, b.from_teacher)
