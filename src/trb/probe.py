"""The paper's continuation probe: how good are the prefixes each behavior policy visits at step 0?

Sample step-0 rollouts from vanilla OPD's behavior (the student) and from TRB's (the blend at eps0), truncate each
after t completion tokens, let the teacher and, separately, the student finish from there, and grade the result.
Prefixes the teacher can still complete correctly are prefixes worth learning at; TRB's claim is that its early
prefixes are better ones. A rollout that ended before t is graded as it is.
"""

from __future__ import annotations

import torch

from trb.report import plt
from trb.rollout import StudentPolicy, TeacherPolicy, TRBPolicy, generate
from trb.stats import wilson_interval
from trb.tasks import Problem, is_correct, tokenize_prompts
from trb.train import stream_seed


@torch.no_grad()
def continuation_probe(student, teacher, tokenizer, vocab, problems: list[Problem], *, eps: float,
                       lengths: list[int], samples: int = 2, max_new_tokens: int = 128, seed: int = 0,
                       batch_size: int = 256, system_prompt: str | None = None) -> list[dict]:
    """Rows {behavior, continuation, t, successes, trials, rate, low, high} (Wilson 95% intervals)."""
    prompts = tokenize_prompts(tokenizer, [p.question for p in problems], system_prompt)
    jobs = [(i, prompt) for i, prompt in enumerate(prompts) for _ in range(samples)]
    rows = []
    for behavior, policy in (("opd (student)", StudentPolicy()), (f"trb (eps={eps})", TRBPolicy(eps))):
        generator = torch.Generator(device=student.device).manual_seed(stream_seed(seed, "probe", behavior))
        completions = []
        for start in range(0, len(jobs), batch_size):
            chunk = [p for _, p in jobs[start : start + batch_size]]
            rollout = generate(policy, chunk, vocab, max_new_tokens, generator, student=student, teacher=teacher)
            completions += [rollout.completion_ids[r, : int(rollout.lengths[r])].tolist() for r in range(len(chunk))]
        for t in lengths:
            prefixes = [c[:t] for c in completions]
            finished = [len(c) <= t for c in completions]
            open_rows = [k for k, done in enumerate(finished) if not done]
            for continuation, model, cont_policy in (("teacher", teacher, TeacherPolicy()),
                                                     ("student", student, StudentPolicy())):
                cont_gen = torch.Generator(device=student.device).manual_seed(stream_seed(seed, "continue", t))
                texts = {k: tokenizer.decode(completions[k], skip_special_tokens=True)
                         for k, done in enumerate(finished) if done}
                for start in range(0, len(open_rows), batch_size):
                    chunk = open_rows[start : start + batch_size]
                    inputs = [jobs[k][1] + prefixes[k] for k in chunk]
                    kwargs = {"teacher": model} if continuation == "teacher" else {"student": model}
                    rollout = generate(cont_policy, inputs, vocab, max_new_tokens - t, cont_gen, **kwargs)
                    for row, k in enumerate(chunk):
                        tail = rollout.completion_ids[row, : int(rollout.lengths[row])].tolist()
                        texts[k] = tokenizer.decode(prefixes[k] + tail, skip_special_tokens=True)
                successes = sum(is_correct(texts[k], problems[jobs[k][0]].answer) for k in range(len(jobs)))
                low, high = wilson_interval(successes, len(jobs))
                rows.append({"behavior": behavior, "continuation": continuation, "t": t, "successes": successes,
                             "trials": len(jobs), "rate": successes / len(jobs), "low": low, "high": high})
    return rows


def probe_table(rows: list[dict]) -> str:
    lines = ["| step-0 behavior | continued by | t | success rate [95% CI] |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['behavior']} | {r['continuation']} | {r['t']} | {r['rate']:.3f} "
                     f"[{r['low']:.3f}, {r['high']:.3f}] |")
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
