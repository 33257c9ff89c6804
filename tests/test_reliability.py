"""Bad input gets one clear line and changes nothing; faults lose nothing; a killed run resumes exactly."""

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from trb.cli import main
from trb.stopping import StopSignals, Stopped
from trb.tasks import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def write_config(path: Path, pair: dict, **values) -> str:
    settings = {"models": {"student": str(pair["student"]), "teacher": str(pair["teacher"])},
                "data": {"num_train": 32, "num_test": 4}, "steps": 4, "prompts_per_step": 2,
                "rollouts_per_prompt": 2, "rollout_batch": 4, "micro_batch": 2, "max_new_tokens": 12,
                "eval_every": 2, "eval_samples": 1, "checkpoint_every": 1, "lr": 1e-3, "warmup_steps": 0,
                "method": {"name": "trb", "eps0": 0.05, "horizon": 2}, **values}
    path.write_text(yaml.safe_dump(settings))
    return str(path)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def final_weights(run: Path) -> dict:
    return load_file(str(run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip() /
                         "model.safetensors"))


def without_timings(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if not k.startswith(("time/", "tokens_per_s"))}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def bad_inputs(tiny_pair, tmp_path_factory):
    """Files for the table of bad inputs: broken checkpoints, a mismatched teacher, bad data files."""
    root = tmp_path_factory.mktemp("bad")
    broken = root / "broken_model"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((tiny_pair["teacher"] / name).read_bytes())
    other = root / "other_teacher"  # same architecture, a different tokenizer
    other.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        (other / name).write_bytes((tiny_pair["teacher"] / name).read_bytes())
    train_tokenizer(["completely different words 7 8 9"] * 20, 150).save_pretrained(other)
    small = root / "small_vocab_teacher"  # the tokenizer's vocabulary, but fewer output rows in the checkpoint
    small.mkdir()
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        (small / name).write_bytes((tiny_pair["teacher"] / name).read_bytes())
    config = json.loads((tiny_pair["teacher"] / "config.json").read_text())
    weights = load_file(str(tiny_pair["teacher"] / "model.safetensors"))
    config["vocab_size"] = config["vocab_size"] - 10
    weights = {k: (v[:-10] if v.shape[0] == config["vocab_size"] + 10 else v) for k, v in weights.items()}
    (small / "config.json").write_text(json.dumps(config))
    save_file(weights, str(small / "model.safetensors"))
    (root / "empty.jsonl").write_text("")
    good = json.dumps({"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"})
    (root / "malformed.jsonl").write_text(good + "\n" + good + "\n{\"question\": \"What\n" + good + "\n")
    (root / "no_answer.jsonl").write_text("\n".join(json.dumps({"question": f"What is {i} + 1?"}) for i in range(9)))
    (root / "a_file").write_text("")
    lines = [json.dumps({"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"})
             for i in range(9)]
    (root / "latin1.jsonl").write_bytes(("\n".join(lines[:3]) + "\n").encode() + b'{"question": "caf\xe9?"}\n')
    (root / "corrupt.parquet").write_bytes(b"PAR1" + bytes(range(256)) * 4)
    for name, change in (("vocab_config", lambda c, w: c.update(vocab_size=c["vocab_size"] + 7)),
                         ("no_tokenizer", None), ("truncated", None)):
        folder = root / name
        folder.mkdir()
        for p in tiny_pair["teacher"].iterdir():
            if not (name == "no_tokenizer" and p.name.startswith("tokenizer")):
                (folder / p.name).write_bytes(p.read_bytes())
        if change is not None:
            config = json.loads((folder / "config.json").read_text())
            change(config, None)
            (folder / "config.json").write_text(json.dumps(config))
    weights = (root / "truncated" / "model.safetensors").read_bytes()
    (root / "truncated" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (root / "empty_folder").mkdir()
    return root


CASES = [
    ("negative eps", ["method.eps0=-0.01"], "eps0 must be a finite number >= 0"),
    ("NaN eps", ["method.eps0=.nan"], "eps0 must be a finite number >= 0"),
    ("K <= 0", ["method.horizon=0"], "horizon must be > 0"),
    ("unknown key", ["method.esp0=0.01"], "unknown config key 'method.esp0'; did you mean 'method.eps0'?"),
    ("unknown top-level key", ["stesp=3"], "unknown config key 'stesp'; did you mean 'steps'?"),
    ("wrong type", ["steps=ten"], "steps must be an integer, got 'ten'"),
    ("missing model", ["models.student=/no/such/model"], "models.student '/no/such/model': no such file or folder"),
    ("unreadable model", ["models.teacher={bad}/broken_model"], "cannot load"),
    ("tokenizer mismatch", ["models.teacher={bad}/other_teacher"], "student and teacher tokenizers differ"),
    ("vocabulary mismatch", ["models.teacher={bad}/small_vocab_teacher"], "output rows but the tokenizer has"),
    ("empty data file", ["data.source={bad}/empty.jsonl"], "empty.jsonl: no problems (the file is empty)"),
    ("malformed data file", ["data.source={bad}/malformed.jsonl"], "malformed.jsonl:3: not valid JSON"),
    ("missing answers", ["data.source={bad}/no_answer.jsonl"], "no_answer.jsonl:1: "),
    ("prompt longer than the context", ["max_new_tokens=100000"], "exceeds the models' context"),
    ("out_dir not writable", ["out_dir={bad}/a_file/run"], "is a file; choose another out_dir"),
    ("out_dir holds another run", ["out_dir={existing}"], "already holds a run; pass resume=true"),
    ("resume with another config", ["out_dir={existing}", "resume=true", "lr=0.5"], "config differs"),
    ("non-UTF-8 data file", ["data.source={bad}/latin1.jsonl"], "latin1.jsonl:4: not UTF-8 (byte 0xe9 at column"),
    ("corrupt parquet file", ["data.source={bad}/corrupt.parquet"], "corrupt.parquet: not a readable parquet file"),
    ("malformed data.fields", ["data.fields={{questoin: q, answer: a}}"],
     "data.fields.questoin is not a field; the fields are question, solution, answer; did you mean "
     "'data.fields.question'?"),
    ("data.fields without an answer", ["data.fields={{question: q}}"], "data.fields must map 'solution' and/or"),
    ("model config vocabulary differs from its weights", ["models.teacher={bad}/vocab_config"],
     "ignore_mismatched_sizes"),
    ("truncated weights", ["models.teacher={bad}/truncated"], "incomplete metadata, file not fully covered"),
    ("model folder without a tokenizer", ["models.student={bad}/no_tokenizer"], "no_tokenizer' has no tokenizer"),
    ("loss.chunk_size = 0", ["loss.chunk_size=0"], "chunk_size must be >= 1"),
    ("loss.top_k = 0", ["loss.top_k=0"], "top_k must be >= 1, got 0; the smallest valid value is 1"),
    ("loss.top_k above the vocabulary", ["loss.divergence=topk_reverse_kl", "loss.top_k=100000"],
     "loss.top_k=100000 exceeds the vocabulary of 150 tokens; use a value in 1..150"),
    ("loss.top_k above the vocabulary, topk_student_weighted_kl (once unbounded)",
     ["loss.divergence=topk_student_weighted_kl", "loss.top_k=100000"],
     "loss.top_k=100000 exceeds the vocabulary of 150 tokens; use a value in 1..150"),
    ("resume=true on an empty folder", ["out_dir={bad}/empty_folder", "resume=true"],
     "empty_folder' holds no run (no config.yaml); check the path, or pass resume=auto"),
    ("resume=true on a mistyped out_dir", ["out_dir={bad}/no_such_run", "resume=true"], "holds no run"),
    ("resume not true, false or auto", ["resume=sometimes"], "resume must be true, false or auto"),
]


@pytest.fixture(scope="module")
def existing_run(tiny_pair, tmp_path_factory):
    root = tmp_path_factory.mktemp("existing")
    config = write_config(root / "run.yaml", tiny_pair, steps=2)
    assert main(["train", config, f"out_dir={root / 'run'}"]) == 0
    return root / "run", config


@pytest.mark.parametrize("name,overrides,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_one_line_exit_2_nothing_changed(name, overrides, message, bad_inputs, existing_run, tmp_path,
                                                   capsys):
    run, config = existing_run
    before = snapshot(run)
    fresh = tmp_path / "fresh_run"
    args = [o.format(bad=bad_inputs, existing=run) for o in overrides]
    capsys.readouterr()
    code = main(["train", config, f"out_dir={fresh}", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("trb: error: "), err
    assert message in err[0]
    assert "Traceback" not in err[0]
    assert snapshot(run) == before, "an existing run must be left untouched"
    assert not fresh.exists(), "a failed start must not leave a half-created run folder"


def test_eval_bad_inputs_and_debug_traceback(bad_inputs, tiny_pair, capsys):
    for args, message in [
        (["--model", "/no/such/dir"], "no such file or folder"),
        (["--model", str(tiny_pair["student"]), "--data", f"{bad_inputs}/no_answer.jsonl", "--problems", "2"],
         "no_answer.jsonl:1: "),
        (["--model", str(tiny_pair["student"]), "--teacher", f"{bad_inputs}/other_teacher"], "tokenizers differ"),
    ]:
        capsys.readouterr()
        assert main(["eval", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]
    with pytest.raises(Exception, match="no such file or folder"):
        main(["--debug", "eval", "--model", "/no/such/dir"])


def test_non_finite_training_stops_and_keeps_the_last_good_checkpoint(tiny_pair, tmp_path, capsys):
    # lr = 1e36: AdamW's first update moves every weight by ~1e36, so the second step's forward overflows
    config = write_config(tmp_path / "c.yaml", tiny_pair, steps=4, lr=1e36, eval_every=0)
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", config, f"out_dir={run}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "non-finite gradient at step 1" in err[-1] and "step_00000001" in err[-1], err[-1]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000001"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    assert all(torch.isfinite(v).all() for v in final_weights(run).values())


def _train_process(config: str, run: Path, *overrides: str, file_size_limit: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT / "src")}

    def limit_file_size():  # a "full disk" without root: writing past the limit fails with EFBIG
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.Popen([sys.executable, "-m", "trb", "train", config, f"out_dir={run}", *overrides], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=limit_file_size if file_size_limit else None)


def _wait_for_step(run: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run / "metrics.jsonl").exists() and any(json.loads(line).get("step") == step and "loss" in line
                                                    for line in (run / "metrics.jsonl").read_text().splitlines()):
            return
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.05)
    raise TimeoutError(f"step {step} never finished")


def test_sigkill_at_a_random_step_then_resume_equals_uninterrupted(tiny_pair, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_pair, steps=6)
    assert main(["train", config, f"out_dir={tmp_path / 'full'}"]) == 0
    kill_after = random.Random(os.getpid()).randint(1, 4)
    run = tmp_path / "killed"
    process = _train_process(config, run)
    _wait_for_step(run, kill_after, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run / "summary.json").exists()
    assert main(["train", config, f"out_dir={run}", "resume=true"]) == 0
    full, resumed = final_weights(tmp_path / "full"), final_weights(run)
    assert all(torch.equal(full[k], resumed[k]) for k in full), f"weights differ after a kill after step {kill_after}"
    assert without_timings(tmp_path / "full") == without_timings(run)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_pair, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_pair, steps=6, checkpoint_every=0)
    assert main(["train", config, f"out_dir={tmp_path / 'full'}"]) == 0
    run = tmp_path / "stopped"
    process = _train_process(config, run)
    _wait_for_step(run, 2, process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 75
    assert "stopped by signal" in process.stderr.read()
    stopped_at = int((run / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 2 <= stopped_at < 6
    assert main(["train", config, f"out_dir={run}", "resume=true"]) == 0
    full, resumed = final_weights(tmp_path / "full"), final_weights(run)
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert without_timings(tmp_path / "full") == without_timings(run)


def test_kill_while_a_checkpoint_is_written_keeps_the_previous_one(tiny_pair, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_pair, steps=2)
    run = tmp_path / "run"
    assert main(["train", config, f"out_dir={run}"]) == 0
    before = snapshot(run / "checkpoints" / "step_00000002")
    # A child process starts writing checkpoint 3 of the same run and is killed half way (after the weights,
    # before the optimizer state and the rename).
    script = textwrap.dedent(f"""
        import sys, time, torch
        from pathlib import Path
        import trb.checkpoint as ckpt
        from trb.distributed import full_state
        from trb.models import load_causal_lm, load_tokenizer
        run = Path({str(run)!r})
        model = load_causal_lm({str(tiny_pair['student'])!r}, torch.device("cpu"))
        tokenizer = load_tokenizer({str(tiny_pair['student'])!r})
        optimizer = torch.optim.AdamW(model.parameters())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        def stall(*args, **kwargs):
            print("writing", flush=True)
            time.sleep(60)
        ckpt.save_file = stall
        model_state, optimizer_state = full_state(model, optimizer)
        ckpt.save_checkpoint(run / "checkpoints", 3, model, tokenizer, model_state, optimizer_state, scheduler, {{}},
                             keep=2)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert process.stdout.readline().strip() == "writing"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (run / "checkpoints" / ".step_00000003.partial").is_dir()
    assert not (run / "checkpoints" / "step_00000003").exists()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert snapshot(run / "checkpoints" / "step_00000002") == before
    assert main(["train", config, f"out_dir={run}", "steps=3", "resume=true"]) == 0
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert not (run / "checkpoints" / ".step_00000003.partial").exists()


# ------------------------------------------------------------------------------------------------------------------
# One run per folder


def metric_keys(run: Path) -> list[tuple]:
    """(step, kind) of every metrics line: each training step, evaluation and SFT update must appear once."""
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out.append((record["step"], "eval" if "eval/pass_at_1" in record else "train"))
    return out


@pytest.mark.slow
def test_two_runs_started_together_into_one_folder_one_runs_the_other_is_refused(tiny_pair, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_pair, steps=3, eval_every=0)
    models = snapshot(tiny_pair["student"].parent)
    run = tmp_path / "run"
    processes = [_train_process(config, run, "seed=1"), _train_process(config, run, "seed=2")]
    codes = [p.wait(timeout=300) for p in processes]
    errors = [p.stderr.read().strip().splitlines() for p in processes]
    assert sorted(codes) == [0, 2], errors
    winner, loser = codes.index(0), codes.index(2)
    assert len(errors[loser]) == 1, errors[loser]
    assert ("is in use by another trb process" in errors[loser][0] or "already holds a run" in errors[loser][0])
    assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == winner + 1
    assert metric_keys(run) == [(0, "eval"), (1, "train"), (2, "train"), (3, "train"), (3, "eval")]
    assert snapshot(tiny_pair["student"].parent) == models


@pytest.mark.slow
def test_resume_while_the_run_is_going_is_refused_naming_its_pid_and_a_killed_run_leaves_no_lock(tiny_pair, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_pair, steps=500, eval_every=0, keep_checkpoints=1)
    run = tmp_path / "run"
    first = _train_process(config, run)
    _wait_for_step(run, 1, first)
    second = _train_process(config, run, "resume=true")
    assert second.wait(timeout=120) == 2
    err = second.stderr.read().strip().splitlines()
    assert err == [f"trb: error: out_dir {str(run)!r} is in use by another trb process (PID {first.pid}); wait for "
                   "it or stop it, or choose another out_dir"]
    assert first.poll() is None, "the running run must be unaffected"
    lines = metric_keys(run)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert metric_keys(run)[: len(lines)] == lines, "the refused resume must not have truncated the log"
    done = int((run / "checkpoints" / "latest").read_text().strip().split("_")[1])
    # the OS released the lock of the killed process: a resume runs
    assert main(["train", config, f"out_dir={run}", "resume=true", f"steps={done + 1}"]) == 0
    assert metric_keys(run) == [(0, "eval")] + [(k, "train") for k in range(1, done + 2)] + [(done + 1, "eval")]


# ------------------------------------------------------------------------------------------------------------------
# Damaged checkpoints


@pytest.fixture(scope="module")
def two_checkpoints(tiny_pair, tmp_path_factory):
    """A 2-step run with checkpoints after steps 1 and 2, and the uninterrupted 3-step run to compare resumes with."""
    root = tmp_path_factory.mktemp("damage")
    config = write_config(root / "c.yaml", tiny_pair, steps=3)
    assert main(["train", config, f"out_dir={root / 'reference'}"]) == 0
    assert main(["train", config, f"out_dir={root / 'run'}", "steps=2"]) == 0
    return root / "run", root / "reference", config


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x10  # inside the last tensor's data
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated weights": (lambda c: c.joinpath("model.safetensors").write_bytes(
        c.joinpath("model.safetensors").read_bytes()[:1000]), "model.safetensors has 1000 bytes"),
    "missing optimizer state": (lambda c: c.joinpath("optimizer.safetensors").unlink(),
                                "optimizer.safetensors is missing"),
    "garbage state file": (lambda c: c.joinpath("state.json").write_bytes(os.urandom(64)), "state.json has 64 bytes"),
    "empty state file": (lambda c: c.joinpath("state.json").write_text(""), "state.json has 0 bytes"),
    "one flipped bit in the weights": (lambda c: flip_a_bit(c / "model.safetensors"),
                                       "model.safetensors does not match its SHA-256"),
    "missing manifest": (lambda c: c.joinpath("manifest.json").unlink(), "manifest.json is missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_resumes_from_the_previous_one(damage, two_checkpoints, tmp_path, capsys):
    base, reference, config = two_checkpoints
    run = tmp_path / "moved_run"  # a copy at another path: a moved run resumes too
    shutil.copytree(base, run)
    damage_fn, message = DAMAGE[damage]
    damage_fn(run / "checkpoints" / "step_00000002")
    capsys.readouterr()
    assert main(["train", config, f"out_dir={run}", "resume=true"]) == 0
    # every warning but the tiny budget's answers cut short (max_new_tokens of a few tokens)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line
                and "reference solutions short" not in line]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"trb: warning: checkpoint step_00000002 is damaged ({message}")
    assert warnings[0].endswith("; resuming from step_00000001")
    full, resumed = final_weights(reference), final_weights(run)
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert without_timings(reference) == without_timings(run)


def test_every_checkpoint_damaged_stops_with_one_line_and_changes_nothing(two_checkpoints, tmp_path, capsys):
    base, _, config = two_checkpoints
    run = tmp_path / "run"
    shutil.copytree(base, run)
    for step in (1, 2):
        flip_a_bit(run / "checkpoints" / f"step_{step:08d}" / "model.safetensors")
    before = snapshot(run)
    capsys.readouterr()
    assert main(["train", config, f"out_dir={run}", "resume=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"trb: error: no intact checkpoint in {run / 'checkpoints'}: "
                                               "step_00000002: model.safetensors does not match"), err
    assert snapshot(run) == before


def test_latest_naming_a_folder_outside_the_run_is_not_followed(two_checkpoints, tmp_path, capsys):
    base, reference, config = two_checkpoints
    run = tmp_path / "run"
    shutil.copytree(base, run)
    shutil.copytree(run / "checkpoints" / "step_00000001", tmp_path / "elsewhere")  # a valid checkpoint, elsewhere
    (run / "checkpoints" / "latest").write_text("../../elsewhere\n")
    capsys.readouterr()
    assert main(["train", config, f"out_dir={run}", "resume=true"]) == 0
    err = capsys.readouterr().err
    assert "names '../../elsewhere', not a checkpoint of this run; ignoring it" in err
    assert "from step_00000002 (next step 2)" in err
    full, resumed = final_weights(reference), final_weights(run)
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_kill_after_the_final_checkpoint_before_the_summary_repeats_no_line(two_checkpoints, tmp_path, capsys):
    _, reference, config = two_checkpoints
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "summary.json").unlink()  # the state a kill between the final checkpoint and the summary leaves
    log = (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["train", config, f"out_dir={run}", "resume=true"]) == 0
    assert (run / "metrics.jsonl").read_text() == log
    assert json.loads((run / "summary.json").read_text())["final"] == \
        json.loads((reference / "summary.json").read_text())["final"]


# ------------------------------------------------------------------------------------------------------------------
# A full disk


@pytest.mark.slow
def test_disk_full_while_writing_a_checkpoint_one_line_nothing_half_written(two_checkpoints, tiny_pair, tmp_path):
    base, _, config = two_checkpoints
    run = tmp_path / "run"
    shutil.copytree(base, run)
    before, models = snapshot(run / "checkpoints" / "step_00000002"), snapshot(tiny_pair["student"].parent)
    size = (run / "checkpoints" / "step_00000002" / "model.safetensors").stat().st_size
    process = _train_process(config, run, "resume=true", "steps=4", file_size_limit=size // 2)
    assert process.wait(timeout=300) == 2
    err = process.stderr.read().strip().splitlines()
    assert err[-1].startswith(f"trb: error: cannot write checkpoint {run / 'checkpoints' / 'step_00000003'}: "), err
    assert "File too large" in err[-1]
    assert err[-1].endswith("; the earlier checkpoints are intact: free space and resume with resume=true")
    assert not any("Traceback" in line for line in err)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000001", "step_00000002"]
    assert snapshot(run / "checkpoints" / "step_00000002") == before
    assert snapshot(tiny_pair["student"].parent) == models
    assert main(["train", config, f"out_dir={run}", "resume=true", "steps=4"]) == 0


# ------------------------------------------------------------------------------------------------------------------
# Signals in every phase


def _wait_for_torch(process: subprocess.Popen, timeout: float = 120) -> None:
    """Until the process has loaded torch's library: its handler is installed, it is still loading."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        try:
            if "libtorch" in Path(f"/proc/{process.pid}/maps").read_text():
                return
        except OSError:
            pass
        time.sleep(0.01)
    raise TimeoutError("torch never loaded")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_while_loading_exits_75_with_one_line_and_writes_nothing(sig, tiny_pair, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_pair)
    run = tmp_path / "run"
    process = _train_process(config, run)
    _wait_for_torch(process)
    process.send_signal(sig)
    assert process.wait(timeout=120) == 75
    err = process.stderr.read().strip().splitlines()
    assert err == [f"trb: stopped by signal {sig.name} before training started; no checkpoint was written: rerun the "
                   "same command (with resume=auto if the run folder was created)"]
    assert not run.exists()


def test_a_second_signal_while_stopping_is_only_recorded():
    """A loading phase raises Stopped on the first signal; a second one (a repeated Ctrl-C, pkill of a process group)
    arrives while the CLI prints its line and restores the handlers, and must not raise there (a traceback)."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}  # (pytest-xdist ignores SIGINT)
    signals = StopSignals().install()
    try:
        with pytest.raises(Stopped, match="SIGINT"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler runs before the sleep ends
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert signals.name == "SIGINT"  # the first signal is the one reported
    finally:
        signals.uninstall()
    assert {sig: signal.getsignal(sig) for sig in before} == before


@pytest.fixture(scope="module")
def long_evaluations(tiny_pair, tmp_path_factory):
    """A config whose evaluations take seconds (48 problems x 2 samples, batches of 4), and its uninterrupted run."""
    root = tmp_path_factory.mktemp("phases")
    config = write_config(root / "c.yaml", tiny_pair, steps=4, checkpoint_every=0,
                          data={"num_train": 32, "num_test": 48}, eval_samples=2, eval_batch=4, max_new_tokens=16)
    assert main(["train", config, f"out_dir={root / 'reference'}"]) == 0
    return config, root / "reference"


def _wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)


PHASES = {  # phase: (signal, the moment it is sent, what the run says when it stops, the checkpoint it leaves)
    "step-0 evaluation": (signal.SIGTERM, lambda run: (run / "metrics.jsonl").exists(),
                          "after step 0; nothing to save yet", None),
    "evaluation after step 2": (signal.SIGINT, lambda run: (2, "train") in metric_keys(run),
                                "after step 2; checkpoint saved", "step_00000002"),
    "final evaluation": (signal.SIGTERM, lambda run: (4, "train") in metric_keys(run),
                         "after step 4; checkpoint saved", "step_00000004"),
}


@pytest.mark.slow
@pytest.mark.parametrize("phase", list(PHASES))
def test_signal_during_an_evaluation_exits_75_and_the_resume_repeats_nothing(phase, long_evaluations, tiny_pair,
                                                                             tmp_path):
    """The evaluation is abandoned, the state after the last step saved, and the resume runs that evaluation once."""
    config, reference = long_evaluations
    sig, moment, said, checkpoint = PHASES[phase]
    run = tmp_path / "run"
    models = snapshot(tiny_pair["student"].parent)
    process = _train_process(config, run)
    _wait_for(lambda: (run / "metrics.jsonl").exists() and moment(run), process)
    process.send_signal(sig)
    assert process.wait(timeout=120) == 75
    err = process.stderr.read()
    assert f"stopped by signal {sig.name} {said}, resume with resume=true" in err and "Traceback" not in err, err
    latest = run / "checkpoints" / "latest"
    assert (latest.read_text().strip() if latest.exists() else None) == checkpoint
    assert not (run / "summary.json").exists()
    assert main(["train", config, f"out_dir={run}", "resume=true"]) == 0
    assert without_timings(reference) == without_timings(run)
    full, resumed = final_weights(reference), final_weights(run)
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert snapshot(tiny_pair["student"].parent) == models


# ------------------------------------------------------------------------------------------------------------------
# Resume identity by content


def test_changed_data_is_refused_and_resume_auto_starts_or_resumes(tiny_pair, tmp_path, capsys):
    data = tmp_path / "problems.jsonl"
    rows = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(40)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = write_config(tmp_path / "c.yaml", tiny_pair, steps=1, data={"source": str(data), "num_test": 4})
    run = tmp_path / "run"
    assert main(["train", config, f"out_dir={run}", "resume=auto"]) == 0  # no run yet: starts one
    rows[7]["answer"] = "7 + 7 = 15\n#### 15"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = snapshot(run)
    capsys.readouterr()
    assert main(["train", config, f"out_dir={run}", "resume=true", "steps=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"data.source {str(data)!r} is not the data the run started with (its content " \
        "changed)" in err[0], err
    assert snapshot(run) == before
    rows[7]["answer"] = "7 + 7 = 14\n#### 14"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))  # the same content again, a new mtime
    assert main(["train", config, f"out_dir={run}", "resume=auto", "steps=2"]) == 0
    assert "resumed" in capsys.readouterr().err
    assert metric_keys(run) == [(0, "eval"), (1, "train"), (1, "eval"), (2, "train"), (2, "eval")]
