"""The figures RESULTS.md quotes in its prose that no table shows, recomputed from the committed results/ alone:

- the resolution of each method table: the half-widths of the paired 95% intervals against OPD at the
  validation-best checkpoint (results.csv);
- the arith sweep's trend along eps0: Spearman's rank correlation between eps0 and each cell's area under the curve
  minus OPD's, over the 15 cells and without the eps0 = 0.05 row (results.csv);
- on chain, the main comparison's validation-best steps per method (evals.csv.gz of each run) and the rollouts'
  teacher-KL per token at steps 1, 10, 25, 50 and 100, mean over the seeds (metrics.jsonl.gz).

    python studies/results_figures.py
"""

from __future__ import annotations

import csv
import gzip
import json
import re
import statistics
from pathlib import Path

from scipy.stats import spearmanr

RESULTS = Path(__file__).resolve().parents[1] / "results"


def rows(folder: Path) -> list[dict]:
    with open(folder / "results.csv") as f:
        return list(csv.DictReader(f))


def resolution(folder: Path) -> None:
    half = {r["method"]: (float(r["diff_selected_high"]) - float(r["diff_selected_low"])) / 2
            for r in rows(folder) if r["diff_selected_high"] not in ("", "nan")}
    print(f"{folder.relative_to(RESULTS)}: paired 95% half-widths at the val-best checkpoint, "
          f"{100 * min(half.values()):.1f} to {100 * max(half.values()):.1f} points "
          f"(TRB {100 * half['trb(horizon=8)']:.1f})")


def sweep_trend(folder: Path) -> None:
    cells = []  # (eps0, AUC - OPD)
    for r in rows(folder):
        if m := re.fullmatch(r"trb\(eps0=([\d.]+),horizon=\d+\)", r["method"]):
            cells.append((float(m[1]), float(r["diff_auc_mean"])))
    for label, subset in (("all 15 cells", cells), ("without eps0 = 0.05", [c for c in cells if c[0] != 0.05])):
        rho, p = spearmanr([c[0] for c in subset], [c[1] for c in subset])
        print(f"{folder.relative_to(RESULTS)}: Spearman(eps0, AUC - OPD), {label} ({len(subset)}): "
              f"{rho:+.2f}, p = {p:.3f}")


def val_best_step(run: Path) -> int:
    """The step of the best validation pass@1, the earliest on ties (trb.compare's rule)."""
    by_step: dict[int, list[float]] = {}
    with gzip.open(run / "evals.csv.gz", "rt") as f:
        for r in csv.DictReader(f):
            if r["split"] == "val":
                by_step.setdefault(int(r["step"]), []).append(float(r["pass_at_1"]))
    means = {step: statistics.fmean(v) for step, v in by_step.items()}
    best = max(means.values())
    return min(step for step, m in means.items() if m == best)


def chain_main(folder: Path) -> None:
    for variant in sorted((folder / "runs").iterdir()):
        seeds = sorted(variant.glob("seed_*"), key=lambda s: int(s.name.split("_")[1]))
        steps = [val_best_step(s) for s in seeds]
        late = sum(step >= 320 for step in steps)
        kl: dict[int, list[float]] = {1: [], 10: [], 25: [], 50: [], 100: []}
        for s in seeds:
            with gzip.open(s / "metrics.jsonl.gz", "rt") as f:
                for line in f:
                    r = json.loads(line)
                    if "loss" in r and r["step"] in kl:
                        kl[r["step"]].append(r["teacher_kl"])
        print(f"{variant.name}: validation-best steps {steps} ({late} of {len(steps)} at 320 or later); "
              "teacher-KL at steps " + " / ".join(f"{k}: {statistics.fmean(v):.3f}" for k, v in kl.items()))


if __name__ == "__main__":
    resolution(RESULTS / "miniature" / "arith" / "methods")
    resolution(RESULTS / "miniature" / "word" / "methods")
    sweep_trend(RESULTS / "miniature" / "arith" / "sweep")
    chain_main(RESULTS / "regime" / "main")
