"""Decoder backends (`trb.rollout.decoder.Decoder`): a paged KV cache over the lean Llama-family forward, and the
Hugging Face forward with its DynamicCache for every other model.

`PagedDecoder` keeps each layer's keys and values in a pool of fixed-size pages (PAGE_SLOTS slots each); a row owns
the pages its tokens fill, so KV memory grows with the tokens actually decoded, and a finished row's pages return to
the pool for the sequence that replaces it. At every step attention reads each row's filled slots only: rows are
grouped by length (`length_groups`) and each group gathers its slots up to its own longest row, so the slots read stay
within READ_SLACK of the slots filled. On a CPU, attention instead reads every row's pages in place through the page
table (`trb.rollout.cpu_attention`, a small C++ kernel built on first use), exactly its filled slots, without the
gather; where that kernel cannot be built, the CPU gathers too. Rows leave and join the batch by reindexing the page
table: no KV is copied.
With compile=True a single-token step runs through torch.compile (`_one_token`, dynamic shapes: one compilation per
model): every row reads up to the longest row's slots (one masked group) and the step writes the new keys and values
after the compiled forward, which fuses the many small operations of a decode step.
"""

from __future__ import annotations

import functools

import torch
from transformers import DynamicCache, PreTrainedModel

from trb import lean
from trb.core import merged_logp
from trb.models import VocabSpace
from trb.rollout.cpu_attention import paged_decode_attention
from trb.rollout.decoder import Decoder, Reads

PAGE_SLOTS = 16  # slots per KV page
READ_SLACK = 1.2  # a length group's rows are all within this factor of its longest row
MAX_GROUPS = 16  # at most this many length groups per step (each costs a gather and an attention call per layer)


# a length group of one decode step: rows (None: all, in order), their slots flattened, how many rows, mask
Group = tuple[torch.Tensor | None, torch.Tensor, int, torch.Tensor | None]


def length_groups(lengths: list[int], slack: float = READ_SLACK, max_groups: int = MAX_GROUPS) -> list[list[int]]:
    """Rows (indices into lengths) grouped so that every row of a group is at least 1/slack of the group's longest;
    when that takes more than max_groups, neighbouring groups of the fewest rows are merged."""
    order = sorted(range(len(lengths)), key=lambda r: -lengths[r])
    groups: list[list[int]] = []
    for r in order:
        if groups and lengths[groups[-1][0]] <= slack * lengths[r]:
            groups[-1].append(r)
        else:
            groups.append([r])
    while len(groups) > max_groups:  # merge the adjacent pair that adds the fewest padded reads
        cost = [len(groups[i + 1]) * (lengths[groups[i][0]] - lengths[groups[i + 1][0]]) for i in range(len(groups) - 1)]
        i = min(range(len(cost)), key=cost.__getitem__)
        groups[i:i + 2] = [groups[i] + groups[i + 1]]
    return groups


def _logp(logits: torch.Tensor, vocab: VocabSpace, stop_ids: torch.Tensor) -> torch.Tensor:
    return merged_logp(logits, vocab.size, stop_ids, vocab.eos_id)


class PagedDecoder:
    """The lean forward of a Llama-family model (`trb.lean`) over a paged KV cache. See the module docstring."""

    def __init__(self, model: PreTrainedModel, vocab: VocabSpace, pages: int = 64, compile: bool = False,
                 cpu_kernel: bool = True):
        self.model, self.vocab, self.compile = model, vocab, compile
        config = model.config
        attn = model.base_model.layers[0].self_attn
        self.kv_heads, self.head_dim = config.num_key_value_heads, attn.head_dim
        self.layers = [lean.plain_layer(layer, config.num_attention_heads, self.kv_heads)
                       for layer in model.base_model.layers]
        self.group = config.num_attention_heads // self.kv_heads
        self.scaling, self.qk_norm = attn.scaling, hasattr(attn, "q_norm")
        self.device = model.device
        # eager steps on a CPU: attention through the page table in place (None: gather the slots, `_attend`)
        self.kernel = paged_decode_attention() if cpu_kernel and self.device.type == "cpu" else None
        self.stop_ids = vocab.stop_tensor(self.device)
        self.reads = Reads()
        self.lengths: list[int] = []  # filled slots per row
        self.pages: list[list[int]] = []  # page ids per row
        self.free_pages: list[int] = []
        # per layer (2 H_kv, pages * PAGE_SLOTS, D), keys then values: one gather of slots reads both, (2 H_kv, b, L,
        # D), whose batch dimensions merge into one, so attention's batched matmuls read it without another copy
        self.kv: list[torch.Tensor] = []
        self.capacity = 0
        self.initial_pages = pages
        self.table = torch.zeros((0, 1), dtype=torch.long, device=self.device)  # (b, pages per row) page ids
        self.updates: list[tuple[int, int, int]] = []  # (row, page index, page id) not yet in `table`
        self.slot_map: torch.Tensor | None = None  # `_slot_map` of the current table

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def _dtype(self) -> torch.dtype:
        kind = self.device.type
        return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else self.model.dtype

    def _grow(self, need: int) -> None:
        """At least `need` free pages: the pool doubles (existing pages keep their ids)."""
        if len(self.free_pages) >= need:
            return
        old = self.capacity
        self.capacity = max(2 * old, old + need, self.initial_pages)
        shape = (2 * self.kv_heads, self.capacity * PAGE_SLOTS, self.head_dim)
        for i in range(len(self.layers)):
            grown = torch.zeros(shape, dtype=self._dtype(), device=self.device)  # masked slots: finite
            if i < len(self.kv):
                grown[:, : old * PAGE_SLOTS] = self.kv[i]
                self.kv[i] = grown
            else:
                self.kv.append(grown)
        self.free_pages.extend(range(self.capacity - 1, old - 1, -1))

    def _reserve(self, row: int, length: int) -> None:
        """Pages for `length` slots in this row (the page table is updated by `_sync_table`)."""
        have = len(self.pages[row])
        need = -(-length // PAGE_SLOTS) - have
        if need > 0:
            self._grow(need)
            for j in range(have, have + need):
                page = self.free_pages.pop()
                self.pages[row].append(page)
                self.updates.append((row, j, page))

    def _sync_table(self) -> None:
        """Write the pages reserved since the last call into the device page table (one copy)."""
        if not self.updates:
            return
        rows, index, pages = zip(*self.updates)
        self.updates = []
        width = max(max(index) + 1, self.table.shape[1])
        if width > self.table.shape[1]:
            self.table = torch.cat([self.table, self.table.new_zeros((self.table.shape[0], width - self.table.shape[1]))], 1)
        values = torch.tensor([rows, index, pages], device=self.device)  # (3, n)
        self.table[values[0], values[1]] = values[2]
        self.slot_map = None

    def _slot_map(self) -> torch.Tensor:
        """Flat pool index of every slot of every row, (b, pages per row * PAGE_SLOTS); slots past a row's pages point
        into page 0 (callers mask them). Built again only after the page table changed."""
        if self.slot_map is None:
            within = torch.arange(PAGE_SLOTS, device=self.device)  # (PAGE_SLOTS,)
            self.slot_map = (self.table[:, :, None] * PAGE_SLOTS + within).flatten(1)  # (b, S)
        return self.slot_map

    def _attend(self, q: torch.Tensor, kv: torch.Tensor, groups: list[Group]) -> torch.Tensor:
        """Queries (b, H, w, D) over each row's filled slots of one layer's pool kv (2 H_kv, slots, D), heads
        concatenated: (b, w, H * D). A group is (rows (b_g,), or None for all rows in order; their slots (b_g, L_g)
        flattened; b_g; mask (b_g, 1, w, L_g) True = attended, or None when a single token attends every slot)."""
        batch, heads, width, _ = q.shape
        out = None
        for rows, slots, n, mask in groups:
            both = kv.index_select(1, slots).view(2 * self.kv_heads, n, -1, self.head_dim)  # (2 H_kv, b_g, L_g, D)
            k, v = both[: self.kv_heads], both[self.kv_heads :]  # (H_kv, b_g, L_g, D) each
            q_g = q if rows is None else q[rows]  # (b_g, H, w, D)
            if width > 1:
                attended = lean.attend(q_g, k.transpose(0, 1), v.transpose(0, 1), mask, self.scaling, self.group)
            else:  # grouped-query attention as batched matmuls (SDPA under a mask takes its slow path here)
                qg = q_g.reshape(n, self.kv_heads, self.group, self.head_dim).transpose(0, 1)  # (H_kv, b_g, g, D)
                exact = torch.promote_types(q.dtype, torch.float32)  # the softmax in fp32 at least
                scores = torch.matmul(qg, k.transpose(-1, -2)).to(exact) * self.scaling  # (H_kv, b_g, g, L_g)
                if mask is not None:
                    scores = scores.masked_fill(~mask[:, 0], float("-inf"))  # mask (b_g, 1, L_g) per KV head
                weights = scores.softmax(-1).to(v.dtype)
                attended = torch.matmul(weights, v).transpose(0, 1).reshape(n, 1, -1)  # (b_g, 1, H * D) heads in order
            if rows is None:  # the only group
                return attended.to(q.dtype)
            if out is None:
                out = q.new_empty((batch, width, heads * self.head_dim))
            out[rows] = attended.to(out.dtype)
        return out

    @torch.no_grad()
    def add(self, prompts: list[list[int]]) -> torch.Tensor:
        """The prompts' forward (right-padded, causal: real tokens never attend padding), their keys and values written
        to fresh pages."""
        first = self.rows
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        ids = torch.tensor([p + [self.vocab.pad_id] * (width - len(p)) for p in prompts], device=self.device)  # (n, P)
        self.table = torch.cat([self.table, self.table.new_zeros((len(prompts), self.table.shape[1]))])
        self.slot_map = None
        for n in lengths:
            self.lengths.append(n)
            self.pages.append([])
            self._reserve(len(self.pages) - 1, n)
        self._sync_table()
        slots = self._slot_map()[first:, :width]  # (n, P)
        real = torch.arange(width, device=self.device)[None] < torch.tensor(lengths, device=self.device)[:, None]
        positions = torch.arange(width, device=self.device)[None]  # (1, P)
        filled = slots[real]  # (tokens,)
        hidden, cos, sin = lean.embed(self.model, ids, positions)  # (n, P, d), each (1, 1, P, D)
        for i, layer in enumerate(self.layers):
            q, k, v = lean.qkv_together(layer, hidden, cos, sin, self.head_dim)  # (n, H, P, D), (n, H_kv, P, D)
            self.kv[i][:, filled] = torch.cat([k, v], 1).transpose(0, 1)[:, real].to(self.kv[i].dtype)  # (2 H_kv, t, D)
            hidden = lean.finish_layer(layer, hidden, lean.attend(q, k, v, None, self.scaling, self.group))
        last = hidden[torch.arange(len(prompts), device=self.device), torch.tensor(lengths, device=self.device) - 1]
        return _logp(lean.output_logits(self.model, last), self.vocab, self.stop_ids)  # (n, V)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, width = tokens.shape
        before = self.lengths
        after = [n + width for n in before]
        for row, n in enumerate(after):
            if n > PAGE_SLOTS * len(self.pages[row]):
                self._reserve(row, n)
        self.lengths = after
        self._sync_table()
        start = torch.tensor(before, device=self.device)  # (b,)
        positions = start[:, None] + torch.arange(width, device=self.device)  # (b, w)
        slot_map = self._slot_map()  # (b, S)
        new_slots = slot_map.gather(1, positions).flatten()  # (b * w,)
        if self.compile and width == 1:
            return self._compiled_step(tokens, positions, start, slot_map, new_slots, max(before))
        if self.kernel is not None:  # reads every row's filled slots in place
            reads = start + width  # (b,)
            self.reads.read += sum(after)
            self.reads.filled += sum(after)
        else:
            reads = self._groups(after, start, slot_map, width)
        hidden, cos, sin = lean.embed(self.model, tokens, positions)  # (b, w, d), each (b, 1, w, D)
        for i, layer in enumerate(self.layers):
            q, k, v = lean.qkv_together(layer, hidden, cos, sin, self.head_dim)  # (b, H, w, D), (b, H_kv, w, D)
            new = torch.cat([k, v], 1).transpose(0, 1).reshape(2 * self.kv_heads, batch * width, self.head_dim)
            self.kv[i].index_copy_(1, new_slots, new if new.dtype == self.kv[i].dtype else new.to(self.kv[i].dtype))
            hidden = lean.finish_layer(layer, hidden, self._attention(q, self.kv[i], reads))
        return _logp(lean.output_logits(self.model, hidden), self.vocab, self.stop_ids)  # (b, w, V)

    def _attention(self, q: torch.Tensor, kv: torch.Tensor, reads: torch.Tensor | list[Group]) -> torch.Tensor:
        """Queries (b, H, w, D) over one layer's pool kv: through the CPU kernel when reads is each row's filled slots
        (b,), else over the length groups' gathered slots (`_attend`). Returns (b, w, H * D)."""
        if isinstance(reads, list):
            return self._attend(q, kv, reads)
        # queries in the pool's dtype, as autocast gives the gathering path's matmuls
        return self.kernel(q.to(kv.dtype), kv, self.table, reads, PAGE_SLOTS, self.scaling)

    def _compiled_step(self, tokens: torch.Tensor, positions: torch.Tensor, start: torch.Tensor,
                       slot_map: torch.Tensor, new_slots: torch.Tensor, longest: int) -> torch.Tensor:
        """One token per row through the compiled `_one_token`: every row reads the past slots up to the longest
        row's (one group, masked), and the new keys and values are written after it."""
        past = torch.arange(longest, device=self.device)[None] < start[:, None]  # (b, L)
        logits, new = _compiled_one_token()(self.model, self.head_dim, self.scaling, self.qk_norm, tokens, positions,
                                            slot_map[:, :longest].flatten(), past, self.kv)
        for pool, kv in zip(self.kv, new):
            pool.index_copy_(1, new_slots, kv.to(pool.dtype))
        self.reads.read += len(start) * (longest + 1)
        self.reads.filled += sum(self.lengths)
        return _logp(logits, self.vocab, self.stop_ids)  # (b, 1, V)

    def _groups(self, lengths: list[int], start: torch.Tensor, slot_map: torch.Tensor, width: int) -> list[Group]:
        """The step's length groups (`length_groups`), each read up to its longest row; counts the reads."""
        groups = []
        for rows in length_groups(lengths):  # each group's rows by decreasing length
            longest, shortest = lengths[rows[0]], lengths[rows[-1]]
            rows_t = None if len(rows) == len(lengths) else torch.tensor(rows, device=self.device)  # (b_g,)
            slots = (slot_map if rows_t is None else slot_map[rows_t])[:, :longest]  # (b_g, L_g)
            mask = None
            if width > 1 or shortest < longest:
                # token i of the window sees the row's slots before it and itself: slot j < start + i + 1
                offsets = torch.arange(width, device=self.device)
                limit = (start if rows_t is None else start[rows_t])[:, None, None] + offsets[None, :, None] + 1
                mask = (torch.arange(longest, device=self.device)[None, None] < limit)[:, None]  # (b_g, 1, w, L_g)
            groups.append((rows_t, slots.flatten(), len(rows), mask))
            self.reads.read += len(rows) * longest
        self.reads.filled += sum(lengths)
        return groups

    def keep(self, rows: torch.Tensor) -> None:
        kept = rows.tolist()
        for row in set(range(self.rows)) - set(kept):
            self.free_pages.extend(self.pages[row])
        self.lengths = [self.lengths[r] for r in kept]
        self.pages = [self.pages[r] for r in kept]
        self._sync_table()
        self.table = self.table[rows]
        self.slot_map = None

    def truncate(self, drop: torch.Tensor) -> None:
        for row, n in enumerate(drop.tolist()):
            self.lengths[row] -= n
            keep_pages = -(-self.lengths[row] // PAGE_SLOTS)
            self.free_pages.extend(self.pages[row][keep_pages:])
            del self.pages[row][keep_pages:]

    @property
    def kv_bytes(self) -> int:
        """Bytes of the KV pool as allocated (it grows with the tokens decoded and never shrinks within a rollout)."""
        return sum(t.numel() * t.element_size() for t in self.kv)


def _one_token(model: PreTrainedModel, head_dim: int, scaling: float, qk_norm: bool, tokens: torch.Tensor,
               positions: torch.Tensor, slots: torch.Tensor, past: torch.Tensor,
               pools: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One token per row over the paged pool without writing to it, so that torch.compile sees no mutation (the
    caller writes the returned keys and values). tokens, positions (b, 1); slots (b * L,) the pool index of each
    row's first L slots, past (b, L) True where they are filled; pools[i] (2 H_kv, S, D). The softmax runs over the
    past slots and the token's own key together. Returns logits (b, 1, V) and each layer's new keys and values
    (2 H_kv, b, D)."""
    batch = tokens.shape[0]
    hidden, cos, sin = lean.embed(model, tokens, positions)  # (b, 1, d), each (b, 1, 1, D)
    closed = ~past[None, :, None, :]  # (1, b, 1, L)
    new = []
    for layer, pool in zip(model.base_model.layers, pools):
        q, k, v = lean.qkv(layer, hidden, cos, sin, head_dim, qk_norm)  # (b, H, 1, D), (b, H_kv, 1, D) x 2
        kv_heads = k.shape[1]
        both = pool.index_select(1, slots).view(2 * kv_heads, batch, -1, head_dim)  # (2 H_kv, b, L, D)
        q = q.reshape(batch, kv_heads, -1, head_dim).transpose(0, 1)  # (H_kv, b, g, D): a KV head's queries together
        k, v = k.transpose(0, 1), v.transpose(0, 1)  # (H_kv, b, 1, D)
        exact = torch.promote_types(q.dtype, torch.float32)  # the softmax in fp32 at least
        scores = torch.matmul(q, both[:kv_heads].transpose(-1, -2)).to(exact) * scaling  # (H_kv, b, g, L)
        scores = scores.masked_fill(closed, float("-inf"))
        own = (q * k).sum(-1, keepdim=True).to(exact) * scaling  # (H_kv, b, g, 1)
        top = torch.maximum(scores.amax(-1, keepdim=True), own)
        scores, own = torch.exp(scores - top), torch.exp(own - top)
        total = scores.sum(-1, keepdim=True) + own
        attended = (torch.matmul(scores.to(v.dtype), both[kv_heads:]) + own.to(v.dtype) * v) / total.to(v.dtype)
        hidden = lean.finish_layer(layer, hidden, attended.transpose(0, 1).reshape(batch, 1, -1))  # heads in order
        new.append(torch.cat([k, v])[:, :, 0])  # (2 H_kv, b, D)
    return lean.output_logits(model, hidden), new


@functools.cache
def _compiled_one_token():
    return torch.compile(_one_token, dynamic=True)


class HFDecoder:
    """Any causal LM through its own forward and a Hugging Face DynamicCache. Rows are left-padded to a common cache
    width; new rows are prefilled in a cache of their own and joined, the narrower side padded on the left (masked);
    slots of truncated tokens stay in the cache, masked. Positions count attended tokens only."""

    def __init__(self, model: PreTrainedModel, vocab: VocabSpace):
        self.model, self.vocab = model, vocab
        self.device = model.device
        self.stop_ids = vocab.stop_tensor(self.device)
        self.reads = Reads()
        self.cache: DynamicCache | None = None
        self.attention = torch.zeros((0, 0), dtype=torch.long, device=self.device)  # (b, S) 1 = attended slot
        self.next_position = torch.zeros(0, dtype=torch.long, device=self.device)  # (b,)

    @property
    def rows(self) -> int:
        return self.attention.shape[0]

    @torch.no_grad()
    def add(self, prompts: list[list[int]]) -> torch.Tensor:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.vocab.pad_id] * (width - len(p)) + p for p in prompts], device=self.device)  # (n, P)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)  # (n, P)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # (n, P)
        cache = DynamicCache(config=self.model.config)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                            use_cache=True, logits_to_keep=1).logits[:, -1]  # (n, V)
        if self.cache is None or self.rows == 0:
            self.cache, self.attention = cache, mask
        else:
            self.cache, self.attention = _join(self.cache, self.attention, cache, mask)
        self.next_position = torch.cat([self.next_position, positions[:, -1] + 1])
        return _logp(logits, self.vocab, self.stop_ids)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, width = tokens.shape
        self.attention = torch.cat([self.attention, torch.ones_like(tokens)], dim=1)  # (b, S + w)
        positions = self.next_position[:, None] + torch.arange(width, device=self.device)  # (b, w)
        logits = self.model(input_ids=tokens, attention_mask=self.attention, position_ids=positions,
                            past_key_values=self.cache, use_cache=True, logits_to_keep=width).logits[:, -width:]
        self.next_position = self.next_position + width
        self.reads.read += self.attention.numel()
        self.reads.filled += int(self.attention.sum())
        return _logp(logits, self.vocab, self.stop_ids)  # (b, w, V)

    def keep(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)
        self.attention, self.next_position = self.attention[rows], self.next_position[rows]

    def truncate(self, drop: torch.Tensor) -> None:
        width = self.attention.shape[1]
        dropped = torch.arange(width, device=self.device)[None] >= width - drop[:, None]  # (b, S)
        self.attention = self.attention.masked_fill(dropped, 0)
        self.next_position = self.next_position - drop


def _join(cache: DynamicCache, mask: torch.Tensor, new: DynamicCache,
          new_mask: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    """Two left-padded caches and masks stacked along the batch, the narrower one padded on the left."""
    width = max(mask.shape[1], new_mask.shape[1])

    def pad(x: torch.Tensor, dim: int) -> torch.Tensor:
        missing = width - x.shape[dim]
        if not missing:
            return x
        shape = list(x.shape)
        shape[dim] = missing
        return torch.cat([x.new_zeros(shape), x], dim=dim)

    for old_layer, new_layer in zip(cache.layers, new.layers):
        old_layer.keys = torch.cat([pad(old_layer.keys, 2), pad(new_layer.keys, 2)])
        old_layer.values = torch.cat([pad(old_layer.values, 2), pad(new_layer.values, 2)])
    return cache, torch.cat([pad(mask, 1), pad(new_mask, 1)])


def make_decoder(model: PreTrainedModel, vocab: VocabSpace, forward: str = "auto", compile: bool = False) -> Decoder:
    """The backend for this model: forward = "lean" (paged, Llama family only), "hf", or "auto" (lean where
    `trb.lean.supports` the model, else hf). compile: the paged decoder's single-token steps through torch.compile.
    On a CPU the paged decoder's eager steps attend through `trb.rollout.cpu_attention` (TRB_CPU_KERNEL=0: not)."""
    if forward not in ("auto", "lean", "hf"):
        raise ValueError(f"forward must be 'auto', 'lean' or 'hf', got {forward!r}")
    if forward == "lean" and not lean.supports(model):
        raise ValueError(f"the lean forward does not support this {type(model).__name__}; use forward 'auto' or 'hf'")
    if forward != "hf" and lean.supports(model):
        return PagedDecoder(model, vocab, compile=compile)
    return HFDecoder(model, vocab)


def kv_bytes_per_token(model: PreTrainedModel, dtype_bytes: int = 2) -> int:
    """KV cache bytes one token occupies in this model (all layers, keys and values)."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * dtype_bytes


