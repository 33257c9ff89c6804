"""The rollout engine: student and teacher decode in lock-step, with continuous batching.

TRB needs the teacher's next-token distribution at every step of the student's rollout, so both models advance one
token at a time over the same sequences, each through its own decoder (`trb.rollout.decoder`). A call's sequences
form a queue; up to `concurrency` of them decode at once, and a row whose sequence ends is refilled by the next one
waiting (its prompt pass joins the batch), so the batch stays full while work remains.

Every random number is keyed by (sequence key, position, stream) (`trb.core.keyed_uniform`): a sequence's tokens do
not depend on which sequences share its batch, on the queue order, on the concurrency or on the number of ranks.
Positions count attended tokens (the same rule as the training forward), so sampled and trained inputs agree.

The one host synchronization per step is the stop check (how many sequences just ended).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from trb.core import entropy, kl_divergence
from trb.models import VocabSpace
from trb.rollout.backends import make_decoder
from trb.rollout.decoder import Reads
from trb.rollout.policies import BehaviorPolicy, Draws, TRBPolicy
from trb.sequences import Rollout, left_pad

# per-token records; teacher_kl KL(pi_S || pi_T) and teacher_entropy H(pi_T) are the full-vocabulary values at the
# prefix (the loss's diagnostics when it reuses recorded teacher log-probs instead of a teacher pass)
RECORDS = ("behavior_logp", "student_logp", "teacher_logp", "beta", "realized_kl", "teacher_kl", "teacher_entropy")


@dataclass
class RolloutStats:
    """What one or more `generate` calls did: lock-step decode steps, prompt passes, tokens generated, the largest
    number of sequences decoding at once, and each role's KV reads (`trb.rollout.decoder.Reads`)."""

    decode_steps: int = 0
    prompt_passes: int = 0
    tokens: int = 0
    concurrency: int = 0
    reads: dict[str, Reads] = field(default_factory=dict)

    def add_reads(self, role: str, reads: Reads) -> None:
        total = self.reads.setdefault(role, Reads())
        total.read += reads.read
        total.filled += reads.filled

    @property
    def steps_over_ideal(self) -> float:
        """Decode steps relative to total tokens / concurrency (1 = every step decodes a full batch)."""
        return self.decode_steps * self.concurrency / max(self.tokens, 1)


def sequence_keys(count: int, generator: torch.Generator) -> torch.Tensor:
    """One 32-bit key per sequence from the generator, (count,) int64."""
    return torch.randint(0, 2**32, (count,), generator=generator, device=generator.device)


def _for_compile(policy: BehaviorPolicy, device: torch.device) -> BehaviorPolicy:
    """TRB's eps as a device tensor: compiled code then does not specialize on its value, which an annealed
    schedule changes at every optimizer step (one compilation instead of one per step)."""
    if isinstance(policy, TRBPolicy) and not isinstance(policy.eps, torch.Tensor):
        return dataclasses.replace(policy, eps=torch.tensor(float(policy.eps), device=device))
    return policy


@torch.no_grad()
def generate(
    policy: BehaviorPolicy,
    prompts: list[list[int]],
    vocab: VocabSpace,
    max_new_tokens: int,
    generator: torch.Generator | None = None,
    student: PreTrainedModel | None = None,
    teacher: PreTrainedModel | None = None,
    greedy: bool = False,
    record_topk: int = 0,
    record_kl: bool = True,
    compile: bool = False,
    concurrency: int = 0,
    keys: torch.Tensor | None = None,
    forward: str = "auto",
    stats: RolloutStats | None = None,
) -> Rollout:
    """Decode up to max_new_tokens for every prompt with the given behavior policy; rows of the result follow
    `prompts`.

    The student runs if the policy needs it, the teacher likewise; both must then be given. keys (B,) int64: each
    sequence's random key (the training loop derives them from (seed, step, sequence index)); without keys they are
    drawn from `generator`. concurrency: sequences decoding at once (0: all). greedy replaces sampling by argmax.
    record_topk = k > 0 (when both models run) also records the teacher's log-probs on the student's top-k.
    record_kl records the full-vocabulary KL(pi_S || pi_T) (both models running) and H(pi_T) (the teacher running) at
    each prefix: a few passes over (b, V) per step, which a caller whose loss computes them anyway turns off.
    forward: the decoder backend ("auto", "lean", "hf"; `trb.rollout.backends.make_decoder`). compile = True runs
    the policy's math through torch.compile. stats, if given, accumulates what the call did.
    """
    roles = {"student": (policy.needs_student, student), "teacher": (policy.needs_teacher, teacher)}
    for role, (needed, model) in roles.items():
        if needed and model is None:
            raise ValueError(f"the {policy.name!r} behavior policy needs a {role} model")
    device = (student if policy.needs_student else teacher).device
    prompt_ids, prompt_mask = left_pad(prompts, vocab.pad_id, device)  # (B, P)
    batch = len(prompts)
    if keys is None:
        if generator is None:
            raise ValueError("generate needs keys or a generator")
        keys = sequence_keys(batch, generator)
    keys = keys.to(device)  # (B,)
    concurrency = min(concurrency or batch, batch)
    decoders = {role: make_decoder(model, vocab, forward) for role, (needed, model) in roles.items() if needed}
    # a wrapper per call (the policy changes every step); TRB's eps is a tensor input, so its value is not specialized
    choose = torch.compile(_for_compile(policy, device).choose, dynamic=True) if compile else policy.choose

    tokens = torch.full((batch, max_new_tokens), vocab.pad_id, dtype=torch.long, device=device)  # (B, T)
    table = torch.zeros((len(RECORDS), batch, max_new_tokens), device=device)  # (R, B, T) one write per step
    records = dict(zip(RECORDS, table))  # each (B, T)
    from_teacher = torch.zeros((batch, max_new_tokens), dtype=torch.bool, device=device)  # (B, T)
    mask = torch.zeros((batch, max_new_tokens), dtype=torch.bool, device=device)  # (B, T)
    topk = record_topk if len(decoders) == 2 else 0
    topk_ids = torch.zeros((batch, max_new_tokens, topk), dtype=torch.long, device=device)  # (B, T, k)
    teacher_topk = torch.zeros((batch, max_new_tokens, topk), device=device)  # (B, T, k)
    stopped = torch.zeros(batch, dtype=torch.bool, device=device)  # (B,)

    waiting = 0  # the next sequence of the queue
    seq = torch.zeros(0, dtype=torch.long, device=device)  # (b,) the sequence each row decodes
    pos = torch.zeros(0, dtype=torch.long, device=device)  # (b,) the completion position each row samples next
    logp = {role: torch.zeros((0, vocab.size), device=device) for role in decoders}  # each (b, V)
    stats = stats if stats is not None else RolloutStats()
    stats.concurrency = max(stats.concurrency, concurrency)
    while True:
        free = concurrency - len(seq)
        if free and waiting < batch:  # refill free rows from the queue
            new = list(range(waiting, min(batch, waiting + free)))
            waiting = new[-1] + 1
            for role, dec in decoders.items():
                logp[role] = torch.cat([logp[role], dec.add([prompts[i] for i in new]).float()])
            seq = torch.cat([seq, torch.tensor(new, device=device)])
            pos = torch.cat([pos, torch.zeros(len(new), dtype=torch.long, device=device)])
            stats.prompt_passes += 1
        if not len(seq):
            break
        choice = choose(logp.get("student"), logp.get("teacher"), Draws(keys[seq], pos, greedy))
        token = choice.token  # (b,)
        flat = seq * max_new_tokens + pos  # (b,) index into the flattened (B, T) records
        tokens.view(-1).index_copy_(0, flat, token)
        mask.view(-1).index_fill_(0, flat, True)
        from_teacher.view(-1).index_copy_(0, flat, choice.from_teacher)
        picked = {role: role_logp.gather(-1, token[:, None])[:, 0] for role, role_logp in logp.items()}  # each (b,)
        values = {"behavior_logp": choice.behavior_logp, "beta": choice.beta, "realized_kl": choice.kl,
                  **{f"{role}_logp": value for role, value in picked.items()}}
        if record_kl and "teacher" in logp:
            values["teacher_entropy"] = entropy(logp["teacher"])  # (b,)
            if "student" in logp:
                values["teacher_kl"] = kl_divergence(logp["student"], logp["teacher"])  # (b,)
        zeros = torch.zeros_like(choice.beta)  # a role that does not run records zeros
        row = torch.stack([values.get(name, zeros).float() for name in RECORDS])  # (R, b)
        table.view(len(RECORDS), -1).index_copy_(1, flat, row)
        if topk:
            ids = logp["student"].topk(topk, dim=-1).indices  # (b, k)
            topk_ids[seq, pos] = ids
            teacher_topk[seq, pos] = logp["teacher"].gather(-1, ids)
        is_eos = token == vocab.eos_id  # (b,)
        stopped[seq] = is_eos
        stats.tokens += len(seq)
        pos = pos + 1
        finished = is_eos | (pos >= max_new_tokens)  # (b,)
        if int(finished.sum()):  # the one host sync per step
            keep = (~finished).nonzero()[:, 0]  # (b',)
            for dec in decoders.values():
                dec.keep(keep)
            seq, pos, token = seq[keep], pos[keep], token[keep]
            logp = {role: value[keep] for role, value in logp.items()}
        if len(seq):
            logp = {role: dec.step(token[:, None])[:, 0].float() for role, dec in decoders.items()}  # each (b, V)
            stats.decode_steps += 1

    for role, dec in decoders.items():
        stats.add_reads(role, dec.reads)
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=tokens,
        completion_mask=mask,
        behavior_logp=records["behavior_logp"],
        student_logp=records["student_logp"] if "student" in decoders else None,
        teacher_logp=records["teacher_logp"] if "teacher" in decoders else None,
        beta=records["beta"],
        realized_kl=records["realized_kl"],
        from_teacher=from_teacher,
        stopped=stopped,
        topk_ids=topk_ids if topk else None,
        teacher_topk_logp=teacher_topk if topk else None,
        teacher_kl=records["teacher_kl"] if record_kl and len(decoders) == 2 else None,
        teacher_entropy=records["teacher_entropy"] if record_kl and "teacher" in decoders else None,
    )
