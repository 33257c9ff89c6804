"""The docs cannot rot. Every command and snippet the README and the docs' quick starts show sits in a fence tagged
`<!-- run by tests/FILE.py::TEST -->`, and that test runs it: the tests below read the fences from the pages and run
what they hold, so an edited command is the command tested. Commands that train for minutes run with tiny budgets
(arguments appended to the shown command, where the last value wins: 2 steps, a few problems, tiny models);
commands that need GPUs or torchrun run as `--dry-run` on CPU with torchrun's options through its own parser;
`make` targets as `make -n` (what they would run). The API reference covers every public name."""

import importlib
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# The pages whose every code fence must be run by a test: the README and the docs' quick starts.
QUICK_STARTS = ["README.md", "docs/index.md", "docs/demo.md", "docs/own-data.md", "docs/own-models.md",
                "docs/trl.md", "docs/python-api.md"]
TAG = re.compile(r"<!-- run by (tests/[\w/]+\.py)::(\w+) -->")
# 2-step runs on few problems: appended to a shown `trb train` / `trb compare` / `trb demo` command
TINY_RUN = ["steps=2", "prompts_per_step=2", "rollouts_per_prompt=2", "rollout_batch=4", "micro_batch=4",
            "max_new_tokens=24", "eval_every=2", "eval_samples=1", "data.num_test=4", "data.num_val=2",
            "checkpoint_every=2"]


def fences(page: str) -> list[tuple[str, str, tuple[str, str] | None]]:
    """(language, body, (test file, test name) or None) of every code fence of a page, its tag the nearest non-blank
    line above it."""
    lines = (ROOT / page).read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        if lines[i].startswith("```") and len(lines[i]) > 3:
            above = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            end = lines.index("```", i + 1)
            tag = TAG.fullmatch(above.strip())
            found.append((lines[i][3:], "\n".join(lines[i + 1:end]), tag.groups() if tag else None))
            i = end
        i += 1
    return found


def shown(test: str, language: str = "bash") -> list[str]:
    """The fences of the quick-start pages tagged with this file's `test`, in page order."""
    bodies = [body for page in QUICK_STARTS for lang, body, tag in fences(page)
              if tag == ("tests/test_docs.py", test) and lang == language]
    assert bodies, f"no {language} fence of the docs is tagged with {test}"
    return bodies


def commands(test: str) -> list[list[str]]:
    """The distinct shell commands of the fences tagged with `test` (a command the README and a docs page both show
    runs once): continuation lines joined, comments dropped."""
    text = "\n".join(shown(test)).replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        if (argv := shlex.split(line, comments=True)) and argv not in found:
            found.append(argv)
    return found


def check_pip_install(argv: list[str]) -> None:
    """`pip install 'trb[extra,...]'`: every extra it names is one of pyproject.toml's."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert argv[:2] == ["pip", "install"] and len(argv) == 3, argv
    package, _, named = argv[2].partition("[")
    assert package == "trb" and set(named.rstrip("]").split(",")) <= set(extras), argv


def run_trb(argv: list[str], extra: list[str], cwd: Path) -> None:
    """`trb ...` through the command's own entry point, in `cwd`, with `extra` arguments appended."""
    from trb.cli import main

    assert argv[0] == "trb", argv
    here = Path.cwd()
    os.chdir(cwd)
    try:
        assert main(argv[1:] + extra) == 0, argv
    finally:
        os.chdir(here)


# ------------------------------------------------------------------------------------------------------------------
# Every fence is run, and the reference is whole
# ------------------------------------------------------------------------------------------------------------------


def test_every_fence_of_the_readme_and_the_quick_starts_is_run_by_a_test():
    for page in QUICK_STARTS:
        for language, body, tag in fences(page):
            assert tag is not None, f"{page}: a {language} fence without a '<!-- run by tests/...::test -->' tag:\n{body}"
            path, name = tag
            assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), f"{page}: {path}::{name} is no test"


def test_api_reference_covers_every_public_name_and_the_trl_trainer():
    import trb

    documented = set(re.findall(r"^::: ([\w.]+)$", (ROOT / "docs" / "reference.md").read_text(), re.M))
    public = {f"{module}.{name}" for module, names in trb._EXPORTS.items() for name in names}
    assert {p.rsplit(".", 1)[1] for p in public} == set(trb.__all__)
    missing = (public | {"trb.integrations.trl.TRBDistillationTrainer"}) - documented
    assert not missing, f"docs/reference.md lacks {sorted(missing)}"
    for name in documented - {"trb.integrations.trl.TRBDistillationTrainer"}:  # TRL's module needs the extra
        module, attribute = name.rsplit(".", 1)
        assert hasattr(importlib.import_module(module), attribute), name


def test_site_builds_offline_and_every_page_is_in_the_navigation():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["theme"]["font"] is False, "no web fonts fetched at build or read time"
    plugins = {p if isinstance(p, str) else next(iter(p)) for p in config["plugins"]}
    assert plugins <= {"search", "mkdocstrings"}, "no plugin that fetches assets (social, privacy, ...)"

    def pages(nav):
        for entry in nav:
            value = next(iter(entry.values())) if isinstance(entry, dict) else entry
            yield from pages(value) if isinstance(value, list) else [value]

    assert sorted(pages(config["nav"])) == sorted(p.name for p in (ROOT / "docs").glob("*.md"))


def strict_build(root: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """The docs build of `make test` (its command from `make -n test`, mkdocs from this interpreter) on a copy of
    the site's sources at `root`."""
    (line,) = [line for line in make_dry("test", tmp_path / "venv") if "mkdocs build" in line]
    command = shlex.split(line.replace(f"{tmp_path / 'venv'}/bin/mkdocs", f"{sys.executable} -m mkdocs"))
    env = {**os.environ, **dict(a.split("=", 1) for a in command if re.fullmatch(r"[A-Z_0-9]+=\S*", a))}
    command = [a for a in command if not re.fullmatch(r"[A-Z_0-9]+=\S*", a)]
    return subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300, env=env)


def test_strict_build_of_make_test_fails_on_a_broken_link_or_reference(tmp_path):
    """The regression: `mkdocs build --strict --quiet` passed with a broken link, since mkdocs counts the warnings
    strict mode fails on only when it prints them; `make test` builds without --quiet."""
    pytest.importorskip("mkdocs")
    site = tmp_path / "site_src"
    site.mkdir()
    for name in ("mkdocs.yml", "src", "examples"):
        (site / name).symlink_to(ROOT / name)
    for page in ("docs/cli.md", "docs/reference.md"):
        for broken in ("See [nowhere](nowhere.md).", "::: trb.api.no_such_name"):
            if broken.startswith(":::") != page.endswith("reference.md"):
                continue
            subprocess.run(["cp", "-r", str(ROOT / "docs"), str(site)], check=True)
            (site / page).write_text((ROOT / page).read_text() + f"\n{broken}\n")
            result = strict_build(site, tmp_path)
            assert result.returncode != 0, f"{page} with {broken!r} built:\n{result.stderr[-2000:]}"
            subprocess.run(["rm", "-r", str(site / "docs")], check=True)
    subprocess.run(["cp", "-r", str(ROOT / "docs"), str(site)], check=True)
    result = strict_build(site, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


# ------------------------------------------------------------------------------------------------------------------
# The commands
# ------------------------------------------------------------------------------------------------------------------


def make_dry(target: str, venv: Path) -> list[str]:
    """The lines `make -n TARGET` prints (runs nothing) for a fresh venv folder."""
    result = subprocess.run(["make", "-n", "--no-print-directory", target, f"VENV={venv}", "HAS_GPU="], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def check_make(argv: list[str], venv: Path) -> None:
    """A shown `make TARGET`: set-up installs trb with the docs extra and runs nothing else; demo, test and docs set
    up, then run what the docs say they run."""
    assert argv[0] == "make" and len(argv) == 2, argv
    lines = make_dry(argv[1], venv)
    setup = [line for line in lines if f"{venv}/bin/" in line and "pip install" in line or "-m venv" in line]
    assert any('-e ".[test,trl,docs]"' in line for line in setup), lines
    ran = [line for line in lines if line not in setup and not line.startswith("touch ")]
    expected = {"setup": [], "demo": [f"{venv}/bin/trb demo"], "docs": ["mkdocs build --strict --site-dir site"],
                "test": ["ruff check src tests benchmarks examples studies", "mkdocs build --strict", "-m pytest"],
                }[argv[1]]
    assert len(ran) == len(expected) and all(e in r for e, r in zip(expected, ran)), ran
    assert not venv.exists(), "make -n ran nothing"


def test_make_targets(tmp_path):
    """make setup / demo / test / docs, as `make -n` on a fresh venv folder: the set-up, then the one command each."""
    shown_targets = [argv for argv in commands("test_make_targets")]
    assert {argv[1] for argv in shown_targets} == {"setup", "demo", "test", "docs"}
    for argv in shown_targets:
        check_make(argv, tmp_path / "venv")


def test_demo_commands(tmp_path):
    """`make demo` as `make -n`; `trb demo ...` with 2 steps of 2 x 2 rollouts and 4 test problems per run
    (tests/test_miniature.py::test_demo_end_to_end checks the arith demo's output)."""
    shown_commands = commands("test_demo_commands")
    assert shown_commands[0] == ["make", "demo"]
    check_make(shown_commands[0], tmp_path / "venv")
    for i, argv in enumerate(shown_commands[1:]):
        run_trb(argv, ["--steps", "2", "--out", str(tmp_path / f"demo{i}"), *TINY_RUN], tmp_path)
        report = (tmp_path / f"demo{i}" / "report.md").read_text()
        assert "| OPD |" in report and "| TRB |" in report


def gsm8k_file(path: Path, split: str, count: int) -> Path:
    """`count` word problems in GSM8K format (question, worked answer ending in '#### N')."""
    from trb.tasks import SETTINGS

    lines = []
    for p in SETTINGS["word"](split, count, 0):
        steps = p.solution.rsplit("\n", 1)[0]
        lines.append(json.dumps({"question": p.question, "answer": f"{steps}\n#### {p.answer}"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_own_data_commands(tmp_path, monkeypatch):
    """The own-data recipe on 120 train and 6 test problems: `trb prepare` with the word preset shrunk to 1-layer
    models, 2 SFT steps each and 6 evaluation problems; `trb eval` at avg@1; `trb train` and `trb compare` (seeds 0
    and 1) at 2 steps of 2 x 2 rollouts on 4 test and 2 validation problems."""
    from trb.miniature import PRESETS, ModelSize

    tiny = replace(PRESETS["word"], vocab_size=160, num_train=48, num_val=6, num_test=6, eval_samples=1,
                   teacher=ModelSize(layers=1, hidden=32, heads=4, kv_heads=2, intermediate=64),
                   student=ModelSize(layers=1, hidden=16, heads=2, kv_heads=1, intermediate=32), max_new_tokens=24)
    monkeypatch.setitem(PRESETS, "word", tiny)
    gsm8k_file(tmp_path / "train.jsonl", "train", 120)
    gsm8k_file(tmp_path / "test.jsonl", "test", 6)
    extra = {"prepare": ["--teacher-steps", "2", "--student-steps", "2", "--threads", "1"],
             "eval": ["--n", "1", "--max-new-tokens", "24"], "train": TINY_RUN,
             "compare": [*TINY_RUN, "--seeds", "0", "1"]}
    shown_commands = commands("test_own_data_commands")
    assert [argv[1] for argv in shown_commands] == ["prepare", "eval", "eval", "train", "eval", "compare"]
    for argv in shown_commands:
        run_trb(argv, extra[argv[1]], tmp_path)
    assert (tmp_path / "run" / "report.md").is_file() and (tmp_path / "run" / "learning_curves.png").is_file()
    results = (tmp_path / "cmp" / "results.md").read_text()
    assert "opd" in results and "trb" in results and "p_Holm" in results


def test_own_data_recipe_caps_answers_alike_in_every_step():
    """The regression: the recipe trained with answers capped at 64 tokens (the config's) while `trb prepare` (the word
    preset) and `trb eval` capped them at 96. Every step of the shown recipe caps them at the word preset's cap."""
    from trb.config import load_config
    from trb.miniature import PRESETS

    caps = {}
    for argv in commands("test_own_data_commands"):
        if argv[1] == "prepare":
            caps["prepare"] = PRESETS["word"].max_new_tokens  # the preset the recipe's file source uses
        elif argv[1] == "eval":
            caps[f"eval {argv[3]}"] = int(argv[argv.index("--max-new-tokens") + 1])
        else:
            overrides = [a for a in argv[3:] if "=" in a and not a.startswith("-")]
            caps[argv[1]] = load_config(argv[2], overrides).max_new_tokens
    assert set(caps) == {"prepare", "eval pair/teacher", "eval pair/student", "eval run", "train", "compare"}
    assert set(caps.values()) == {PRESETS["word"].max_new_tokens}, caps


@pytest.fixture(scope="module")
def qwen_pairs(tmp_path_factory):
    """The paths of the own-models commands, on random-init checkpoints with the real Qwen3 vocabulary and
    template, the paper shapes scaled down 32 times."""
    from trb.testing import random_qwen3_pair

    root = tmp_path_factory.mktemp("qwen3")
    large = random_qwen3_pair(root / "large", "1.7b", "8b", scale=1 / 32)
    small = random_qwen3_pair(root / "small", "0.6b", "4b", scale=1 / 32)
    return {"/models/Qwen3-1.7B-Base": large["student"], "/models/Qwen3-8B": large["teacher"],
            "/models/Qwen3-0.6B-Base": small["student"], "/models/Qwen3-4B": small["teacher"],
            "/data/math.jsonl": ROOT / "tests" / "data" / "gsm8k" / "test.jsonl"}


def test_own_models_commands(qwen_pairs, tmp_path):
    """Every own-models command on CPU: `trb train` as --dry-run on the scaled-down random Qwen3 pairs (one dry run
    per distinct command), torchrun's options through torchrun's parser, `pip install` extras against
    pyproject.toml."""
    from torch.distributed.run import get_args_parser

    def local(argv):  # the shown paths, on this machine
        return [re.sub(r"=(/\S+)", lambda m: f"={qwen_pairs[m.group(1)]}", a) if "=/" in a else a for a in argv]

    dry_runs = []
    for argv in commands("test_own_models_commands"):
        if argv[0] == "pip":
            check_pip_install(argv)
            continue
        if argv[0] == "torchrun":
            args = get_args_parser().parse_args(argv[1:])
            assert args.module and args.training_script == "trb", argv
            argv = ["trb", *args.training_script_args]
        argv = [a for a in local(argv) if a != "--dry-run"]
        if argv not in dry_runs:
            dry_runs.append(argv)
    for i, argv in enumerate(dry_runs):
        run_trb(argv, ["--dry-run", "device=cpu", "data.num_test=10", f"out_dir={tmp_path / f'run{i}'}"], ROOT)
    assert any("models.lora_rank=64" in argv for argv in dry_runs)


def test_trl_commands(tmp_path, monkeypatch):
    """`pip install 'trb[trl]'` against pyproject.toml's extras; the TRL snippet run as shown, on CPU, but with
    2 optimizer steps of 2 prompts and 16-token completions."""
    for argv in commands("test_trl_commands"):
        check_pip_install(argv)
    pytest.importorskip("trl")
    (snippet,) = shown("test_trl_commands", "python")
    budget = "max_completion_length=64,"
    assert budget in snippet
    snippet = snippet.replace(budget, "max_completion_length=16, max_steps=2, per_device_train_batch_size=2,")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(snippet, "docs/trl.md", "exec"), namespace)
    assert namespace["trainer"].state.global_step == 2
    assert namespace["trainer"].last_rollout is not None


def test_python_api_loop(tmp_path, monkeypatch):
    """The Python API's loop snippet run as shown, but for 2 steps of 2 rollouts of 16 tokens, and its `trb.distill`
    call at 2 steps of 2 x 2 rollouts on 4 test problems."""
    (snippet,) = shown("test_python_api_loop", "python")
    tiny = {"range(20)": "range(2)", "] * 8, 96,": "] * 2, 16,",
            '"out_dir=runs/py"]': '"out_dir=runs/py", ' + ", ".join(f'"{o}"' for o in TINY_RUN) + "]"}
    for shown_text, budget in tiny.items():
        assert shown_text in snippet, shown_text
        snippet = snippet.replace(shown_text, budget)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(snippet, "docs/python-api.md", "exec"), namespace)
    assert namespace["loss"].item() >= 0
    assert (tmp_path / "runs" / "py" / "report.md").is_file()
