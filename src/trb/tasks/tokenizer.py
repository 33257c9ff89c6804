"""A miniature BPE tokenizer for the synthetic settings, and the one function that formats prompts.

Digits are always single tokens: with merged digit strings a tiny model would have to learn each multi-digit token's
arithmetic separately, with single digits it learns carries. Newlines are isolated too, and the prompt format ends in
a newline, so the prompt/completion boundary is always a token boundary: tokens(prompt) + tokens(completion) ==
tokens(prompt + completion), and a rollout's tokens match the teacher-forced tokens of the same text. Words of two
or more letters, with their leading space, are pre-tokens of their own, so BPE learns whole words (" marbles")
rather than fragments that straddle words; spaces, punctuation and single letters merge freely (",ĠbĠ=ĠaĠ+Ġ"),
which keeps the arithmetic short. Byte-level encoding makes decode(encode(text)) == text exactly.

The alphabet is printable ASCII plus every character of the training texts; other characters are dropped by
encoding, so train on the texts you will encode.
"""

from __future__ import annotations

import string
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
PROMPT_FORMAT = "Question: {question}\nAnswer:\n"

# Single-turn, system messages ignored (a tiny model trained from scratch knows no instructions), same text as
# PROMPT_FORMAT.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}Question: {{ message['content'] + '\\n' }}"
    "{%- elif message['role'] != 'system' -%}{{ raise_exception('the miniature prompt format is single-turn') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Answer:\\n' }}{%- endif -%}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of at most vocab_size tokens (special tokens included) trained on texts."""
    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Split(Regex(r" ?\p{L}{2,}"), behavior="isolated"),
            byte_level,
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    [(ascii_bytes, _)] = byte_level.pre_tokenize_str(string.printable)  # printable ASCII as byte-level symbols
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, EOS_TOKEN],
        initial_alphabet=list(ascii_bytes),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN, chat_template=CHAT_TEMPLATE
    )


def format_prompt(tokenizer: PreTrainedTokenizerFast, question: str, system_prompt: str | None = None) -> str:
    """The prompt text for question: the tokenizer's chat template when it has one, else PROMPT_FORMAT (after the
    system prompt, if any)."""
    if tokenizer.chat_template is None:
        prefix = f"{system_prompt}\n\n" if system_prompt else ""
        return prefix + PROMPT_FORMAT.format(question=question)
    messages = [{"role": "user", "content": question}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def tokenize_prompts(
    tokenizer: PreTrainedTokenizerFast, questions: list[str], system_prompt: str | None = None
) -> list[list[int]]:
    """Token ids of each formatted prompt. Special tokens come only from the chat template (no extra BOS)."""
    texts = [format_prompt(tokenizer, q, system_prompt) for q in questions]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]
