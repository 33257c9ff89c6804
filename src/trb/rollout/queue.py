"""The queue of one rollout call, shared by the lock-step loop (`trb.rollout.lockstep`) and speculative TRB
(`trb.rollout.speculative`): which sequences decode, admission by KV memory, preemption, the per-token records and
the finished `Rollout`.

**Admission by KV memory.** Each model's decoder holds a KV budget of `budget` slots (by default
`batch x (longest prompt + max_new_tokens)`, what a dense cache of `batch` rows held). A row holds one slot per token
fed to it: its prompt and the tokens it has decoded. Sequences join in queue order while the budget holds the rows
already decoding, the new row's prompt, and the slots every row needs for the next decode step (1 in lock-step,
gamma + 1 in a speculative round): admission is optimistic, it does not reserve what a row may decode later, so short
sequences keep many rows busy and a step's drain ends with its longest sequence. When the rows grow past the budget,
the rows admitted last are preempted: they leave the decoders (their KV is freed), keep the tokens and records they
emitted, and go back to the front of the queue; readmitted, they pass their prompt and emitted tokens in one prompt
pass and continue where they stopped. A sequence's randomness is keyed by (key, position, stream), so its tokens do
not depend on the schedule: preemption is exact (up to floating-point ties between batch shapes). At most
ROW_FACTOR x batch rows decode at once (the vocabulary-sized work of a step grows with rows, not with KV slots), and
one row always decodes, whatever its length.

**Records.** Every emitted token writes its records at (sequence, position) of flat (B * T) buffers in one copy per
record table; an entry that must not be written (a speculative position past a stop or past max_new_tokens) goes to
a scratch slot at the end, so writing needs no host synchronization.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from trb.core import entropy, kl_divergence
from trb.models import VocabSpace
from trb.rollout.decoder import Decoder, Reads
from trb.rollout.policies import Draws
from trb.sequences import Rollout, left_pad

# per-token records; teacher_kl KL(pi_S || pi_T) and teacher_entropy H(pi_T) are the full-vocabulary values at the
# prefix (the loss's diagnostics when it reuses recorded teacher log-probs instead of a teacher pass)
RECORDS = ("behavior_logp", "student_logp", "teacher_logp", "beta", "realized_kl", "teacher_kl", "teacher_entropy",
           "from_teacher")
ROW_FACTOR = 4  # at most this many times `batch` rows decode at once


@dataclass
class RolloutStats:
    """What one or more rollout calls did: decode steps (a speculative round counts gamma + 1), prompt passes,
    tokens generated, the KV budget's size in sequences (`batch`), the most rows decoding at once, the most KV slots
    held at once (per model), preemptions, each role's KV reads (`trb.rollout.decoder.Reads`), and speculative TRB's
    drafts: proposed, put to the accept test (those after a rejection are not) and accepted."""

    decode_steps: int = 0
    prompt_passes: int = 0
    tokens: int = 0
    batch: int = 0
    rows: int = 0
    peak_slots: int = 0
    preemptions: int = 0
    reads: dict[str, Reads] = field(default_factory=dict)
    drafted: int = 0
    tested: int = 0
    accepted: int = 0

    def add_reads(self, role: str, reads: Reads) -> None:
        total = self.reads.setdefault(role, Reads())
        total.read += reads.read
        total.filled += reads.filled

    @property
    def steps_over_ideal(self) -> float:
        """Decode steps relative to total tokens / batch (1 = every step decodes `batch` sequences)."""
        return self.decode_steps * self.batch / max(self.tokens, 1)

    @property
    def acceptance(self) -> float:
        """Per-draft acceptance probability, 1 - TV(mu, pi_S) averaged over tested positions."""
        return self.accepted / max(self.tested, 1)


def model_records(logp: dict[str, torch.Tensor], token: torch.Tensor, record_kl: bool) -> dict[str, torch.Tensor]:
    """Each running model's log-prob of the emitted token, and with record_kl the prefix's KL(pi_S || pi_T) (both
    models running) and H(pi_T) (the teacher running). logp: role -> (..., V); token (...); each record (...)."""
    out = {f"{role}_logp": value.gather(-1, token[..., None])[..., 0] for role, value in logp.items()}
    if record_kl and "teacher" in logp:
        out["teacher_entropy"] = entropy(logp["teacher"])
        if "student" in logp:
            out["teacher_kl"] = kl_divergence(logp["student"], logp["teacher"])
    return out


class Queue:
    """One call's sequences: the waiting queue, the rows decoding (`seq`, the sequence each row decodes, and
    `state`, per-row tensors the loop keeps, reindexed with the rows), the decoders, and the records.

    prompts: B token-id lists; keys (B,) int64 on the device; decoders: role -> Decoder (the models that run);
    batch: the KV budget in sequences of (longest prompt + max_new_tokens) slots (0: all B).
    """

    def __init__(self, prompts: list[list[int]], keys: torch.Tensor, max_new_tokens: int, vocab: VocabSpace,
                 decoders: dict[str, Decoder], batch: int, stats: RolloutStats, record_kl: bool = True,
                 record_topk: int = 0):
        self.prompts, self.keys, self.max_new_tokens, self.vocab = prompts, keys, max_new_tokens, vocab
        self.decoders, self.stats, self.record_kl = decoders, stats, record_kl
        self.device = keys.device
        self.prompt_ids, self.prompt_mask = left_pad(prompts, vocab.pad_id, self.device)  # (B, P) each
        count, steps = len(prompts), max_new_tokens
        batch = min(batch or count, count)
        self.budget = batch * (max(map(len, prompts)) + max_new_tokens)  # KV slots per model
        self.max_rows = ROW_FACTOR * batch
        stats.batch = max(stats.batch, batch)
        self.waiting = deque(range(count))
        self.paused: dict[int, int] = {}  # preempted sequence -> tokens it had emitted
        self.seq = torch.zeros(0, dtype=torch.long, device=self.device)  # (b,)
        self.state: dict[str, torch.Tensor] = {}  # each (b, ...)
        self.held: list[int] = []  # KV slots each row holds in every decoder
        self.order: list[int] = []  # admission stamps (the latest admitted are preempted first)
        self.admitted = 0
        self.count = torch.zeros(count, dtype=torch.long, device=self.device)  # (B,) tokens emitted
        # flat (B * T) buffers plus one scratch entry for writes that must not land
        self.tokens = torch.full((count * steps + 1,), vocab.pad_id, dtype=torch.long, device=self.device)
        self.table = torch.zeros((len(RECORDS), count * steps + 1), device=self.device)  # (R, B * T + 1)
        self.topk = record_topk if len(decoders) == 2 else 0
        self.topk_ids = torch.zeros((count * steps + 1, self.topk), dtype=torch.long, device=self.device)
        self.teacher_topk = torch.zeros((count * steps + 1, self.topk), device=self.device)

    # -- rows ----------------------------------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        return len(self.held)

    def _fits(self, extra: int, rows: int, grow: int) -> bool:
        return sum(self.held) + extra + rows * grow <= self.budget

    def admit(self, grow: int, held_back: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """Waiting sequences join while the budget holds them (module docstring); their prompt pass feeds the prompt
        and the tokens they emitted before a preemption, all but the last `held_back` of them. Returns the new rows'
        sequences (n,) and each decoder's next-token log-probs (n, V), or None when none joins."""
        chosen, inputs, extra = [], [], 0
        while self.waiting and self.rows + len(chosen) < self.max_rows:
            i = self.waiting[0]
            emitted = self.paused.get(i, 0)
            fed = self.prompts[i] + self._emitted(i, emitted - held_back if emitted else 0)
            if (self.rows or chosen) and not self._fits(extra + len(fed), self.rows + len(chosen) + 1, grow):
                break
            self.paused.pop(self.waiting.popleft(), None)
            chosen.append(i)
            inputs.append(fed)
            extra += len(fed)
        if not chosen:
            return None
        logp = {role: dec.add(inputs).float() for role, dec in self.decoders.items()}  # each (n, V)
        new = torch.tensor(chosen, device=self.device)  # (n,)
        self.seq = torch.cat([self.seq, new])
        self.held += [len(x) for x in inputs]
        self.order += range(self.admitted, self.admitted + len(chosen))
        self.admitted += len(chosen)
        self.stats.prompt_passes += 1
        self.stats.rows = max(self.stats.rows, self.rows)
        return new, logp

    def _emitted(self, i: int, n: int) -> list[int]:
        start = i * self.max_new_tokens
        return self.tokens[start : start + n].tolist() if n else []

    def join(self, **values: torch.Tensor) -> None:
        """Append the rows `admit` just added to each per-row state tensor, values[name] (n, ...)."""
        for name, value in values.items():
            self.state[name] = torch.cat([self.state[name], value]) if name in self.state else value

    def keep(self, rows: torch.Tensor, kept: list[int]) -> None:
        """Keep only these rows (b',) int64, in this order (kept: the same on the host)."""
        for dec in self.decoders.values():
            dec.keep(rows)
        self.seq = self.seq[rows]
        self.state = {name: value[rows] for name, value in self.state.items()}
        self.held = [self.held[r] for r in kept]
        self.order = [self.order[r] for r in kept]

    def retire(self) -> None:
        """Finished rows leave (the one host synchronization of a decode step): their last token is a stop or they
        reached max_new_tokens."""
        count = self.count[self.seq]  # (b,)
        last = self.tokens[self.seq * self.max_new_tokens + count - 1]  # (b,)
        done = (last == self.vocab.eos_id) | (count >= self.max_new_tokens)  # (b,)
        if int(done.sum()):
            rows = (~done).nonzero()[:, 0]  # (b',)
            self.keep(rows, rows.tolist())

    def make_room(self, grow: int) -> None:
        """Preempt the rows admitted last until every row fits `grow` more slots (one row always stays); they go
        back to the front of the queue, in their order."""
        evicted = []
        by_age = sorted(range(self.rows), key=self.order.__getitem__)
        while len(by_age) > 1 and not self._fits(-sum(self.held[r] for r in evicted), len(by_age), grow):
            evicted.append(by_age.pop())
        if evicted:
            seq = self.seq[evicted]  # (e,)
            self.paused.update(zip(seq.tolist(), self.count[seq].tolist()))
            self.waiting.extendleft(seq.tolist())  # the earliest admitted ends up first
            kept = sorted(by_age)
            self.keep(torch.tensor(kept, dtype=torch.long, device=self.device), kept)
            self.stats.preemptions += len(evicted)

    # -- decoding ------------------------------------------------------------------------------------------------

    def feed(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Feed tokens (b, w) to every decoder; returns each model's log-probs after each of them, (b, w, V)."""
        self.grow(tokens.shape[1])
        return {role: dec.step(tokens).float() for role, dec in self.decoders.items()}

    def grow(self, width: int) -> None:
        """Count `width` tokens fed to every row of every decoder (decode steps, KV slots held)."""
        self.held = [n + width for n in self.held]
        self.stats.peak_slots = max(self.stats.peak_slots, sum(self.held))
        self.stats.decode_steps += width

    def truncate(self, drop: torch.Tensor) -> None:
        """Every decoder forgets the last drop[r] tokens fed to row r, drop (b,) int64."""
        for dec in self.decoders.values():
            dec.truncate(drop)
        self.held = [n - d for n, d in zip(self.held, drop.tolist())]

    def draws(self, greedy: bool) -> Draws:
        """The randomness of the rows' next token: keyed by each sequence and the position it samples."""
        return Draws(self.keys[self.seq], self.count[self.seq], greedy)

    def emit(self, values: dict[str, torch.Tensor], valid: torch.Tensor | None = None,
             seq: torch.Tensor | None = None) -> None:
        """Write runs of new tokens at each sequence's next positions: values["token"] and records named in RECORDS,
        each (b, k); valid (b, k): leading True entries are emitted (None: all). seq: the rows' sequences (default:
        every row). Positions past max_new_tokens are dropped."""
        seq = self.seq if seq is None else seq
        token = values["token"]  # (b, k)
        cols = self.count[seq][:, None] + torch.arange(token.shape[1], device=self.device)  # (b, k)
        keep = cols < self.max_new_tokens if valid is None else valid & (cols < self.max_new_tokens)  # (b, k)
        flat = torch.where(keep, seq[:, None] * self.max_new_tokens + cols, len(self.tokens) - 1).flatten()  # (b k,)
        self.tokens.index_copy_(0, flat, token.flatten())
        zeros = torch.zeros_like(token, dtype=self.table.dtype)
        rows = torch.stack([values.get(name, zeros).to(self.table.dtype) for name in RECORDS])  # (R, b, k)
        self.table.index_copy_(1, flat, rows.flatten(1))
        if self.topk and "student_topk" in values:
            self.topk_ids.index_copy_(0, flat, values["student_topk"].flatten(0, 1))
            self.teacher_topk.index_copy_(0, flat, values["teacher_topk"].flatten(0, 1))
        self.count.index_add_(0, seq, keep.sum(1))

    def rollout(self) -> Rollout:
        """The finished sequences, rows in prompt order."""
        for role, dec in self.decoders.items():
            self.stats.add_reads(role, dec.reads)
        self.stats.tokens += int(self.count.sum())
        count, steps = len(self.prompts), self.max_new_tokens
        mask = torch.arange(steps, device=self.device)[None] < self.count[:, None]  # (B, T)
        tokens = self.tokens[:-1].view(count, steps)  # (B, T)
        records = dict(zip(RECORDS, self.table[:, :-1].view(len(RECORDS), count, steps)))  # each (B, T)
        last = tokens.gather(1, (self.count - 1).clamp_min(0)[:, None])[:, 0]  # (B,)
        roles = self.decoders
        diagnostics = self.record_kl and "teacher" in roles
        return Rollout(
            prompt_ids=self.prompt_ids,
            prompt_mask=self.prompt_mask,
            completion_ids=tokens,
            completion_mask=mask,
            behavior_logp=records["behavior_logp"],
            student_logp=records["student_logp"] if "student" in roles else None,
            teacher_logp=records["teacher_logp"] if "teacher" in roles else None,
            beta=records["beta"],
            realized_kl=records["realized_kl"],
            from_teacher=records["from_teacher"].bool(),
            stopped=(last == self.vocab.eos_id) & (self.count > 0),
            topk_ids=self.topk_ids[:-1].view(count, steps, -1) if self.topk else None,
            teacher_topk_logp=self.teacher_topk[:-1].view(count, steps, -1) if self.topk else None,
            teacher_kl=records["teacher_kl"] if diagnostics and len(roles) == 2 else None,
            teacher_entropy=records["teacher_entropy"] if diagnostics else None,
        )
