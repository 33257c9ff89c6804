"""Random-init stand-ins for real checkpoints, for tests, dry runs and benchmarks where nothing can be downloaded.

`random_qwen3_pair` writes a base-student / chat-teacher pair with the real Qwen3 vocabulary size (151,669 tokens,
151,936 output rows), the real special-token ids (<|endoftext|> 151643 ends the base student, <|im_end|> 151645
the chat teacher), a ChatML chat template, and Qwen3 layer shapes, optionally scaled down. The tokenizer is
byte-level with no merges (every byte a token, the rest of the vocabulary reserved), so any text tokenizes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

QWEN3_VOCAB = 151_643  # regular tokens; special tokens follow
QWEN3_PADDED_VOCAB = 151_936  # output rows in the checkpoints
QWEN3_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|special_{i}|>" for i in range(21)] + [
    "<think>", "</think>"]  # ids 151643 .. 151668

# Shapes of the paper's models (hidden size, layers, attention heads, KV heads, MLP size, tied embeddings).
QWEN3_SHAPES = {
    "0.6b": (1024, 28, 16, 8, 3072, True),
    "1.7b": (2048, 28, 16, 8, 6144, True),
    "4b": (2560, 36, 32, 8, 9728, True),
    "8b": (4096, 36, 32, 8, 12288, False),
}

CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def qwen3_like_tokenizer(eos_token: str) -> PreTrainedTokenizerFast:
    """Byte-level tokenizer with Qwen3's vocabulary size and special-token ids; eos_token picks base or chat."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    vocab.update({f"<reserved_{i}>": i for i in range(len(alphabet), QWEN3_VOCAB)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(QWEN3_SPECIAL)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos_token, pad_token="<|endoftext|>",
                                   chat_template=CHATML_TEMPLATE)


def random_qwen3(shape: str, scale: float = 1.0, seed: int = 0, chat: bool = False, max_positions: int = 40960,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A random-init Qwen3 causal LM of the named shape, width and depth multiplied by `scale` (>= 1 head kept),
    built directly on `device` in `dtype` (an 8B-shaped model is initialized in seconds on a GPU, minutes on a CPU)."""
    hidden, layers, heads, kv_heads, mlp, tied = QWEN3_SHAPES[shape]
    heads = max(2, round(heads * scale))
    kv_heads = max(1, min(heads, round(kv_heads * scale)))
    head_dim = 128 if scale == 1.0 else max(8, round(hidden * scale) // heads // 2 * 2)  # rotary needs it even
    config = AutoConfig.for_model(
        "qwen3", vocab_size=QWEN3_PADDED_VOCAB, hidden_size=heads * head_dim if scale != 1.0 else hidden,
        intermediate_size=max(16, round(mlp * scale)), num_hidden_layers=max(1, round(layers * scale)),
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=max_positions, tie_word_embeddings=tied, rope_theta=1_000_000.0,
        bos_token_id=None, eos_token_id=151645 if chat else 151643, pad_token_id=151643,
    )
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    model.generation_config.eos_token_id = [151645, 151643] if chat else 151643
    return model


def random_qwen3_pair(folder: Path, student_shape: str, teacher_shape: str, scale: float = 1.0) -> dict[str, Path]:
    """Write a base student and a chat teacher (Qwen3 vocabulary, EOS ids and template) under folder."""
    paths = {}
    for role, shape, chat, seed in (("student", student_shape, False, 0), ("teacher", teacher_shape, True, 1)):
        paths[role] = folder / role
        random_qwen3(shape, scale, seed, chat).save_pretrained(paths[role])
        qwen3_like_tokenizer("<|im_end|>" if chat else "<|endoftext|>").save_pretrained(paths[role])
        (paths[role] / "trb_random_init.json").write_text(json.dumps({"shape": shape, "scale": scale, "chat": chat}))
    return paths
