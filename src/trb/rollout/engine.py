"""The rollout engine: student and teacher decode in lock-step, each with its own KV cache.

TRB needs the teacher's next-token distribution at every step of the student's rollout, so both models advance one
token at a time over the same sequences. Prompts are left-padded; position ids come from the attention mask (the
same rule as Hugging Face `generate` and as the training forward pass, so sampled and trained inputs agree).

Two cache modes:
- "dynamic" (default): caches that grow with the sequences: `trb.rollout.lean` for Llama-family models (preallocated,
  written in place), Hugging Face DynamicCache otherwise. When sequences finish, the batch is compacted: once
  finished rows make up COMPACT_AT of the batch they leave both caches and cost no further student or teacher work.
- "static": preallocated StaticCache of prompt + max_new_tokens slots (rounded up to a multiple of 64) for each
  model, kept on the model and reused by later rollouts of the same shape; finished rows keep running as padding
  (fixed shapes, for compiled decoding).

With compile=True and a static cache the single-token decode steps have fixed shapes. On a GPU both models' decode
steps are captured once as one CUDA graph and replayed (no per-kernel launch cost, no compilation wait), and so is
the policy's step; on a CPU each model's forward goes through torch.compile. The captured forwards are the models'
own (eager) kernels: measured at Qwen3-1.7B and -8B shapes (BENCHMARKS.md), inductor-compiled forwards inside the
graph ran slower (teacher step 27.0 ms against 13.5 ms), so they are opt-in (COMPILE_FORWARD_ON_GPU). With
compile=True and a dynamic cache (what `compiled_cache` picks on a CPU) the lean forward's prompt pass and
single-token step go through torch.compile with dynamic shapes. The policy's math (beta solve, blend, sampling) is
compiled in every case.

The only host synchronization per step is the stop check (how many sequences just ended); compiled decoding with
fixed shapes does it every 8 steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from dataclasses import dataclass, fields

import torch
from transformers import DynamicCache, PreTrainedModel, StaticCache

from trb.core import merged_logp, sample
from trb.models import VocabSpace
from trb.rollout import lean
from trb.rollout.policies import BehaviorPolicy, TRBPolicy

# transformers 5.x renames the forward's `past_key_values` to `cache` in some releases; the old name works on every
# 5.x release this project supports, so keep it and silence the rename notice.
warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated.*", category=FutureWarning)


@dataclass
class Rollout:
    """A batch of finished rollouts. B sequences, prompts left-padded to P, completions right-padded to T.

    completion_mask is 1 for sampled tokens up to and including the stop token. Per-token records (B, T) are
    zero/False at masked positions. student_logp / teacher_logp are the temperature-1 log-probabilities of the
    sampled token on the shared vocabulary (None when that model did not run). stopped: True where the sequence
    ended with EOS, False where it hit max_new_tokens.
    """

    prompt_ids: torch.Tensor  # (B, P) int64
    prompt_mask: torch.Tensor  # (B, P) bool
    completion_ids: torch.Tensor  # (B, T) int64
    completion_mask: torch.Tensor  # (B, T) bool
    behavior_logp: torch.Tensor  # (B, T)
    student_logp: torch.Tensor | None  # (B, T)
    teacher_logp: torch.Tensor | None  # (B, T)
    beta: torch.Tensor  # (B, T)
    realized_kl: torch.Tensor  # (B, T)
    from_teacher: torch.Tensor  # (B, T) bool
    stopped: torch.Tensor  # (B,) bool
    # With record_topk = k and both models decoding: the student's top-k token ids at each position and the
    # teacher's log-probs there, so a top-k loss can skip the second teacher pass.
    topk_ids: torch.Tensor | None = None  # (B, T, k) int64
    teacher_topk_logp: torch.Tensor | None = None  # (B, T, k)

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)  # (B,)

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask and position_ids (B, P + T) of prompt + completion, for a training forward."""
        input_ids = torch.cat([self.prompt_ids, self.completion_ids], dim=1)  # (B, P + T)
        attention_mask = torch.cat([self.prompt_mask, self.completion_mask], dim=1)  # (B, P + T)
        return input_ids, attention_mask, position_ids(attention_mask)

    def to(self, device: torch.device) -> Rollout:
        return Rollout(**{f.name: _move(getattr(self, f.name), device) for f in fields(self)})

    def select(self, rows: torch.Tensor | slice) -> Rollout:
        return Rollout(**{f.name: _index(getattr(self, f.name), rows) for f in fields(self)})


def _move(x, device):
    return None if x is None else x.to(device)


def _index(x, rows):
    return None if x is None else x[rows]


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over attended tokens only, (B, L); padded slots get 0 (they are never attended)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged prompts -> (ids, mask), each (B, P), padded on the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = True
    return ids.to(device), mask.to(device)


def rollout_from_tokens(
    prompts: list[list[int]], completions: list[list[int]], vocab: VocabSpace, device: torch.device
) -> Rollout:
    """A Rollout record of given prompt and completion tokens (dataset solutions, fixed data for GKD): prompts
    left-padded, completions right-padded, per-token records zero. A completion ending in EOS counts as stopped."""
    prompt_ids, prompt_mask = left_pad(prompts, vocab.pad_id, device)  # (B, P)
    width = max(1, max(len(c) for c in completions))
    completion_ids = torch.full((len(completions), width), vocab.pad_id, dtype=torch.long)  # (B, T)
    completion_mask = torch.zeros((len(completions), width), dtype=torch.bool)  # (B, T)
    for row, tokens in enumerate(completions):
        completion_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        completion_mask[row, : len(tokens)] = True
    zeros = torch.zeros((len(completions), width), device=device)
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids.to(device),
        completion_mask=completion_mask.to(device),
        behavior_logp=zeros,
        student_logp=None,
        teacher_logp=None,
        beta=zeros,
        realized_kl=zeros,
        from_teacher=torch.zeros((len(completions), width), dtype=torch.bool, device=device),
        stopped=torch.tensor([len(c) > 0 and c[-1] == vocab.eos_id for c in completions], device=device),
    )


STATIC_CACHE_ROUND = 64  # static caches come in multiples of this many slots, so nearby prompt widths share one
COMPILE_FORWARD_ON_GPU = False  # compiled decoding on a GPU: also torch.compile the forwards captured in the graph
# With a dynamic cache, finished rows leave the caches once they are this fraction of the rows decoding; until then
# they decode as padding. Every compaction copies every cache, so it pays to drop rows in bunches.
COMPACT_AT = 1 / 8
LEAN_DECODE = True  # dynamic-cache decoding of Llama-family models through trb.rollout.lean (False: their own forward)


def _static_cache(model: PreTrainedModel, batch: int, cache_len: int) -> StaticCache:
    """The model's StaticCache for (batch, cache_len), emptied. It is kept on the model and reused: compiled decode
    steps refer to its tensors, so a fresh cache per rollout would mean recompiling every time. Only the latest shape
    is kept (an 8B teacher's cache at 64 x 1,024 slots is 9.7 GB)."""
    store = vars(model).setdefault("_trb_static_caches", {})
    cache = store.get((batch, cache_len))
    if cache is None:
        store.clear()
        cache = store[(batch, cache_len)] = StaticCache(config=model.config, max_cache_len=cache_len)
    else:
        cache.reset()
    return cache


class _Decoder:
    """One model's incremental decoding state: its cache and the next-token log-probs on the shared vocabulary."""

    def __init__(self, model: PreTrainedModel, vocab: VocabSpace, cache: str, max_len: int, compile: bool = False,
                 batch: int = 0, compile_forward: bool | None = None):
        self.model = model
        self.vocab = vocab
        self.stop_ids = vocab.stop_tensor(model.device)
        self.lean = None
        if cache == "static":
            self.cache = _static_cache(model, batch, max_len)
        elif LEAN_DECODE and lean.supports(model):
            self.cache = self.lean = lean.LeanCache(model, capacity=max_len, compile=compile)
        else:
            self.cache = DynamicCache(config=model.config)
        # Decode steps have fixed shapes with a static cache: one compiled graph serves them all. On a GPU the
        # steps are captured as a CUDA graph (_GraphedSteps), over the eager forward unless asked otherwise. With a
        # dynamic cache only the lean forward compiles (its own single-token step, dynamic shapes).
        if compile_forward is None:
            compile_forward = (compile and cache == "static"
                               and (not _use_graphs(model.device) or COMPILE_FORWARD_ON_GPU))
        self.decode_forward = torch.compile(model.forward, dynamic=False) if compile_forward else model.forward

    @torch.no_grad()
    def step(self, input_ids, attention_mask, positions, keep: int = 1) -> torch.Tensor:
        """Feed (b, L) tokens; return the next-token log-probs after each of the last `keep` of them, (b, keep, V)
        (or (b, V) for keep = 1). Single-token steps go through the compiled forward when there is one."""
        if self.lean is not None:
            logits = self.lean.step(input_ids, attention_mask, positions, keep)  # (b, keep, V)
        else:
            forward = self.decode_forward if input_ids.shape[1] == 1 else self.model
            logits = forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=positions,
                past_key_values=self.cache,
                use_cache=True,
                logits_to_keep=keep,
            ).logits[:, -keep:]
        logp = merged_logp(logits, self.vocab.size, self.stop_ids, self.vocab.eos_id)  # (b, keep, V)
        return logp[:, -1] if keep == 1 else logp

    def keep(self, rows: torch.Tensor) -> None:
        if self.lean is not None:
            self.lean.keep(rows)
        else:
            self.cache.batch_select_indices(rows)


def compiled_cache(device: torch.device) -> str:
    """The cache compiled decoding uses on this device: static on a GPU (fixed shapes, captured as CUDA graphs), dynamic
    on a CPU (the lean forward compiled with dynamic shapes; finished rows leave the batch). On a CPU compiled static
    decoding ran slower than eager (BENCHMARKS.md)."""
    return "static" if _use_graphs(device) else "dynamic"


def _use_graphs(device: torch.device) -> bool:
    """Whether compiled decoding captures CUDA graphs (on a GPU) rather than going through torch.compile."""
    return device.type == "cuda"


class _GraphedSteps:
    """Every decoder's single-token step (forward and log-probs) as one CUDA graph over fixed buffers.

    Inputs live in fixed tensors: the token (b, 1), its position (b, 1), and an additive attention mask
    (b, 1, 1, S) per model dtype that opens the prompt's slots and then each decoded slot as it is written (padding
    and causality in one, so the model builds no mask of its own). The first step runs eagerly on a side stream,
    which warms up kernels and workspaces and writes the real first slot; the graph is captured right after and every
    later step copies its inputs in and replays it. Off CUDA the same buffers are used without capture.
    The returned log-probs are the graph's output buffers: read them before the next step.
    """

    def __init__(self, decoders: dict[str, _Decoder], prompt_mask: torch.Tensor, cache_len: int):
        self.decoders = decoders
        batch, self.slot = prompt_mask.shape
        device = prompt_mask.device
        self.token = torch.zeros((batch, 1), dtype=torch.long, device=device)  # (b, 1)
        self.position = torch.zeros((batch, 1), dtype=torch.long, device=device)  # (b, 1)
        self.masks = {}  # dtype -> (b, 1, 1, S)
        self.autocast = _autocast_now(device)
        for dec in decoders.values():
            dtype = self._dtype(dec)
            if dtype not in self.masks:
                low = torch.finfo(dtype).min
                mask = torch.full((batch, 1, 1, cache_len), low, dtype=dtype, device=device)
                mask[:, 0, 0, : self.slot] = torch.where(prompt_mask, 0.0, low)
                self.masks[dtype] = mask
        self.graph = None
        self.outputs = None

    def _dtype(self, dec: _Decoder) -> torch.dtype:
        return self.autocast[1] if self.autocast else dec.model.dtype  # the dtype attention runs in

    def _run(self) -> dict[str, torch.Tensor]:
        return {role: dec.step(self.token, self.masks[self._dtype(dec)], self.position)
                for role, dec in self.decoders.items()}

    def set_slots(self, start: int, open_: torch.Tensor) -> None:
        """Open (True) or close (False) each row's slots start .. start + k - 1; open_: (b, k) bool."""
        for mask in self.masks.values():
            mask[:, 0, 0, start : start + open_.shape[1]] = torch.where(open_, 0.0, torch.finfo(mask.dtype).min)

    def step(self, token: torch.Tensor, position: torch.Tensor) -> dict[str, torch.Tensor]:
        """token: (b,), position: (b, 1). Returns each role's next-token log-probs (b, V)."""
        self.token.copy_(token[:, None])
        self.position.copy_(position)
        for mask in self.masks.values():
            mask[:, :, :, self.slot] = 0.0
        self.slot += 1
        if self.graph is not None:
            self.graph.replay()
            return self.outputs
        if token.device.type != "cuda":  # no capture; fixed output buffers all the same, as on a GPU
            fresh = self._run()
            if self.outputs is None:
                self.outputs = {role: value.clone() for role, value in fresh.items()}
            for role, value in fresh.items():
                self.outputs[role].copy_(value)
            return self.outputs
        first, self.graph, self.outputs = _capture(self._run, self.autocast)
        return first


def race_draw(logp: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """trb.core.sample with the race drawn beforehand: noise (b, V) ~ Exp(1) from the rollout's generator."""
    return (logp.float() - noise.log()).argmax(dim=-1)


def _autocast_now(device: torch.device) -> tuple[str, torch.dtype] | None:
    return (device.type, torch.get_autocast_dtype(device.type)) if torch.is_autocast_enabled(device.type) else None


def _capture(fn, autocast: tuple[str, torch.dtype] | None):
    """Run fn once eagerly on a side stream (warm-up, and the real result of this step), then capture it as a CUDA
    graph. Returns (first result, graph, the graph's output buffers)."""
    current = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(current)
    with torch.cuda.stream(side):
        first = fn()
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # Under autocast the captured steps cast weights themselves: autocast's cache of cast weights would be freed
    # when the caller's autocast region ends, while the graph still reads it.
    no_cast_cache = (torch.autocast(autocast[0], dtype=autocast[1], cache_enabled=False) if autocast
                     else contextlib.nullcontext())
    with no_cast_cache, torch.cuda.graph(graph):
        outputs = fn()
    return first, graph, outputs


class _GraphedChoice:
    """The policy's choice at every step, captured as a CUDA graph over the decode graph's output buffers.

    For policies that draw once (`single_draw`): the exponential race that `trb.core.sample` would draw is taken
    from the rollout's generator outside the graph, into a fixed buffer, so the graph samples exactly what the
    eager policy would. The returned Choice holds the graph's output buffers: read them before the next step.
    """

    def __init__(self, choose, logp: dict[str, torch.Tensor], generator: torch.Generator):
        self.choose = choose
        self.logp = logp
        self.generator = generator
        self.noise = torch.empty_like(next(iter(logp.values())), dtype=torch.float32)  # (b, V)
        self.graph = None
        self.output = None

    def draw(self, logp: torch.Tensor) -> torch.Tensor:
        return race_draw(logp, self.noise)

    def _run(self):
        return self.choose(self.logp.get("student"), self.logp.get("teacher"), self.draw, self.generator)

    def step(self):
        self.noise.exponential_(generator=self.generator)
        if self.graph is not None:
            self.graph.replay()
            return self.output
        first = self._run()
        if self.noise.device.type == "cuda":
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.output = self._run()
        return first


def _for_compile(policy: BehaviorPolicy, device: torch.device) -> BehaviorPolicy:
    """TRB's eps as a device tensor: compiled code then does not specialize on its value, which an annealed
    schedule changes at every optimizer step (one compilation instead of one per step)."""
    if isinstance(policy, TRBPolicy) and not isinstance(policy.eps, torch.Tensor):
        return dataclasses.replace(policy, eps=torch.tensor(float(policy.eps), device=device))
    return policy


def _graphable(model: PreTrainedModel) -> bool:
    # the graphed steps hand the model a ready additive 4D mask, which these attention implementations take
    return getattr(model.config, "_attn_implementation", None) in ("sdpa", "eager")


@torch.no_grad()
def generate(
    policy: BehaviorPolicy,
    prompts: list[list[int]],
    vocab: VocabSpace,
    max_new_tokens: int,
    generator: torch.Generator,
    student: PreTrainedModel | None = None,
    teacher: PreTrainedModel | None = None,
    greedy: bool = False,
    cache: str = "dynamic",
    record_topk: int = 0,
    compile: bool = False,
) -> Rollout:
    """Decode up to max_new_tokens for every prompt with the given behavior policy.

    prompts: ragged token-id lists. The student runs if the policy needs it, the teacher likewise; both must then
    be given. generator drives every random draw (same seed, same rollout). greedy replaces sampling by argmax.
    record_topk = k > 0 (when both models run) also records the teacher's log-probs on the student's top-k.
    compile = True compiles the policy's math and the decode steps: with a static cache each model's forward, over
    fixed shapes (a full-length attention mask; CUDA graphs on a GPU; the stop check runs every 8 steps); with a
    dynamic cache the lean prompt pass and single-token step of Llama-family models (`trb.rollout.lean`), dynamic
    shapes.
    """
    if cache not in ("dynamic", "static"):
        raise ValueError(f"cache must be 'dynamic' or 'static', got {cache!r}")
    roles = {"student": (policy.needs_student, student), "teacher": (policy.needs_teacher, teacher)}
    for role, (needed, model) in roles.items():
        if needed and model is None:
            raise ValueError(f"the {policy.name!r} behavior policy needs a {role} model")
    device = (student if policy.needs_student else teacher).device
    prompt_ids, prompt_mask = left_pad(prompts, vocab.pad_id, device)  # (B, P)
    batch, width = prompt_ids.shape
    cache_len = width + max_new_tokens
    if cache == "static":
        cache_len = -(-cache_len // STATIC_CACHE_ROUND) * STATIC_CACHE_ROUND
    decoders = {
        role: _Decoder(model, vocab, cache, cache_len, compile, batch)
        for role, (needed, model) in roles.items()
        if needed
    }
    fixed = compile and cache == "static"  # fixed-shape decode steps
    predraw = compile and getattr(policy, "single_draw", False) and not greedy  # the race drawn outside compiled code
    choose = (torch.compile(_for_compile(policy, device).choose, dynamic=not fixed) if compile
              else policy.choose)
    graphs = graphed_choice = None
    if fixed and _use_graphs(device) and all(_graphable(dec.model) for dec in decoders.values()):
        graphs = _GraphedSteps(decoders, prompt_mask, cache_len)

    def draw(logp: torch.Tensor) -> torch.Tensor:
        return logp.argmax(-1) if greedy else sample(logp, generator)

    # Per-token records for the full batch; `active` maps the rows still decoding (cache order) to batch rows.
    tokens = torch.full((batch, max_new_tokens), vocab.pad_id, dtype=torch.long, device=device)  # (B, T)
    records = {
        name: torch.zeros((batch, max_new_tokens), device=device)
        for name in ("behavior_logp", "student_logp", "teacher_logp", "beta", "realized_kl")
    }  # each (B, T)
    from_teacher = torch.zeros((batch, max_new_tokens), dtype=torch.bool, device=device)  # (B, T)
    mask = torch.zeros((batch, max_new_tokens), dtype=torch.bool, device=device)  # (B, T)
    topk = record_topk if len(decoders) == 2 else 0
    topk_ids = torch.zeros((batch, max_new_tokens, topk), dtype=torch.long, device=device)  # (B, T, k)
    teacher_topk = torch.zeros((batch, max_new_tokens, topk), device=device)  # (B, T, k)
    stopped = torch.zeros(batch, dtype=torch.bool, device=device)  # (B,)
    active = torch.arange(batch, device=device)  # (b,)

    attention = prompt_mask.long()  # (b, P + t)
    positions = position_ids(attention)  # (b, P)
    logp = {role: dec.step(prompt_ids, attention, positions) for role, dec in decoders.items()}  # each (b, V)
    next_position = positions[:, -1:] + 1  # (b, 1)
    if fixed:  # fixed-shape mask: prompt mask, then ones (causality hides the future)
        attention = torch.cat([attention, torch.ones_like(attention[:, :1]).expand(-1, cache_len - width)], dim=1)

    def decode(token: torch.Tensor) -> dict[str, torch.Tensor]:
        if graphs is not None:
            return graphs.step(token, next_position)
        return {role: dec.step(token[:, None], attention, next_position) for role, dec in decoders.items()}

    for t in range(max_new_tokens):
        if predraw and graphs is not None and logp is graphs.outputs:
            graphed_choice = graphed_choice or _GraphedChoice(choose, logp, generator)
            choice = graphed_choice.step()
        elif predraw:  # a generator draw inside compiled code would break its graph
            noise = torch.empty_like(next(iter(logp.values())), dtype=torch.float32).exponential_(generator=generator)
            choice = choose(logp.get("student"), logp.get("teacher"), functools.partial(race_draw, noise=noise),
                            generator)
        else:
            choice = choose(logp.get("student"), logp.get("teacher"), draw, generator)
        token = choice.token  # (b,)
        tokens[active, t] = token
        mask[active, t] = True
        records["behavior_logp"][active, t] = choice.behavior_logp
        records["beta"][active, t] = choice.beta
        records["realized_kl"][active, t] = choice.kl
        from_teacher[active, t] = choice.from_teacher
        for role, role_logp in logp.items():
            records[f"{role}_logp"][active, t] = role_logp.gather(-1, token[:, None])[:, 0]
        if topk:
            ids = logp["student"].topk(topk, dim=-1).indices  # (b, k)
            topk_ids[active, t] = ids
            teacher_topk[active, t] = logp["teacher"].gather(-1, ids)
        finished = stopped[active] | (token == vocab.eos_id)  # (b,) static caches keep finished rows
        stopped[active] = finished
        if t == max_new_tokens - 1:
            break
        if fixed and t % 8:  # fixed shapes: check for the end less often (a host sync)
            logp = decode(token)
            next_position = next_position + 1
            continue
        n_finished = int(finished.sum())  # the one host sync per step
        if n_finished == len(active):
            break
        if cache == "dynamic" and n_finished and n_finished >= len(active) * COMPACT_AT:
            keep = (~finished).nonzero()[:, 0]  # (b',)
            for dec in decoders.values():
                dec.keep(keep)
            active, token, attention, next_position = active[keep], token[keep], attention[keep], next_position[keep]
        if not fixed:
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)  # (b, P + t + 1)
        logp = decode(token)
        next_position = next_position + 1

    # Finished rows that stayed in the batch (static caches; dynamic ones until COMPACT_AT) decoded as padding: drop
    # whatever they produced after their stop.
    is_stop = (tokens == vocab.eos_id) & mask  # (B, T)
    mask &= (torch.cumsum(is_stop, dim=1) - is_stop.long()) == 0
    tokens = torch.where(mask, tokens, vocab.pad_id)
    for name in records:
        records[name] = torch.where(mask, records[name], 0.0)
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
        from_teacher=from_teacher & mask,
        stopped=stopped,
        topk_ids=topk_ids if topk else None,
        teacher_topk_logp=torch.where(mask[..., None], teacher_topk, 0.0) if topk else None,
    )
