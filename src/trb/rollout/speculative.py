"""Exact speculative sampling of the TRB behavior policy mu_beta (METHOD.md section 2, *ours*).

Lock-step TRB runs the teacher once per generated token. Here the student drafts gamma tokens from pi_S, the teacher
scores the pending token and all drafts in one forward, and at each drafted position i the target mu_i (the TRB blend
at that prefix, beta_i solved there) accepts the draft x_i with probability min(1, mu_i(x_i) / pi_S_i(x_i)). At the
first rejection a token is drawn from normalize(max(0, mu_i - pi_S_i)) and the round ends; if all drafts pass, a
bonus token is drawn from mu_{gamma+1}. Because beta at a position depends only on that prefix, every emitted token
is an exact sample of mu_beta given its prefix: the rollouts have the lock-step distribution. Acceptance per token is
1 - TV(mu, pi_S) >= 1 - sqrt(eps / 2).

Both models decode through the decoder interface (`trb.rollout.decoder`): rows accept different numbers of drafts,
and each decoder forgets exactly the rejected ones (`truncate`). The target mu comes from the policy itself
(`BehaviorPolicy.distribution`), and randomness is keyed by (sequence, position, stream) as in lock-step decoding, so
rows join and leave through the shared queue (`trb.rollout.queue`: admission by KV memory, preemption) without
changing any sequence. Rounds start where the previous one ended, so a preempted row resumes at a round boundary:
its prompt pass feeds all it emitted but the last token, which stays pending as if nothing had happened. A
(position, stream) number can be read again in a later round only after the draft it drew was discarded unread by
any emitted decision, so every emitted token still sees fresh randomness.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from trb.core import keyed_sample, keyed_uniform
from trb.rollout.policies import Distribution
from trb.rollout.queue import Queue, model_records

DRAFT, ACCEPT, CORRECT = 0, 1, 2  # random streams: the student's draft, the accept test, the corrected/first token
Target = Callable[[torch.Tensor, torch.Tensor], Distribution]


def choose_gamma(acceptance: float, student_cost: float, teacher_cost: float, max_gamma: int = 8) -> int:
    """The draft length maximizing expected tokens per unit cost. A round costs gamma + 1 student forwards of one
    token and one teacher forward (of gamma + 1 tokens, priced like one decode step when decoding is memory-bound)
    and yields (1 - a^(gamma + 1)) / (1 - a) tokens in expectation for per-draft acceptance a."""
    a = min(max(acceptance, 0.0), 0.999)

    def tokens_per_cost(gamma: int) -> float:
        return (1 - a ** (gamma + 1)) / (1 - a) / ((gamma + 1) * student_cost + teacher_cost)

    return max(range(1, max_gamma + 1), key=tokens_per_cost)


def decode_speculative(queue: Queue, target: Target, gamma: int) -> None:
    """Decode every sequence of the queue by exact speculative sampling of `target` (a speculative policy's
    `distribution`) with drafts of gamma tokens. The rows' emitted-but-unfed token lives in `queue.state["pending"]`;
    draft counts go to the queue's stats."""
    counts = torch.zeros(3, dtype=torch.long, device=queue.device)  # drafted, tested, accepted (read once at the end)
    while _refill(queue, target, gamma):
        _round(queue, target, gamma, counts)
    stats = queue.stats
    drafted, tested, accepted = counts.tolist()
    stats.drafted, stats.tested, stats.accepted = (stats.drafted + drafted, stats.tested + tested,
                                                   stats.accepted + accepted)


def _pick(logp: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    return logp.gather(-1, token[..., None])[..., 0]


def _refill(queue: Queue, target: Target, gamma: int) -> bool:
    """Admit waiting sequences: a new one's first token is a plain draw from mu after its prompt pass; a preempted
    one's last emitted token becomes its pending token again. Preempt rows the next round would not fit; False once
    every sequence has finished."""
    while (joined := queue.admit(grow=gamma + 1, held_back=1)) is not None:
        new, logp = joined  # (n,), each (n, V)
        mu, beta, realized = target(logp["student"], logp["teacher"])  # (n, V), (n,), (n,)
        first = keyed_sample(mu, queue.keys[new], torch.zeros_like(new), CORRECT)  # (n,)
        values = {"token": first, "behavior_logp": _pick(mu, first), "beta": beta, "realized_kl": realized,
                  **model_records(logp, first, queue.record_kl)}
        emitted = queue.count[new]  # (n,) 0 for a new sequence
        last = queue.tokens[new * queue.max_new_tokens + (emitted - 1).clamp_min(0)]  # (n,)
        queue.emit({name: value[:, None] for name, value in values.items()}, (emitted == 0)[:, None], seq=new)
        queue.join(pending=torch.where(emitted == 0, first, last))
        queue.retire()
    queue.make_room(grow=gamma + 1)
    return queue.rows > 0


def _round(queue: Queue, target: Target, gamma: int, counts: torch.Tensor) -> None:
    """One round for every row: gamma drafts, one teacher forward, the accept tests, the corrected token."""
    keys, base = queue.keys[queue.seq], queue.count[queue.seq]  # (b,), (b,) completion position of the first draft
    fed, s_all = _draft(queue, keys, base, gamma)  # (b, gamma + 1): pending, x_1 .. x_gamma; (b, gamma + 1, V)
    t_all = queue.decoders["teacher"].step(fed).float()  # (b, gamma + 1, V): one teacher forward
    queue.grow(gamma + 1)
    mu_all, beta_all, realized_all = target(s_all, t_all)  # (b, gamma + 1, V), (b, gamma + 1) each
    drafts = fed[:, 1:]  # (b, gamma)
    s_draft, mu_draft = _pick(s_all[:, :gamma], drafts), _pick(mu_all[:, :gamma], drafts)  # (b, gamma) each
    coins = torch.stack([keyed_uniform(keys, base + i, ACCEPT) for i in range(gamma)], dim=1)  # (b, gamma)
    accept = coins.log() < (mu_draft - s_draft)
    n = torch.cumprod(accept.long(), dim=1).sum(1)  # (b,) leading accepted drafts
    counts += torch.stack([torch.tensor(len(n) * gamma, device=n.device), (n + (n < gamma).long()).sum(), n.sum()])

    rows = torch.arange(len(n), device=n.device)
    corrected = _corrected(mu_all[rows, n], s_all[rows, n], n < gamma, keys, base + n)  # (b,)
    # Emit x_1 .. x_n and the corrected token; records use the blend at each token's own position.
    round_tokens = torch.cat([drafts, corrected[:, None]], dim=1)  # (b, gamma + 1)
    round_tokens[rows, n] = corrected
    values = {"token": round_tokens, "behavior_logp": _pick(mu_all, round_tokens), "beta": beta_all,
              "realized_kl": realized_all,
              **model_records({"student": s_all, "teacher": t_all}, round_tokens, queue.record_kl)}
    valid = torch.arange(gamma + 1, device=n.device)[None] <= n[:, None]  # (b, gamma + 1)
    is_stop = (round_tokens == queue.vocab.eos_id) & valid
    valid &= (torch.cumsum(is_stop, dim=1) - is_stop.long()) == 0  # nothing after the first stop
    queue.emit(values, valid)
    # Both models were fed pending, x_1 .. x_gamma; the rejected drafts x_{n+1} .. x_gamma are forgotten.
    queue.truncate(gamma - n)
    queue.state["pending"] = corrected
    queue.retire()


def _draft(queue: Queue, keys: torch.Tensor, base: torch.Tensor,
           gamma: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed the pending token to the student, then gamma draws from it, each fed back: the fed tokens (b, gamma + 1)
    and pi_S after each of them (b, gamma + 1, V)."""
    fed = [queue.state["pending"]]  # pending, x_1 .. x_gamma
    student = []  # pi_S after each fed token: s_0 .. s_gamma
    for i in range(gamma + 1):
        student.append(queue.decoders["student"].step(fed[-1][:, None])[:, 0].float())  # (b, V)
        if i < gamma:
            fed.append(keyed_sample(student[-1], keys, base + i, DRAFT))
    return torch.stack(fed, dim=1), torch.stack(student, dim=1)


def _corrected(mu_n: torch.Tensor, s_n: torch.Tensor, rejected: torch.Tensor, keys: torch.Tensor,
               position: torch.Tensor) -> torch.Tensor:
    """The token at the first rejected position n: a draw from the residual max(0, mu - pi_S) after a rejection,
    from mu itself after full acceptance. mu_n, s_n (b, V); rejected (b,) bool; returns (b,)."""
    residual = (mu_n.exp() - s_n.exp()).clamp_min(0.0)  # (b, V)
    use_residual = rejected & (residual.sum(-1) > 0)  # (b,)
    logp = torch.where(use_residual[:, None], residual.log(), mu_n)  # (b, V)
    logp = logp - torch.logsumexp(logp, -1, keepdim=True)
    return keyed_sample(logp, keys, position, CORRECT)
