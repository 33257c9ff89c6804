"""The `trb` command on the own-data path: one-line errors for every subcommand, fast when nothing heavy is needed,
a report and a figure for every training run, dry runs beside an existing run, evaluation of a whole test file from
a run folder or its latest pointer."""

import contextlib
import hashlib
import io
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import pytest
import yaml

from trb import cli
from trb.cli import main
from trb.miniature import PRESETS
from trb.tasks import SETTINGS, load_problems

ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def gsm8k_file(path: Path, split: str, count: int) -> Path:
    """`count` arith problems in GSM8K format (question, worked answer ending in '#### N')."""
    lines = []
    for p in SETTINGS["arith"](split, count, 0):
        steps = p.solution.rsplit("\n", 1)[0]
        lines.append(json.dumps({"question": p.question, "answer": f"{steps}\n#### {p.answer}"}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def trained(tiny_pair, tmp_path_factory):
    """A finished 4-step TRB run of the tiny pair on a GSM8K-format train file, a 230-problem test file, and what the
    run wrote to stderr (not a terminal)."""
    root = tmp_path_factory.mktemp("cli")
    train_file = gsm8k_file(root / "train.jsonl", "train", 64)
    test_file = gsm8k_file(root / "test.jsonl", "test", 230)
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump({
        "models": {"student": str(tiny_pair["student"]), "teacher": str(tiny_pair["teacher"])},
        "data": {"source": str(train_file), "test_source": str(test_file), "num_test": 8},
        "steps": 4, "prompts_per_step": 2, "rollouts_per_prompt": 2, "rollout_batch": 4, "micro_batch": 2,
        "max_new_tokens": 12, "eval_every": 2, "eval_samples": 1, "checkpoint_every": 2, "lr": 1e-3,
        "warmup_steps": 0, "method": {"name": "trb", "eps0": 0.05, "horizon": 2},
    }))
    run = root / "run"
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert main(["train", str(config), f"out_dir={run}"]) == 0
    return {"run": run, "config": config, "test_file": test_file, "log": stderr.getvalue()}


# ------------------------------------------------------------------------------------------------------------------
# One picture per run
# ------------------------------------------------------------------------------------------------------------------


def test_train_writes_report_and_four_panel_learning_curves(trained):
    run = trained["run"]
    summary = json.loads((run / "summary.json").read_text())
    report = (run / "report.md").read_text()
    assert report.startswith("# trb train: trb\n")
    final = summary["final"]["eval/pass_at_1"]
    row = next(line for line in report.splitlines() if line.startswith("| trb |"))
    assert row.split("|")[4].strip() == f"{final:.3f}"  # the final pass@1 column
    assert f"Final pass@1 {final:.3f}" in report and "![learning curves](learning_curves.png)" in report
    image = matplotlib.image.imread(run / "learning_curves.png")  # (H, W, 4)
    assert image.shape[1] == 4 * 5 * 120, "pass@1, loss, teacher-KL and eps/beta panels, 5 inches each at 120 dpi"


def test_report_labels_the_run_by_its_method_not_its_folder(trained):
    """The regression: the report's table and legends named the run by its folder ("run"), not its method."""
    report = (trained["run"] / "report.md").read_text()
    rows = [line.split("|")[1].strip() for line in report.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows == ["method", "trb"], rows


# ------------------------------------------------------------------------------------------------------------------
# Progress and warnings of a run whose stderr is not a terminal
# ------------------------------------------------------------------------------------------------------------------


def test_train_says_what_it_does_between_evaluations_in_plain_lines(trained):
    """No progress bar (stderr is not a terminal) and no bar characters: a line once the models and data are loaded
    (with the threads chosen), each evaluation as it starts and as it ends, and the first training step."""
    lines = trained["log"].splitlines()
    assert "\r" not in trained["log"] and "it/s" not in trained["log"]
    assert lines[0].startswith("loaded the student, the teacher and 60 training prompts in ")
    assert lines[0].endswith(" s; torch threads: 1 (OMP_NUM_THREADS)")  # the suite's (tests/conftest.py)
    started = lines.index("step 0: evaluating avg@1 pass@1 on 8 test problems and 4 validation problems")
    assert lines[started + 1].startswith("step 0: pass@1 ") and lines[started + 1].endswith(" s)")
    step = next(i for i, line in enumerate(lines) if line.startswith("step 1/4: loss "))
    assert started < step and lines[step].endswith(" s/step")
    for evaluated in (2, 4):
        assert f"step {evaluated}: evaluating avg@1 pass@1 on 8 test problems and 4 validation problems" in lines


def test_train_warns_when_max_new_tokens_cuts_the_reference_solutions_short(trained, capsys):
    """max_new_tokens=12 cuts every arith solution (about 50 tokens): the run says so before it starts, with the
    caps that would cover them, in its log and its summary; the dry run reports it too."""
    (warning,) = json.loads((trained["run"] / "summary.json").read_text())["warnings"]
    assert warning.startswith("max_new_tokens=12 cuts 72 of the 72 reference solutions short (100.0%")
    assert "trb warns above 1%" in warning and "covers 95% of them" in warning
    assert f"trb: warning: {warning}" in trained["log"].splitlines()
    capsys.readouterr()
    assert main(["train", str(trained["config"]), f"out_dir={trained['run']}", "resume=true", "--dry-run",
                 "--threads", "1"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out.strip().splitlines()[-1])
    assert report["warnings"] == [warning] and report["torch_threads"] == 1
    assert captured.err.splitlines() == [f"trb: warning: {warning}"]


# ------------------------------------------------------------------------------------------------------------------
# --dry-run beside an existing run; eval of a whole file from a run folder
# ------------------------------------------------------------------------------------------------------------------


def test_dry_run_leaves_an_existing_run_alone(trained, capsys):
    run, config = trained["run"], trained["config"]
    before = snapshot(run)
    capsys.readouterr()
    assert main(["train", str(config), f"out_dir={run}", "--dry-run"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["dry_run"] == "ok"
    assert report["out_dir"].startswith("not usable as given:") and "already holds a run" in report["out_dir"]
    assert main(["train", str(config), f"out_dir={run}", "resume=true", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["out_dir"] == "ok"
    assert snapshot(run) == before


def test_eval_scores_every_problem_of_a_file_from_a_run_folder_or_its_latest_pointer(trained, tmp_path, capsys):
    run, test_file = trained["run"], trained["test_file"]
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    results = {}
    for name, model in (("checkpoint", latest), ("run", run), ("pointer", run / "checkpoints" / "latest")):
        out = tmp_path / f"{name}.json"
        assert main(["eval", "--model", str(model), "--data", str(test_file), "--all", "--n", "1",
                     "--max-new-tokens", "12", "--out", str(out)]) == 0
        results[name] = json.loads(out.read_text())
    assert len(load_problems(test_file)) == 230 > 200  # more than the default --problems
    assert results["checkpoint"]["problems"] == 230 and len(results["checkpoint"]["per_problem"]) == 230
    # the run folder and the pointer stand for the latest checkpoint: the same model, the same samples
    assert results["run"]["per_problem"] == results["checkpoint"]["per_problem"]
    assert results["pointer"]["per_problem"] == results["checkpoint"]["per_problem"]


# ------------------------------------------------------------------------------------------------------------------
# Bad paths, presets and options: one line, exit 2, no traceback, for every subcommand
# ------------------------------------------------------------------------------------------------------------------

BAD = [
    ("train: missing config", ["train", "/no/such.yaml"], "trb: error: config file '/no/such.yaml' not found"),
    ("train: bad option", ["train", "{config}", "--dri-run"], "unrecognized arguments: --dri-run"),
    ("eval: missing model", ["eval", "--model", "/no/model"], "--model '/no/model': no such file or folder"),
    ("eval: missing data", ["eval", "--model", "{run}", "--data", "/no/test.jsonl"], "--data '/no/test.jsonl'"),
    ("eval: --all on a setting", ["eval", "--model", "{run}", "--all"], "--all scores every problem of a file"),
    ("eval: bad option", ["eval", "--model", "{run}", "--samples", "3"], "unrecognized arguments"),
    ("eval: zero samples", ["eval", "--model", "{run}", "--n", "0"], "argument --n: expected a positive integer"),
    ("eval: zero batch", ["eval", "--model", "{run}", "--batch", "0"], "argument --batch: expected a positive"),
    ("eval: negative problems", ["eval", "--model", "{run}", "--problems", "-2"], "argument --problems"),
    ("eval: negative length", ["eval", "--model", "{run}", "--max-new-tokens", "-5"], "--max-new-tokens"),
    ("eval: bad device", ["eval", "--model", "{run}", "--device", "gpu0"],
     "argument --device: expected auto, cpu, cuda or cuda:N, got 'gpu0'"),
    ("prepare: bad source", ["prepare", "/no/problems.jsonl", "--out", "{tmp}/p"], "is neither a setting"),
    ("prepare: bad preset", ["prepare", "word", "--out", "{tmp}/p", "--preset", "big"],
     "argument --preset: invalid choice: 'big' (choose from 'arith', 'word', 'chain')"),
    ("prepare: bad steps", ["prepare", "word", "--out", "{tmp}/p", "--teacher-steps", "0"],
     "argument --teacher-steps: expected a positive integer, got '0'"),
    ("prepare: bad threads", ["prepare", "word", "--out", "{tmp}/p", "--threads", "two"], "--threads"),
    ("prepare: out is a file", ["prepare", "word", "--out", "{config}"], "is a file, not a folder"),
    ("prepare: bad teacher", ["prepare", "word", "--out", "{tmp}/p", "--teacher-from", "{tmp}"],
     "is not a prepared teacher folder"),
    ("prepare: more steps, no teacher", ["prepare", "word", "--out", "{tmp}/p", "--teacher-more-steps", "5"],
     "--teacher-more-steps and --student-from need --teacher-from"),
    ("prepare: bad student", ["prepare", "arith", "--out", "{tmp}/p", "--teacher-from", "trb:miniature/arith/teacher",
                              "--student-from", "{tmp}"], "is not a prepared student folder"),
    ("compare: missing config", ["compare", "/no/such.yaml", "--methods", "opd", "--out", "{tmp}/c"], "not found"),
    ("compare: out is a file", ["compare", "{config}", "--methods", "opd", "--out", "{config}"], "is a file"),
    ("compare: override after the methods", ["compare", "{config}", "--methods", "opd", "steps=0", "--out", "{tmp}/c"],
     "steps must be"),
    ("compare: only overrides", ["compare", "{config}", "--out", "{tmp}/c", "--methods", "steps=3"],
     "--methods names no method"),
    ("compare: zero jobs", ["compare", "{config}", "--methods", "opd", "--out", "{tmp}/c", "--jobs", "0"],
     "argument --jobs: expected a positive integer, got '0'"),
    ("probe: negative eps", ["probe", "--student", "{run}", "--teacher", "{run}", "--out", "{tmp}/o", "--eps", "-1"],
     "argument --eps: expected a finite number >= 0"),
    ("tables: not a result folder", ["tables", "{tmp}"], "holds neither plan.json"),
    ("inspect: negative step", ["inspect", "{run}", "--steps", "-1"], "argument --steps: expected an integer >= 0"),
    ("demo: zero steps", ["demo", "--steps", "0"], "argument --steps: expected a positive integer"),
    ("probe: missing student", ["probe", "--student", "/no/s", "--teacher", "{run}", "--out", "{tmp}/o"],
     "--student '/no/s': no such file or folder"),
    ("inspect: not a run", ["inspect", "{tmp}"], "is not a run folder"),
    ("demo: bad setting", ["demo", "--setting", "chess"], "argument --setting: invalid choice: 'chess'"),
    ("demo: out is a file", ["demo", "--out", "{config}"], "is a file"),
    ("unknown command", ["trian"], "argument command: invalid choice: 'trian'"),
]


def exit_code(args: list[str]) -> int:
    """main's exit code, whether returned or carried by SystemExit (argparse's errors)."""
    try:
        return main(args)
    except SystemExit as stop:
        return stop.code


@pytest.mark.parametrize("name,args,message", BAD, ids=[b[0] for b in BAD])
def test_bad_path_preset_or_option_one_line_exit_2(name, args, message, trained, tmp_path, capsys):
    args = [a.format(config=trained["config"], run=trained["run"], tmp=tmp_path) for a in args]
    before = snapshot(tmp_path)
    capsys.readouterr()
    code = exit_code(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err
    assert snapshot(tmp_path) == before, "a refused command creates nothing"


def test_setting_names_of_the_command_line_are_the_settings_and_presets():
    assert set(cli.SETTINGS) == set(SETTINGS) == set(PRESETS)


# ------------------------------------------------------------------------------------------------------------------
# Errors come back before anything heavy is imported
# ------------------------------------------------------------------------------------------------------------------


FAST = [  # (name, arguments, the message's words); {tmp}: a fresh folder, {file}: a file, {bad}: a file of bad JSON
    ("train", ["train", "/no/such.yaml"], "config file '/no/such.yaml' not found"),
    ("train config key", ["train", "trb:configs/miniature_word.yaml", "stesp=3"], "did you mean 'steps'"),
    ("train config value", ["train", "trb:configs/miniature_arith.yaml", "loss.divergence=kl"], "unknown divergence"),
    ("train model path", ["train", "trb:configs/miniature_arith.yaml", "models.student=/no/student"],
     "models.student '/no/student': no such file or folder"),
    ("train out_dir is a file", ["train", "trb:configs/miniature_arith.yaml", "out_dir={file}"],
     "exists and is not a folder"),
    ("train model path is a file", ["train", "trb:configs/miniature_arith.yaml", "models.teacher={file}"],
     "models.teacher '{file}' is a file; give a model folder"),
    ("train trb: name typo", ["train", "trb:configs/miniature_word.yaml", "models.student=trb:miniature/wrod/student"],
     "trb ships no such file or folder; did you mean 'trb:miniature/word/student'?"),
    ("train resume on a missing folder", ["train", "trb:configs/miniature_arith.yaml", "out_dir={tmp}/no/run",
                                          "resume=true"], "resume=true but out_dir"),
    ("train bad JSON", ["train", "trb:configs/miniature_arith.yaml", "data.source={bad}"],
     "{bad}:2: not valid JSON"),
    ("train bad JSON test file", ["train", "trb:configs/miniature_arith.yaml", "data.source=word",
                                  "data.test_source={bad}"], "{bad}:2: not valid JSON"),
    ("train dry run out_dir is a file", ["train", "trb:configs/miniature_arith.yaml", "out_dir={file}", "--dry-run"],
     "exists and is not a folder"),
    ("compare config value", ["compare", "trb:configs/miniature_arith.yaml", "--methods", "trb:eps0=x", "--out",
                              "{tmp}/c"], "eps0 must be a number"),
    ("demo config value", ["demo", "method.eps0=-1"], "eps0 must be a finite number >= 0"),
    ("prepare source", ["prepare", "/no/problems.jsonl", "--out", "{tmp}/p"], "is neither a setting"),
    ("prepare preset", ["prepare", "word", "--out", "{tmp}/p", "--preset", "big"], "invalid choice: 'big'"),
    ("prepare bad JSON", ["prepare", "{bad}", "--out", "{tmp}/p"], "{bad}:2: not valid JSON"),
    ("prepare over another pair", ["prepare", "arith", "--out", "{tmp}/pair"], "holds a finished pair made with other"),
    ("eval", ["eval", "--model", "/no/model"], "--model '/no/model': no such file or folder"),
    ("eval model is a file", ["eval", "--model", "{file}"], "--model '{file}' is a file"),
    ("eval trb: name typo", ["eval", "--model", "trb:miniature/arith/studnet"], "did you mean 'trb:miniature/arith/"),
    ("eval bad JSON", ["eval", "--model", "trb:miniature/arith/student", "--data", "{bad}", "--all"],
     "{bad}:2: not valid JSON"),
    ("eval option", ["eval", "--model", "/tmp", "--n", "0"], "argument --n: expected a positive integer"),
    ("inspect", ["inspect", "/no/run"], "is not a run folder"),
    ("tables", ["tables", "/no/results"], "holds neither plan.json"),
]


@pytest.mark.parametrize("name,args,message", FAST, ids=[f[0] for f in FAST])
def test_path_option_config_and_data_errors_take_under_2_cpu_seconds_without_torch(name, args, message, tmp_path):
    """One line, exit 2, torch and transformers never imported, under 2 s of the process's CPU time. The process's
    CPU time, not its wall time, is the bar: on a loaded machine (the test suite beside other work) a process that
    imports nothing heavy can still wait seconds for a core. The wall clock gets a generous 30 s."""
    (tmp_path / "pair").mkdir()
    (tmp_path / "pair" / "prepare.json").write_text(json.dumps({"settings": {"source": "word"}}))
    (tmp_path / "bad.jsonl").write_text('{"question": "1 + 1?", "answer": "2\\n#### 2"}\n{"question": "2 + 2?",\n')
    fill = {"tmp": str(tmp_path), "file": str(ROOT / "pyproject.toml"), "bad": str(tmp_path / "bad.jsonl")}
    args, message = [a.format(**fill) for a in args], message.format(**fill)
    code = "\n".join([
        "import sys",
        "from trb.cli import main",
        "try:",
        "    code = main(sys.argv[1:])",
        "except SystemExit as stop:",
        "    code = stop.code",
        "print('torch' in sys.modules, 'transformers' in sys.modules)",
        "sys.exit(code)",
    ])
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60,
                            env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "error:" in result.stderr and message in result.stderr, result.stderr
    assert result.stdout.split() == ["False", "False"], "torch or transformers was imported"
    assert cpu < 2.0, f"the process took {cpu:.2f} s of CPU ({wall:.2f} s wall)"
    assert wall < 30.0


def test_config_and_the_api_names_load_without_torch():
    """`import trb`, its torch-free names and a config with every section built and checked import no torch."""
    code = "\n".join([
        "import sys",
        "import trb",
        "from trb.config import load_config",
        "cfg = load_config('trb:configs/miniature_arith.yaml', ['method.name=sft_warmup', 'loss.top_k=8',",
        "                  'loss.divergence=topk_student_weighted_kl'])",
        "assert (trb.LossSpec, trb.register_method, trb.register_divergence, trb.METHODS) is not None",
        "print(cfg.method.name, cfg.loss.top_k, 'torch' in sys.modules, 'transformers' in sys.modules)",
    ])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["sft_warmup", "8", "False", "False"]


@pytest.mark.parametrize("override,message", [
    ("method.eps0=-1", "method: eps0 must be a finite number >= 0, got -1.0"),
    ("loss.divergence=kl", "loss: unknown divergence 'kl'; choose one of reverse_kl, topk_student_weighted_kl"),
    ("method.name=trbb", "unknown method 'trbb'; choose one of"),
    ("steps=many", "steps must be an integer, got 'many'"),
])
def test_bad_config_value_through_python_m_trb_is_one_line_exit_2(override, message, tmp_path):
    result = subprocess.run([sys.executable, "-m", "trb", "train", "trb:configs/miniature_arith.yaml", override,
                             f"out_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=60,
                            env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and result.stdout == ""
    assert len(lines) == 1 and lines[0].startswith("trb: error: ") and message in lines[0], lines
    assert not (tmp_path / "run").exists()
