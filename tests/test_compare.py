"""Aggregation statistics against hand-computed values, and compare / probe / inspect end to end on tiny models."""

import csv
import json
import math

import pytest
import yaml

from trb.cli import main
from trb.compare import rebuild_results, run_compare
from trb.config import parse_variants
from trb.probe import continuation_probe, probe_stats
from trb.records import read_text
from trb.stats import area_under_curve, mean_ci
from trb.tasks import problem_splits


def test_mean_ci_by_hand():
    # values 0.1, 0.2, 0.3: mean 0.2, sd 0.1, t(0.975, df=2) = 4.302653 -> half width 0.1 * 4.302653 / sqrt(3)
    mean, low, high, _, _, _ = mean_ci([0.1, 0.2, 0.3])
    assert mean == pytest.approx(0.2)
    assert high - mean == pytest.approx(0.1 * 4.302653 / math.sqrt(3), rel=1e-6)
    assert mean - low == pytest.approx(high - mean)
    single = mean_ci([0.5])
    assert single.mean == 0.5 and not single.has_interval and single.values == (0.5,)


def test_area_under_curve():
    # a curve 0 -> 1 linearly over 10 steps has average height 0.5; a step function by hand
    assert area_under_curve([0, 10], [0.0, 1.0]) == pytest.approx(0.5)
    assert area_under_curve([0, 5, 10], [0.2, 0.2, 0.6]) == pytest.approx((0.2 * 5 + 0.4 * 5) / 10)


def test_parse_variants_expands_grids():
    assert [v.label for v in parse_variants("opd")] == ["opd"]
    grid = parse_variants("trb:eps0=0.005|0.02,horizon=15|50")
    assert [v.label for v in grid] == ["trb(eps0=0.005,horizon=15)", "trb(eps0=0.005,horizon=50)",
                                       "trb(eps0=0.02,horizon=15)", "trb(eps0=0.02,horizon=50)"]
    assert grid[1].overrides == ("method.name=trb", "method.eps0=0.005", "method.horizon=50")
    assert grid[1].slug == "trb_eps0-0.005_horizon-50"


def write_config(path, pair, **values):
    settings = {"models": {"student": str(pair["student"]), "teacher": str(pair["teacher"])},
                "data": {"num_train": 32, "num_test": 4, "num_val": 3}, "steps": 2, "prompts_per_step": 2,
                "rollouts_per_prompt": 2, "rollout_batch": 4, "micro_batch": 4, "max_new_tokens": 12,
                "eval_every": 1, "eval_samples": 1, "checkpoint_every": 0, "lr": 1e-3, "warmup_steps": 0, **values}
    path.write_text(yaml.safe_dump(settings))
    return str(path)


def test_compare_two_methods_two_seeds_end_to_end(tiny_pair, tmp_path):
    config = write_config(tmp_path / "tiny.yaml", tiny_pair)
    out = tmp_path / "cmp"
    lines = []
    rows = run_compare(config, ["opd", "trb:eps0=0.05,horizon=2"], [0, 1], out, jobs=2, overrides=[],
                       log=lines.append)
    assert len(lines) == 5 and "4 runs" in lines[0]
    labels = [r["method"] for r in rows]
    assert labels == ["opd", "trb(eps0=0.05,horizon=2)"]
    trb = rows[1]
    assert trb["seeds"] == [0, 1] and "diff_selected" in trb and "diff_selected" not in rows[0]
    # the aggregate equals the per-run numbers it was made from
    best = [max(json.loads(line).get("eval/pass_at_1", -1) for line in
                (out / "runs" / "trb_eps0-0.05_horizon-2" / f"seed_{s}" / "metrics.jsonl").read_text().splitlines())
            for s in (0, 1)]
    assert trb["best"][0] == pytest.approx(sum(best) / 2)
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table] == labels
    assert (out / "learning_curves.png").stat().st_size > 1000
    assert (out / "diagnostics.png").stat().st_size > 1000
    assert "| trb(eps0=0.05,horizon=2) | 2 |" in (out / "results.md").read_text()
    # every run evaluated test and validation problems at every evaluation, and wrote its compact record
    record = out / "runs" / "opd" / "seed_0" / "record"
    evals = list(csv.DictReader(read_text(record / "evals.csv").splitlines()))
    assert {(r["split"], r["step"]) for r in evals} == {(split, str(step)) for split in ("test", "val")
                                                          for step in (0, 1, 2)}
    assert sum(r["split"] == "val" for r in evals) == 3 * 3 and sum(r["split"] == "test" for r in evals) == 3 * 4
    # the tables rebuilt from plan.json and the runs' data alone are the tables of the comparison
    made = (out / "results.md").read_text()
    (out / "results.md").unlink()
    rebuild_results(out)
    assert (out / "results.md").read_text() == made
    # rerunning resumes: every run is already complete, nothing is trained again
    again = run_compare(config, ["opd", "trb:eps0=0.05,horizon=2"], [0, 1], out, jobs=1, overrides=[],
                        log=lambda m: None)
    assert again[1]["best"] == trb["best"]
    # --until-step scores the same (finished) runs as if they had stopped at step 1: final = the step-1 evaluation
    assert main(["compare", config, "--methods", "opd", "trb:eps0=0.05,horizon=2", "--seeds", "0", "1",
                 "--out", str(out), "--until-step", "1"]) == 0
    assert json.loads((out / "plan.json").read_text())["until_step"] == 1
    at_step_1 = [next(json.loads(line)["eval/pass_at_1"] for line in
                      (out / "runs" / "opd" / f"seed_{s}" / "metrics.jsonl").read_text().splitlines()
                      if json.loads(line)["step"] == 1 and "eval/pass_at_1" in json.loads(line)) for s in (0, 1)]
    cut = rebuild_results(out)
    assert cut[0]["final"].mean == pytest.approx(sum(at_step_1) / 2)
    assert "up to step 1" in (out / "results.md").read_text()


def test_continuation_probe_and_inspect(tiny_pair, tmp_path, loaded_pair):
    tokenizer, student, teacher, vocab = loaded_pair
    problems, _ = problem_splits("arith", 6, 1, 0)
    rows = probe_stats(continuation_probe(student, teacher, tokenizer, vocab, problems, eps=0.05,
                                          lengths=[0, 4, 1000], samples=2, max_new_tokens=16))
    assert len(rows) == 2 * 3 * 2
    assert all(r["trials"] == 12 and sum(r["per_problem"]) == r["successes"] for r in rows)
    assert all(0 <= r["low"] <= r["rate"] <= r["high"] <= 1 for r in rows)
    assert sum("diff" in r for r in rows) == 6, "TRB's rows carry the difference from OPD's"
    # at t beyond every rollout's length nothing is continued: teacher and student continuations agree
    for behavior in {r["behavior"] for r in rows}:
        pair = [r["successes"] for r in rows if r["behavior"] == behavior and r["t"] == 1000]
        assert pair[0] == pair[1]

    run = tmp_path / "run"
    config = write_config(tmp_path / "tiny.yaml", tiny_pair, log_rollouts_every=1, log_rollouts=2, eval_every=0)
    assert main(["train", config, f"out_dir={run}", "method.name=trb", "method.eps0=0.1", "method.horizon=1"]) == 0
    assert main(["inspect", str(run)]) == 0
    page = (run / "rollouts.html").read_text()
    assert "step 0" in page and "step 1" in page and "beta=" in page and "log pi_T=" in page
    assert main(["inspect", str(run), "--steps", "7"]) == 2


def test_sweep_grid_is_found_and_drawn(tmp_path):
    from trb.compare import grid, plot_grid

    def row(label, best, diff=None):
        r = {"method": label, "seeds": [0, 1, 2], "minutes": 1.0, "selected": (best, best - 0.1, best + 0.1)}
        if diff is not None:
            r["diff_selected"] = (diff, diff - 0.05, diff + 0.05)
        return r

    rows = [row("opd", 0.5)] + [row(f"trb(eps0={e},horizon={k})", 0.5 + float(e) + k / 100, float(e) + k / 100)
                                for e in ("0.01", "0.02", "0.05") for k in (2, 8)]
    name, key_a, values_a, key_b, values_b, cells = grid(rows)
    assert (name, key_a, values_a, key_b, values_b) == ("trb", "eps0", ["0.01", "0.02", "0.05"], "horizon", ["2", "8"])
    assert cells[("0.05", "8")]["selected"][0] == pytest.approx(0.63)
    assert plot_grid(rows, "opd", tmp_path / "grid.png", "t") and (tmp_path / "grid.png").stat().st_size > 1000
    # one-parameter variants or a lone method are no grid
    assert grid([row("opd", 0.5), row("trb(eps0=0.01)", 0.6), row("trb(eps0=0.02)", 0.6)]) is None
    assert not plot_grid([row("opd", 0.5)], "opd", tmp_path / "none.png", "t") and not (tmp_path / "none.png").exists()
