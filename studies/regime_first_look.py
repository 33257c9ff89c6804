"""The chain regime's first runs, from their committed records: teacher-KL and rollout length over the first steps,
and every test / validation pass@1, as markdown tables.

    python studies/regime_first_look.py [results/regime/first_look]

Each folder under the argument is one run's record (metrics.jsonl.gz, evals.csv.gz, config.yaml, written by
`trb.records.write_record`), named for what it varies; runs that were stopped early show the steps they reached.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import yaml

STEPS = (1, 5, 9, 13, 17, 21)  # the first steps, where the estimators part ways


def load(run: Path) -> tuple[dict, list[dict]]:
    config = yaml.safe_load((run / "config.yaml").read_text())
    with gzip.open(run / "metrics.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return config, rows


def label(config: dict) -> str:
    loss = config["loss"]
    divergence = loss["divergence"] + (f" (k = {loss['top_k']})" if loss["divergence"].startswith("topk") else "")
    return f"{config['method']['name']}, {divergence}"


def main(root: Path) -> None:
    runs = sorted(p for p in root.iterdir() if (p / "metrics.jsonl.gz").is_file())
    print("| run | method, loss | " + " | ".join(f"step {s}" for s in STEPS) + " | last step |")
    print("|---|---|" + "---|" * (len(STEPS) + 1))
    curves = {}
    for run in runs:
        config, rows = load(run)
        train = {r["step"]: r for r in rows if "teacher_kl" in r}
        cells = [f"{train[s]['teacher_kl']:.2f} ({train[s]['rollout/length']:.0f})" if s in train else "-"
                 for s in STEPS]
        print(f"| {run.name} | {label(config)} | " + " | ".join(cells) + f" | {max(train, default=0)} |")
        curves[run.name] = [(r["step"], r["eval/pass_at_1"], r.get("val/pass_at_1")) for r in rows
                            if "eval/pass_at_1" in r]
    print("\nteacher-KL per token of the step's rollouts (mean rollout length in tokens)\n")
    print("| run | pass@1 test / validation at each evaluation (step: test / val) | validation-best step: test |"
          " max over test (the paper's) |")
    print("|---|---|---|---|")
    for name, points in curves.items():
        best_step, best_test, _ = max(points, key=lambda point: (point[2], -point[0]))  # earliest of equal ones
        print(f"| {name} | " + ", ".join(f"{s}: {t:.3f} / {v:.3f}" for s, t, v in points)
              + f" | {best_step}: {best_test:.3f} | {max(t for _, t, _ in points):.3f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "results/regime/first_look"))
