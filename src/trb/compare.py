"""`trb compare`: methods x seeds, then a table with confidence intervals and paired differences against OPD.

    trb compare CONFIG --methods opd trb skd:top_k=25 "trb:eps0=0.005|0.02,horizon=15|50" --seeds 0 1 2 3 4

A method spec is `name` or `name:key=value,...`; `a|b` in a value expands into one variant per choice (a grid).
Each (variant, seed) is an ordinary `trb train` run in OUT/runs/<variant>/seed_<s>, so an interrupted comparison
resumes where it stopped (finished runs are kept, unfinished ones resume from their last checkpoint).

Per variant and seed: the paper's best-checkpoint pass@1 (max over evaluations), the final pass@1, and the area under
the pass@1 curve (its average height over training). Across seeds: mean and 95% t-interval; against the baseline:
the mean paired difference (same seed) with a 95% percentile-bootstrap interval.
"""

from __future__ import annotations

import csv
import itertools
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trb.config import ConfigError, load_config
from trb.report import plt, read_metrics, series
from trb.stats import area_under_curve, mean_ci, paired_bootstrap

METRICS = ("best", "final", "auc")


@dataclass(frozen=True)
class Variant:
    label: str  # e.g. trb(eps0=0.02,horizon=50)
    overrides: tuple[str, ...]

    @property
    def slug(self) -> str:
        return self.label.replace("(", "_").replace(")", "").replace(",", "_").replace("=", "-")


def parse_variants(spec: str) -> list[Variant]:
    """'name' or 'name:key=v1|v2,key2=w' -> one Variant per combination of choices."""
    name, _, params = spec.partition(":")
    if not name:
        raise ConfigError(f"method spec {spec!r} has no method name")
    choices = []
    for item in filter(None, params.split(",")):
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise ConfigError(f"method spec {spec!r}: {item!r} is not key=value")
        choices.append([(key, v) for v in values.split("|")])
    variants = []
    for combo in itertools.product(*choices) if choices else [()]:
        label = name + (f"({','.join(f'{k}={v}' for k, v in combo)})" if combo else "")
        variants.append(Variant(label, (f"method.name={name}", *(f"method.{k}={v}" for k, v in combo))))
    return variants


def _run_one(config: str, variant: Variant, seed: int, folder: Path, overrides: list[str], threads: int) -> int:
    """One training run as a subprocess (resuming it if a previous attempt stopped part way)."""
    if (folder / "summary.json").exists():
        return 0
    resume = ["resume=true"] if (folder / "config.yaml").exists() else []
    command = [sys.executable, "-m", "trb", "train", config, *overrides, *variant.overrides, f"seed={seed}",
               f"out_dir={folder}", *resume]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"seed_{seed}.log", "a") as log:
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def run_summary(run: Path) -> dict:
    records = read_metrics(run)
    steps, pass1 = series(records, "eval/pass_at_1")
    _, step_time = series(records, "time/step_s")
    return {"best": max(pass1), "final": pass1[-1], "auc": area_under_curve(steps, pass1),
            "minutes": sum(step_time) / 60}


def aggregate(runs: dict[str, dict[int, Path]], baseline: str | None) -> list[dict]:
    """One row per variant: mean and CI of each metric over seeds, paired difference against the baseline."""
    per_run = {label: {seed: run_summary(path) for seed, path in seeds.items()} for label, seeds in runs.items()}
    rows = []
    for label, by_seed in per_run.items():
        row = {"method": label, "seeds": len(by_seed),
               "minutes": float(np.mean([r["minutes"] for r in by_seed.values()]))}
        for metric in METRICS:
            row[metric] = mean_ci([r[metric] for r in by_seed.values()])
            if baseline is not None and label != baseline and baseline in per_run:
                common = sorted(set(by_seed) & set(per_run[baseline]))
                if common:
                    row[f"diff_{metric}"] = paired_bootstrap([by_seed[s][metric] for s in common],
                                                             [per_run[baseline][s][metric] for s in common])
        rows.append(row)
    return rows


def _fmt(triple) -> str:
    mean, low, high = triple
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def _fmt_diff(triple) -> str:
    mean, low, high = triple
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"


def markdown(rows: list[dict], baseline: str | None) -> str:
    head = ["method", "seeds", "best pass@1", "final pass@1", "AUC pass@1"]
    if baseline:
        head += [f"best - {baseline}", f"final - {baseline}", f"AUC - {baseline}"]
    head.append("train min/run")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["method"], str(row["seeds"])] + [_fmt(row[m]) for m in METRICS]
        if baseline:
            cells += [_fmt_diff(row[f"diff_{m}"]) if f"diff_{m}" in row else "-" for m in METRICS]
        cells.append(f"{row['minutes']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    fields = ["method", "seeds", "minutes"]
    for metric in METRICS:
        fields += [f"{metric}_mean", f"{metric}_low", f"{metric}_high"]
        fields += [f"diff_{metric}_mean", f"diff_{metric}_low", f"diff_{metric}_high"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            flat = {"method": row["method"], "seeds": row["seeds"], "minutes": f"{row['minutes']:.3f}"}
            for key in [m for m in METRICS] + [f"diff_{m}" for m in METRICS]:
                if key in row:
                    flat.update({f"{key}_mean": row[key][0], f"{key}_low": row[key][1], f"{key}_high": row[key][2]})
            writer.writerow(flat)


def _mean_curve(paths: list[Path], key: str) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
    """Mean and 95% t-interval across runs of one metric at the steps all runs share."""
    curves = [dict(zip(*series(read_metrics(p), key))) for p in paths]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    values = np.array([[c[s] for s in steps] for c in curves])  # (runs, steps)
    stats = [mean_ci(values[:, j].tolist()) for j in range(len(steps))]
    return steps, *(np.array([s[i] for s in stats]) for i in range(3))


def plot_curves(runs: dict[str, dict[int, Path]], path: Path, title: str) -> None:
    """pass@1 over training, mean over seeds with a 95% band, one line per variant."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for label, seeds in runs.items():
        steps, mean, low, high = _mean_curve(list(seeds.values()), "eval/pass_at_1")
        ax.plot(steps, mean, label=f"{label} (n={len(seeds)})")
        ax.fill_between(steps, low, high, alpha=0.15)
    ax.set(xlabel="optimizer step", ylabel="avg@n pass@1 (T = 1.0)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


DIAGNOSTICS = (("eps", "eps"), ("rollout/mean_beta", "mean beta"), ("rollout/frac_beta_one", "fraction beta = 1"),
               ("rollout/realized_kl", "realized KL(mu || pi_S)"), ("teacher_entropy", "teacher entropy, visited prefixes"),
               ("teacher_kl", "teacher-KL of rollouts"))


def plot_diagnostics(runs: dict[str, dict[int, Path]], path: Path, title: str) -> None:
    """Behavior diagnostics over steps (mean over seeds): eps, beta, realized KL, teacher entropy and KL."""
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    colors = {label: plt.cm.tab10(i % 10) for i, label in enumerate(runs)}  # one color per method in every panel
    for ax, (key, name) in zip(axes.flat, DIAGNOSTICS):
        for label, seeds in runs.items():
            steps, mean, _, _ = _mean_curve(list(seeds.values()), key)
            if len(steps):
                ax.plot(steps, mean, label=label, linewidth=1, color=colors[label])
        ax.set(xlabel="optimizer step", title=name)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=colors[label], label=label) for label in runs]
    fig.legend(handles=handles, loc="lower center", ncol=min(5, len(handles)), fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def grid(rows: list[dict], metric: str = "best") -> tuple[str, str, list[str], str, list[str], dict] | None:
    """The two-parameter grid of one method among the rows (e.g. trb over eps0 x horizon), if there is one:
    (method, key_a, values_a, key_b, values_b, {(a, b): row}); values in the order they first appear."""
    by_method: dict[str, list[tuple[dict[str, str], dict]]] = {}
    for row in rows:
        name, _, params = row["method"].partition("(")
        if params:
            by_method.setdefault(name, []).append(
                (dict(item.split("=", 1) for item in params.rstrip(")").split(",")), row))
    for name, cells in by_method.items():
        keys = list(cells[0][0])
        if len(keys) != 2 or any(list(p) != keys for p, _ in cells):
            continue
        values = [list(dict.fromkeys(p[k] for p, _ in cells)) for k in keys]
        if min(len(v) for v in values) >= 2:
            return name, keys[0], values[0], keys[1], values[1], {(p[keys[0]], p[keys[1]]): r for p, r in cells}
    return None


def plot_grid(rows: list[dict], baseline: str | None, path: Path, title: str) -> bool:
    """Heat map of a method's two-parameter grid: best-checkpoint pass@1 (mean over seeds), and its paired
    difference against the baseline in each cell. Returns False (and draws nothing) without such a grid."""
    found = grid(rows)
    if found is None:
        return False
    name, key_a, values_a, key_b, values_b, cells = found
    use_diff = baseline is not None and all("diff_best" in r for r in cells.values())
    matrix = np.full((len(values_a), len(values_b)), np.nan)  # (a, b)
    for (a, b), row in cells.items():
        matrix[values_a.index(a), values_b.index(b)] = row["diff_best" if use_diff else "best"][0]
    fig, ax = plt.subplots(figsize=(1.3 * len(values_b) + 2.5, 0.6 * len(values_a) + 1.8))
    limit = np.nanmax(np.abs(matrix)) if use_diff else None
    image = ax.imshow(matrix, cmap="RdBu" if use_diff else "viridis", vmin=-limit if use_diff else None, vmax=limit)
    for (i, j), value in np.ndenumerate(matrix):
        if not np.isnan(value):
            best = cells[(values_a[i], values_b[j])]["best"][0]
            dark = use_diff and abs(value) > 0.6 * limit
            ax.text(j, i, f"{best:.3f}\n({value:+.3f})" if use_diff else f"{best:.3f}", ha="center", va="center",
                    fontsize=8, color="white" if dark else "black")
    ax.set(xticks=range(len(values_b)), xticklabels=values_b, yticks=range(len(values_a)), yticklabels=values_a,
           xlabel=key_b, ylabel=key_a, title=title)
    fig.colorbar(image, ax=ax, label=f"best pass@1 - {baseline}" if use_diff else "best pass@1")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run_compare(config: str, specs: list[str], seeds: list[int], out: Path, jobs: int, overrides: list[str],
                baseline: str | None = "opd", log=print, threads: int | None = None) -> list[dict]:
    """threads: torch threads of each run (default: the machine's cores divided among the parallel runs)."""
    variants = [v for spec in specs for v in parse_variants(spec)]
    labels = [v.label for v in variants]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"methods repeat: {labels}")
    for variant in variants:  # every config must validate before anything runs
        load_config(config, [*overrides, *variant.overrides, f"out_dir={out}/check"])
    baseline = baseline if baseline in labels else None
    runs = {v.label: {s: out / "runs" / v.slug / f"seed_{s}" for s in seeds} for v in variants}
    plan = [(v, s) for s in seeds for v in variants]  # seeds outermost: partial results cover every method
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    log(f"trb compare: {len(variants)} variants x {len(seeds)} seeds = {len(plan)} runs, {jobs} at a time "
        f"({threads} thread(s) each), output in {out}")
    started, finished = time.monotonic(), 0

    def work(item):
        variant, seed = item
        t0 = time.monotonic()
        code = _run_one(config, variant, seed, runs[variant.label][seed], overrides, threads)
        return variant, seed, code, time.monotonic() - t0

    failures = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for variant, seed, code, seconds in pool.map(work, plan):
            finished += 1
            if code != 0:
                failures.append(f"{variant.label} seed {seed}")
                log(f"[{finished}/{len(plan)}] {variant.label} seed {seed}: FAILED (see its log)")
                continue
            summary = run_summary(runs[variant.label][seed])
            log(f"[{finished}/{len(plan)}] {variant.label} seed {seed}: best {summary['best']:.3f} final "
                f"{summary['final']:.3f} ({seconds:.0f} s, {time.monotonic() - started:.0f} s elapsed)")
    if failures:
        raise RuntimeError(f"{len(failures)} runs failed: {', '.join(failures)}; rerun the same command to resume")
    return write_results(runs, out, baseline, title=Path(config).stem)


def write_results(runs: dict[str, dict[int, Path]], out: Path, baseline: str | None, title: str) -> list[dict]:
    rows = aggregate(runs, baseline)
    table = markdown(rows, baseline)
    write_csv(rows, out / "results.csv")
    plot_curves(runs, out / "learning_curves.png", f"{title}: pass@1, mean and 95% CI over seeds")
    plot_diagnostics(runs, out / "diagnostics.png", f"{title}: behavior diagnostics (mean over seeds)")
    has_grid = plot_grid(rows, baseline, out / "grid.png", f"{title}: best pass@1 (mean over seeds)")
    (out / "results.md").write_text(
        f"# {title}\n\n{table}\n\nMean [95% t-interval] over seeds; differences are paired by seed against "
        f"{baseline or 'no baseline'} with 95% bootstrap intervals.\n\n"
        + ("![grid](grid.png)\n\n" if has_grid else "")
        + "![learning curves](learning_curves.png)\n\n![diagnostics](diagnostics.png)\n"
    )
    return rows
