"""Every script in examples/ runs as a user would run it: `python examples/X.py --quick --out DIR` exits 0, prints
no traceback, and (for the scripts listed in PRODUCES) ends with the line and writes the files it promises. A
script whose first lines hold `# requires: <module>` is skipped exactly when that module is not importable; those
that require vLLM run in its own environment (`make test-vllm`), not here."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def requirements(script: Path) -> list[str]:
    """Modules named by a `# requires: a, b` line among the script's first five lines."""
    for line in script.read_text().splitlines()[:5]:
        if line.startswith("# requires:"):
            return line.removeprefix("# requires:").replace(",", " ").split()
    return []


# the scripts that need vLLM run in its own environment (tests/test_vllm_train.py, make test-vllm)
SCRIPTS = [s for s in sorted((ROOT / "examples").glob("*.py")) if "vllm" not in requirements(s)]


def check_custom_loop(out: Path, last_line: str) -> None:
    curve = json.loads((out / "curve.json").read_text())
    assert [r["step"] for r in curve] == [0, 1, 2]
    assert curve[0]["eps"] > 0 and curve[0]["mean_beta"] > 0, "the first steps blend in the teacher"
    assert all(r["loss"] >= 0 and 0 <= r["rollout_pass_rate"] <= 1 for r in curve)
    assert last_line.startswith(f"final loss {curve[-1]['loss']:.4f} after 3 steps")


def check_custom_method(out: Path, last_line: str) -> None:
    summary = json.loads(last_line)
    assert summary["status"] == "completed" and 0 <= summary["eval/pass_at_1"] <= 1
    config = (out / "run" / "config.yaml").read_text()
    assert "name: geometric_warmup" in config and "divergence: skew_reverse_kl" in config
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["beta"] for r in records if "loss" in r] == [0.3, 0.0], "the method's policy, then the student"


PRODUCES = {"custom_loop.py": check_custom_loop, "custom_method.py": check_custom_method}


def test_the_known_examples_are_there():
    assert set(PRODUCES) <= {s.name for s in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_example_runs_quick(script, tmp_path):
    missing = [m for m in requirements(script) if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{script.name} requires {', '.join(missing)}")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(script), "--quick", "--out", str(out)], capture_output=True,
                            text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    if script.name in PRODUCES:
        PRODUCES[script.name](out, result.stdout.strip().splitlines()[-1])
