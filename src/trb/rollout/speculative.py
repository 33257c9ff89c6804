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
(`TRBPolicy.target`), and randomness is keyed by (sequence, position, stream) as in lock-step decoding, so rows are
refilled from the queue as they finish (continuous batching) without changing any sequence. A (position, stream)
number can be read again in a later round only after the draft it drew was discarded unread by any emitted decision,
so every emitted token still sees fresh randomness.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from trb.core import entropy, keyed_sample, keyed_uniform, kl_divergence
from trb.models import VocabSpace
from trb.rollout.backends import make_decoder
from trb.rollout.engine import RECORDS, RolloutStats, sequence_keys
from trb.rollout.policies import BehaviorPolicy, TRBPolicy
from trb.sequences import Rollout, left_pad

DRAFT, ACCEPT, CORRECT = 0, 1, 2  # random streams: the student's draft, the accept test, the corrected/first token


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


@torch.no_grad()
def generate_speculative(
    policy: BehaviorPolicy | float,
    prompts: list[list[int]],
    vocab: VocabSpace,
    max_new_tokens: int,
    generator: torch.Generator | None,
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    gamma: int = 4,
    compile: bool = False,
    concurrency: int = 0,
    keys: torch.Tensor | None = None,
    forward: str = "auto",
    stats: RolloutStats | None = None,
    record_kl: bool = True,
) -> tuple[Rollout, SpeculativeStats]:
    """TRB rollouts by exact speculative sampling; same record format and arguments as `generate` (policy: one whose
    `speculative` is true, such as a TRBPolicy, or TRB's eps). compile=True runs the policy's target through
    torch.compile."""
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1, got {gamma}")
    policy = TRBPolicy(float(policy)) if isinstance(policy, (int, float)) else policy
    if not policy.speculative:
        raise ValueError(f"the {policy.name!r} behavior policy cannot be sampled speculatively")
    target = torch.compile(policy.target, dynamic=True) if compile else policy.target
    device = student.device
    spec = SpeculativeStats()
    stats = stats if stats is not None else RolloutStats()
    prompt_ids, prompt_mask = left_pad(prompts, vocab.pad_id, device)  # (B, P)
    batch = len(prompts)
    keys = (keys if keys is not None else sequence_keys(batch, generator)).to(device)  # (B,)
    concurrency = min(concurrency or batch, batch)
    stats.concurrency = max(stats.concurrency, concurrency)
    s_dec, t_dec = make_decoder(student, vocab, forward), make_decoder(teacher, vocab, forward)

    tokens = torch.full((batch, max_new_tokens), vocab.pad_id, dtype=torch.long, device=device)  # (B, T)
    records = {name: torch.zeros((batch, max_new_tokens), device=device) for name in RECORDS}  # each (B, T)
    count = torch.zeros(batch, dtype=torch.long, device=device)  # (B,) tokens emitted per sequence
    stopped = torch.zeros(batch, dtype=torch.bool, device=device)  # (B,)
    counts = torch.zeros(3, dtype=torch.long, device=device)  # drafted, tested, accepted (read once at the end)
    pick = lambda logp, tok: logp.gather(-1, tok[..., None])[..., 0]  # noqa: E731
    diagnostics = lambda s, t: {"teacher_kl": kl_divergence(s, t), "teacher_entropy": entropy(t)}  # noqa: E731

    def emit(seq: torch.Tensor, values: dict[str, torch.Tensor], valid: torch.Tensor) -> None:
        """Write per-row runs of new tokens: values[name] (b, k), valid (b, k) leading True entries."""
        cols = count[seq][:, None] + torch.arange(valid.shape[1], device=device)  # (b, k)
        keep = valid & (cols < max_new_tokens)  # (b, k)
        r, c = seq[:, None].expand_as(cols)[keep], cols[keep]
        tokens[r, c] = values["token"][keep]
        for name in RECORDS:
            if name in values:
                records[name][r, c] = values[name][keep].float()
        stopped[seq] |= ((values["token"] == vocab.eos_id) & keep).any(1)
        count[seq] += keep.sum(1)

    waiting = 0
    seq = torch.zeros(0, dtype=torch.long, device=device)  # (b,) the sequence each row decodes
    pending = torch.zeros(0, dtype=torch.long, device=device)  # (b,) emitted, not yet fed to either model
    while True:
        free = concurrency - len(seq)
        if free and waiting < batch:  # refill free rows; their first token is a plain draw from mu
            new = torch.arange(waiting, min(batch, waiting + free), device=device)  # (n,)
            waiting += len(new)
            chosen = [prompts[i] for i in new.tolist()]
            s_logp, t_logp = s_dec.add(chosen).float(), t_dec.add(chosen).float()  # (n, V) each
            mu, beta, realized = target(s_logp, t_logp)
            first = keyed_sample(mu, keys[new], torch.zeros_like(new), CORRECT)  # (n,)
            values = {"token": first, "behavior_logp": pick(mu, first), "student_logp": pick(s_logp, first),
                      "teacher_logp": pick(t_logp, first), "beta": beta, "realized_kl": realized,
                      **(diagnostics(s_logp, t_logp) if record_kl else {})}
            emit(new, {k: v[:, None] for k, v in values.items()}, torch.ones((len(new), 1), dtype=torch.bool,
                                                                              device=device))
            seq, pending = torch.cat([seq, new]), torch.cat([pending, first])
            stats.prompt_passes += 1
            spec.student_forwards += 1
            spec.teacher_forwards += 1
        finished = stopped[seq] | (count[seq] >= max_new_tokens)  # (b,)
        if int(finished.sum()):  # finished rows leave both decoders
            keep = (~finished).nonzero()[:, 0]
            s_dec.keep(keep)
            t_dec.keep(keep)
            seq, pending = seq[keep], pending[keep]
            if waiting < batch:
                continue
        if not len(seq):
            break
        b = len(seq)
        spec.rounds += 1
        row_keys = keys[seq]  # (b,)
        base = count[seq]  # (b,) completion position of the first draft

        # Draft: feed the pending token, then gamma draws from the student, each fed back.
        fed = [pending]  # pending, x_1 .. x_gamma
        student_dists = []  # pi_S after each fed token: s_0 .. s_gamma
        for i in range(gamma + 1):
            student_dists.append(s_dec.step(fed[-1][:, None])[:, 0].float())  # (b, V)
            spec.student_forwards += 1
            if i < gamma:
                fed.append(keyed_sample(student_dists[-1], row_keys, base + i, DRAFT))
        drafts = torch.stack(fed[1:], dim=1)  # (b, gamma)
        s_all = torch.stack(student_dists, dim=1)  # (b, gamma + 1, V)
        t_all = t_dec.step(torch.stack(fed, dim=1)).float()  # (b, gamma + 1, V): one teacher forward
        spec.teacher_forwards += 1
        stats.decode_steps += gamma + 1

        mu_all, beta_all, realized_all = target(s_all, t_all)  # (b, gamma + 1, V), (b, gamma + 1) each
        s_draft, mu_draft = pick(s_all[:, :gamma], drafts), pick(mu_all[:, :gamma], drafts)  # (b, gamma) each
        coins = torch.stack([keyed_uniform(row_keys, base + i, ACCEPT) for i in range(gamma)], dim=1)  # (b, gamma)
        accept = coins.log() < (mu_draft - s_draft)
        n = torch.cumprod(accept.long(), dim=1).sum(1)  # (b,) leading accepted drafts
        counts += torch.stack([torch.tensor(b * gamma, device=device), (n + (n < gamma).long()).sum(), n.sum()])

        # The token at position n: residual max(0, mu - pi_S) after a rejection, mu itself after full acceptance.
        rows = torch.arange(b, device=device)
        mu_n, s_n = mu_all[rows, n], s_all[rows, n]  # (b, V)
        residual = (mu_n.exp() - s_n.exp()).clamp_min(0.0)  # (b, V)
        use_residual = (n < gamma) & (residual.sum(-1) > 0)  # (b,)
        corrected_logp = torch.where(use_residual[:, None], residual.log(), mu_n)  # (b, V)
        corrected_logp = corrected_logp - torch.logsumexp(corrected_logp, -1, keepdim=True)
        corrected = keyed_sample(corrected_logp, row_keys, base + n, CORRECT)  # (b,)

        # Emit x_1 .. x_n and the corrected token; records use the blend at each token's own position.
        round_tokens = torch.cat([drafts, corrected[:, None]], dim=1)  # (b, gamma + 1)
        round_tokens[rows, n] = corrected
        values = {"token": round_tokens, "behavior_logp": pick(mu_all, round_tokens),
                  "student_logp": pick(s_all, round_tokens), "teacher_logp": pick(t_all, round_tokens),
                  "beta": beta_all, "realized_kl": realized_all,
                  **(diagnostics(s_all, t_all) if record_kl else {})}
        valid = torch.arange(gamma + 1, device=device)[None] <= n[:, None]  # (b, gamma + 1)
        is_stop = (round_tokens == vocab.eos_id) & valid
        valid &= (torch.cumsum(is_stop, dim=1) - is_stop.long()) == 0  # nothing after the first stop
        emit(seq, values, valid)
        stats.tokens += int(valid.sum())
        # Both models were fed pending, x_1 .. x_gamma; the rejected drafts x_{n+1} .. x_gamma are forgotten.
        s_dec.truncate(gamma - n)
        t_dec.truncate(gamma - n)
        pending = corrected

    spec.drafted, spec.tested, spec.accepted = counts.tolist()
    mask = torch.arange(max_new_tokens, device=device)[None] < count.clamp_max(max_new_tokens)[:, None]  # (B, T)
    stats.add_reads("student", s_dec.reads)
    stats.add_reads("teacher", t_dec.reads)
    rollout = Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=torch.where(mask, tokens, vocab.pad_id),
        completion_mask=mask,
        behavior_logp=records["behavior_logp"],
        student_logp=records["student_logp"],
        teacher_logp=records["teacher_logp"],
        beta=records["beta"],
        realized_kl=records["realized_kl"],
        from_teacher=torch.zeros_like(mask),
        stopped=stopped,
        teacher_kl=records["teacher_kl"] if record_kl else None,
        teacher_entropy=records["teacher_entropy"] if record_kl else None,
    )
    return rollout, spec
