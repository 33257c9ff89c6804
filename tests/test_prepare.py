"""trb.miniature (`trb prepare`): the SFT batch is laid out like a rollout, a tiny end-to-end run writes loadable
checkpoints and its report, runs are reproducible, configs are validated, problem files split deterministically."""

import copy
import hashlib
import json
import os
import random
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from trb.cli import main
from trb.models import VocabSpace, tiny_causal_lm
from trb.forward import completion_select
from trb.miniature import (
    PRESETS,
    ModelSize,
    PrepareConfig,
    PrepareError,
    SFTConfig,
    epoch_batches,
    lr_factor,
    sft_loss,
    split_problems,
)
from trb.miniature import prepare as run_prepare
from trb.miniature.config import finished_pair, prepare_settings
from trb.miniature.storage import save_and_reload
from trb.rollout import StudentPolicy, generate
from trb.sequences import position_ids, rollout_from_tokens
from trb.tasks import SETTINGS, tokenize_prompts, train_tokenizer
from trb.tasks.tokenizer import PROMPT_FORMAT

GSM8K_TEST = Path(__file__).parent / "data" / "gsm8k" / "test.jsonl"
VOCAB, EOS, PAD = 40, 1, 0

TINY = PrepareConfig(
    vocab_size=160,
    num_train=48,
    num_val=6,
    num_test=6,
    teacher=ModelSize(layers=1, hidden=32, heads=4, kv_heads=2, intermediate=64),
    student=ModelSize(layers=1, hidden=16, heads=2, kv_heads=1, intermediate=32),
    teacher_sft=SFTConfig(batch_size=8, steps=8, lr=3e-3, warmup=2, weight_decay=0.1, schedule="cosine"),
    student_sft=SFTConfig(batch_size=8, steps=8, lr=3e-3, warmup=2, weight_decay=0.1, schedule="constant"),
    student_window=(0.0, 1.0),  # any pass@1 is in the window: the student stops at its first evaluation
    eval_every=3,
    student_early_stop=True,
    eval_samples=1,
    max_new_tokens=64,
    save_dtype="float32",
)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


# ------------------------------------------------------------------------------------------------------------------
# The SFT batch
# ------------------------------------------------------------------------------------------------------------------


def test_sft_batch_matches_rollout_layout_and_logp():
    """Teacher-forcing the tokens a rollout sampled feeds the model exactly what the engine fed it: same ids, mask
    and positions, and the SFT loss equals minus the mean of the sampler's own log-probs."""
    model = tiny_causal_lm(VOCAB, 32, 2, seed=0, init_std=0.3, eos_token_id=EOS, pad_token_id=PAD)
    with torch.no_grad():
        model.lm_head.weight[EOS] *= 2.0  # stop often enough that completions have different lengths
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15]]
    vocab = VocabSpace(size=VOCAB, stop_ids=(EOS,), eos_id=EOS, pad_id=PAD)
    rollout = generate(StudentPolicy(), prompts, vocab, 12, torch.Generator().manual_seed(3), student=model)
    lengths = rollout.lengths.tolist()
    assert len(set(lengths)) > 1 and len(set(map(len, prompts))) > 1
    completions = [rollout.completion_ids[row, :n].tolist() for row, n in enumerate(lengths)]

    batch = rollout_from_tokens(prompts, completions, vocab, torch.device("cpu"))
    input_ids, attention_mask, positions = rollout.sequences()  # (B, P + T)
    batch_ids, batch_mask, batch_positions = batch.sequences()  # (B, P + longest completion)
    width = batch_ids.shape[1]
    assert torch.equal(batch_ids, input_ids[:, :width])
    assert torch.equal(batch_mask, attention_mask[:, :width])
    assert torch.equal(batch_positions, positions[:, :width])
    assert torch.equal(batch_positions, position_ids(batch_mask))

    # The loss reads exactly the completion tokens (solution + EOS) as targets, none of the prompt.
    loss_mask = completion_select(batch)[:, :-1]  # (B, P + T - 1): the logits that predict a completion token
    targets = batch_ids[:, 1:][loss_mask]
    assert targets.tolist() == [token for completion in completions for token in completion]
    assert int(loss_mask.sum()) == sum(lengths)

    with torch.no_grad():
        loss = sft_loss(model, batch)
    sampler_logp = rollout.student_logp[rollout.completion_mask]  # (N,)
    torch.testing.assert_close(loss, -sampler_logp.mean(), atol=1e-5, rtol=1e-5)


def test_prompt_and_solution_tokens_join_at_a_token_boundary():
    for setting in SETTINGS:
        problems = SETTINGS[setting]("train", 200, seed=0)
        tokenizer = train_tokenizer([PROMPT_FORMAT.format(question=p.question) + p.solution for p in problems], 256)
        prompts = tokenize_prompts(tokenizer, [p.question for p in problems])
        solutions = tokenizer([p.solution for p in problems], add_special_tokens=False)["input_ids"]
        joined = tokenizer([PROMPT_FORMAT.format(question=p.question) + p.solution for p in problems],
                           add_special_tokens=False)["input_ids"]
        assert [p + s for p, s in zip(prompts, solutions)] == joined


def test_epoch_batches_cover_each_problem_once_with_little_padding():
    lengths = torch.randint(20, 90, (1000,), generator=torch.Generator().manual_seed(0))  # (n,)
    batches = epoch_batches(lengths, 16, torch.Generator().manual_seed(1))
    rows = [i for b in batches for i in b]
    assert all(len(b) == 16 for b in batches) and len(rows) == len(set(rows)) == 1000 - 1000 % 16
    padded = sum(16 * int(lengths[b].max()) for b in batches)
    assert int(lengths[rows].sum()) / padded > 0.85  # unsorted batches of uniform lengths: ~0.6
    assert batches == epoch_batches(lengths, 16, torch.Generator().manual_seed(1))
    assert epoch_batches(lengths[:5], 16, torch.Generator().manual_seed(1)) != []  # fewer problems than a batch


def test_lr_schedules():
    cosine = SFTConfig(batch_size=1, steps=110, lr=1.0, warmup=10, weight_decay=0.0, schedule="cosine")
    assert lr_factor(0, cosine) == pytest.approx(0.1)
    assert lr_factor(9, cosine) == pytest.approx(1.0)
    assert lr_factor(60, cosine) == pytest.approx(0.5)
    assert lr_factor(109, cosine) == pytest.approx(0.0, abs=1e-3)
    constant = replace(cosine, schedule="constant")
    assert lr_factor(109, constant) == 1.0


# ------------------------------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    lines: list[str] = []
    report = run_prepare("arith", out, TINY, log=lines.append)
    return out, report, lines


def test_smoke_writes_loadable_checkpoints_and_report(tiny_run):
    out, report, lines = tiny_run
    assert json.loads((out / "prepare.json").read_text()) == json.loads(json.dumps(report))
    for key in ("source", "config", "data", "teacher", "student", "parameter_ratio", "wall_s", "warnings",
                "versions", "hardware"):
        assert key in report
    assert report["data"] == {"train": 48, "val": 6, "test": 6, "vocab_size": report["data"]["vocab_size"]}
    for phase in ("data", "teacher_sft", "student_sft", "teacher_eval", "student_eval", "total"):
        assert report["wall_s"][phase] >= 0
    assert report["hardware"]["threads"] == torch.get_num_threads()

    tokenizer = AutoTokenizer.from_pretrained(out / "teacher")
    for role in ("teacher", "student"):
        folder = out / role
        for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
            assert (folder / name).is_file(), f"{role}/{name} missing"
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert sum(p.numel() for p in model.parameters()) == report[role]["parameters"]
        assert model.generation_config.eos_token_id == tokenizer.eos_token_id
        assert AutoTokenizer.from_pretrained(folder).get_vocab() == tokenizer.get_vocab()
        test = report[role]["test"]
        assert 0 <= test["pass_at_1"] <= 1 and test["n_samples"] == 1 and test["n_problems"] == 6
    assert report["teacher"]["sft_steps"] == TINY.teacher_sft.steps

    # Early stopping: every pass@1 lies in the window (0, 1), so the student stops at its first evaluation.
    assert report["student"]["sft_steps"] == TINY.eval_every
    assert [step for step, _ in report["student"]["validation_curve"]] == [TINY.eval_every]
    assert report["student"]["in_window"]

    # A tiny teacher cannot reach 0.9: the report and the log must say so.
    assert not report["teacher"]["meets_target"]
    assert any("TEACHER MISSES ITS TARGET" in w for w in report["warnings"])
    assert any("TEACHER MISSES ITS TARGET" in line for line in lines)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_saved_checkpoint_reloads_to_the_same_logits(tmp_path, dtype):
    problems = SETTINGS["arith"]("train", 50, seed=0)
    tokenizer = train_tokenizer([PROMPT_FORMAT.format(question=p.question) + p.solution for p in problems], 160)
    model = tiny_causal_lm(len(tokenizer), 32, 2, seed=0, init_std=0.3, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    ids = torch.tensor(tokenize_prompts(tokenizer, [problems[0].question]))  # (1, P)
    stored = copy.deepcopy(model)  # the weights the file holds, in fp32
    with torch.no_grad():
        for p in stored.parameters():
            p.copy_(p.to(getattr(torch, dtype)))
        expected = stored(input_ids=ids).logits  # (1, P, V)
        before = model(input_ids=ids).logits  # (1, P, V)
    reloaded = save_and_reload(model, tokenizer, tmp_path, dtype, torch.device("cpu"))
    assert all(p.dtype == torch.float32 for p in reloaded.parameters())
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, expected)
        assert torch.equal(model(input_ids=ids).logits, before)  # saving leaves the caller's model as it was


def test_same_seed_same_weights_other_seed_other_weights(tiny_run, tmp_path):
    out, _, _ = tiny_run
    run_prepare("arith", tmp_path / "again", TINY, log=lambda line: None)
    run_prepare("arith", tmp_path / "seed1", replace(TINY, seed=1), log=lambda line: None)
    for role in ("teacher", "student"):
        first, again, other = (weights(folder / role) for folder in (out, tmp_path / "again", tmp_path / "seed1"))
        assert first.keys() == again.keys()
        assert all(torch.equal(first[name], again[name]) for name in first)
        assert not all(torch.equal(first[name], other[name]) for name in first if first[name].shape == other[name].shape)


# ------------------------------------------------------------------------------------------------------------------
# Data splits and validation
# ------------------------------------------------------------------------------------------------------------------


def test_problem_file_splits_are_deterministic_disjoint_and_order_free(tmp_path):
    config = replace(TINY, num_train=100, num_val=20, num_test=30)
    splits = split_problems(str(GSM8K_TEST), config)
    assert {name: len(problems) for name, problems in splits.items()} == {"train": 100, "val": 20, "test": 30}
    questions = {name: {p.question for p in problems} for name, problems in splits.items()}
    assert not questions["train"] & questions["val"] and not questions["train"] & questions["test"]
    assert not questions["val"] & questions["test"]

    lines = GSM8K_TEST.read_text().splitlines()
    random.Random(0).shuffle(lines)
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("\n".join(lines) + "\n")
    assert split_problems(str(shuffled), config) == splits


def test_problem_file_too_small_is_rejected(tmp_path):
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(GSM8K_TEST.read_text().splitlines()[:10]) + "\n")
    with pytest.raises(ValueError, match="not enough for num_test"):
        split_problems(str(small), replace(TINY, num_test=6, num_val=4))
    with pytest.raises(ValueError, match="neither"):
        split_problems("no_such_setting", TINY)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ModelSize(2, 100, 8, 4, 64), "divisible by heads"),
        (lambda: ModelSize(2, 96, 6, 4, 64), "divisible by kv_heads"),
        (lambda: ModelSize(0, 96, 6, 3, 64), "layers must be > 0"),
        (lambda: replace(TINY.teacher_sft, warmup=8), "warmup must lie in"),
        (lambda: replace(TINY.teacher_sft, lr=0.0), "lr must be"),
        (lambda: replace(TINY.teacher_sft, lr=float("nan")), "lr must be"),
        (lambda: replace(TINY.teacher_sft, schedule="linear"), "schedule must be"),
        (lambda: replace(TINY.teacher_sft, weight_decay=-0.1), "weight_decay"),
        (lambda: replace(TINY.student_sft, label_smoothing=1.0), "label_smoothing"),
        (lambda: replace(TINY.student_sft, label_smoothing=-0.1), "label_smoothing"),
        (lambda: replace(TINY, student_window=(0.3, 0.2)), "student_window"),
        (lambda: replace(TINY, student_window=(0.1, 1.5)), "student_window"),
        (lambda: replace(TINY, vocab_size=64), "vocab_size must be >= 128"),
        (lambda: replace(TINY, num_test=0), "num_test must be > 0"),
        (lambda: replace(TINY, eval_every=0), "eval_every must be > 0"),
        (lambda: replace(TINY, teacher_target=1.5), "teacher_target"),
        (lambda: replace(TINY, save_dtype="float16"), "save_dtype"),
    ],
)
def test_config_validation(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_presets_are_valid_and_ship_a_smaller_under_confident_student():
    for config in PRESETS.values():
        assert config.student.hidden < config.teacher.hidden or config.student.layers < config.teacher.layers
        assert config.student_sft.label_smoothing > 0 and config.teacher_sft.label_smoothing == 0
        assert not config.student_early_stop and config.teacher_sft.schedule == "cosine"


def test_label_smoothed_sft_loss_matches_float64_reference():
    generator = torch.Generator().manual_seed(0)
    model = tiny_causal_lm(VOCAB, 16, 1, seed=0, init_std=0.5, eos_token_id=EOS, pad_token_id=PAD)
    prompts = [torch.randint(2, VOCAB, (n,), generator=generator).tolist() for n in (3, 5)]
    completions = [torch.randint(2, VOCAB, (n,), generator=generator).tolist() + [EOS] for n in (4, 2)]
    batch = rollout_from_tokens(prompts, completions, VocabSpace(VOCAB, (EOS,), EOS, PAD), torch.device("cpu"))
    input_ids, attention_mask, positions = batch.sequences()  # (B, L)
    loss_mask = completion_select(batch)[:, :-1]  # (B, L - 1)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=positions).logits[:, :-1].double()  # (B, L - 1, V)
        logp = logits.log_softmax(-1)[loss_mask]  # (N, V)
        targets = input_ids[:, 1:][loss_mask]  # (N,)
        nll = -logp.gather(-1, targets[:, None])[:, 0]  # (N,)
        for alpha in (0.0, 0.06, 0.5):
            # (1 - alpha) * one-hot + alpha * uniform, written out
            expected = ((1 - alpha) * nll - alpha * logp.mean(-1)).mean()
            assert abs(sft_loss(model, batch, alpha).item() - expected.item()) < 1e-5


def test_full_budget_student_and_reused_teacher(tiny_run, tmp_path):
    out, first, _ = tiny_run
    config = replace(TINY, student_early_stop=False,
                     student_sft=replace(TINY.student_sft, steps=7, label_smoothing=0.1))
    report = run_prepare("arith", tmp_path / "reuse", config, log=lambda line: None, teacher_from=out / "teacher")
    # The teacher and tokenizer are the earlier run's, carried over with their report; only the student trains.
    assert all(torch.equal(a, b) for a, b in zip(weights(out / "teacher").values(),
                                                 weights(tmp_path / "reuse" / "teacher").values()))
    assert report["teacher"]["reused_from"] == str(out / "teacher") and report["teacher"]["sft_steps"] == 0
    assert report["teacher"]["earlier_run"]["report"]["sft_steps"] == first["teacher"]["sft_steps"]
    assert "teacher_sft" not in report["wall_s"]
    assert (AutoTokenizer.from_pretrained(tmp_path / "reuse" / "student").get_vocab()
            == AutoTokenizer.from_pretrained(out / "teacher").get_vocab())
    # Without early stopping the student trains its whole budget; its curve ends with the last step.
    assert report["student"]["sft_steps"] == 7
    assert [step for step, _ in report["student"]["validation_curve"]] == [3, 6, 7]
    # A further-trained teacher and a reused student: the student is the earlier run's, the teacher moved on.
    again = run_prepare("arith", tmp_path / "more", config, log=lambda line: None, teacher_from=out / "teacher",
                        teacher_more_steps=3, student_from=tmp_path / "reuse" / "student")
    assert again["teacher"]["sft_steps"] == 3 and again["teacher"]["more_sft_steps"] == 3
    assert again["student"]["sft_steps"] == 0 and again["student"]["reused_from"] == str(tmp_path / "reuse" / "student")
    assert again["student"]["earlier_run"]["report"]["sft_steps"] == 7
    assert all(torch.equal(a, b) for a, b in zip(weights(tmp_path / "reuse" / "student").values(),
                                                 weights(tmp_path / "more" / "student").values()))
    assert not all(torch.equal(a, b) for a, b in zip(weights(out / "teacher").values(),
                                                     weights(tmp_path / "more" / "teacher").values()))
    with pytest.raises(ValueError, match="prepared teacher folder"):
        run_prepare("arith", tmp_path / "bad", config, log=lambda line: None, teacher_from=tmp_path)


def signal_at(role: str, step: int, sig: int = signal.SIGINT):
    """A log callback that sends this process `sig` when `role` logs its SFT step `step` (every step is logged)."""
    def log(line: str) -> None:
        if line.startswith(f"{role} step {step}/"):
            os.kill(os.getpid(), sig)
    return log


def test_stopped_by_a_signal_keeps_the_model_and_continues_exactly(tiny_run, tmp_path):
    """SIGINT in the teacher's SFT, then SIGTERM in the student's: each time the model so far is saved as a loadable
    checkpoint, and rerunning continues to the very weights and report of the uninterrupted run."""
    out, full, _ = tiny_run
    run = tmp_path / "run"
    first = run_prepare("arith", run, TINY, log=signal_at("teacher", 3))
    assert first == {"status": "stopped", "stage": "teacher", "step": 3, "out": str(run),
                     "models": {"teacher": str(run / "teacher")}}
    assert not (run / "prepare.json").exists() and not (run / "student").exists()
    assert AutoModelForCausalLM.from_pretrained(run / "teacher").config.num_hidden_layers == TINY.teacher.layers
    with pytest.raises(PrepareError, match=r"other settings \(config.teacher_sft.steps: 8 -> 9\)"):
        run_prepare("arith", run, replace(TINY, teacher_sft=replace(TINY.teacher_sft, steps=9)), log=lambda line: None)

    second = run_prepare("arith", run, TINY, log=signal_at("student", 2, signal.SIGTERM))
    assert (second["stage"], second["step"]) == ("student", 2)
    assert weights(run / "teacher").keys() == weights(out / "teacher").keys()
    assert all(torch.equal(weights(run / "teacher")[k], weights(out / "teacher")[k]) for k in weights(out / "teacher"))

    lines: list[str] = []
    third = run_prepare("arith", run, TINY, log=lines.append)
    assert third["status"] == "completed" and not (run / ".resume").exists()
    assert lines[0] == f"continuing the stopped run in {run}: teacher finished, student at step 2"
    for role in ("teacher", "student"):
        assert all(torch.equal(weights(run / role)[k], weights(out / role)[k]) for k in weights(out / role))
        assert third[role]["sft_steps"] == full[role]["sft_steps"]
        assert third[role]["test"] == full[role]["test"]
    assert third["student"]["validation_curve"] == full["student"]["validation_curve"]


# ------------------------------------------------------------------------------------------------------------------
# A finished pair is never replaced unless asked
# ------------------------------------------------------------------------------------------------------------------


def hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under folder, by relative path: equal means byte-identical and nothing added."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_prepare_with_other_options_does_not_replace_a_finished_pair(tmp_path, monkeypatch, capsys):
    """The regression: `trb prepare` with other options into a finished pair's folder retrained and replaced the
    teacher and left prepare.json describing the old one. Now other options are refused (one line, exit 2, every file
    byte-identical), the same command says the pair is done (exit 0, nothing touched), and --overwrite makes it
    again with the new options."""
    monkeypatch.setitem(PRESETS, "arith", TINY)
    out = tmp_path / "pair"
    command = ["prepare", "arith", "--out", str(out), "--threads", "1"]
    assert main(command) == 0
    made = hashes(out)
    assert json.loads((out / "prepare.json").read_text())["settings"]["config"]["teacher_sft"]["steps"] == 8
    capsys.readouterr()

    assert main(command) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["status"] == "done"
    assert captured.err == (f"trb prepare: {out} holds the finished pair of this command; nothing to do (--overwrite "
                            "makes it again)\n")
    assert hashes(out) == made

    for other, changed in ((["--teacher-steps", "9"], "config.teacher_sft.steps: 8 -> 9"), (["--seed", "1"], "seed"),
                           (["--preset", "word"], "config.")):
        assert main(command + other) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(f"trb: error: {out} holds a finished pair made with other "
                                                   "settings (") and changed in err[0] and "--overwrite" in err[0], err
        assert hashes(out) == made

    assert main(command + ["--teacher-steps", "9", "--overwrite"]) == 0
    report = json.loads((out / "prepare.json").read_text())
    assert report["teacher"]["sft_steps"] == 9 and report["settings"]["config"]["teacher_sft"]["steps"] == 9
    assert not (out / ".resume").exists()
    assert hashes(out)["teacher/model.safetensors"] != made["teacher/model.safetensors"]


def test_prepare_on_its_own_finished_pair_returns_the_report_and_trains_nothing(tiny_run):
    out, report, _ = tiny_run
    before, lines = hashes(out), []
    assert run_prepare("arith", out, TINY, log=lines.append) == json.loads(json.dumps(report))
    assert lines == [f"{out} holds the finished pair of these settings (prepare.json); nothing to do"]
    assert hashes(out) == before


def test_what_an_output_folder_may_hold(tmp_path):
    """finished_pair: an empty or new folder, or a stopped run (continued by prepare), is free; models that no
    prepare.json describes, or an unreadable one, are refused; a report written before reports held their settings
    is compared by its source, config and reused folders."""
    settings = prepare_settings("arith", TINY, None, 0, None)
    assert finished_pair(tmp_path / "new", settings, overwrite=False) is None
    (tmp_path / "models" / "teacher").mkdir(parents=True)
    with pytest.raises(PrepareError, match="holds teacher/ but no prepare.json of a finished pair; .* --overwrite"):
        finished_pair(tmp_path / "models", settings, overwrite=False)
    assert finished_pair(tmp_path / "models", settings, overwrite=True) is None
    (tmp_path / "models" / ".resume").mkdir()
    assert finished_pair(tmp_path / "models", settings, overwrite=False) is None  # a stopped run: prepare continues it

    (tmp_path / "old" / "teacher").mkdir(parents=True)
    (tmp_path / "old" / "prepare.json").write_text("{not json")
    with pytest.raises(PrepareError, match="prepare.json is unreadable"):
        finished_pair(tmp_path / "old", settings, overwrite=False)
    legacy = {"status": "completed", "source": "arith", "config": settings["config"],
              "teacher": {"reused_from": "earlier/teacher"}, "student": {}}
    (tmp_path / "old" / "prepare.json").write_text(json.dumps(legacy))
    reused = prepare_settings("arith", TINY, "earlier/teacher", 0, None)
    assert finished_pair(tmp_path / "old", reused, overwrite=False) == legacy
    with pytest.raises(PrepareError, match=r"other settings \(teacher_from: earlier/teacher -> None\)"):
        finished_pair(tmp_path / "old", settings, overwrite=False)
