"""A lean forward for Llama-family causal LMs (Llama, Mistral, Qwen2, Qwen3 with full attention): the layers'
building blocks from the models' own weights, shared by decoding (`trb.rollout.backends.PagedDecoder`) and by the
training forward of the loss (`final_hidden`).

The Hugging Face forward computes each RMSNorm in seven operations, builds a 4D mask and, when decoding, grows its KV
cache by concatenation; these blocks compute one `rms_norm` per norm and leave the cache layout to the caller.
`final_hidden` is the training forward for aligned rows (no padding inside a row, no mask): the last layer's output
projection and MLP run only at the positions the loss reads.

Results equal the Hugging Face forward up to float rounding (tests compare them in float64, gradients included);
models it does not recognize keep the Hugging Face forward (`supports`, `trains`).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from trb.models import plain_forward

FAMILY = ("llama", "mistral", "qwen2", "qwen3")


def supports(model: PreTrainedModel) -> bool:
    """Whether these blocks reproduce this model's forward: a Llama-family decoder with full attention in every
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


def plain_layer(layer: torch.nn.Module, heads: int, kv_heads: int) -> SimpleNamespace:
    """The weights a decode step reads from a layer (`qkv_together`, `finish_layer`), as plain attributes: the same
    tensors, read without nn.Module's attribute lookup (a decode step reads about twenty of them per layer), and
    Qwen3's q_norm and k_norm weights as one per head, (H + H_kv, D)."""
    attn, mlp = layer.self_attn, layer.mlp
    projections = {name: _plain_linear(getattr(attn, name)) for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
    qk_norm = hasattr(attn, "q_norm")
    if qk_norm and attn.q_norm.variance_epsilon != attn.k_norm.variance_epsilon:
        raise ValueError("q_norm and k_norm with different epsilons")
    return SimpleNamespace(
        input_layernorm=_plain_norm(layer.input_layernorm),
        post_attention_layernorm=_plain_norm(layer.post_attention_layernorm),
        self_attn=SimpleNamespace(**projections),
        qk_weight=torch.cat([attn.q_norm.weight.expand(heads, -1), attn.k_norm.weight.expand(kv_heads, -1)])
        if qk_norm else None,
        qk_epsilon=attn.q_norm.variance_epsilon if qk_norm else None,
        mlp=SimpleNamespace(act_fn=mlp.act_fn.forward, gate_proj=_plain_linear(mlp.gate_proj),
                            up_proj=_plain_linear(mlp.up_proj), down_proj=_plain_linear(mlp.down_proj)))


def _plain_linear(linear: torch.nn.Module) -> SimpleNamespace:
    return SimpleNamespace(weight=linear.weight, bias=linear.bias)


def _plain_norm(norm: torch.nn.Module) -> SimpleNamespace:
    return SimpleNamespace(weight=norm.weight, variance_epsilon=norm.variance_epsilon)


def rms_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The family's RMSNorm: normalize in fp32, cast back, scale by the weight."""
    if x.dtype == torch.float32 and norm.weight.dtype == torch.float32:
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)
    return norm.weight * F.rms_norm(x.float(), norm.weight.shape, None, norm.variance_epsilon).to(x.dtype)


def embed(model: PreTrainedModel, input_ids: torch.Tensor,
           positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token embeddings (b, w, d) and the rotary cos, sin (b or 1, 1, w, D) at positions (b or 1, w)."""
    base = model.base_model
    hidden = base.embed_tokens(input_ids)  # (b, w, d)
    cos, sin = base.rotary_emb(hidden, positions)  # each (b or 1, w, D)
    return hidden, cos[:, None], sin[:, None]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (b, h, w, D) at cos/sin (b, 1, w, D), the half-split convention of the family."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def qkv(layer: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int,
         qk_norm: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer's rotated queries (b, H, w, D), keys and values (b, H_kv, w, D) for hidden states (b, w, d)."""
    attn = layer.self_attn
    q, k, v = _project(layer, hidden, head_dim)
    if qk_norm:
        q, k = rms_norm(attn.q_norm, q), rms_norm(attn.k_norm, k)
    return rotate(q.transpose(1, 2), cos, sin), rotate(k.transpose(1, 2), cos, sin), v.transpose(1, 2)


def qkv_together(layer: SimpleNamespace, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`qkv` for a `plain_layer` without gradients (decoding): queries and keys normalized (Qwen3's q_norm and
    k_norm, the same epsilon) and rotated in one pass over both, which gives the same values as `qkv` bit for bit
    in fewer operations. Queries and keys are views of one tensor."""
    q, k, v = _project(layer, hidden, head_dim)  # (b, w, H, D), (b, w, H_kv, D) x 2
    qk = torch.cat([q, k], dim=2)  # (b, w, H + H_kv, D)
    if layer.qk_weight is not None:  # rms_norm's weight multiplies last, so one per head gives the same values
        normed = F.rms_norm(qk.float(), (head_dim,), None, layer.qk_epsilon).to(qk.dtype)
        qk = layer.qk_weight * normed  # weight (H + H_kv, D)
    qk = rotate(qk.transpose(1, 2), cos, sin)  # (b, H + H_kv, w, D)
    return qk[:, : q.shape[2]], qk[:, q.shape[2] :], v.transpose(1, 2)


def _project(layer, hidden: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries (b, w, H, D), keys and values (b, w, H_kv, D) before norms and rotation."""
    attn = layer.self_attn
    batch, width = hidden.shape[:2]
    x = rms_norm(layer.input_layernorm, hidden)  # (b, w, d)
    q = F.linear(x, attn.q_proj.weight, attn.q_proj.bias).view(batch, width, -1, head_dim)
    k = F.linear(x, attn.k_proj.weight, attn.k_proj.bias).view(batch, width, -1, head_dim)
    v = F.linear(x, attn.v_proj.weight, attn.v_proj.bias).view(batch, width, -1, head_dim)
    return q, k, v


def finish_layer(layer: torch.nn.Module, hidden: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """The residual stream after a layer: attention output (..., H * D), heads concatenated, projected and added to
    hidden (..., d), then the MLP."""
    attn, mlp = layer.self_attn, layer.mlp
    hidden = hidden + F.linear(attended, attn.o_proj.weight, attn.o_proj.bias)
    x = rms_norm(layer.post_attention_layernorm, hidden)
    gate = F.linear(x, mlp.gate_proj.weight, mlp.gate_proj.bias)
    up = F.linear(x, mlp.up_proj.weight, mlp.up_proj.bias)
    return hidden + F.linear(mlp.act_fn(gate) * up, mlp.down_proj.weight, mlp.down_proj.bias)


def output_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    head = model.get_output_embeddings()
    return F.linear(rms_norm(model.base_model.norm, hidden), head.weight, head.bias)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scaling: float,
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
    hidden, cos, sin = embed(model, input_ids, positions)  # (b, w, d), each (b or 1, 1, w, D)
    last = len(base.layers) - 1
    for i, layer in enumerate(base.layers):
        q, k, v = qkv(layer, hidden, cos, sin, head_dim, qk_norm)
        attended = attend(q, k, v, None, scaling, group)  # (b, w, H * D)
        if i == last:
            hidden, attended = hidden.flatten(0, 1)[keep], attended.flatten(0, 1)[keep]  # (n, d), (n, H * D)
        hidden = finish_layer(layer, hidden, attended)
    return rms_norm(base.norm, hidden)  # (n, d)


@functools.cache
def compiled_final_hidden():
    return torch.compile(final_hidden, dynamic=True)
