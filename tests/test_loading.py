"""trb.loading: torch's CPU threads by default fit a busy machine, and the warning when max_new_tokens cuts the
reference solutions short."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trb import loading
from trb.config import load_config
from trb.loading import busy_cores, cpu_times, idle_cores, set_threads, truncation_warning
from trb.models import load_tokenizer
from trb.tasks import SETTINGS

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------------------
# Threads
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cores,busy,expected", [
    (2, 2.0, 1),  # the busy 2-core machine of benchmarks/bench_threads.py
    (2, 0.1, 2),  # a quiet one: every core, torch's own default
    (2, 0.6, 1),  # 1.4 cores idle
    (2, 0.5, 2),  # 1.5 rounds up
    (16, 3.4, 13),
    (4, 4.0, 1),  # never fewer than one
])
def test_idle_cores_are_the_cores_less_the_busy_ones_at_least_one(cores, busy, expected):
    assert idle_cores(cores, busy) == expected


def test_cpu_times_count_normal_priority_work_as_busy_and_nice_work_as_idle():
    #              user  nice   system idle  iowait irq softirq steal guest guest_nice
    line = "cpu  1000  5000   300    2000  100    20  30      50    7     9\ncpu0 1 2 3 4 5 6 7 8 9 10\n"
    assert cpu_times(line) == (1000 + 300 + 20 + 30 + 50, 1000 + 5000 + 300 + 2000 + 100 + 20 + 30 + 50)


def test_busy_cores_lie_between_none_and_all():
    assert 0.0 <= busy_cores(0.05) <= (os.cpu_count() or 1) + 1e-9


def test_set_threads_takes_the_option_then_omp_num_threads_then_the_idle_cores(monkeypatch):
    try:
        assert set_threads(3) == "torch threads: 3" and torch.get_num_threads() == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert set_threads(None) == "torch threads: 3 (OMP_NUM_THREADS)" and torch.get_num_threads() == 3
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(os, "cpu_count", lambda: 2)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
        monkeypatch.setattr(loading, "busy_cores", lambda: 1.9)
        assert set_threads(None) == "torch threads: 1 (2 cores, 1.9 busy with other work; --threads N to choose)"
        assert torch.get_num_threads() == 1
        monkeypatch.setattr(loading, "busy_cores", lambda: 0.2)
        assert set_threads(None).startswith("torch threads: 2 (") and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)  # the suite's (tests/conftest.py)


@pytest.mark.parametrize("environment,expected", [({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE")])
def test_the_trb_command_lets_idle_openmp_threads_sleep_unless_told_otherwise(environment, expected):
    """OMP_WAIT_POLICY=PASSIVE is in the environment before any subcommand loads torch (libgomp reads it then), and
    the runs `trb compare` starts inherit it; a policy the user set stays."""
    code = ("import os, sys\nfrom trb.cli import main\ncode = main(['eval', '--model', '/no/model'])\n"
            "print('torch' in sys.modules, os.environ['OMP_WAIT_POLICY'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", **environment})
    assert result.stdout.split() == ["False", expected], result.stderr


# ------------------------------------------------------------------------------------------------------------------
# Answers cut short
# ------------------------------------------------------------------------------------------------------------------


def test_truncation_warning_counts_the_cut_solutions_and_names_the_caps_that_cover_them():
    lengths = list(range(1, 101))  # solutions of 1..100 tokens
    assert truncation_warning(lengths, 100) is None
    assert truncation_warning(lengths, 99) is None  # 1 of 100 cut: not above 1%
    assert truncation_warning(lengths, 98).startswith("max_new_tokens=98 cuts 2 of the 100 reference solutions short "
                                                      "(2.0%")
    warning = truncation_warning(lengths, 64)
    assert warning.startswith("max_new_tokens=64 cuts 36 of the 100 reference solutions short (36.0%, in the student's "
                              "tokens with EOS; trb warns above 1%)")
    assert "max_new_tokens=95 covers 95% of them, 99 99% and 100 all" in warning
    assert "max_new_tokens=1 covers 95% of them, 1 99% and 50 all" in truncation_warning([1] * 99 + [50], 0)


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_the_shipped_configs_cut_no_reference_solution_short(setting):
    """The shipped miniature configs give every solution of their setting room (so their runs do not warn)."""
    cfg = load_config(f"trb:configs/miniature_{setting}.yaml")
    tokenizer = load_tokenizer(cfg.models.student)
    problems = SETTINGS[setting]("train", 500, 0) + SETTINGS[setting]("test", 200, 0)
    lengths = [len(ids) + 1 for ids in tokenizer([p.solution for p in problems], add_special_tokens=False)["input_ids"]]
    assert max(lengths) <= cfg.max_new_tokens and truncation_warning(lengths, cfg.max_new_tokens) is None
