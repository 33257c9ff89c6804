"""`trb inspect RUN`: a self-contained HTML page of the rollouts a run logged, token by token.

Each completion token is shaded by its blend weight beta (white: pure student, full orange: beta = 1) and outlined
when the teacher supplied it (SKD injection, mixture draws, teacher sampling); hovering shows beta, the student's,
teacher's and behavior log-probs and the trust-region budget spent, KL(mu || pi_S).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from trb.errors import TrbError

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 70em; color: #222; }
.rollout { border: 1px solid #ddd; border-radius: 6px; padding: 0.6em 0.8em; margin: 0.6em 0; }
.prompt { color: #777; white-space: pre-wrap; font-family: ui-monospace, monospace; }
.completion { white-space: pre-wrap; font-family: ui-monospace, monospace; line-height: 1.7; }
.tok { border-radius: 2px; }
.teacher { outline: 2px solid #2a6fdb; }
.meta { color: #777; font-size: 0.85em; }
.legend span { padding: 0 0.4em; margin-right: 0.5em; font-family: ui-monospace, monospace; }
"""


def _token_span(token: str, record: dict, i: int) -> str:
    beta = record["beta"][i]
    parts = [f"beta={beta:.3f}"]
    for key, name in (("student_logp", "log pi_S"), ("teacher_logp", "log pi_T"), ("behavior_logp", "log mu"),
                      ("realized_kl", "KL(mu||pi_S)")):
        if record.get(key) is not None:
            parts.append(f"{name}={record[key][i]:.3f}")
    injected = record["from_teacher"][i]
    if injected:
        parts.append("from the teacher")
    classes = "tok teacher" if injected else "tok"
    style = f"background: rgba(255, 140, 0, {min(max(beta, 0.0), 1.0):.3f})"
    return f'<span class="{classes}" style="{style}" title="{html.escape(", ".join(parts))}">{html.escape(token)}</span>'


def render(run: Path, steps: list[int] | None = None) -> str:
    files = sorted((run / "rollouts").glob("step_*.json"))
    if not files:
        raise TrbError(f"{run} has no logged rollouts (rollouts/step_*.json); train with log_rollouts_every > 0")
    logged = [json.loads(f.read_text()) for f in files]
    if steps:
        missing = sorted(set(steps) - {entry["step"] for entry in logged})
        if missing:
            available = [entry["step"] for entry in logged]
            raise TrbError(f"no rollouts logged at steps {missing}; available: {available}")
        logged = [entry for entry in logged if entry["step"] in steps]
    body = [f"<h1>Rollouts of {html.escape(str(run))}</h1>",
            '<p class="legend">shading: <span style="background: rgba(255,140,0,0.1)">beta 0.1</span>'
            '<span style="background: rgba(255,140,0,0.5)">beta 0.5</span>'
            '<span style="background: rgba(255,140,0,1)">beta 1</span>'
            '<span class="teacher">token from the teacher</span> hover a token for its numbers</p>']
    for entry in logged:
        schedule = ", ".join(f"{k} = {v:.4g}" for k, v in entry.items() if k not in ("step", "rollouts"))
        body.append(f"<h2>step {entry['step']}</h2><p class='meta'>{html.escape(schedule)}</p>")
        for record in entry["rollouts"]:
            tokens = "".join(_token_span(tok, record, i) for i, tok in enumerate(record["tokens"]))
            ending = "stopped" if record["stopped"] else "hit the length limit"
            mean_beta = sum(record["beta"]) / max(len(record["beta"]), 1)
            body.append(
                f'<div class="rollout"><div class="prompt">{html.escape(record["prompt"])}</div>'
                f'<div class="completion">{tokens}</div>'
                f'<div class="meta">{len(record["tokens"])} tokens, {ending}, mean beta {mean_beta:.3f}</div></div>'
            )
    return f"<!doctype html><html><head><meta charset='utf-8'><title>trb inspect</title><style>{STYLE}</style>" \
           f"</head><body>{''.join(body)}</body></html>"


def write_page(run: Path, out: Path | None = None, steps: list[int] | None = None) -> Path:
    out = out or run / "rollouts.html"
    out.write_text(render(run, steps))
    return out
