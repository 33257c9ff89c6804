"""A comparison's learning curves step by step: test pass@1 at every evaluation, mean over the seeds every variant
has finished, and each variant's paired difference from the baseline (same seed) with a t-interval and a
Holm-adjusted p-value over the table's comparisons (every step of every variant). Also the teacher-KL of the
rollouts at the first steps, where the warmups act, and the minutes of training steps. Markdown on stdout.

    python studies/paired_curves.py results/regime/main [> results/regime/main/paired_curves.md]

The folder is a `trb compare` output (plan.json + runs/<variant>/seed_<s>/, run folders or compact records).
"""

from __future__ import annotations

import sys
from pathlib import Path

from trb.compare import format_difference, format_estimate, read_plan
from trb.report import read_metrics, series
from trb.stats import holm, mean_ci, paired_difference

KL_STEPS = (1, 10, 25, 50, 100)  # rollouts' teacher-KL per token at these steps (TRB's budget ends at K = 50)
WARMUP = 50  # training time is also shown for the first WARMUP steps (the paper's K)


def main(folder: Path) -> None:
    plan, folders, seeds = read_plan(folder)
    if not seeds or plan["baseline"] is None:
        sys.exit(f"{folder}: no seed finished by every variant, or no baseline to pair with: no paired curves")
    runs = {label: {s: by_seed[s] for s in seeds} for label, by_seed in folders.items()}
    baseline, until = plan["baseline"], plan.get("until_step")  # a comparison may score runs up to one step
    curves = {label: {s: dict(zip(*series(read_metrics(by_seed[s], until), "eval/pass_at_1"))) for s in seeds}
              for label, by_seed in runs.items()}
    steps = sorted(curves[baseline][seeds[0]])
    others = [label for label in runs if label != baseline]
    diffs = {(label, step): paired_difference([curves[label][s][step] for s in seeds],
                                              [curves[baseline][s][step] for s in seeds])
             for label in others for step in steps}
    diffs = {key: d._replace(p_holm=p) for (key, d), p in zip(diffs.items(), holm([d.p for d in diffs.values()]))}
    print(f"# {plan['title']}: test pass@1 at every evaluation\n")
    print(f"Seeds {' '.join(map(str, seeds))} ({len(seeds)} of {len(plan['seeds'])} planned, those every variant "
          f"finished); mean over seeds [95% t-interval]; differences paired by seed, p-values Holm-adjusted over "
          f"the {len(diffs)} differences of this table.\n")
    head = ["step", baseline] + [part for label in others for part in (label, f"{label} - {baseline}")]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for step in steps:
        cells = [str(step), format_estimate(mean_ci([curves[baseline][s][step] for s in seeds], bounds=(0.0, 1.0)))]
        for label in others:
            cells += [format_estimate(mean_ci([curves[label][s][step] for s in seeds], bounds=(0.0, 1.0))),
                      format_difference(diffs[(label, step)])]
        print("| " + " | ".join(cells) + " |")
    print(f"\nTeacher-KL per token of the step's rollouts (mean over seeds {' '.join(map(str, seeds))}):\n")
    print("| variant | " + " | ".join(f"step {k}" for k in KL_STEPS) + " |\n|---|" + "---|" * len(KL_STEPS))
    for label, by_seed in runs.items():
        kl = [dict(zip(*series(read_metrics(by_seed[s], until), "teacher_kl"))) for s in seeds]
        cells = [f"{sum(c[k] for c in kl) / len(kl):.3f}" if all(k in c for c in kl) else "-" for k in KL_STEPS]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("\nMinutes of training steps per run (`time/step_s`, evaluations excluded; mean over seeds):\n")
    print(f"| variant | steps 1-{WARMUP} | all steps |\n|---|---|---|")
    for label, by_seed in runs.items():
        times = [series(read_metrics(by_seed[s], until), "time/step_s") for s in seeds]
        early = sum(sum(t for step, t in zip(*run) if step <= WARMUP) for run in times) / len(seeds) / 60
        total = sum(sum(run[1]) for run in times) / len(seeds) / 60
        print(f"| {label} | {early:.1f} | {total:.1f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "results/regime/main"))
