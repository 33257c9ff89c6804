"""Reading run folders back: learning curves, summary rows, markdown tables and plots."""

from __future__ import annotations

import json
from pathlib import Path

from trb.records import read_text

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run: Path, until_step: int | None = None) -> list[dict]:
    """A run folder's metrics.jsonl, or a compact record's metrics.jsonl.gz (`trb.records`); [] without either.
    until_step: only the records of steps <= until_step (a longer run scored on its first steps)."""
    path = Path(run) / "metrics.jsonl"
    if not path.exists() and not Path(f"{path}.gz").exists():
        return []
    records = [json.loads(line) for line in read_text(path).splitlines()]
    return records if until_step is None else [r for r in records if r["step"] <= until_step]


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, in step order."""
    points = [(r["step"], r[key]) for r in records if key in r]
    return [s for s, _ in points], [v for _, v in points]


def summary_row(run: Path) -> dict:
    """pass@1 at the start, best (the paper's best-checkpoint rule), final; final teacher-KL; wall time."""
    records = read_metrics(run)
    steps, pass1 = series(records, "eval/pass_at_1")
    _, kl = series(records, "eval/teacher_kl")
    _, step_time = series(records, "time/step_s")
    if not pass1:
        return {}
    return {
        "start": pass1[0],
        "best": max(pass1),
        "best_step": steps[pass1.index(max(pass1))],
        "final": pass1[-1],
        "teacher_kl": kl[-1] if kl else float("nan"),
        "train_minutes": sum(step_time) / 60,
        "steps": steps[-1],
    }


def markdown_table(rows: dict[str, dict]) -> str:
    lines = [
        "| method | pass@1 start | best (step) | final | teacher-KL (final) | train time |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['start']:.3f} | {row['best']:.3f} ({row['best_step']}) | {row['final']:.3f} | "
            f"{row['teacher_kl']:.4f} | {row['train_minutes']:.1f} min |"
        )
    return "\n".join(lines)


# (metric keys, y label, title) of each panel a learning-curve figure can show; eval/* points are evaluations
PANELS = {
    "pass_at_1": (("eval/pass_at_1",), "avg@n pass@1 (T = 1.0)", "pass@1 on held-out problems"),
    "teacher_kl": (("eval/teacher_kl",), "KL(student || teacher) per token", "teacher-KL on fresh samples"),
    "loss": (("loss",), "loss per completion token", "training loss"),
    "behavior": (("eps", "rollout/mean_beta"), "value", "behavior: budget eps, mean beta"),
}


def plot_learning_curves(runs: dict[str, Path], path: Path, title: str,
                         panels: tuple[str, ...] = ("pass_at_1", "teacher_kl")) -> None:
    """Metrics over optimizer steps, one panel per entry of PANELS named in `panels`, one line per run (and metric:
    the behavior panel draws eps and mean beta). A metric a run never logged leaves no line."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        keys, ylabel, panel_title = PANELS[panel]
        for name, run in runs.items():
            records = read_metrics(run)
            for key in keys:
                steps, values = series(records, key)
                if steps:
                    label = name if len(keys) == 1 else f"{name} {key.removeprefix('rollout/')}"
                    ax.plot(steps, values, marker="o" if key.startswith("eval/") else None, markersize=3,
                            label=label)
        ax.set(xlabel="optimizer step", ylabel=ylabel, title=panel_title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_run_report(run: Path, label: str, title: str, description: str) -> None:
    """run/report.md (the summary table, the figure, the final evaluation) and run/learning_curves.png (pass@1,
    loss, teacher-KL, eps / beta) of one training run, from its metrics.jsonl; `label` (the method) names the run in
    the table and the legends."""
    run = Path(run)
    plot_learning_curves({label: run}, run / "learning_curves.png", title,
                         panels=("pass_at_1", "loss", "teacher_kl", "behavior"))
    row = summary_row(run)
    lines = [f"# {title}", "", description, ""]
    if row:
        lines += [markdown_table({label: row}), ""]
    lines += ["![learning curves](learning_curves.png)", ""]
    (run / "report.md").write_text("\n".join(lines))
