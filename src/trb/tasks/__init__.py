"""Tasks: problems (synthetic settings and user files), prompt formatting, answer extraction and grading."""

from trb.tasks import arith, word
from trb.tasks.data import DataError, load_problems
from trb.tasks.grading import extract_answer, is_correct
from trb.tasks.problems import Problem
from trb.tasks.tokenizer import format_prompt, tokenize_prompts, train_tokenizer

# Synthetic settings by name: generate(split, n, seed) -> list[Problem], split "train" or "test" (disjoint).
SETTINGS = {"arith": arith.generate, "word": word.generate}

__all__ = [
    "SETTINGS",
    "DataError",
    "Problem",
    "extract_answer",
    "format_prompt",
    "is_correct",
    "load_problems",
    "tokenize_prompts",
    "train_tokenizer",
]
