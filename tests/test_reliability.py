"""Bad input gets one clear line and changes nothing; faults lose nothing; a killed run resumes exactly."""

import hashlib
import json
import os
import random
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
    return root


CASES = [
    ("negative eps", ["method.eps0=-0.01"], "eps0 must be a finite number >= 0"),
    ("NaN eps", ["method.eps0=.nan"], "eps0 must be a finite number >= 0"),
    ("K <= 0", ["method.horizon=0"], "horizon must be > 0"),
    ("unknown key", ["method.esp0=0.01"], "unknown config key 'method.esp0'; did you mean 'method.eps0'?"),
    ("unknown top-level key", ["stesp=3"], "unknown config key 'stesp'; did you mean 'steps'?"),
    ("wrong type", ["steps=ten"], "steps must be an integer, got 'ten'"),
    ("missing model", ["models.student=/no/such/model"], "model path '/no/such/model' is not a directory"),
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
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    for p in tiny_pair["teacher"].iterdir():
        (teacher / p.name).write_bytes(p.read_bytes())
    config = write_config(tmp_path / "c.yaml", {**tiny_pair, "teacher": teacher}, steps=2)
    run = tmp_path / "run"
    assert main(["train", config, f"out_dir={run}"]) == 0
    good = snapshot(run / "checkpoints")
    weights = load_file(str(teacher / "model.safetensors"))
    weights = {k: torch.full_like(v, float("nan")) if "layers.0.mlp" in k else v for k, v in weights.items()}
    save_file(weights, str(teacher / "model.safetensors"))
    capsys.readouterr()
    assert main(["train", config, f"out_dir={run}", "steps=4", "resume=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "non-finite loss at step 2" in err[-1] and "step_00000002" in err[-1]
    assert snapshot(run / "checkpoints") == good
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"


def _train_process(config: str, run: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.Popen([sys.executable, "-m", "trb", "train", config, f"out_dir={run}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


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
