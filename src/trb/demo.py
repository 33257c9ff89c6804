"""`trb demo`: the embedded miniature, vanilla OPD and TRB side by side from the shipped checkpoints.

Both runs start from the same student, see the same prompts in the same order and are evaluated on the same test
problems with the same sampling seeds; only the behavior policy of the first `horizon` steps differs. On a machine
with two or more cores the runs go in parallel, one thread each. The demo prints a table and writes report.md and
learning_curves.png into its folder.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from trb.config import TrainConfig, load_config
from trb.paths import BUILTIN_PREFIX

# trb.report (matplotlib) is imported where it is used: `check_demo` answers before any heavy import
METHODS = {"OPD": ["method.name=opd"], "TRB": ["method.name=trb"]}


def check_demo(setting: str, steps: int | None, overrides: list[str]) -> tuple[str, list[str], TrainConfig]:
    """The demo's config file, its overrides (`overrides` plus the step budget) and TRB's validated config, so that a
    bad value fails before anything starts."""
    config = f"{BUILTIN_PREFIX}configs/miniature_{setting}.yaml"
    extra = list(overrides) + ([f"steps={steps}"] if steps else [])
    return config, extra, load_config(config, extra + METHODS["TRB"])


def _progress(runs: dict[str, Path], total: int, started: float) -> str:
    from trb.report import read_metrics, series

    parts = []
    for name, run in runs.items():
        records = read_metrics(run)
        done = max((r["step"] for r in records), default=0)
        _, pass1 = series(records, "eval/pass_at_1")
        parts.append(f"{name} step {done}/{total} pass@1 {pass1[-1]:.3f}" if pass1 else f"{name} starting")
    return f"[{time.monotonic() - started:5.0f}s] " + " | ".join(parts)


def run_demo(out: Path | None, setting: str = "arith", steps: int | None = None, overrides: list[str] = ()) -> dict:
    out = out if out is not None else Path("runs") / f"demo-{datetime.now():%Y%m%d-%H%M%S}"
    config, extra, cfg = check_demo(setting, steps, overrides)
    out.mkdir(parents=True, exist_ok=True)
    parallel = (os.cpu_count() or 1) >= 2
    threads = max(1, (os.cpu_count() or 1) // len(METHODS)) if parallel else (os.cpu_count() or 1)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    print(f"trb demo: {setting} miniature, {cfg.steps} steps per method, "
          f"{'in parallel' if parallel else 'one after the other'} ({threads} thread(s) each)")
    print(f"  student {cfg.models.student}, teacher {cfg.models.teacher}; output in {out}")

    runs = {name: out / name.lower() for name in METHODS}
    # method.* overrides (e.g. method.eps0=0.01) are TRB's; vanilla OPD has no parameters
    shared = [o for o in extra if not o.startswith("method.")]
    trb_only = [o for o in extra if o.startswith("method.")]
    commands = {
        name: [sys.executable, "-m", "trb", "train", config, *shared, *args, *(trb_only if name == "TRB" else []),
               f"out_dir={runs[name]}"]
        for name, args in METHODS.items()
    }
    started = time.monotonic()
    logs = {name: open(out / f"{name.lower()}.log", "w") for name in METHODS}
    processes = {}
    for name, command in commands.items():
        processes[name] = subprocess.Popen(command, stdout=logs[name], stderr=subprocess.STDOUT, env=env)
        if not parallel:
            while processes[name].poll() is None:
                time.sleep(5)
                print(_progress(runs, cfg.steps, started), flush=True)
    while any(p.poll() is None for p in processes.values()):
        time.sleep(5)
        print(_progress(runs, cfg.steps, started), flush=True)
    for handle in logs.values():
        handle.close()
    failed = [name for name, p in processes.items() if p.returncode != 0]
    if failed:
        for name in failed:
            tail = (out / f"{name.lower()}.log").read_text().splitlines()[-15:]
            print(f"{name} failed:\n" + "\n".join(tail), file=sys.stderr)
        raise SystemExit(1)

    wall = time.monotonic() - started
    from trb.report import markdown_table, plot_learning_curves, summary_row

    rows = {name: summary_row(run) for name, run in runs.items()}
    table = markdown_table(rows)
    plot_learning_curves(runs, out / "learning_curves.png", f"{setting} miniature: student pass@1 under OPD and TRB")
    hardware = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    report = "\n".join([
        f"# trb demo: the {setting} miniature",
        "",
        f"Vanilla OPD and TRB from the same base student ({cfg.models.student}) and teacher ({cfg.models.teacher}),",
        f"{cfg.steps} steps of {cfg.prompts_per_step} prompts x {cfg.rollouts_per_prompt} rollouts, evaluated every "
        f"{cfg.eval_every} steps with avg@{cfg.eval_samples} pass@1 at temperature 1.0 on {cfg.data.num_test} "
        f"held-out problems. TRB: {json.dumps(vars(cfg.method))}.",
        "",
        table,
        "",
        "![learning curves](learning_curves.png)",
        "",
        f"Hardware: {hardware}; wall time {wall / 60:.1f} min for both runs. Command: `trb demo --setting {setting}"
        + (f" --steps {steps}" if steps else "") + "`.",
        "",
    ])
    (out / "report.md").write_text(report)
    print()
    print(table)
    print(f"\nreport: {out / 'report.md'}; plot: {out / 'learning_curves.png'}; wall time {wall / 60:.1f} min")
    return rows
