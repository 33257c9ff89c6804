"""Statistics of the comparison tables against hand-computed values, checkpoint selection by validation on hand-made
curves, and the tables rebuilt from committed per-run data alone (studies/collect.sh), identically."""

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trb.compare import aggregate, markdown, rebuild_results, run_summary
from trb.probe import probe_stats, probe_table
from trb.records import write_gzip
from trb.stats import holm, mean_ci, paired_difference

ROOT = Path(__file__).resolve().parents[1]


def test_interval_of_a_pass_at_1_is_clipped_to_the_unit_interval():
    # 0.95, 0.99, 1.0: mean 0.98, sd 0.026458, t(0.975, 2) = 4.302653 -> [0.9143, 1.0457] before clipping
    estimate = mean_ci([0.95, 0.99, 1.0], bounds=(0.0, 1.0))
    assert estimate.mean == pytest.approx(0.98)
    assert estimate.low == pytest.approx(0.98 - 4.302653 * 0.0264575 / math.sqrt(3), rel=1e-5)
    assert estimate.high == 1.0


def test_two_seeds_show_the_seeds_not_an_interval():
    """Regression: a 2-seed comparison printed a final pass@1 interval of [0.166, 1.252] (a t-interval with one
    degree of freedom). Fewer than 3 seeds now give no interval; the table shows the seeds' values."""
    estimate = mean_ci([0.55, 0.869])
    assert not estimate.has_interval and estimate.values == (0.55, 0.869)
    diff = paired_difference([0.6, 0.9], [0.5, 0.6])
    assert diff.mean == pytest.approx(0.2) and not diff.has_interval and math.isnan(diff.p)
    assert diff.values == pytest.approx((0.1, 0.3))


def test_paired_difference_by_hand():
    # differences 0.1, 0.2, 0.3: mean 0.2, sd 0.1, t = 0.2 / (0.1 / sqrt 3) = 2 sqrt 3 with 2 degrees of freedom,
    # whose two-sided p-value has the closed form 1 - t / sqrt(t^2 + 2)
    diff = paired_difference([0.6, 0.7, 0.8], [0.5, 0.5, 0.5])
    assert diff.mean == pytest.approx(0.2)
    assert diff.high - diff.mean == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-6)
    t = 2 * math.sqrt(3)
    assert diff.p == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-9)
    same = paired_difference([0.4, 0.5, 0.6], [0.4, 0.5, 0.6])
    assert (same.mean, same.low, same.high, same.p) == (0.0, 0.0, 0.0, 1.0)


def test_holm_by_hand():
    # tested: 0.005, 0.01, 0.03, 0.04 (m = 4) -> 4 x 0.005, 3 x 0.01, 2 x 0.03, max(0.06, 1 x 0.04); nan untested
    adjusted = holm([0.01, 0.04, 0.03, math.nan, 0.005])
    assert adjusted[:3] == pytest.approx([0.03, 0.06, 0.06]) and adjusted[4] == pytest.approx(0.02)
    assert math.isnan(adjusted[3])
    assert holm([0.6, 0.9]) == [1.0, 1.0]


def write_run(folder: Path, test: list[float], val: list[float] | None, gz: bool = False) -> Path:
    """A run's metrics with evaluations at steps 0, 10, 20, 30 (and a training line between them)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for k, step in enumerate((0, 10, 20, 30)):
        if step:
            lines.append({"step": step, "loss": 0.1, "time/step_s": 6.0, "teacher_kl": 0.2})
        lines.append({"step": step, "eval/pass_at_1": test[k], **({"val/pass_at_1": val[k]} if val else {})})
    text = "".join(json.dumps(line) + "\n" for line in lines)
    if gz:
        write_gzip(folder / "metrics.jsonl.gz", text)
    else:
        (folder / "metrics.jsonl").write_text(text)
    return folder


def test_the_reported_checkpoint_is_chosen_on_validation(tmp_path):
    # test-best step 10 (0.5), validation-best step 20 (0.6 there; test 0.4 at step 20)
    summary = run_summary(write_run(tmp_path / "a", [0.1, 0.5, 0.4, 0.45], [0.1, 0.3, 0.6, 0.5]))
    assert summary["selected_step"] == 20 and summary["selected"] == 0.4
    assert summary["best"] == 0.5 and summary["final"] == 0.45
    assert summary["auc"] == pytest.approx((0.3 + 0.45 + 0.425) * 10 / 30)
    # ties go to the earliest step; a run without validation has no selection
    assert run_summary(write_run(tmp_path / "b", [0.1, 0.5, 0.4, 0.45], [0.1, 0.6, 0.6, 0.2]))["selected"] == 0.5
    assert math.isnan(run_summary(write_run(tmp_path / "c", [0.1, 0.5, 0.4, 0.45], None))["selected"])


def test_a_run_cut_at_a_step_is_scored_as_if_it_had_stopped_there(tmp_path):
    # validation-best step 30 over the whole run, step 10 up to step 20; test-best 0.7 at step 30
    run = write_run(tmp_path / "a", [0.1, 0.5, 0.4, 0.7], [0.1, 0.5, 0.3, 0.6])
    whole, cut = run_summary(run), run_summary(run, until_step=20)
    assert (whole["selected_step"], whole["selected"], whole["final"], whole["best"]) == (30, 0.7, 0.7, 0.7)
    assert (cut["selected_step"], cut["selected"], cut["final"], cut["best"]) == (10, 0.5, 0.4, 0.5)
    assert cut["auc"] == pytest.approx((0.3 + 0.45) * 10 / 20)
    assert cut["minutes"] == pytest.approx(2 * 6.0 / 60) and whole["minutes"] == pytest.approx(3 * 6.0 / 60)
    # a run that ended at the cut scores the same as a longer one cut there (the linked runs of a study)
    short = write_run(tmp_path / "b", [0.1, 0.5, 0.4, 0.7], [0.1, 0.5, 0.3, 0.6])
    lines = (short / "metrics.jsonl").read_text().splitlines()
    (short / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= 20))
    assert run_summary(short) == cut


def test_a_comparison_cut_at_a_step_rebuilds_with_its_cut(tmp_path):
    from trb.compare import rebuild_results

    for label, test in (("opd", [0.1, 0.5, 0.4, 0.9]), ("trb", [0.1, 0.6, 0.5, 0.2])):
        for seed in range(3):
            write_run(tmp_path / "runs" / label / f"seed_{seed}", test, test)
            (tmp_path / "runs" / label / f"seed_{seed}" / "summary.json").write_text("{}")
    plan = {"title": "t", "baseline": "opd", "seeds": [0, 1, 2], "variants": [["opd", "opd"], ["trb", "trb"]]}
    (tmp_path / "plan.json").write_text(json.dumps({**plan, "until_step": 20}))
    opd, trb = rebuild_results(tmp_path)
    assert opd["final"].mean == pytest.approx(0.4) and trb["diff_selected"].mean == pytest.approx(0.1)
    assert "up to step 20" in (tmp_path / "results.md").read_text()
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    opd, trb = rebuild_results(tmp_path)
    assert opd["final"].mean == pytest.approx(0.9) and trb["diff_selected"].mean == pytest.approx(-0.3)


def test_compare_reports_the_validation_selected_score_beside_the_papers(tmp_path):
    runs = {"opd": {}, "trb": {}}
    for seed in range(3):
        # OPD: validation picks step 30 (test 0.42 + seed / 100); the test maximum is at step 10
        runs["opd"][seed] = write_run(tmp_path / f"opd{seed}", [0.1, 0.6, 0.4, 0.42 + seed / 100],
                                      [0.1, 0.2, 0.3, 0.5])
        # TRB: validation picks step 20 (test 0.45 + seed / 50); the test maximum is at step 10 again
        runs["trb"][seed] = write_run(tmp_path / f"trb{seed}", [0.1, 0.7, 0.45 + seed / 50, 0.3],
                                      [0.1, 0.2, 0.5, 0.3])
    rows = aggregate(runs, "opd")
    opd, trb = rows
    assert opd["selected"].values == pytest.approx((0.42, 0.43, 0.44))
    assert trb["selected"].values == pytest.approx((0.45, 0.47, 0.49))
    assert trb["best"].mean == pytest.approx(0.7) and opd["best"].mean == pytest.approx(0.6)
    assert trb["diff_selected"].values == pytest.approx((0.03, 0.04, 0.05))
    tested = [trb[f"diff_{m}"].p for m in ("selected", "final", "auc", "best")]
    assert [trb[f"diff_{m}"].p_holm for m in ("selected", "final", "auc", "best")] == pytest.approx(holm(tested))
    table = markdown(rows, "opd")
    assert "| pass@1 at val-best step |" in table and "max over test evals (paper)" in table
    assert "| trb | 3 | 0.470 [" in table


def test_grid_cells_are_chosen_on_validation(tmp_path):
    from trb.compare import best_by_validation, write_csv

    runs = {"opd": {s: write_run(tmp_path / f"o{s}", [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]) for s in range(3)}}
    # cell A: best on test (0.9), worse on validation (0.5); cell B: best on validation (0.6), test 0.45
    runs["trb(eps0=0.02,horizon=8)"] = {s: write_run(tmp_path / f"a{s}", [0.1, 0.9, 0.5, 0.5], [0.1, 0.5, 0.4, 0.4])
                                        for s in range(3)}
    runs["trb(eps0=0.05,horizon=8)"] = {s: write_run(tmp_path / f"b{s}", [0.1, 0.3, 0.45, 0.4], [0.1, 0.3, 0.6, 0.5])
                                        for s in range(3)}
    write_csv(aggregate(runs, "opd"), tmp_path / "results.csv")
    assert best_by_validation(tmp_path / "results.csv", "trb") == "trb(eps0=0.05,horizon=8)"


def test_probe_intervals_are_clustered_by_problem():
    rows = [{"behavior": "opd", "continuation": "teacher", "t": 4, "successes": 5, "trials": 8, "samples": 2,
             "per_problem": [0, 1, 2, 2]},
            {"behavior": "trb", "continuation": "teacher", "t": 4, "successes": 6, "trials": 8, "samples": 2,
             "per_problem": [1, 1, 2, 2]}]
    opd, trb = probe_stats(rows)
    # per-problem rates 0, 0.5, 1, 1: mean 0.625, sd 0.478714, t(0.975, 3) = 3.182446 -> clipped to [0, 1]
    assert opd["rate"] == pytest.approx(0.625) and (opd["low"], opd["high"]) == (0.0, 1.0)
    assert trb["diff"] == pytest.approx(0.125) and "diff" not in opd
    # differences 0.5, 0, 0, 0: sd 0.25, t = 0.125 / 0.125 = 1 with 3 degrees of freedom
    assert trb["diff_high"] - trb["diff"] == pytest.approx(3.182446 * 0.25 / 2, rel=1e-6)
    assert trb["p_holm"] == trb["p"]
    assert "4 problems x 2 rollouts" in probe_table([opd, trb])


def hand_made_study(root: Path, gz: bool) -> None:
    """A comparison (plan.json, 2 methods x 3 seeds with validation) and a probe, as trb compare / probe save them."""
    variants = [["opd", "opd"], ["trb(eps0=0.02,horizon=8)", "trb_eps0-0.02_horizon-8"]]
    methods = root / "arith" / "methods"
    methods.mkdir(parents=True)
    (methods / "plan.json").write_text(json.dumps({"title": "miniature_arith", "baseline": "opd", "seeds": [0, 1, 2],
                                                   "variants": variants}))
    for k, (_, slug) in enumerate(variants):
        for seed in range(3):
            folder = methods / "runs" / slug / f"seed_{seed}" / ("" if gz else "record")
            write_run(folder, [0.1, 0.5 + k / 10, 0.4 + seed / 20, 0.45], [0.1, 0.3, 0.6 - k / 5, 0.5], gz=True)
    probe = root / "arith" / "probe"
    probe.mkdir(parents=True)
    rows = [{"behavior": b, "continuation": c, "t": t, "successes": 0, "trials": 8, "samples": 2,
             "per_problem": [(t + i + len(b)) % 3 for i in range(4)]}
            for b in ("opd (student)", "trb (eps=0.02)") for c in ("teacher", "student") for t in (0, 8)]
    (probe / "probe.json").write_text(json.dumps({"title": "continuation probe (arith)", "rows": rows}))


def collect(out: Path, dest: Path) -> None:
    env = {**os.environ, "TRB": f"{sys.executable} -m trb", "PYTHON": sys.executable, "PYTHONPATH": str(ROOT / "src"),
           "OMP_NUM_THREADS": "1"}
    subprocess.run(["bash", str(ROOT / "studies" / "collect.sh"), str(out), str(dest)], check=True, env=env,
                   capture_output=True)


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_collect_rebuilds_every_table_from_the_per_run_data_identically(tmp_path):
    study, results = tmp_path / "study", tmp_path / "results"
    hand_made_study(study, gz=False)  # run folders keep their compact records in record/
    collect(study, results)
    first = digests(results)
    data = {"plan.json", "probe.json", "metrics.jsonl.gz"}
    assert {Path(name).name for name in first} == data | {"results.md", "results.csv", "learning_curves.png",
                                                          "diagnostics.png", "paired_curves.md", "probe.md",
                                                          "probe.png"}
    assert not any("record" in name for name in first), "records land in the seed folders"
    for name in first:
        if Path(name).name not in data:
            (results / name).unlink()
    collect(tmp_path / "absent", results)  # from results/ alone
    assert digests(results) == first
    # a study resumed from those records (each run folder a compact record, linked variants) collects the same data
    resumed = tmp_path / "resumed"
    shutil.copytree(results, resumed)
    for name in first:
        if Path(name).name not in data:
            (resumed / name).unlink()
    runs = resumed / "arith" / "methods" / "runs"
    runs.joinpath("opd").rename(tmp_path / "opd")
    runs.joinpath("opd").symlink_to(tmp_path / "opd")
    fresh = tmp_path / "fresh"
    collect(resumed, fresh)
    assert digests(fresh) == first
    assert "| trb(eps0=0.02,horizon=8) | 3 |" in (results / "arith" / "methods" / "results.md").read_text()


def test_collect_keeps_runs_that_parts_of_a_study_share_as_links(tmp_path):
    """A part linking another part's runs (as studies/regime.sh and miniature.sh do) gets the same link in the
    repository, not a second copy; its tables are those of a copy, and collecting again changes nothing."""
    study, results = tmp_path / "study", tmp_path / "results"
    hand_made_study(study, gz=False)
    methods, sweep = study / "arith" / "methods", study / "arith" / "sweep"
    (sweep / "runs").mkdir(parents=True)
    shutil.copy(methods / "plan.json", sweep / "plan.json")
    (sweep / "runs" / "opd").symlink_to("../../methods/runs/opd")  # a variant linked whole
    (sweep / "runs" / "trb_eps0-0.02_horizon-8").mkdir()
    for seed in range(3):  # and one linked seed by seed
        (sweep / "runs" / "trb_eps0-0.02_horizon-8" / f"seed_{seed}").symlink_to(
            f"../../../methods/runs/trb_eps0-0.02_horizon-8/seed_{seed}")
    (sweep / "runs" / "gone").symlink_to("../../methods/runs/never_ran")  # a target with no run: no link kept
    collect(study, results)
    kept = results / "arith" / "sweep" / "runs"
    assert os.readlink(kept / "opd") == "../../methods/runs/opd"
    seed_1 = kept / "trb_eps0-0.02_horizon-8" / "seed_1"
    assert os.readlink(seed_1) == "../../../methods/runs/trb_eps0-0.02_horizon-8/seed_1"
    assert not os.path.lexists(kept / "gone")
    data = list(results.rglob("metrics.jsonl.gz"))  # (rglob does not follow the links)
    assert len(data) == 6 and all("sweep" not in str(p.relative_to(results)) for p in data), "each run is kept once"
    table = (results / "arith" / "methods" / "results.md").read_text()
    assert (results / "arith" / "sweep" / "results.md").read_text() == table
    first = digests(results)
    collect(study, results)  # again, over its own links
    collect(tmp_path / "absent", results)  # and from results/ alone
    assert digests(results) == first and os.readlink(kept / "opd") == "../../methods/runs/opd"


def test_the_estimator_table_scores_the_exact_kl_runs_on_the_estimator_runs_steps(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("estimators", ROOT / "studies" / "estimators.py")
    estimators = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(estimators)
    variants = [["opd", "opd"], ["trb(eps0=0.02,horizon=50)", "trb_eps0-0.02_horizon-50"]]

    def part(folder: Path, test: list[float], steps: int, spread: float) -> None:
        folder.mkdir(parents=True)
        (folder / "plan.json").write_text(json.dumps({"title": "chain", "baseline": "opd", "seeds": [0, 1, 2],
                                                      "variants": variants}))
        for k, (_, slug) in enumerate(variants):
            for seed in range(3):
                run = write_run(folder / "runs" / slug / f"seed_{seed}", [v + k / 10 + seed * spread for v in test],
                                [v + k / 10 for v in test])
                lines = (run / "metrics.jsonl").read_text().splitlines()
                (run / "metrics.jsonl").write_text("".join(f"{line}\n" for line in lines
                                                           if json.loads(line)["step"] <= steps))
                (run / "summary.json").write_text("{}")

    # the exact KL's runs: 30 steps, best at step 30 (0.9), 0.4 at step 20; the estimators' runs end at step 20
    part(tmp_path / "main", [0.1, 0.3, 0.4, 0.9], 30, spread=0.01)
    part(tmp_path / "estimators" / "topk_student_weighted_kl", [0.1, 0.0, 0.0, 0.0], 20, spread=0.02)
    part(tmp_path / "estimators" / "topk_reverse_kl", [0.1, 0.2, 0.5, 0.0], 20, spread=0.02)
    estimators.main(tmp_path)
    table = capsys.readouterr().out
    assert table.startswith("# chain: the loss's estimator, 20 steps")
    scores = table.split("Teacher-KL per token")[0]  # the first table
    rows = {tuple(cells[:2]): cells for line in scores.splitlines() if line.startswith(("| opd", "| trb"))
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}
    assert rows[("opd", "reverse_kl")][3].startswith("0.410 [")  # final = step 20 (0.4 + seed / 100), not step 30
    assert rows[("opd", "topk_student_weighted_kl")][6].startswith("-0.390 [")  # step 20: 0.02 s - (0.4 + 0.01 s)
    assert rows[("opd", "topk_reverse_kl")][5].startswith("+0.110 [")  # val-best step 20 on both: 0.52 - 0.41
    assert rows[("trb(eps0=0.02,horizon=50)", "reverse_kl")][3].startswith("0.510 [")


def test_a_study_still_running_gives_tables_only_from_the_seeds_every_variant_finished(tmp_path, capsys):
    from trb.config import ConfigError

    hand_made_study(tmp_path, gz=True)  # compact records: 2 variants x seeds 0, 1, 2, all finished
    methods = tmp_path / "arith" / "methods"
    running = methods / "runs" / "trb_eps0-0.02_horizon-8" / "seed_1"
    (running / "metrics.jsonl.gz").unlink()  # seed 1 of TRB still training: a partial curve, no summary.json
    write_run(running, [0.1, 0.9, 0.9, 0.9], [0.1, 0.9, 0.9, 0.9])
    with pytest.raises(ConfigError, match="1 runs are not finished.*--finished-seeds"):
        rebuild_results(methods)
    rows = rebuild_results(methods, finished_seeds=True)
    assert [r["seeds"] for r in rows] == [[0, 2], [0, 2]], "seed 1 is left out of both variants, so pairs stay paired"
    assert (methods / "results.md").read_text().startswith(
        "# miniature_arith (2 of 3 planned seeds finished: 0 2)\n")
    (running / "summary.json").write_text("{}")  # the run completes
    assert [r["seeds"] for r in rebuild_results(methods)] == [[0, 1, 2], [0, 1, 2]]
    for seed in (0, 1, 2):
        (methods / "runs" / "opd" / f"seed_{seed}" / "metrics.jsonl.gz").unlink()
    with pytest.raises(ConfigError, match="no seed is finished by every variant"):
        rebuild_results(methods, finished_seeds=True)
    # `trb tables --finished-seeds` (studies/collect.sh) skips such a part of a study instead of stopping there
    from trb.cli import main

    (methods / "results.md").unlink()
    assert main(["tables", "--finished-seeds", str(methods)]) == 0
    assert "skipped" in capsys.readouterr().out and not (methods / "results.md").exists()


def test_compare_trains_only_the_runs_that_have_neither_a_summary_nor_a_compact_record(tmp_path, monkeypatch):
    # a fresh clone resumes a study from the records studies/collect.sh kept: those runs are finished, not retrained

    import trb.compare as compare

    hand_made_study(tmp_path, gz=True)
    methods = tmp_path / "arith" / "methods"
    missing = methods / "runs" / "trb_eps0-0.02_horizon-8" / "seed_2"
    shutil.rmtree(missing)
    trained = []

    def train(command, **kwargs):  # `trb train` as a subprocess: write the run a finished training leaves
        folder = Path(next(arg for arg in command if arg.startswith("out_dir=")).split("=", 1)[1])
        trained.append(folder)
        write_run(folder, [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4])
        (folder / "summary.json").write_text("{}")
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(compare.subprocess, "run", train)
    rows = compare.run_compare("trb:configs/miniature_arith.yaml", ["opd", "trb:eps0=0.02,horizon=8"], [0, 1, 2],
                               methods, jobs=1, overrides=[], log=lambda *args: None)
    assert trained == [missing]
    assert [r["seeds"] for r in rows] == [[0, 1, 2], [0, 1, 2]]
    assert rows[1]["final"].values == pytest.approx((0.45, 0.45, 0.4)), "seeds 0, 1 from records, seed 2 trained"


def test_the_chain_study_resumes_from_the_repositorys_records(tmp_path):
    # studies/regime.sh on a fresh clone: finished runs come back from RECORDS (what collect.sh kept), linked parts
    # share one copy, and a run OUT already holds (finished or part way) is left alone
    records, out = tmp_path / "records", tmp_path / "out"
    for part, slug, seed in (("main", "opd", 0), ("grid", "opd", 1), ("grid", "trb_eps0-0.05_horizon-25", 0),
                             ("grid", "trb_eps0-0.05_horizon-25", 1)):
        write_run(records / part / "runs" / slug / f"seed_{seed}", [0.1, 0.2, 0.3, 0.4 + seed], None, gz=True)
    (records / "grid" / "results.csv").write_text("variant\n")
    (records / "others" / "runs").mkdir(parents=True)
    (records / "others" / "runs" / "opd").symlink_to("../../main/runs/opd")  # a shared run, as collect.sh keeps it
    partial = out / "grid" / "runs" / "trb_eps0-0.05_horizon-25" / "seed_1"
    partial.mkdir(parents=True)
    (partial / "config.yaml").write_text("seed: 1\n")  # a run part way: its resume is trb compare's business
    env = {**os.environ, "PARTS": "none", "RECORDS": str(records)}
    subprocess.run(["bash", str(ROOT / "studies" / "regime.sh"), str(out)], check=True, env=env, capture_output=True)
    opd = out / "main" / "runs" / "opd"
    assert sorted(p.name for p in opd.iterdir()) == ["seed_0", "seed_1"], "grid's OPD is main's (linked)"
    assert (out / "grid" / "runs" / "opd").resolve() == (out / "others" / "runs" / "opd").resolve() == opd.resolve()
    assert run_summary(opd / "seed_1")["final"] == pytest.approx(1.4)
    assert sorted(p.name for p in partial.iterdir()) == ["config.yaml"]
    assert (out / "grid" / "runs" / "trb_eps0-0.05_horizon-25" / "seed_0" / "metrics.jsonl.gz").is_file()
    assert (out / "grid" / "results.csv").read_text() == "variant\n"


def test_rebuild_refuses_a_folder_without_plan(tmp_path):
    from trb.config import ConfigError

    with pytest.raises(ConfigError, match="no plan.json"):
        rebuild_results(tmp_path)
