"""The chain study's estimator comparison: OPD and TRB trained with the paper's top-k estimator
(`topk_student_weighted_kl`) and the renormalized top-k KL (`topk_reverse_kl`), each against the same method with
the exact full-vocabulary reverse KL on the same seeds. Markdown on stdout.

    python studies/estimators.py results/regime [> results/regime/estimators/estimators.md]

The folder holds `studies/regime.sh`'s parts (run folders or the compact records `studies/collect.sh` keeps):
main/ (the exact KL, 400 steps) and estimators/<divergence>/ (the top-k estimators, ESTIMATOR_STEPS steps). The
exact-KL runs are scored on their first N steps, N the estimator runs' length: a run equals the first steps of a
longer one with the same config (`tests/test_train.py::test_resume_continues_exactly`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from trb.compare import format_difference, format_estimate, read_plan, run_summary
from trb.report import read_metrics, series
from trb.stats import holm, mean_ci, paired_difference

ESTIMATORS = (("reverse_kl", "exact full-vocabulary reverse KL (the config's)"),
              ("topk_student_weighted_kl", "the paper's top-k estimator, k = 16"),
              ("topk_reverse_kl", "renormalized top-k reverse KL, k = 16"))
METRICS = (("selected", "pass@1 at val-best step"), ("final", "final pass@1"), ("auc", "AUC pass@1"))
KL_STEPS = (1, 10, 25, 50, 100)  # the rollouts' teacher-KL per token at these steps


def sources(folder: Path) -> tuple[dict[str, dict[str, dict[int, Path]]], list[int]]:
    """estimator -> method label -> seed -> run folder, for the seeds every run has finished."""
    runs, seeds = {}, None
    _, main, main_done = read_plan(folder / "main")
    for divergence, _ in ESTIMATORS[1:]:
        _, by_label, done = read_plan(folder / "estimators" / divergence)
        runs[divergence] = by_label
        seeds = set(done) if seeds is None else seeds & set(done)
    runs = {"reverse_kl": {label: main[label] for label in runs["topk_student_weighted_kl"]}, **runs}
    return runs, sorted(seeds & set(main_done))


def last_step(run: Path) -> int:
    return max(record["step"] for record in read_metrics(run))


def main(folder: Path) -> None:
    runs, seeds = sources(folder)
    if not seeds:
        sys.exit(f"{folder}: no seed finished by every estimator run: no table yet")
    lengths = {last_step(by_seed[s]) for divergence, by_label in runs.items() if divergence != "reverse_kl"
               for by_seed in by_label.values() for s in seeds}
    if len(lengths) != 1:
        sys.exit(f"{folder}: the estimator runs have different lengths {sorted(lengths)}")
    until = lengths.pop()
    summaries = {(divergence, label): {s: run_summary(by_seed[s], until) for s in seeds}
                 for divergence, by_label in runs.items() for label, by_seed in by_label.items()}
    labels = list(runs["reverse_kl"])
    diffs = {(divergence, label, metric): paired_difference(
                 [summaries[(divergence, label)][s][metric] for s in seeds],
                 [summaries[("reverse_kl", label)][s][metric] for s in seeds])
             for divergence, _ in ESTIMATORS[1:] for label in labels for metric, _ in METRICS}
    diffs = {key: d._replace(p_holm=p) for (key, d), p in zip(diffs.items(), holm([d.p for d in diffs.values()]))}

    print(f"# chain: the loss's estimator, {until} steps\n")
    print(f"Seeds {' '.join(map(str, seeds))} ({len(seeds)}), those every run has finished. Test pass@1 (avg@4, "
          f"T = 1) of each run scored on its first {until} steps: at the validation-best evaluation, at step {until} "
          f"and the area under the curve; the exact-KL runs are the main comparison's 400-step runs cut at step "
          f"{until}. Mean over seeds [95% t-interval]; differences against the exact KL paired by seed, p-values "
          f"Holm-adjusted over the {len(diffs)} differences of this table.\n")
    for name, text in ESTIMATORS:
        print(f"- `{name}`: {text}")
    head = ["method", "loss"] + [name for _, name in METRICS] + [f"{name} - exact KL" for _, name in METRICS]
    head.append("train min/run")
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for label in labels:
        for divergence, _ in ESTIMATORS:
            by_seed = summaries[(divergence, label)]
            cells = [label, divergence]
            cells += [format_estimate(mean_ci([by_seed[s][m] for s in seeds], bounds=(0.0, 1.0))) for m, _ in METRICS]
            cells += ["-" if divergence == "reverse_kl" else format_difference(diffs[(divergence, label, m)])
                      for m, _ in METRICS]
            cells.append(f"{sum(by_seed[s]['minutes'] for s in seeds) / len(seeds):.1f}")
            print("| " + " | ".join(cells) + " |")
    print("\nTeacher-KL per token of the step's rollouts (mean over the seeds) and mean rollout length in tokens:\n")
    print("| method | loss | " + " | ".join(f"step {k}" for k in KL_STEPS) + " |\n|---|---|" + "---|" * len(KL_STEPS))
    for label in labels:
        for divergence, _ in ESTIMATORS:
            by_seed = runs[divergence][label]
            records = [read_metrics(by_seed[s], until) for s in seeds]
            kl = [dict(zip(*series(r, "teacher_kl"))) for r in records]
            length = [dict(zip(*series(r, "rollout/length"))) for r in records]
            cells = [f"{sum(c[k] for c in kl) / len(kl):.2f} ({sum(c[k] for c in length) / len(length):.0f})"
                     if all(k in c for c in kl + length) else "-" for k in KL_STEPS]
            print(f"| {label} | {divergence} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "results/regime"))
