"""OPD and TRB trained with rollouts from vLLM's engine against the same runs on trb's own engine, paired by seed
(the runs of studies/vllm_engine.sh), beside the 5-seed OPD interval of the arith method table.

    python studies/vllm_engine.py OUT DEST

OUT: the folder studies/vllm_engine.sh ran into (OUT/vllm, OUT/own, each a `trb compare` output); DEST: where the
compact per-run records and results.md go. With OUT = DEST the table is rebuilt from the committed records alone.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from trb.compare import run_summary
from trb.stats import Estimate, mean_ci, paired_difference

ENGINES = ("own", "vllm")
METHODS = ("opd", "trb")
METRICS = {"selected": "test pass@1 at val-best step", "final": "final test pass@1", "auc": "AUC test pass@1"}
REFERENCE = Path("results/miniature/arith/methods/runs/opd")  # the method table's 5 OPD seeds


def seed_folders(root: Path) -> dict[int, Path]:
    """seed -> run folder (a live run or a compact record) under root."""
    return {int(p.name.removeprefix("seed_")): p for p in sorted(root.glob("seed_*")) if p.is_dir()}


def copy_records(out: Path, dest: Path) -> None:
    """Each run's compact record (metrics, evaluations, config) from OUT into DEST, the layout of results/."""
    for engine in ENGINES:
        for method in METHODS:
            for seed, run in seed_folders(out / engine / "runs" / method).items():
                target = dest / engine / "runs" / method / f"seed_{seed}"
                target.mkdir(parents=True, exist_ok=True)
                for f in (run / "record").glob("*"):
                    shutil.copy2(f, target / f.name)


def cell(e: Estimate) -> str:
    if not e.has_interval:
        return f"{e.mean:.3f} (values {', '.join(f'{v:.3f}' for v in e.values)})"
    p = f", p={e.p:.2g}" if e.p == e.p else ""
    return f"{e.mean:+.3f} [{e.low:+.3f}, {e.high:+.3f}]{p}" if p else f"{e.mean:.3f} [{e.low:.3f}, {e.high:.3f}]"


def table(dest: Path) -> str:
    summaries = {(engine, method): {seed: run_summary(run) for seed, run in
                                    seed_folders(dest / engine / "runs" / method).items()}
                 for engine in ENGINES for method in METHODS}
    lines = ["| method | engine | seeds | " + " | ".join(METRICS.values()) + " | minutes/run |",
             "|---|---|---|" + "---|" * len(METRICS) + "---|"]
    for method in METHODS:
        for engine in ENGINES:
            runs = summaries[(engine, method)]
            values = [cell(mean_ci([r[m] for r in runs.values()], bounds=(0, 1))) for m in METRICS]
            minutes = sum(r["minutes"] for r in runs.values()) / max(len(runs), 1)
            lines.append(f"| {method} | {engine} | {', '.join(map(str, sorted(runs)))} | {' | '.join(values)} | "
                         f"{minutes:.1f} |")
        own, vllm = summaries[("own", method)], summaries[("vllm", method)]
        seeds = sorted(set(own) & set(vllm))
        diffs = [cell(paired_difference([vllm[s][m] for s in seeds], [own[s][m] for s in seeds])) for m in METRICS]
        lines.append(f"| {method} | vllm - own (paired) | {', '.join(map(str, seeds))} | {' | '.join(diffs)} | |")
    reference = [run_summary(run)["selected"] for run in seed_folders(REFERENCE).values()]
    lines += ["", f"The arith method table's OPD ({len(reference)} seeds, {REFERENCE}): test pass@1 at the "
              f"validation-best step {cell(mean_ci(reference, bounds=(0, 1)))}."]
    return "\n".join(lines)


def main(out: Path, dest: Path) -> None:
    if out.resolve() != dest.resolve():
        copy_records(out, dest)
    text = (f"# OPD and TRB on arith: rollouts from vLLM's engine and from trb's own\n\n{table(dest)}\n\n"
            "Mean [95% t-interval] over seeds; paired rows: vLLM minus own engine, same seed, with the paired "
            "t-test's p (no correction over the six). minutes/run: training wall time per run, two runs at a time on a "
            "2-core machine shared with other work: not a speed comparison. Made by `studies/vllm_engine.sh` and "
            "`python studies/vllm_engine.py OUT DEST`.\n")
    (dest / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
