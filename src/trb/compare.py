"""`trb compare`: methods x seeds, then a table with confidence intervals and paired differences against OPD.

    trb compare CONFIG --methods opd trb skd:top_k=25 "trb:eps0=0.005|0.02,horizon=15|50" --seeds 0 1 2 3 4

A method spec is `name` or `name:key=value,...`; `a|b` in a value expands into one variant per choice (a grid).
Each (variant, seed) is an ordinary `trb train` run in OUT/runs/<variant>/seed_<s>, so an interrupted comparison
resumes where it stopped (finished runs are kept, unfinished ones resume from their last checkpoint).

Per variant and seed, all on the test problems: pass@1 at the checkpoint with the best validation pass@1 (the
reported checkpoint), the final pass@1, the area under the pass@1 curve (its average height over training), and,
labelled as such, the paper's rule, the maximum over the test evaluations. Across seeds: mean and 95% t-interval
(clipped to [0, 1]; the seeds' values instead with fewer than 3 seeds); against the baseline: the mean paired
difference (same seed), a t-interval and a paired t-test, Holm-adjusted across the table (`trb.stats`).

OUT/plan.json names the variants and seeds; with the runs' compact records (`trb.records`) it is all that
`trb tables OUT` needs to rebuild the tables and plots, as `studies/collect.sh` does from `results/`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from trb.config import ConfigError, Variant, check_variants
from trb.report import plt, read_metrics, series
from trb.stats import MIN_INTERVAL, Estimate, area_under_curve, holm, mean_ci, paired_difference

METRICS = ("selected", "final", "auc", "best")
METRIC_NAMES = {"selected": "pass@1 at val-best step", "final": "final pass@1", "auc": "AUC pass@1",
                "best": "max over test evals (paper)"}


def _run_one(config: str, variant: Variant, seed: int, folder: Path, overrides: list[str], threads: int) -> int:
    """One training run as a subprocess (resuming it if a previous attempt stopped part way); a finished run (its
    summary.json, or the compact record `studies/collect.sh` keeps) is not trained again."""
    if finished(folder):
        return 0
    resume = ["resume=true"] if (folder / "config.yaml").exists() else []
    command = [sys.executable, "-m", "trb", "train", config, *overrides, *variant.overrides, f"seed={seed}",
               f"out_dir={folder}", *resume]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"seed_{seed}.log", "a") as log:
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def run_summary(run: Path, until_step: int | None = None) -> dict:
    """One run's numbers, all on the test problems: `selected`, the test pass@1 at the step with the best validation
    pass@1 (the earliest on ties; nan for a run without validation); `final`; `auc`, the curve's average height;
    `best`, the maximum over the test evaluations (the paper's rule, biased upward by evaluation noise); and
    `val_best`, the best validation pass@1 itself, by which runs and grid cells are chosen (`best_by_validation`).
    until_step: the run as if it had stopped there (its evaluations and steps up to until_step; `final` is the last
    evaluation at or before it), so runs of a longer study can be compared with shorter ones."""
    records = read_metrics(run, until_step)
    steps, pass1 = series(records, "eval/pass_at_1")
    val_steps, val_pass1 = series(records, "val/pass_at_1")
    _, step_time = series(records, "time/step_s")
    selected, selected_step, val_best = float("nan"), None, float("nan")
    if val_pass1:
        val_best = max(val_pass1)
        selected_step = val_steps[val_pass1.index(max(val_pass1))]
        selected = dict(zip(steps, pass1))[selected_step]
    return {"selected": selected, "selected_step": selected_step, "final": pass1[-1],
            "auc": area_under_curve(steps, pass1), "best": max(pass1), "val_best": val_best,
            "minutes": sum(step_time) / 60}


def aggregate(runs: dict[str, dict[int, Path]], baseline: str | None, until_step: int | None = None) -> list[dict]:
    """One row per variant: mean over seeds of each metric (a t-interval from MIN_INTERVAL seeds on, clipped to
    [0, 1]), and the paired difference (same seed) against the baseline with a t-interval and p-value; the p-values
    of the whole table are Holm-adjusted together. until_step: every run cut there (`run_summary`)."""
    per_run = {label: {seed: run_summary(path, until_step) for seed, path in seeds.items()}
               for label, seeds in runs.items()}
    rows = []
    for label, by_seed in per_run.items():
        row = {"method": label, "seeds": sorted(by_seed),
               "minutes": float(np.mean([r["minutes"] for r in by_seed.values()])),
               "val_best": float(np.mean([r["val_best"] for r in by_seed.values()]))}
        for metric in METRICS:
            values = [by_seed[s][metric] for s in sorted(by_seed)]
            if any(math.isnan(v) for v in values):
                continue
            row[metric] = mean_ci(values, bounds=(0.0, 1.0))
            if baseline is not None and label != baseline and baseline in per_run:
                common = sorted(set(by_seed) & set(per_run[baseline]))
                if common and not any(math.isnan(per_run[baseline][s][metric]) for s in common):
                    row[f"diff_{metric}"] = paired_difference([by_seed[s][metric] for s in common],
                                                              [per_run[baseline][s][metric] for s in common])
        rows.append(row)
    keys = [(i, key) for i, row in enumerate(rows) for key in row if key.startswith("diff_")]
    adjusted = holm([rows[i][key].p for i, key in keys])
    for (i, key), p_holm in zip(keys, adjusted):
        rows[i][key] = rows[i][key]._replace(p_holm=p_holm)
    return rows


def format_estimate(estimate: Estimate, sign: str = "") -> str:
    """mean [low, high], or mean (the values) where there are too few for an interval."""
    mean = f"{estimate.mean:{sign}.3f}"
    if not estimate.has_interval:  # too few seeds for an interval: the seeds themselves
        return f"{mean} ({', '.join(f'{v:{sign}.3f}' for v in estimate.values)})"
    return f"{mean} [{estimate.low:{sign}.3f}, {estimate.high:{sign}.3f}]"


def format_difference(estimate: Estimate) -> str:
    """A paired difference, signed, with its Holm-adjusted p-value once `holm` has run."""
    text = format_estimate(estimate, "+")
    return text if math.isnan(estimate.p_holm) else f"{text} p_Holm={estimate.p_holm:.2g}"


def markdown(rows: list[dict], baseline: str | None) -> str:
    metrics = [m for m in METRICS if any(m in row for row in rows)]
    head = ["method", "seeds"] + [METRIC_NAMES[m] for m in metrics]
    if baseline:
        head += [f"{METRIC_NAMES[m]} - {baseline}" for m in metrics]
    head.append("train min/run")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["method"], str(len(row["seeds"]))]
        cells += [format_estimate(row[m]) if m in row else "-" for m in metrics]
        if baseline:
            cells += [format_difference(row[f"diff_{m}"]) if f"diff_{m}" in row else "-" for m in metrics]
        cells.append(f"{row['minutes']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def legend(rows: list[dict], baseline: str | None, until_step: int | None = None) -> str:
    """What a table's numbers are: seeds, selection rule, intervals, pairing and correction."""
    seeds = sorted({len(row["seeds"]) for row in rows})
    comparisons = sum(key.startswith("diff_") for row in rows for key in row)
    tested = sum(not math.isnan(row[key].p) for row in rows for key in row if key.startswith("diff_"))
    text = [
        f"Seeds per method: {', '.join(map(str, seeds))} (column `seeds`). pass@1 on the test problems. "
        f"{METRIC_NAMES['selected']}: the checkpoint whose pass@1 on the validation problems (disjoint from train "
        f"and test) is highest, scored on test; {METRIC_NAMES['best']}: the paper's rule, the maximum over the same "
        "test problems evaluated at every checkpoint (biased upward, kept for comparison with the paper).",
        f"Mean over seeds with a 95% Student-t interval clipped to [0, 1]; with fewer than {MIN_INTERVAL} seeds the "
        "seeds' values in parentheses instead of an interval.",
    ]
    if until_step is not None:
        text.append(f"Every run is scored on its evaluations and steps up to step {until_step} (longer runs as if they "
                    f"had stopped there); the final pass@1 is the last evaluation at or before step {until_step}.")
    if baseline and comparisons:
        text.append(
            f"Differences: paired by seed against {baseline} (every row against the same {baseline} runs, so the "
            f"comparisons are not independent), 95% t-intervals; p_Holm: two-sided paired t-test, Holm-adjusted across "
            f"the table's {tested} tested comparisons"
            + (f" (the {comparisons - tested} with fewer than {MIN_INTERVAL} seeds show per-seed differences and "
               "are not tested)." if tested < comparisons else ".")
        )
    return "\n\n".join(text)


def write_csv(rows: list[dict], path: Path) -> None:
    fields = ["method", "seeds", "minutes", "val_best_mean"]
    for metric in METRICS:
        fields += [f"{metric}_mean", f"{metric}_low", f"{metric}_high", f"{metric}_values"]
        fields += [f"diff_{metric}_mean", f"diff_{metric}_low", f"diff_{metric}_high", f"diff_{metric}_values",
                   f"diff_{metric}_p", f"diff_{metric}_p_holm"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            flat = {"method": row["method"], "seeds": " ".join(map(str, row["seeds"])),
                    "minutes": f"{row['minutes']:.3f}", "val_best_mean": row["val_best"]}
            for key in [m for m in METRICS] + [f"diff_{m}" for m in METRICS]:
                if key in row:
                    e = row[key]
                    flat.update({f"{key}_mean": e.mean, f"{key}_low": e.low, f"{key}_high": e.high,
                                 f"{key}_values": " ".join(repr(v) for v in e.values)})
                    if key.startswith("diff_"):
                        flat.update({f"{key}_p": e.p, f"{key}_p_holm": e.p_holm})
            writer.writerow(flat)


def best_by_validation(results_csv: Path, method: str) -> str:
    """The label of `method`'s variant (e.g. the best cell of a trb eps0 x horizon grid) with the highest mean best
    validation pass@1 in a comparison's results.csv: chosen without looking at the test problems."""
    with open(results_csv) as f:
        rows = [r for r in csv.DictReader(f) if r["method"].partition("(")[0] == method]
    rows = [r for r in rows if not math.isnan(float(r["val_best_mean"]))]
    if not rows:
        raise ConfigError(f"{results_csv} has no {method} variant with validation evaluations")
    return max(rows, key=lambda r: float(r["val_best_mean"]))["method"]


def _curves(paths: list[Path], key: str, until_step: int | None = None) -> tuple[list[int], np.ndarray]:
    """One metric of several runs at the steps all runs share (up to until_step): (steps, values (runs, steps))."""
    curves = [dict(zip(*series(read_metrics(p, until_step), key))) for p in paths]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return steps, np.array([[c[s] for s in steps] for c in curves])  # (runs, steps)


def plot_curves(runs: dict[str, dict[int, Path]], path: Path, title: str, until_step: int | None = None) -> None:
    """Test pass@1 over training, one color per variant: the mean over seeds with a 95% band (clipped to [0, 1]);
    with fewer than MIN_INTERVAL seeds each seed's curve instead of a band."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, (label, seeds) in enumerate(runs.items()):
        color = plt.cm.tab10(i % 10)
        steps, values = _curves(list(seeds.values()), "eval/pass_at_1", until_step)
        ax.plot(steps, values.mean(0), color=color, label=f"{label} (n={len(seeds)})")
        if len(seeds) >= MIN_INTERVAL:
            bands = [mean_ci(values[:, j].tolist(), bounds=(0.0, 1.0)) for j in range(len(steps))]
            ax.fill_between(steps, [b.low for b in bands], [b.high for b in bands], color=color, alpha=0.15)
        else:
            for curve in values:
                ax.plot(steps, curve, color=color, linewidth=0.6, alpha=0.5)
    ax.set(xlabel="optimizer step", ylabel="avg@n pass@1 on test (T = 1.0)", title=title, ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


DIAGNOSTICS = (("eps", "eps"), ("rollout/mean_beta", "mean beta"), ("rollout/frac_beta_one", "fraction beta = 1"),
               ("rollout/realized_kl", "realized KL(mu || pi_S)"), ("teacher_entropy", "teacher entropy, visited prefixes"),
               ("teacher_kl", "teacher-KL of rollouts"))


def plot_diagnostics(runs: dict[str, dict[int, Path]], path: Path, title: str, until_step: int | None = None) -> None:
    """Behavior diagnostics over steps (mean over seeds): eps, beta, realized KL, teacher entropy and KL."""
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    colors = {label: plt.cm.tab10(i % 10) for i, label in enumerate(runs)}  # one color per method in every panel
    for ax, (key, name) in zip(axes.flat, DIAGNOSTICS):
        for label, seeds in runs.items():
            steps, values = _curves(list(seeds.values()), key, until_step)
            if len(steps):
                ax.plot(steps, values.mean(0), label=label, linewidth=1, color=colors[label])
        ax.set(xlabel="optimizer step", title=name)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=colors[label], label=label) for label in runs]
    fig.legend(handles=handles, loc="lower center", ncol=min(5, len(handles)), fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def grid(rows: list[dict]) -> tuple[str, str, list[str], str, list[str], dict] | None:
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
    """Heat map of a method's two-parameter grid: the reported pass@1 (at the validation-best step; the paper's
    max over test evaluations for runs without validation), mean over seeds, and its paired difference against the
    baseline in each cell. Returns False (and draws nothing) without such a grid."""
    found = grid(rows)
    if found is None:
        return False
    name, key_a, values_a, key_b, values_b, cells = found
    metric = "selected" if all("selected" in r for r in cells.values()) else "best"
    use_diff = baseline is not None and all(f"diff_{metric}" in r for r in cells.values())
    matrix = np.full((len(values_a), len(values_b)), np.nan)  # (a, b)
    for (a, b), row in cells.items():
        matrix[values_a.index(a), values_b.index(b)] = row[f"diff_{metric}" if use_diff else metric][0]
    fig, ax = plt.subplots(figsize=(1.3 * len(values_b) + 2.5, 0.6 * len(values_a) + 1.8))
    limit = np.nanmax(np.abs(matrix)) if use_diff else None
    image = ax.imshow(matrix, cmap="RdBu" if use_diff else "viridis", vmin=-limit if use_diff else None, vmax=limit)
    for (i, j), value in np.ndenumerate(matrix):
        if not np.isnan(value):
            best = cells[(values_a[i], values_b[j])][metric][0]
            dark = use_diff and abs(value) > 0.6 * limit
            ax.text(j, i, f"{best:.3f}\n({value:+.3f})" if use_diff else f"{best:.3f}", ha="center", va="center",
                    fontsize=8, color="white" if dark else "black")
    ax.set(xticks=range(len(values_b)), xticklabels=values_b, yticks=range(len(values_a)), yticklabels=values_a,
           xlabel=key_b, ylabel=key_a, title=title)
    ax.set_title(f"{title}\n{METRIC_NAMES[metric]}", fontsize=9)
    fig.colorbar(image, ax=ax, label=f"difference from {baseline}" if use_diff else METRIC_NAMES[metric])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run_compare(config: str, specs: list[str], seeds: list[int], out: Path, jobs: int, overrides: list[str],
                baseline: str | None = "opd", log=print, threads: int | None = None,
                until_step: int | None = None) -> list[dict]:
    """threads: torch threads of each run (default: the machine's cores divided among the parallel runs).
    until_step: score every run up to this step (e.g. runs linked from a longer study beside runs of steps=N)."""
    variants = check_variants(config, specs, overrides, out)  # every config validates before anything runs
    labels = [v.label for v in variants]
    baseline = baseline if baseline in labels else None
    runs = {v.label: {s: out / "runs" / v.slug / f"seed_{s}" for s in seeds} for v in variants}
    out.mkdir(parents=True, exist_ok=True)
    described = {"title": Path(config).stem, "baseline": baseline, "seeds": seeds,
                 "variants": [[v.label, v.slug] for v in variants]}
    if until_step is not None:
        described["until_step"] = until_step
    (out / "plan.json").write_text(json.dumps(described, indent=1) + "\n")
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
            summary = run_summary(runs[variant.label][seed], until_step)
            log(f"[{finished}/{len(plan)}] {variant.label} seed {seed}: at val-best {summary['selected']:.3f} "
                f"final {summary['final']:.3f} ({seconds:.0f} s, {time.monotonic() - started:.0f} s elapsed)")
    if failures:
        raise RuntimeError(f"{len(failures)} runs failed: {', '.join(failures)}; rerun the same command to resume")
    return write_results(runs, out, baseline, title=Path(config).stem, until_step=until_step)


def write_results(runs: dict[str, dict[int, Path]], out: Path, baseline: str | None, title: str,
                  until_step: int | None = None) -> list[dict]:
    rows = aggregate(runs, baseline, until_step)
    table = markdown(rows, baseline)
    write_csv(rows, out / "results.csv")
    cut = f", up to step {until_step}" if until_step is not None else ""
    plot_curves(runs, out / "learning_curves.png",
                textwrap.fill(f"{title}: test pass@1, mean over seeds (95% band; each seed below 3){cut}", 80),
                until_step)
    plot_diagnostics(runs, out / "diagnostics.png",
                     textwrap.fill(f"{title}: behavior diagnostics (mean over seeds){cut}", 100), until_step)
    has_grid = plot_grid(rows, baseline, out / "grid.png", textwrap.fill(f"{title}: mean over seeds", 60))
    (out / "results.md").write_text(
        f"# {title}\n\n{table}\n\n{legend(rows, baseline, until_step)}\n\n"
        + ("![grid](grid.png)\n\n" if has_grid else "")
        + "![learning curves](learning_curves.png)\n\n![diagnostics](diagnostics.png)\n"
    )
    return rows


def finished(run: Path) -> bool:
    """Whether a run completed: its folder's summary.json (written last by `trb train`), or a compact record
    (`studies/collect.sh` copies records only of completed runs)."""
    return (run / "summary.json").is_file() or (run / "metrics.jsonl.gz").is_file()


def read_plan(out: Path) -> tuple[dict, dict[str, dict[int, Path]], list[int]]:
    """A comparison's plan.json, its run folders (variant label -> seed -> folder, every planned seed) and the seeds
    every variant has finished."""
    plan_path = out / "plan.json"
    if not plan_path.is_file():
        raise ConfigError(f"{str(out)!r} holds no plan.json: not the output folder of trb compare")
    plan = json.loads(plan_path.read_text())
    folders = {label: {s: out / "runs" / slug / f"seed_{s}" for s in plan["seeds"]} for label, slug in plan["variants"]}
    done = [s for s in plan["seeds"] if all(finished(seeds[s]) for seeds in folders.values())]
    return plan, folders, done


def rebuild_results(out: Path, finished_seeds: bool = False) -> list[dict]:
    """The tables and plots of a comparison from OUT/plan.json and the runs' data alone (run folders, or the compact
    records `studies/collect.sh` keeps in results/), without training anything.

    A study still running has unfinished runs (partial curves) and runs not started. By default that is an error;
    with finished_seeds the tables use the seeds every variant has finished, and their title says how many of the
    planned seeds that is."""
    plan, folders, done = read_plan(out)
    planned = plan["seeds"]
    title = plan["title"]
    if len(done) < len(planned):
        missing = [str(seeds[s]) for seeds in folders.values() for s in planned if not finished(seeds[s])]
        if not finished_seeds:
            raise ConfigError(f"{len(missing)} runs are not finished, e.g. {missing[0]}; finish them with trb compare, "
                              f"or build the tables from the finished seeds with --finished-seeds")
        if not done:
            raise ConfigError(f"{str(out)!r}: no seed is finished by every variant ({len(missing)} runs unfinished)")
        title = f"{title} ({len(done)} of {len(planned)} planned seeds finished: {' '.join(map(str, done))})"
    runs = {label: {s: seeds[s] for s in done} for label, seeds in folders.items()}
    return write_results(runs, out, plan["baseline"], title, plan.get("until_step"))
