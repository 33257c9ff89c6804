"""Exact speculative sampling of the TRB behavior policy mu_beta (METHOD.md section 2, *ours*).

Lock-step TRB runs the teacher once per generated token. Here the student drafts gamma tokens from pi_S, the teacher
scores the pending token and all drafts in one forward, and at each drafted position i the target mu_i (the TRB blend
at that prefix, beta_i solved there) accepts the draft x_i with probability min(1, mu_i(x_i) / pi_S_i(x_i)). At the
first rejection a token is drawn from normalize(max(0, mu_i - pi_S_i)) and the round ends; if all drafts pass, a
bonus token is drawn from mu_{gamma+1}. Because beta at a position depends only on that prefix, every emitted token
is an exact sample of mu_beta given its prefix: the rollouts have the lock-step distribution. Acceptance per token is
1 - TV(mu, pi_S) >= 1 - sqrt(eps / 2).

Batching: rows accept different numbers of drafts. Instead of cropping caches row by row, rejected drafts stay in the
caches as masked slots (attention mask 0) and positions count valid tokens only, so every row advances by exactly the
tokens it accepted.

With compile=True the shapes are fixed: static caches with room for the worst case (one token per round), every row
decoding until all are done, the student's single-token steps and the teacher's window forward reading fixed token,
position and additive-mask buffers; on a GPU both are captured as CUDA graphs (as lock-step decoding is).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from trb.core import blend_logp, kl_divergence, sample, solve_beta
from trb.models import VocabSpace
from trb.rollout.engine import (
    STATIC_CACHE_ROUND,
    Rollout,
    _autocast_now,
    _capture,
    _Decoder,
    _GraphedSteps,
    left_pad,
    position_ids,
)


@dataclass
class SpeculativeStats:
    drafted: int = 0  # draft tokens proposed
    tested: int = 0  # drafts put to the accept test (those after a rejection are not)
    accepted: int = 0  # draft tokens accepted
    rounds: int = 0
    student_forwards: int = 0
    teacher_forwards: int = 0

    @property
    def acceptance(self) -> float:
        """Per-draft acceptance probability, 1 - TV(mu, pi_S) averaged over tested positions."""
        return self.accepted / max(self.tested, 1)


def choose_gamma(acceptance: float, student_cost: float, teacher_cost: float, max_gamma: int = 8) -> int:
    """The draft length maximizing expected tokens per unit cost. A round costs gamma + 1 student forwards of one
    token and one teacher forward (of gamma + 1 tokens, priced like one decode step when decoding is memory-bound)
    and yields (1 - a^(gamma + 1)) / (1 - a) tokens in expectation for per-draft acceptance a."""
    a = min(max(acceptance, 0.0), 0.999)

    def tokens_per_cost(gamma: int) -> float:
        return (1 - a ** (gamma + 1)) / (1 - a) / ((gamma + 1) * student_cost + teacher_cost)

    return max(range(1, max_gamma + 1), key=tokens_per_cost)


class _GraphedWindow:
    """The teacher's forward over one round's window of w tokens (the pending token and the drafts), over fixed
    buffers: tokens and positions (b, w) and an additive mask (b, 1, w, S) that opens each row's accepted slots and,
    for window token i, the window's slots up to i. Captured as a CUDA graph on a GPU after one eager run."""

    def __init__(self, decoder: _Decoder, batch: int, width: int, cache_len: int, device: torch.device):
        self.decoder = decoder
        self.autocast = _autocast_now(device)
        dtype = self.autocast[1] if self.autocast else decoder.model.dtype
        self.low = torch.finfo(dtype).min
        self.tokens = torch.zeros((batch, width), dtype=torch.long, device=device)  # (b, w)
        self.positions = torch.zeros((batch, width), dtype=torch.long, device=device)  # (b, w)
        self.mask = torch.full((batch, 1, width, cache_len), self.low, dtype=dtype, device=device)  # (b, 1, w, S)
        self.slots = torch.arange(cache_len, device=device)  # (S,)
        self.graph = None
        self.output = None

    def _run(self) -> torch.Tensor:
        return self.decoder.step(self.tokens, self.mask, self.positions, keep=self.tokens.shape[1])

    def step(self, tokens, positions, valid: torch.Tensor, base: int) -> torch.Tensor:
        """tokens, positions: (b, w); valid: (b, S) slots holding accepted tokens; the window starts at slot base.
        Returns the teacher's log-probs after each window token, (b, w, V)."""
        width = tokens.shape[1]
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        window = (self.slots[None] >= base) & (self.slots[None] <= base + torch.arange(width, device=tokens.device)[:, None])
        allowed = valid[:, None, :] | window[None]  # (b, w, S)
        self.mask.copy_(torch.where(allowed, 0.0, self.low)[:, None])
        if self.graph is not None:
            self.graph.replay()
            return self.output
        if tokens.device.type != "cuda":
            return self._run()
        first, self.graph, self.output = _capture(self._run, self.autocast)
        return first


def _mu(student_logp: torch.Tensor, teacher_logp: torch.Tensor, eps: float):
    beta = solve_beta(student_logp, teacher_logp, eps)  # (...)
    mu = blend_logp(student_logp, teacher_logp, beta)  # (..., V)
    return mu, beta


@torch.no_grad()
def generate_speculative(
    eps: float,
    prompts: list[list[int]],
    vocab: VocabSpace,
    max_new_tokens: int,
    generator: torch.Generator,
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    gamma: int = 4,
    compile: bool = False,
) -> tuple[Rollout, SpeculativeStats]:
    """TRB rollouts (budget eps) by exact speculative sampling; same record format as `generate`. compile=True:
    fixed shapes (static caches, fixed buffers, CUDA graphs on a GPU); the rollouts have the same distribution."""
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1, got {gamma}")
    device = student.device
    stats = SpeculativeStats()
    prompt_ids, prompt_mask = left_pad(prompts, vocab.pad_id, device)  # (B, P)
    batch, width = prompt_ids.shape
    if compile:  # the worst case is one token per round, each round taking gamma + 1 slots
        cache_len = width + max(max_new_tokens - 1, 1) * (gamma + 1)
        cache_len = -(-cache_len // STATIC_CACHE_ROUND) * STATIC_CACHE_ROUND
        s_dec = _Decoder(student, vocab, "static", cache_len, batch=batch)
        t_dec = _Decoder(teacher, vocab, "static", cache_len, batch=batch)
    else:
        s_dec, t_dec = _Decoder(student, vocab, "dynamic", 0), _Decoder(teacher, vocab, "dynamic", 0)

    tokens = torch.full((batch, max_new_tokens), vocab.pad_id, dtype=torch.long, device=device)  # (B, T)
    names = ("behavior_logp", "student_logp", "teacher_logp", "beta", "realized_kl")
    records = {name: torch.zeros((batch, max_new_tokens), device=device) for name in names}  # each (B, T)
    count = torch.zeros(batch, dtype=torch.long, device=device)  # (B,) tokens emitted per row
    stopped = torch.zeros(batch, dtype=torch.bool, device=device)  # (B,)
    active = torch.arange(batch, device=device)  # (b,) batch rows still decoding, in cache order

    def emit(rows, values: dict[str, torch.Tensor], valid: torch.Tensor) -> None:
        """Write per-row runs of new tokens: values[name] (b, k), valid (b, k) leading True entries."""
        cols = count[rows][:, None] + torch.arange(valid.shape[1], device=device)  # (b, k)
        keep = valid & (cols < max_new_tokens)  # (b, k)
        r = rows[:, None].expand_as(cols)[keep]
        c = cols[keep]
        tokens[r, c] = values["token"][keep]
        for name in names:
            records[name][r, c] = values[name][keep].float()

    # Prefill, then the first token by a plain (lock-step) TRB draw.
    attention = prompt_mask.long()  # (b, S) valid cache slots
    s_logp = s_dec.step(prompt_ids, attention, position_ids(attention))  # (b, V)
    t_logp = t_dec.step(prompt_ids, attention, position_ids(attention))  # (b, V)
    stats.student_forwards, stats.teacher_forwards = 1, 1
    counts = torch.zeros(3, dtype=torch.long, device=device)  # drafted, tested, accepted
    mu, beta = _mu(s_logp, t_logp, eps)
    pending = sample(mu, generator)  # (b,) emitted, not yet fed to either model
    pick = lambda logp, tok: logp.gather(-1, tok[..., None])[..., 0]  # noqa: E731
    first = {"token": pending, "behavior_logp": pick(mu, pending), "student_logp": pick(s_logp, pending),
             "teacher_logp": pick(t_logp, pending), "beta": beta, "realized_kl": kl_divergence(mu, s_logp)}
    emit(active, {k: v[:, None] for k, v in first.items()}, torch.ones((batch, 1), dtype=torch.bool, device=device))
    count += 1
    stopped |= pending == vocab.eos_id
    next_position = position_ids(attention)[:, -1] + 1  # (b,) position of the pending token
    if compile:  # fixed buffers: the student's single-token steps, the teacher's window, the accepted slots
        student_steps = _GraphedSteps({"student": s_dec}, prompt_mask, cache_len)
        teacher_window = _GraphedWindow(t_dec, batch, gamma + 1, cache_len, device)
        valid = torch.zeros((batch, cache_len), dtype=torch.bool, device=device)  # (b, S) slots of accepted tokens
        valid[:, :width] = prompt_mask

    while True:
        finished = stopped[active] | (count[active] >= max_new_tokens)  # (b,)
        if bool(finished.all()):
            break
        if finished.any() and not compile:  # finished rows leave both caches
            keep = (~finished).nonzero()[:, 0]
            s_dec.keep(keep)
            t_dec.keep(keep)
            active, pending, attention, next_position = active[keep], pending[keep], attention[keep], next_position[keep]
            finished = finished[keep]
        live = ~finished  # (b,) with fixed shapes, finished rows keep decoding and emit nothing
        b = len(active)
        stats.rounds += 1

        # Draft: feed the pending token, then gamma draws from the student, each fed back.
        fed = [pending]  # tokens fed this round: pending, x_1 .. x_gamma
        student_dists = []  # pi_S after each fed token: s_1 .. s_{gamma+1}
        base = student_steps.slot if compile else 0  # the round's first cache slot (fixed shapes)
        for i in range(gamma + 1):
            if compile:  # the step's output buffer is overwritten by the next step: keep a copy
                s_logp = student_steps.step(fed[-1], (next_position + i)[:, None])["student"].clone()  # (b, V)
            else:
                attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)  # (b, S + 1)
                s_logp = s_dec.step(fed[-1][:, None], attention, (next_position + i)[:, None])  # (b, V)
            stats.student_forwards += 1
            student_dists.append(s_logp)
            if i < gamma:
                fed.append(sample(s_logp, generator))
        drafts = torch.stack(fed[1:], dim=1)  # (b, gamma)
        s_all = torch.stack(student_dists, dim=1)  # (b, gamma + 1, V)
        # Score: one teacher forward over the pending token and every draft.
        window = torch.stack(fed, dim=1)  # (b, gamma + 1)
        positions = next_position[:, None] + torch.arange(gamma + 1, device=device)  # (b, gamma + 1)
        if compile:
            t_all = teacher_window.step(window, positions, valid, base)  # (b, gamma + 1, V)
        else:
            t_all = t_dec.step(window, attention, positions, keep=gamma + 1)  # (b, gamma + 1, V)
        stats.teacher_forwards += 1

        mu_all, beta_all = _mu(s_all, t_all, eps)  # (b, gamma + 1, V), (b, gamma + 1)
        s_draft = pick(s_all[:, :gamma], drafts)  # (b, gamma)
        mu_draft = pick(mu_all[:, :gamma], drafts)  # (b, gamma)
        accept = torch.rand((b, gamma), generator=generator, device=device).log() < (mu_draft - s_draft)
        n = torch.cumprod(accept.long(), dim=1).sum(1)  # (b,) leading accepted drafts
        # counted on the device (drafted, tested, accepted) and read once at the end: no host sync per round
        counts += torch.stack([live.sum() * gamma, ((n + (n < gamma).long()) * live).sum(), (n * live).sum()])

        # The token at position n: residual max(0, mu - pi_S) after a rejection, mu itself after full acceptance.
        rows = torch.arange(b, device=device)
        mu_n, s_n = mu_all[rows, n], s_all[rows, n]  # (b, V)
        residual = (mu_n.exp() - s_n.exp()).clamp_min(0.0)  # (b, V)
        use_residual = (n < gamma) & (residual.sum(-1) > 0)  # (b,)
        corrected_logp = torch.where(use_residual[:, None], residual.log(), mu_n)  # (b, V) unnormalized is fine
        corrected = sample(corrected_logp - torch.logsumexp(corrected_logp, -1, keepdim=True), generator)  # (b,)

        # Emit x_1 .. x_n and the corrected token; records use the blend at each token's own position.
        round_tokens = torch.cat([drafts, corrected[:, None]], dim=1)  # (b, gamma + 1)
        round_tokens[rows, n] = corrected
        kl_all = kl_divergence(mu_all, s_all)  # (b, gamma + 1)
        values = {"token": round_tokens, "behavior_logp": pick(mu_all, round_tokens),
                  "student_logp": pick(s_all, round_tokens), "teacher_logp": pick(t_all, round_tokens),
                  "beta": beta_all, "realized_kl": kl_all}
        # A stop token ends the row: nothing after the first stop is emitted.
        valid_slots = torch.arange(gamma + 1, device=device)[None] <= n[:, None]  # (b, gamma + 1) pending, x_1..x_n
        valid_emit = valid_slots & live[:, None]
        is_stop = (round_tokens == vocab.eos_id) & valid_emit
        valid_emit &= (torch.cumsum(is_stop, dim=1) - is_stop.long()) == 0
        emit(active, values, valid_emit)
        emitted = valid_emit.sum(1)  # (b,)
        stopped[active] |= is_stop.any(1) & (count[active] + emitted <= max_new_tokens)
        count[active] += emitted

        # Rejected drafts stay in the caches as masked slots; the pending token and accepted drafts are valid.
        if compile:
            valid[:, base : base + gamma + 1] = valid_slots
            student_steps.set_slots(base, valid_slots)  # the student opened every drafted slot: close the rejected
        else:
            attention[:, -(gamma + 1):] = valid_slots.long()
        next_position = next_position + n + 1
        pending = corrected

    stats.drafted, stats.tested, stats.accepted = counts.tolist()
    count = count.clamp_max(max_new_tokens)
    mask = torch.arange(max_new_tokens, device=device)[None] < count[:, None]  # (B, T)
    tokens = torch.where(mask, tokens, vocab.pad_id)
    for name in names:
        records[name] = torch.where(mask, records[name], 0.0)
    rollout = Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=tokens,
        completion_mask=mask,
        behavior_logp=records["behavior_logp"],
        student_logp=records["student_logp"],
        teacher_logp=records["teacher_logp"],
        beta=records["beta"],
        realized_kl=records["realized_kl"],
        from_teacher=torch.zeros_like(mask),
        stopped=stopped,
    )
    return rollout, stats
