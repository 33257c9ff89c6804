"""The own engine on a mock decoder (fixed tables of logits, no model): refill order, stops, truncation at
max_new_tokens and of rejected drafts, admission by KV memory, exact preemption, and every sequence's independence of
the schedule. Each test runs in milliseconds."""

from types import SimpleNamespace

import pytest
import torch

from trb.models import VocabSpace
from trb.rollout import (MixturePolicy, OwnEngine, Reads, RolloutStats, SKDPolicy, StudentPolicy, TeacherPolicy,
                         TRBPolicy)

V, EOS, PAD = 12, 1, 0
SPACE = VocabSpace(size=V, stop_ids=(EOS,), eos_id=EOS, pad_id=PAD)
CONTEXTS = 97  # rows of each table


class TableDecoder:
    """A decoder whose next-token log-probs after a row's tokens are row (31 x last token + length) mod CONTEXTS of
    a fixed table: they depend on the row's last token and length, so keeping, truncating and refilling rows must
    be bookkept exactly, and they do not depend on the batch (the schedule cannot change a single bit). `log`
    records every operation: ("add", first tokens), ("step", rows, width), ("keep", rows), ("truncate", drops)."""

    def __init__(self, logp: torch.Tensor, log: list):
        self.logp, self.log, self.reads = logp, log, Reads()
        self.held: list[list[int]] = []
        self.peak = 0

    @property
    def rows(self) -> int:
        return len(self.held)

    def after(self, tokens: list[int]) -> torch.Tensor:
        return self.logp[(31 * tokens[-1] + len(tokens)) % CONTEXTS]  # (V,)

    def _grew(self) -> None:
        self.peak = max(self.peak, sum(map(len, self.held)))

    def add(self, prompts: list[list[int]]) -> torch.Tensor:
        self.log.append(("add", [p[0] for p in prompts]))
        self.held += [list(p) for p in prompts]
        self._grew()
        return torch.stack([self.after(p) for p in prompts])  # (n, V)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.log.append(("step", *tokens.shape))
        out = []
        for row, new in zip(self.held, tokens.tolist()):
            out.append([self.after(row + new[: i + 1]) for i in range(len(new))])
            row += new
        self._grew()
        self.reads.read += sum(map(len, self.held))
        self.reads.filled += sum(map(len, self.held))
        return torch.stack([torch.stack(r) for r in out])  # (b, w, V)

    def keep(self, rows: torch.Tensor) -> None:
        self.log.append(("keep", rows.tolist()))
        self.held = [self.held[r] for r in rows.tolist()]

    def truncate(self, drop: torch.Tensor) -> None:
        self.log.append(("truncate", drop.tolist()))
        for row, n in zip(self.held, drop.tolist()):
            del row[len(row) - n :]


def tables(stop: float = 0.0) -> dict[str, torch.Tensor]:
    """Student and teacher log-prob tables (CONTEXTS, V), EOS's logit raised by `stop`."""
    generator = torch.Generator().manual_seed(0)
    out = {}
    for role in ("student", "teacher"):
        logits = 1.5 * torch.randn(CONTEXTS, V, generator=generator)
        logits[:, EOS] += stop
        out[role] = logits.log_softmax(-1)
    return out


def engine(log=None, stop=0.0, **options):
    """An OwnEngine over two table decoders; the made decoders are listed in engine.made[role]."""
    log = [] if log is None else log
    logp = tables(stop)
    models = {role: SimpleNamespace(role=role, device=torch.device("cpu")) for role in logp}
    made = {role: [] for role in logp}

    def decoders(model):
        made[model.role].append(TableDecoder(logp[model.role], log))
        return made[model.role][-1]

    own = OwnEngine(models["student"], models["teacher"], SPACE, decoders, **options)
    own.made, own.log, own.tables = made, log, logp
    return own


PROMPTS = [[2 + i % 9] * (1 + i % 4) for i in range(24)]  # lengths 1-4, first tokens 2-10
KEYS = torch.arange(len(PROMPTS)) * 7919 + 5
POLICIES = [StudentPolicy(), StudentPolicy(0.7), TRBPolicy(0.2), SKDPolicy(top_k=3), MixturePolicy(0.3),
            TeacherPolicy()]


def assert_same_sequences(a, b):
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.completion_mask, b.completion_mask)
    assert torch.equal(a.stopped, b.stopped) and torch.equal(a.from_teacher, b.from_teacher)
    for name in ("behavior_logp", "student_logp", "teacher_logp", "beta", "realized_kl", "teacher_kl"):
        if getattr(a, name) is not None:
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=1e-6)


def test_refill_admits_the_queue_in_order_and_retires_finished_rows():
    own = engine(stop=1.5, batch=4)
    rollout = own.rollout(StudentPolicy(), PROMPTS, 6, KEYS)
    added = [first for op, *args in own.log if op == "add" for first in args[0]]
    assert added == [p[0] for p in PROMPTS], "every sequence joins once, in queue order (no preemption here)"
    assert own.stats.preemptions == 0 and own.stats.prompt_passes > 1
    # after every step, the rows fed are exactly the sequences still decoding
    alive = 0
    for op, *args in own.log:
        if op == "add":
            alive += len(args[0])
        elif op == "keep":
            alive = len(args[0])
        elif op == "step":
            assert args[0] == alive
    assert int(rollout.completion_mask.sum()) == own.stats.tokens


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: repr(p)[:24])
def test_stops_and_max_new_tokens(policy):
    own = engine(stop=1.5, batch=3)
    rollout = own.rollout(policy, PROMPTS, 5, KEYS)
    ids, mask = rollout.completion_ids, rollout.completion_mask
    lengths = rollout.lengths
    assert rollout.stopped.any() and (lengths == 5).any(), "the case mixes stops and truncation"
    for row in range(len(PROMPTS)):
        n = int(lengths[row])
        assert mask[row, :n].all() and not mask[row, n:].any() and (ids[row, n:] == PAD).all()
        assert (ids[row, : n - 1] != EOS).all(), "nothing after the first stop"
        assert bool(rollout.stopped[row]) == (ids[row, n - 1] == EOS)
        assert n == 5 or rollout.stopped[row], "a sequence ends at a stop or at max_new_tokens"


def prefixes(rollout, prompts) -> tuple[list[list[int]], list[int], torch.Tensor]:
    """Every emitted token's prefix (prompt + completion before it), the token, and its (row, position) mask."""
    contexts, tokens = [], []
    for row, prompt in enumerate(prompts):
        completion = rollout.completion_ids[row, : int(rollout.lengths[row])].tolist()
        contexts += [prompt + completion[:j] for j in range(len(completion))]
        tokens += completion
    return contexts, tokens, rollout.completion_mask


def table_logp(table: torch.Tensor, contexts: list[list[int]]) -> torch.Tensor:
    """A fresh lookup of the log-probs after each context, (N, V)."""
    return torch.stack([TableDecoder(table, []).after(c) for c in contexts])


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: repr(p)[:24])
def test_records_are_the_tables_at_each_prefix(policy):
    """What a fresh forward would give: each recorded log-prob is the table's at the token's own prefix, and the
    behavior log-prob, beta and KL are the policy's distribution there."""
    own = engine(stop=0.5, batch=2, record_topk=2)
    rollout = own.rollout(policy, PROMPTS[:10], 6, KEYS[:10])
    contexts, tokens, mask = prefixes(rollout, PROMPTS[:10])
    token = torch.tensor(tokens)[:, None]  # (N, 1)
    logp = {role: table_logp(table, contexts) for role, table in own.tables.items()}  # each (N, V)
    mu, beta, kl = policy.distribution(logp["student"] if policy.needs_student else None,
                                       logp["teacher"] if policy.needs_teacher else None)  # (N, V), (N,), (N,)

    def close(recorded, expected):
        torch.testing.assert_close(recorded[mask], expected, rtol=0, atol=1e-6)

    close(rollout.behavior_logp, mu.gather(1, token)[:, 0])
    close(rollout.beta, beta)
    close(rollout.realized_kl, kl)
    for role in ("student", "teacher"):
        recorded, needed = getattr(rollout, f"{role}_logp"), getattr(policy, f"needs_{role}")
        assert (recorded is None) != needed
        if needed:
            close(recorded, logp[role].gather(1, token)[:, 0])
    if policy.needs_student and policy.needs_teacher:
        assert torch.equal(rollout.topk_ids[mask], logp["student"].topk(2).indices)


@pytest.mark.parametrize("policy", POLICIES + ["speculative"], ids=lambda p: repr(p)[:24])
def test_a_sequence_does_not_depend_on_the_schedule(policy):
    """Keyed randomness: every sequence decodes the same tokens and records with all sequences at once and, in
    another queue order, with a budget of two dense rows that forces preemption."""
    gamma = 3 if policy == "speculative" else 0
    policy = TRBPolicy(0.2) if policy == "speculative" else policy
    prompts, keys = PROMPTS[:12], KEYS[:12]
    reference = engine(stop=0.3, gamma=gamma).rollout(policy, prompts, 8, keys)
    assert reference.stopped.any() and not reference.stopped.all()
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(1))
    own = engine(stop=0.3, gamma=gamma, batch=2)
    rollout = own.rollout(policy, [prompts[i] for i in order], 8, keys[order]).select(order.argsort())
    assert own.stats.preemptions > 0, "the budget forces preemption"
    assert_same_sequences(reference, rollout)


def test_admission_holds_the_kv_budget_and_reaches_the_longest_sequence():
    """Rows join while the budget holds them: with the dense cache's budget the step ends with its longest
    sequence; a budget of one dense row keeps every decoder within it (one row may always decode)."""
    own = engine(stop=1.0, batch=16)
    rollout = own.rollout(StudentPolicy(), PROMPTS, 8, KEYS)
    budget = 16 * (4 + 8)
    assert own.stats.rows > 16, "short sequences let more rows than `batch` decode"
    assert own.stats.decode_steps == int(rollout.lengths.max()) - 1, "the drain ends with the longest sequence"
    assert own.made["student"][0].peak <= budget and own.stats.peak_slots <= budget
    small = engine(stop=1.0, batch=1)
    small.rollout(StudentPolicy(), PROMPTS, 8, KEYS)
    assert small.made["student"][0].peak <= 4 + 8 and small.stats.preemptions > 0


def test_speculative_rounds_truncate_rejected_drafts():
    """One teacher step of gamma + 1 tokens per round; both decoders forget the rejected drafts, so every record
    is the table's at its prefix (checked against a fresh lookup), and the drafts' counts add up."""
    own = engine(stop=0.3, gamma=3, batch=2)
    rollout = own.rollout(TRBPolicy(0.5), PROMPTS[:8], 10, KEYS[:8])
    teacher_steps = [args for op, *args in own.log if op == "step" and args[1] == 4]
    assert len(teacher_steps) * 4 == own.stats.decode_steps, "one teacher forward of gamma + 1 tokens per round"
    drops = [d for op, *args in own.log if op == "truncate" for d in args[0]]
    assert any(drops), "some drafts were rejected"
    assert 0 < own.stats.accepted <= own.stats.tested <= own.stats.drafted
    contexts, tokens, mask = prefixes(rollout, PROMPTS[:8])
    for role, table in own.tables.items():
        expected = table_logp(table, contexts).gather(1, torch.tensor(tokens)[:, None])[:, 0]
        torch.testing.assert_close(getattr(rollout, f"{role}_logp")[mask], expected, rtol=0, atol=1e-6)


def test_engine_refuses_missing_models_and_mismatched_keys():
    own = OwnEngine(None, SimpleNamespace(device=torch.device("cpu")), SPACE, lambda m: None)
    with pytest.raises(ValueError, match="needs a student"):
        own.rollout(TRBPolicy(0.1), PROMPTS, 4, KEYS)
    with pytest.raises(ValueError, match="as many keys"):
        engine().rollout(StudentPolicy(), PROMPTS, 4, KEYS[:3])
    with pytest.raises(ValueError, match="at least one token"):
        engine().rollout(StudentPolicy(), [[3], []], 4, KEYS[:2])
    stats = RolloutStats()
    assert stats.acceptance == 0 and stats.steps_over_ideal == 0
