"""Whole training steps with each rollout engine: `trb train` on the same config, models, data and seed with
`rollout.engine=trb` and `rollout.engine=vllm`, and the median of each run's `time/step_s` and `time/rollout_s` over
its steps after the first (the first pays engine start-up and compilation).

    .venv-vllm/bin/python benchmarks/bench_engine_step.py CONFIG OUT key=value ...

CONFIG is any `trb train` config (e.g. configs/qwen3_0.6b_from_4b.yaml), OUT a scratch folder for the two runs, and
the key=value overrides go to both runs (models, data, steps, the vLLM knobs). Each run's output is in
OUT/<engine>/train.log. The last stdout line is JSON with both engines' medians and the device name.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, emit  # noqa: E402

ENGINES = ("trb", "vllm")


def run(config: str, out: Path, engine: str, overrides: list[str]) -> list[dict]:
    """One `trb train` run of `engine`, its metrics records (a failed run raises with its log's last lines)."""
    folder = out / engine
    folder.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "trb", "train", config, *overrides, f"rollout.engine={engine}",
            f"out_dir={folder / 'run'}"]
    with open(folder / "train.log", "w") as log:
        code = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = (folder / "train.log").read_text().strip().splitlines()[-5:]
        raise SystemExit(f"{engine}: trb train exited {code}:\n" + "\n".join(tail))
    lines = (folder / "run" / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if "time/step_s" in record]


def medians(records: list[dict]) -> dict:
    """Median step and rollout seconds over the steps after the first."""
    timed = records[1:] or records
    return {"steps_timed": len(timed),
            "step_s": round(statistics.median(r["time/step_s"] for r in timed), 3),
            "rollout_s": round(statistics.median(r["time/rollout_s"] for r in timed), 3)}


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    config, out, overrides = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    row = {"benchmark": "engine_step", "config": config, "overrides": overrides}
    for engine in ENGINES:
        measured = medians(run(config, out, engine, overrides))
        print(engine, measured, file=sys.stderr)
        row.update({f"{engine}_{key}": value for key, value in measured.items()})
    emit({**row, "device": device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))})


if __name__ == "__main__":
    main()
