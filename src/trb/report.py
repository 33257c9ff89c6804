"""Reading run folders back: learning curves, summary rows, markdown tables and plots."""

from __future__ import annotations

import json
from pathlib import Path

from trb.records import read_text

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run: Path) -> list[dict]:
    """A run folder's metrics.jsonl, or a compact record's metrics.jsonl.gz (`trb.records`); [] without either."""
    path = Path(run) / "metrics.jsonl"
    if not path.exists() and not Path(f"{path}.gz").exists():
        return []
    return [json.loads(line) for line in read_text(path).splitlines()]


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


def plot_learning_curves(runs: dict[str, Path], path: Path, title: str) -> None:
    """pass@1 and the teacher-KL of fresh samples over optimizer steps, one line per run."""
    fig, (ax_pass, ax_kl) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, run in runs.items():
        records = read_metrics(run)
        ax_pass.plot(*series(records, "eval/pass_at_1"), marker="o", markersize=3, label=name)
        ax_kl.plot(*series(records, "eval/teacher_kl"), marker="o", markersize=3, label=name)
    ax_pass.set(xlabel="optimizer step", ylabel="avg@n pass@1 (T = 1.0)", title="pass@1 on held-out problems")
    ax_kl.set(xlabel="optimizer step", ylabel="KL(student || teacher) per token", title="teacher-KL on fresh samples")
    for ax in (ax_pass, ax_kl):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
