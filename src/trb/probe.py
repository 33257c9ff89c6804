"""The paper's continuation probe: how good are the prefixes each behavior policy visits at step 0?

Sample step-0 rollouts from vanilla OPD's behavior (the student) and from TRB's (the blend at eps0), truncate each
after t completion tokens, let the teacher and, separately, the student finish from there, and grade the result.
Prefixes the teacher can still complete correctly are prefixes worth learning at; TRB's claim is that its early
prefixes are better ones. A rollout that ended before t is graded as it is.

Rollouts of one problem share its difficulty, so they are not independent trials: each row keeps its successes per
problem, and intervals (`probe_stats`) are problem-clustered, Student-t intervals over the per-problem success rates;
TRB's difference from OPD is paired by problem.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trb.core import stream_seed
from trb.errors import TrbError
from trb.report import plt
from trb.rollout import Engine, StudentPolicy, TeacherPolicy, TRBPolicy, own_engine, sequence_keys
from trb.stats import holm, mean_ci, paired_difference
from trb.tasks import Problem, is_correct, tokenize_prompts


@torch.no_grad()
def continuation_probe(student, teacher, tokenizer, vocab, problems: list[Problem], *, eps: float,
                       lengths: list[int], samples: int = 2, max_new_tokens: int = 128, seed: int = 0,
                       batch_size: int = 256, system_prompt: str | None = None,
                       engine: Engine | None = None) -> list[dict]:
    """Rows {behavior, continuation, t, successes, trials, per_problem}: per_problem[i] = the successes of problem
    i's `samples` rollouts; `probe_stats` adds rates and intervals. Every sampling is one call of `engine` (default:
    trb's own over the two models) with a KV budget of `batch_size` sequences."""
    engine = engine if engine is not None else own_engine(student, teacher, vocab)
    prompts = tokenize_prompts(tokenizer, [p.question for p in problems], system_prompt)
    jobs = [(i, prompt) for i, prompt in enumerate(prompts) for _ in range(samples)]

    def sample(policy, inputs: list[list[int]], steps: int, generator: torch.Generator) -> list[list[int]]:
        rollout = engine.rollout(policy, inputs, steps, sequence_keys(len(inputs), generator), batch=batch_size)
        ids, counts = rollout.completion_ids.tolist(), rollout.lengths.tolist()
        return [row[:n] for row, n in zip(ids, counts)]

    rows = []
    for behavior, policy in (("opd (student)", StudentPolicy()), (f"trb (eps={eps})", TRBPolicy(eps))):
        generator = torch.Generator(device=student.device).manual_seed(stream_seed(seed, "probe", behavior))
        completions = sample(policy, [p for _, p in jobs], max_new_tokens, generator)
        for t in lengths:
            prefixes = [c[:t] for c in completions]
            open_rows = [k for k, c in enumerate(completions) if len(c) > t]
            for continuation, cont_policy in (("teacher", TeacherPolicy()), ("student", StudentPolicy())):
                cont_gen = torch.Generator(device=student.device).manual_seed(stream_seed(seed, "continue", t))
                texts = {k: tokenizer.decode(c, skip_special_tokens=True)
                         for k, c in enumerate(completions) if len(c) <= t}
                if open_rows:
                    tails = sample(cont_policy, [jobs[k][1] + prefixes[k] for k in open_rows], max_new_tokens - t,
                                   cont_gen)
                    texts.update({k: tokenizer.decode(prefixes[k] + tail, skip_special_tokens=True)
                                  for k, tail in zip(open_rows, tails)})
                per_problem = [0] * len(problems)
                for k, (i, _) in enumerate(jobs):
                    per_problem[i] += int(is_correct(texts[k], problems[i].answer))
                rows.append({"behavior": behavior, "continuation": continuation, "t": t,
                             "successes": sum(per_problem), "trials": len(jobs), "samples": samples,
                             "per_problem": per_problem})
    return rows


def probe_stats(rows: list[dict]) -> list[dict]:
    """Each row with its success rate and 95% problem-clustered interval (rate, low, high; clipped to [0, 1]), and,
    for the rows of the second behavior (TRB), the difference from the first (OPD) at the same continuation and t,
    paired by problem (diff, diff_low, diff_high, p, and p_holm: Holm-adjusted across these differences)."""
    out, first = [], rows[0]["behavior"]
    baseline = {(r["continuation"], r["t"]): r for r in rows if r["behavior"] == first}
    for r in rows:
        rates = [c / r["samples"] for c in r["per_problem"]]
        rate = mean_ci(rates, bounds=(0.0, 1.0))
        row = {**r, "problems": len(rates), "rate": rate.mean, "low": rate.low, "high": rate.high}
        if r["behavior"] != first:
            base = baseline[(r["continuation"], r["t"])]
            diff = paired_difference(rates, [c / base["samples"] for c in base["per_problem"]])
            row.update({"diff": diff.mean, "diff_low": diff.low, "diff_high": diff.high, "p": diff.p})
        out.append(row)
    compared = [row for row in out if "p" in row]
    for row, p_holm in zip(compared, holm([row["p"] for row in compared])):
        row["p_holm"] = p_holm
    return out


def probe_table(rows: list[dict]) -> str:
    """Rows of `probe_stats` as markdown, with a line saying what the intervals are."""
    first = rows[0]["behavior"]
    lines = [f"| step-0 behavior | continued by | t | success rate [95% CI] | difference from {first} [95% CI], "
             "p (Holm) |",
             "|---|---|---|---|---|"]
    for r in rows:
        diff = (f"{r['diff']:+.3f} [{r['diff_low']:+.3f}, {r['diff_high']:+.3f}], p={r['p_holm']:.2g}" if "diff" in r
                else "-")
        lines.append(f"| {r['behavior']} | {r['continuation']} | {r['t']} | {r['rate']:.3f} "
                     f"[{r['low']:.3f}, {r['high']:.3f}] | {diff} |")
    r = rows[0]
    lines.append(f"\n{r['problems']} problems x {r['samples']} rollouts per behavior. Intervals are clustered by "
                 "problem: 95% Student-t intervals over the per-problem success rates (clipped to [0, 1]); "
                 "differences are paired by problem, with two-sided paired t-tests Holm-adjusted across the table's "
                 f"{sum('diff' in x for x in rows)} comparisons.")
    return "\n".join(lines)


def plot_probe(rows: list[dict], path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for behavior in dict.fromkeys(r["behavior"] for r in rows):
        for continuation, style in (("teacher", "-"), ("student", "--")):
            pts = [r for r in rows if r["behavior"] == behavior and r["continuation"] == continuation]
            ax.errorbar([r["t"] for r in pts], [r["rate"] for r in pts],
                        yerr=[[r["rate"] - r["low"] for r in pts], [r["high"] - r["rate"] for r in pts]],
                        linestyle=style, marker="o", markersize=3, capsize=2,
                        label=f"{behavior}, continued by {continuation}")
    ax.set(xlabel="prefix length t (completion tokens kept)", ylabel="success rate", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def probe_tables(out: Path) -> str:
    """probe.md and probe.png in `out` from out/probe.json (the title and the raw rows with per-problem successes, as
    `trb probe` saves them) alone; returns the table. `trb tables` rebuilds a probe's results this way."""
    path = out / "probe.json"
    saved = json.loads(path.read_text())
    if not isinstance(saved, dict) or "per_problem" not in saved["rows"][0]:
        raise TrbError(f"{path} holds no per-problem successes (made by an earlier trb probe); rerun trb probe")
    rows = probe_stats(saved["rows"])
    table = probe_table(rows)
    (out / "probe.md").write_text(f"# {saved['title']}\n\n{table}\n\n![probe](probe.png)\n")
    plot_probe(rows, out / "probe.png", saved["title"])
    return table
