"""A lean forward for Llama-family causal LMs (Llama, Mistral, Qwen2, Qwen3 with full attention): incremental
decoding, and the training forward of the loss.

Decoding one token at a time is dominated by per-operation overhead at small and medium widths: the Hugging Face
forward grows its KV cache by concatenation (every step copies the whole cache), builds a 4D mask, and computes
each RMSNorm in seven operations. `LeanCache` runs the same layers from the same weights with a preallocated cache
written in place (doubling when full, compacted when rows finish), the caller's 2D attention mask used as is, and
one `rms_norm` call per norm (BENCHMARKS.md: what that buys in the miniature's rollouts).

`final_hidden` is the training forward the loss uses for aligned rows (no padding inside a row, no mask): the last
layer's output projection and MLP run only at the positions the loss reads.

Results equal the Hugging Face forward up to float rounding (tests compare them in float64, gradients included);
models it does not recognize keep the Hugging Face forward (`supports`, `trains`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from trb.models import plain_forward

FAMILY = ("llama", "mistral", "qwen2", "qwen3")


def supports(model: PreTrainedModel) -> bool:
    """Whether `LeanCache.step` reproduces this model's forward: a Llama-family decoder with full attention in every
    layer, plain linear layers (no adapters, no quantization) and a forward of its own (no hooks, no sharding)."""
    config = model.config
    if getattr(config, "model_type", None) not in FAMILY or getattr(config, "quantization_config", None):
        return False
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return False
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return False
    try:
        linears = [model.get_output_embeddings()]
        for layer in model.base_model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears += [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    except AttributeError:
        return False
    return all(type(m) is torch.nn.Linear for m in linears) and plain_forward(model)


def _rms_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The family's RMSNorm: normalize in fp32, cast back, scale by the weight."""
    if x.dtype == torch.float32 and norm.weight.dtype == torch.float32:
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)
    return norm.weight * F.rms_norm(x.float(), norm.weight.shape, None, norm.variance_epsilon).to(x.dtype)


def _embed(model: PreTrainedModel, input_ids: torch.Tensor,
           positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token embeddings (b, w, d) and the rotary cos, sin (b or 1, 1, w, D) at positions (b or 1, w)."""
    base = model.base_model
    hidden = base.embed_tokens(input_ids)  # (b, w, d)
    cos, sin = base.rotary_emb(hidden, positions)  # each (b or 1, w, D)
    return hidden, cos[:, None], sin[:, None]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (b, h, w, D) at cos/sin (b, 1, w, D), the half-split convention of the family."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _qkv(layer: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int,
         qk_norm: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer's rotated queries (b, H, w, D), keys and values (b, H_kv, w, D) for hidden states (b, w, d)."""
    attn = layer.self_attn
    batch, width = hidden.shape[:2]
    x = _rms_norm(layer.input_layernorm, hidden)  # (b, w, d)
    q = F.linear(x, attn.q_proj.weight, attn.q_proj.bias).view(batch, width, -1, head_dim)
    k = F.linear(x, attn.k_proj.weight, attn.k_proj.bias).view(batch, width, -1, head_dim)
    v = F.linear(x, attn.v_proj.weight, attn.v_proj.bias).view(batch, width, -1, head_dim)
    if qk_norm:
        q, k = _rms_norm(attn.q_norm, q), _rms_norm(attn.k_norm, k)
    return _rotate(q.transpose(1, 2), cos, sin), _rotate(k.transpose(1, 2), cos, sin), v.transpose(1, 2)


def _finish_layer(layer: torch.nn.Module, hidden: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """The residual stream after a layer: attention output (..., H * D), heads concatenated, projected and added to
    hidden (..., d), then the MLP."""
    attn, mlp = layer.self_attn, layer.mlp
    hidden = hidden + F.linear(attended, attn.o_proj.weight, attn.o_proj.bias)
    x = _rms_norm(layer.post_attention_layernorm, hidden)
    gate = F.linear(x, mlp.gate_proj.weight, mlp.gate_proj.bias)
    up = F.linear(x, mlp.up_proj.weight, mlp.up_proj.bias)
    return hidden + F.linear(mlp.act_fn(gate) * up, mlp.down_proj.weight, mlp.down_proj.bias)


def _logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    head = model.get_output_embeddings()
    return F.linear(_rms_norm(model.base_model.norm, hidden), head.weight, head.bias)


def _one_token(model: PreTrainedModel, head_dim: int, scaling: float, qk_norm: bool, input_ids: torch.Tensor,
               positions: torch.Tensor, past_mask: torch.Tensor, keys: list[torch.Tensor],
               values: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """One token per row without touching the cache, so that torch.compile sees no mutation (the caller writes the
    new keys and values). input_ids, positions: (b, 1); past_mask (b, S) over the filled slots; keys/values[i]
    (b, H_kv, S, D). The softmax runs over the past slots and the token's own slot together. Returns logits (b, V)
    and each layer's new key and value (b, H_kv, 1, D)."""
    base = model.base_model
    batch = input_ids.shape[0]
    hidden, cos, sin = _embed(model, input_ids, positions)  # (b, 1, d), each (b, 1, 1, D)
    closed = ~past_mask[:, None, None, :]  # (b, 1, 1, S)
    new_keys, new_values = [], []
    for i, layer in enumerate(base.layers):
        q, k, v = _qkv(layer, hidden, cos, sin, head_dim, qk_norm)  # (b, H, 1, D), (b, H_kv, 1, D) x 2
        kv_heads = k.shape[1]
        q = q.reshape(batch, kv_heads, -1, head_dim)  # (b, H_kv, g, D): a KV head's queries together
        exact = torch.promote_types(q.dtype, torch.float32)  # the softmax in fp32 at least
        past = torch.matmul(q, keys[i].transpose(-1, -2)).to(exact) * scaling  # (b, H_kv, g, S)
        past = past.masked_fill(closed, float("-inf"))
        own = (q * k).sum(-1, keepdim=True).to(exact) * scaling  # (b, H_kv, g, 1)
        top = torch.maximum(past.amax(-1, keepdim=True), own)
        past, own = torch.exp(past - top), torch.exp(own - top)
        total = past.sum(-1, keepdim=True) + own
        attended = (torch.matmul(past.to(v.dtype), values[i]) + own.to(v.dtype) * v) / total.to(v.dtype)
        hidden = _finish_layer(layer, hidden, attended.reshape(batch, 1, -1))  # heads (H_kv, g) in order
        new_keys.append(k)
        new_values.append(v)
    return _logits(model, hidden)[:, 0], new_keys, new_values


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scaling: float,
            group: int) -> torch.Tensor:
    """SDPA of queries (b, H, w, D) over keys and values (b, H_kv, S, D) where mask (b, 1, w, S) is True (causal
    when None), heads concatenated: (b, w, H * D). group = H / H_kv, from the config (a plain int, also under dynamic
    shapes)."""
    if group > 1 and mask is not None and q.device.type == "cuda":  # SDPA's GQA with a mask: its slow math kernel
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        group = 1
    attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None, scale=scaling,
                                              enable_gqa=group > 1)  # (b, H, w, D)
    return attended.transpose(1, 2).flatten(2)  # (b, w, H * D)


def _window_mask(attention_mask: torch.Tensor, start: int, width: int) -> torch.Tensor:
    """(b, 1, w, start + w) bool: w new tokens after `start` filled slots attend to the slots attention_mask (b, >=
    start + w) marks, among themselves causally, and each always to itself (which keeps padded rows finite)."""
    mask = attention_mask[:, None, None, : start + width].bool()  # (b, 1, 1, S)
    if width == 1:
        return mask
    causal = torch.ones((width, width), dtype=torch.bool, device=mask.device).tril()  # (w, w)
    own = torch.eye(width, dtype=torch.bool, device=mask.device)  # (w, w)
    return torch.cat([mask[..., :start].expand(-1, -1, width, -1), (mask[..., start:] & causal) | own], dim=-1)


def _prefill(model: PreTrainedModel, head_dim: int, scaling: float, qk_norm: bool, input_ids: torch.Tensor,
             positions: torch.Tensor, attention_mask: torch.Tensor,
             keep: int) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Prompts (b, w) into an empty cache, without touching it (the caller writes the returned keys and values), so
    that torch.compile sees no mutation. positions (b, w); attention_mask (b, w). Returns the logits after the last
    `keep` tokens (b, keep, V) and each layer's keys and values (b, H_kv, w, D)."""
    base = model.base_model
    hidden, cos, sin = _embed(model, input_ids, positions)  # (b, w, d), each (b, 1, w, D)
    mask = _window_mask(attention_mask, 0, input_ids.shape[1])  # (b, 1, w, w)
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    keys, values = [], []
    for layer in base.layers:
        q, k, v = _qkv(layer, hidden, cos, sin, head_dim, qk_norm)
        hidden = _finish_layer(layer, hidden, _attend(q, k, v, mask, scaling, group))
        keys.append(k)
        values.append(v)
    return _logits(model, hidden[:, -keep:]), keys, values


@functools.cache
def _compiled_one_token():
    return torch.compile(_one_token, dynamic=True)


@functools.cache
def _compiled_prefill():
    return torch.compile(_prefill, dynamic=True)


def trains(model: PreTrainedModel) -> bool:
    """Whether `final_hidden` reproduces this model's forward in its current mode: what `supports` asks, and while
    training no attention dropout and no activation checkpointing (the Hugging Face forward applies them)."""
    if not supports(model):
        return False
    if not model.training:
        return True
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    return not checkpointing and not getattr(model.config, "attention_dropout", 0.0)


def final_hidden(model: PreTrainedModel, input_ids: torch.Tensor, positions: torch.Tensor,
                 keep: torch.Tensor) -> torch.Tensor:
    """The final hidden states (after the last norm) at `keep` of rows whose tokens are all real: a training forward
    (differentiable) of the base model with plain causal attention, no mask and no cache.

    input_ids: (b, w); positions: (b, w), or (1, w) shared by every row; keep: (n,) indices into the flattened
    (b * w) positions. Returns (n, d). Every layer runs on every token except the last layer's output projection,
    MLP and the final norm, which run only at `keep` (no later position reads them): in a rollout's loss, the prompt
    tokens' and padding's share of that work."""
    base = model.base_model
    config = model.config
    attn = base.layers[0].self_attn
    head_dim, scaling, qk_norm = attn.head_dim, attn.scaling, hasattr(attn, "q_norm")
    group = config.num_attention_heads // config.num_key_value_heads
    hidden, cos, sin = _embed(model, input_ids, positions)  # (b, w, d), each (b or 1, 1, w, D)
    last = len(base.layers) - 1
    for i, layer in enumerate(base.layers):
        q, k, v = _qkv(layer, hidden, cos, sin, head_dim, qk_norm)
        attended = _attend(q, k, v, None, scaling, group)  # (b, w, H * D)
        if i == last:
            hidden, attended = hidden.flatten(0, 1)[keep], attended.flatten(0, 1)[keep]  # (n, d), (n, H * D)
        hidden = _finish_layer(layer, hidden, attended)
    return _rms_norm(base.norm, hidden)  # (n, d)


@functools.cache
def compiled_final_hidden():
    return torch.compile(final_hidden, dynamic=True)


class LeanCache:
    """One model's KV cache for incremental decoding and its forward over it.

    Keys and values of layer i live in preallocated (b, H_kv, capacity, D) buffers; `length` slots are filled. A
    step writes its w new slots in place and attends over the filled prefix. Slots follow the caller's 2D attention
    mask: slot j is attended where mask[:, j] is True (and, among the step's own tokens, causally).

    Single-token steps run `_one_token` (grouped-query attention as batched matmuls, no cache mutation inside),
    through torch.compile with compile=True (dynamic shapes: one compilation per model serves every batch size and
    length), which fuses the many small operations of a decode step; on a CPU this is what makes compiled decoding
    pay (BENCHMARKS.md). Prompts into an empty cache run `_prefill` (SDPA, compiled likewise with compile=True); later
    multi-token windows (speculative drafts) write the cache first and attend over it with SDPA, eagerly."""

    def __init__(self, model: PreTrainedModel, capacity: int = 0, compile: bool = False):
        self.model = model
        self.base = model.base_model
        self.layers = list(self.base.layers)
        attn = self.layers[0].self_attn
        self.kv_heads = model.config.num_key_value_heads
        self.group = model.config.num_attention_heads // self.kv_heads
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.qk_norm = hasattr(attn, "q_norm")
        self.capacity = capacity
        self.compile = compile
        self.length = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def _reserve(self, batch: int, width: int, dtype: torch.dtype, device: torch.device) -> None:
        need = self.length + width
        if self.keys and need <= self.keys[0].shape[2]:
            return
        capacity = max(need, self.capacity, 2 * (self.keys[0].shape[2] if self.keys else 0))
        shape = (batch, self.kv_heads, capacity, self.head_dim)
        for store in (self.keys, self.values):
            for i in range(len(self.layers)):
                grown = torch.empty(shape, dtype=dtype, device=device)
                if i < len(store):
                    grown[:, :, : self.length] = store[i][:, :, : self.length]
                    store[i] = grown
                else:
                    store.append(grown)

    def _write(self, start: int, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Each layer's new keys and values (b, H_kv, w, D) into slots start ... start + w."""
        for store, new in ((self.keys, keys), (self.values, values)):
            for buffer, slots in zip(store, new):
                buffer[:, :, start : start + slots.shape[2]] = slots
        self.length = start + keys[0].shape[2]

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (b',), in this order: finished sequences leave the cache. Only the filled slots
        are copied, into buffers of the same capacity."""
        for store in (self.keys, self.values):
            for i, buffer in enumerate(store):
                kept = buffer.new_empty((len(rows), *buffer.shape[1:]))  # (b', H_kv, capacity, D)
                torch.index_select(buffer[:, :, : self.length], 0, rows, out=kept[:, :, : self.length])
                store[i] = kept

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
             keep: int = 1) -> torch.Tensor:
        """Feed (b, w) tokens at positions (b, w); attention_mask (b, length + w) marks the slots to attend, these
        tokens' own included. Returns the output layer's logits after each of the last `keep` tokens, (b, keep, V)."""
        batch, width = input_ids.shape
        device = input_ids.device
        dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                 else self.base.embed_tokens.weight.dtype)
        self._reserve(batch, width, dtype, device)
        start, end = self.length, self.length + width
        if width == 1 and start > 0:
            small = input_ids, positions, attention_mask[:, :start].bool()
            if self.compile:  # fresh (non-view) copies: compiled code guards on whether an input is a view
                small = tuple(x.clone() for x in small)
            one_token = _compiled_one_token() if self.compile else _one_token
            logits, keys, values = one_token(self.model, self.head_dim, self.scaling, self.qk_norm, *small,
                                             [k[:, :, :start] for k in self.keys],
                                             [v[:, :, :start] for v in self.values])
            self._write(start, keys, values)
            return logits[:, None]  # (b, 1, V)
        if start == 0:
            prefill = _compiled_prefill() if self.compile else _prefill
            logits, keys, values = prefill(self.model, self.head_dim, self.scaling, self.qk_norm, input_ids, positions,
                                           attention_mask, keep)
            self._write(start, keys, values)
            return logits  # (b, keep, V)
        hidden, cos, sin = _embed(self.model, input_ids, positions)  # (b, w, d), each (b, 1, w, D)
        mask = _window_mask(attention_mask, start, width)  # (b, 1, w, S)
        for i, layer in enumerate(self.layers):
            q, k, v = _qkv(layer, hidden, cos, sin, self.head_dim, self.qk_norm)
            self.keys[i][:, :, start:end] = k
            self.values[i][:, :, start:end] = v
            attended = _attend(q, self.keys[i][:, :, :end], self.values[i][:, :, :end], mask, self.scaling,
                               self.group)
            hidden = _finish_layer(layer, hidden, attended)  # (b, w, d)
        self.length = end
        return _logits(self.model, hidden[:, -keep:])  # (b, keep, V)
