"""The vLLM engine through the real engine (vLLM's CPU build) on the shipped miniature pair: behavior log-probs and
records equal trb's math, sampled tokens follow mu (chi-square), the stop event is merged, student weights follow an
optimizer step (one process, and 2 gloo ranks under DDP and FSDP2), and bad input gives one line.

Run with `make test-vllm` (its own environment, the pins of pyproject's `vllm` extra); the default suite deselects
the `vllm` marker.
"""

from __future__ import annotations

import json
import shutil
import socket
from contextlib import contextmanager

import pytest
import torch

from trb.core import kl_divergence
from trb.models import load_causal_lm, load_tokenizer, merged_weights, vocab_space
from trb.paths import resolve_builtin
from trb.rollout import MixturePolicy, SKDPolicy, StudentPolicy, TeacherPolicy, TRBPolicy
from trb.vllm.behavior import distribution

pytestmark = pytest.mark.vllm

PAIR = "trb:miniature/arith/"
SETTINGS = dict(kv_cache_bytes=64 << 20, dtype="float32", enforce_eager=True)
POLICIES = [TRBPolicy(0.02), TRBPolicy(0.3), SKDPolicy(), MixturePolicy(0.2)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _engine(student: str, teacher: str | None, vocab):
    from trb.vllm.engine import VLLMEngine, VLLMSettings

    return VLLMEngine(student, teacher, vocab, VLLMSettings(**SETTINGS))


@pytest.fixture(scope="module")
def arith():
    """(tokenizer, student, teacher, vocab, prompts) of the miniature pair, models in float64 (the references)."""
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(PAIR + "student")
    student = load_causal_lm(PAIR + "student", torch.device("cpu")).double()
    teacher = load_causal_lm(PAIR + "teacher", torch.device("cpu")).double()
    vocab = vocab_space(tokenizer, tokenizer, student, teacher)
    prompts = [tokenizer.encode(q) for q in ("12+7=", "3*4-5=", "(8-2)*3=")]
    return tokenizer, student, teacher, vocab, prompts


@pytest.fixture(scope="module")
def engine(arith):
    engine = _engine(PAIR + "student", PAIR + "teacher", arith[3])
    yield engine
    engine.close()


def reference_logp(model, vocab, ids: list[int], start: int) -> torch.Tensor:
    """float64 log-probs (n, V) on the stop-merged shared vocabulary at the prefixes ids[:start], ..., ids[:-1]."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, start - 1 : len(ids) - 1]  # (n, V_model)
    logp = torch.log_softmax(logits[:, : vocab.size].double(), dim=-1)  # (n, V)
    stops = list(vocab.stop_ids)
    if len(stops) > 1:
        merged = torch.logsumexp(logp[:, stops], dim=-1)  # (n,)
        logp[:, stops] = float("-inf")
        logp[:, vocab.eos_id] = merged
    return logp


@contextmanager
def captured(engine):
    """The student's and the teacher's log-probs (each a list of (rows, V) tensors, in call order) that the blend
    model hands to the policy while the block runs."""
    model = engine.model
    calls = {"student": [], "teacher": []}

    def logp(stack, hidden):
        out = type(model)._logp(model, stack, hidden)  # (n, V)
        calls["teacher" if stack is model.teacher else "student"].append(out.clone())
        return out

    model._logp = logp
    try:
        yield calls
    finally:
        del model._logp


def one_by_one(engine, policy, prompts, max_new_tokens, key0=0):
    """Each prompt generated alone (one row per engine step, so the captured rows follow the sequence): [(prompt,
    completion, rollout row, student (n, V), teacher (n, V) or None)]."""
    rows = []
    for i, prompt in enumerate(prompts):
        engine.generate(policy, [prompt], 1, torch.tensor([key0 + i]))  # the engine of the policy's kind is up
        with captured(engine) as calls:
            rollout = engine.generate(policy, [prompt], max_new_tokens, torch.tensor([key0 + i]))
        n = int(rollout.lengths[0])
        student = torch.cat(calls["student"])  # (n, V)
        teacher = torch.cat(calls["teacher"]) if calls["teacher"] else None  # (n, V)
        assert student.shape[0] == n
        rows.append((prompt, rollout.completion_ids[0, :n].tolist(), rollout.select(slice(0, 1)), student, teacher))
    return rows


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"{p.name}-{getattr(p, 'eps', '')}")
def test_behavior_logprobs_and_records_are_trbs_math(engine, arith, policy):
    """The behavior log-prob vLLM returns for each sampled token, and the beta, realized KL and teacher-KL records,
    equal trb's policy math (as the own engine runs it, outside vLLM) on the distributions the engine's stacks
    produced, to 1e-5;
    and those distributions are the Hugging Face models' (float64) to the fp32 rounding of a forward (1e-4 on
    every token's log-prob, the far tail included)."""
    _, student_hf, teacher_hf, vocab, prompts = arith
    for prompt, completion, rollout, student, teacher in one_by_one(engine, policy, prompts, 16):
        n = len(completion)
        mu, beta, kl = distribution(policy, student, teacher)  # (n, V), (n,), (n,)
        token = torch.tensor(completion)[:, None]  # (n, 1)
        for name, value in (("behavior_logp", mu.gather(-1, token)[:, 0]), ("beta", beta), ("realized_kl", kl),
                            ("teacher_kl", kl_divergence(student, teacher))):
            assert (getattr(rollout, name)[0, :n] - value.float()).abs().max() < 1e-5, name
        assert rollout.completion_mask[0, :n].all() and not rollout.completion_mask[0, n:].any()
        if isinstance(policy, TRBPolicy):
            assert (rollout.realized_kl[0, :n] <= policy.eps).all()
        ids = prompt + completion
        finite = torch.isfinite(student)
        for model, engine_logp in ((student_hf, student), (teacher_hf, teacher)):
            hf = reference_logp(model, vocab, ids, len(prompt))  # (n, V)
            assert (hf[finite] - engine_logp[finite].double()).abs().max() < 1e-4  # ~4e-5 seen, in the far tail


def frequencies_fit(tokens: torch.Tensor, logp: torch.Tensor) -> float:
    """Pearson chi-square p-value of token counts against exp(logp) (V,), cells of expected count < 5 pooled."""
    from scipy.stats import chisquare

    expected = logp.exp() * len(tokens)  # (V,)
    counts = torch.bincount(tokens, minlength=len(logp)).double()  # (V,)
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum()[None]])
    wanted = torch.cat([expected[~small], expected[small].sum()[None]])
    wanted = wanted * observed.sum() / wanted.sum()
    return float(chisquare(observed.numpy(), wanted.numpy()).pvalue)


@pytest.mark.parametrize("eps", [0.02, 0.1, 0.3])
def test_sampled_tokens_follow_mu_two_prefixes_deep(engine, arith, eps):
    """2,000 sequences of two tokens: the first tokens' counts fit mu at the prompt and the second tokens' counts
    (after the commonest first token) fit mu at that prefix, mu computed in float64 from the Hugging Face models;
    the same counts reject the teacher's distribution."""
    _, student_hf, teacher_hf, vocab, prompts = arith
    policy, prompt, count = TRBPolicy(eps), prompts[0], 2000
    rollout = engine.generate(policy, [prompt] * count, 2, torch.arange(count) + 1000)
    first = rollout.completion_ids[:, 0]  # (N,)
    common = int(torch.mode(first[first != vocab.eos_id]).values)
    second = rollout.completion_ids[(first == common) & rollout.completion_mask[:, 1], 1]  # (N',)
    for prefix, tokens in ((prompt, first), (prompt + [common], second)):
        student = reference_logp(student_hf, vocab, prefix + [0], len(prefix))[0]  # (V,)
        teacher = reference_logp(teacher_hf, vocab, prefix + [0], len(prefix))[0]  # (V,)
        mu = distribution(policy, student[None], teacher[None])[0][0]  # (V,)
        assert len(tokens) >= 200
        assert frequencies_fit(tokens, mu) > 1e-3
        assert frequencies_fit(tokens, teacher) < 1e-6  # the test has the power to tell mu from another distribution


def test_stop_ids_merge_into_the_students_eos(tmp_path, engine, arith):
    """A teacher whose generation config adds a second stop id: both stacks' stop mass is carried by the student's
    EOS, the other stop id is never sampled, sequences end on the EOS, and the behavior log-prob at the stop is the
    merged event's (in the blend and in the student-only engine)."""
    tokenizer, student_hf, _, _, prompts = arith
    extra_stop = 21  # a token both models emit often on these prompts
    teacher = tmp_path / "teacher"
    shutil.copytree(resolve_builtin(PAIR + "teacher"), teacher)
    generation = json.loads((teacher / "generation_config.json").read_text())
    (teacher / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": [1, extra_stop]}))
    teacher_hf = load_causal_lm(str(teacher), torch.device("cpu")).double()
    vocab = vocab_space(tokenizer, tokenizer, student_hf, teacher_hf)
    assert vocab.stop_ids == (1, extra_stop) and vocab.eos_id == 1
    engine.close()  # one vLLM engine per process (vLLM's parallel state is global); the shared one restarts later
    engine = _engine(PAIR + "student", str(teacher), vocab)
    try:
        for policy in (TRBPolicy(0.3), StudentPolicy()):
            rollout = engine.generate(policy, prompts * 20, 24, torch.arange(60))
            assert not (rollout.completion_ids[rollout.completion_mask] == extra_stop).any()
            assert rollout.stopped.float().mean() > 0.3
            for row in rollout.stopped.nonzero()[:5, 0].tolist():
                n = int(rollout.lengths[row])
                ids = rollout.prompt_ids[row][rollout.prompt_mask[row]].tolist()
                completion = rollout.completion_ids[row, :n].tolist()
                assert completion[-1] == vocab.eos_id and not rollout.completion_mask[row, n:].any()
                student = reference_logp(student_hf, vocab, ids + completion, len(ids))  # (n, V)
                teacher_logp = reference_logp(teacher_hf, vocab, ids + completion, len(ids))  # (n, V)
                mu = distribution(policy, student, teacher_logp)[0]  # (n, V)
                assert abs(float(rollout.behavior_logp[row, n - 1]) - float(mu[-1, vocab.eos_id])) < 2e-4
    finally:
        engine.close()


def one_step(student, seed: int, lr: float = 1e-3) -> None:
    """One AdamW step of next-token cross-entropy on random tokens (every parameter moves)."""
    ids = torch.randint(2, 160, (4, 16), generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr)
    logits = student(ids).logits[:, :-1]  # (4, 15, V)
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)).backward()
    optimizer.step()


def check_sync(engine, trained, initial, teacher_hf, vocab, prompts) -> None:
    """The blend engine's student distributions equal `trained`'s (not `initial`'s) to 1e-5 in every token's
    probability, and its teacher's the checkpoint's; then the student-only engine (started after the update) returns
    `trained`'s log-probs of the tokens it samples to 1e-5."""
    for prompt, completion, rollout, student, teacher in one_by_one(engine, TeacherPolicy(), prompts[:2], 12):
        ids = prompt + completion
        for model, engine_logp, close in ((trained, student, True), (initial, student, False),
                                          (teacher_hf, teacher, True)):
            gap = (reference_logp(model, vocab, ids, len(prompt)).exp() - engine_logp.double().exp()).abs().max()
            assert gap < 1e-5 if close else gap > 1e-3
    rollout = engine.generate(StudentPolicy(), prompts, 12, torch.arange(len(prompts)))
    for row, prompt in enumerate(prompts):
        n = int(rollout.lengths[row])
        completion = rollout.completion_ids[row, :n]
        logp = reference_logp(trained, vocab, prompt + completion.tolist(), len(prompt))  # (n, V)
        gap = (logp.gather(-1, completion[:, None])[:, 0] - rollout.behavior_logp[row, :n].double()).abs().max()
        assert gap < 1e-5


def test_per_sequence_caps_end_each_row_at_its_own_length(engine, arith):
    """max_new_tokens as a list caps row i at its own length (vLLM's per-request max_tokens): each row is the same
    key's uncapped row cut there."""
    prompts = arith[4]
    keys = torch.arange(len(prompts)) + 50
    full = engine.generate(StudentPolicy(), prompts, 12, keys)
    caps = [1, 2, 4]
    capped = engine.generate(StudentPolicy(), prompts, caps, keys)
    assert capped.completion_ids.shape[1] == max(caps)
    for row, cap in enumerate(caps):
        n = min(int(full.lengths[row]), cap)
        assert int(capped.lengths[row]) == n
        assert torch.equal(capped.completion_ids[row, :n], full.completion_ids[row, :n])


def test_student_weights_follow_an_optimizer_step(engine, arith):
    """After an optimizer step and `load_student`, the engine's student log-probs are the trained student's to 1e-5
    and its teacher's are unchanged."""
    _, initial, teacher_hf, vocab, prompts = arith
    trained = load_causal_lm(PAIR + "student", torch.device("cpu"))
    engine.generate(TeacherPolicy(), prompts[:1], 2, torch.tensor([0]))  # the blend engine is up before the step
    one_step(trained, seed=0)
    engine.load_student(trained)
    check_sync(engine, trained.double(), initial, teacher_hf, vocab, prompts)


def _rank(rank: int, port: int, wrap: str, result) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        tokenizer = load_tokenizer(PAIR + "student")
        student = load_causal_lm(PAIR + "student", torch.device("cpu"))
        initial = load_causal_lm(PAIR + "student", torch.device("cpu")).double()
        teacher = load_causal_lm(PAIR + "teacher", torch.device("cpu")).double()
        vocab = vocab_space(tokenizer, tokenizer, student, teacher)
        if wrap == "ddp":
            trained = torch.nn.parallel.DistributedDataParallel(student)
            inner = trained.module
        else:
            from torch.distributed.fsdp import fully_shard

            for layer in student.model.layers:
                fully_shard(layer)
            trained = inner = fully_shard(student)
        engine = _engine(PAIR + "student", PAIR + "teacher", vocab)
        engine.generate(TeacherPolicy(), [tokenizer.encode("1+1=")], 2, torch.tensor([rank]))
        one_step(trained, seed=rank)  # each rank its own batch: DDP averages the gradients, FSDP2 reduces them
        engine.load_student(inner)  # a collective under FSDP2
        full = load_causal_lm(PAIR + "student", torch.device("cpu"))
        full.load_state_dict(dict(merged_weights(inner)))  # the whole trained student (gathered again under FSDP2)
        prompts = [tokenizer.encode(q) for q in ("12+7=", "3*4-5=")]
        check_sync(engine, full.double(), initial, teacher, vocab, prompts)
        engine.close()  # vLLM's teardown keeps this process group
        dist.barrier()
        result[rank] = "ok"
    except Exception as error:  # the parent asserts on the outcome of each rank
        result[rank] = f"{type(error).__name__}: {error}"
        raise
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_student_weights_follow_a_step_on_two_gloo_ranks(wrap):
    """2 gloo ranks, each with its own in-process engine (vLLM builds its groups inside the ranks' group): after a
    DDP or FSDP2 step every rank's engine holds the trained student and the unchanged teacher."""
    import torch.multiprocessing as mp

    result = mp.Manager().dict()
    mp.spawn(_rank, args=(free_port(), wrap, result), nprocs=2, join=True)
    assert dict(result) == {0: "ok", 1: "ok"}


def test_bad_input_gives_one_line(tmp_path, engine, arith):
    from trb.vllm.engine import VLLMEngine, VLLMError, VLLMSettings

    vocab, prompts = arith[3], arith[4]
    unknown = tmp_path / "unknown"
    shutil.copytree(resolve_builtin(PAIR + "teacher"), unknown)
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchModelForCausalLM"]}))
    with pytest.raises(VLLMError, match=r"cannot load the teacher model: its architectures \['NoSuch"):
        VLLMEngine(PAIR + "student", str(unknown), vocab)
    (unknown / "config.json").write_text(json.dumps({**config, "layer_types": ["sliding_attention"] * 5}))
    with pytest.raises(VLLMError, match="shares one KV cache between full-attention stacks only"):
        VLLMEngine(PAIR + "student", str(unknown), vocab)
    engine.close()  # one vLLM engine per process
    tiny = VLLMEngine(PAIR + "student", PAIR + "teacher", vocab, VLLMSettings(**{**SETTINGS, "kv_cache_bytes": 4096}))
    with pytest.raises(VLLMError, match="cannot start the blend engine: No available memory .*; check gpu_memory"
                       ) as error:
        tiny.generate(TRBPolicy(0.1), prompts, 4, torch.arange(3))
    assert "\n" not in str(error.value)
    with pytest.raises(VLLMError, match="exceed max_model_len=512"):
        engine.generate(TRBPolicy(0.1), prompts, 510, torch.arange(3))
    with pytest.raises(VLLMError, match="sleep mode needs CUDA"):
        VLLMEngine(PAIR + "student", PAIR + "teacher", vocab, VLLMSettings(sleep=True))
