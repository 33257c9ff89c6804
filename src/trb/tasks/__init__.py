"""Tasks: problems (synthetic settings and user files), prompt formatting, answer extraction and grading."""

import random

from trb.tasks import arith, word
from trb.tasks.data import DataError, load_problems
from trb.tasks.grading import extract_answer, is_correct
from trb.tasks.problems import Problem
from trb.tasks.tokenizer import format_prompt, tokenize_prompts, train_tokenizer

# Synthetic settings by name: generate(split, n, seed) -> list[Problem], split "train" or "test" (disjoint).
SETTINGS = {"arith": arith.generate, "word": word.generate}


def problem_splits(
    source: str,
    num_train: int,
    num_test: int,
    seed: int,
    test_source: str | None = None,
    fields: dict[str, str] | None = None,
) -> tuple[list[Problem], list[Problem]]:
    """Train and test problems of a built-in setting (its disjoint generated splits) or of a problem file.

    A file without a separate test file is split by a seeded shuffle: num_test problems for testing, the rest (up to
    num_train) for training.
    """
    if source in SETTINGS:
        return SETTINGS[source]("train", num_train, seed), SETTINGS[source]("test", num_test, seed)
    problems = load_problems(source, fields)
    if test_source is not None:
        return problems[:num_train], load_problems(test_source, fields)[:num_test]
    if len(problems) <= num_test:
        raise DataError(
            f"{source}: {len(problems)} problems cannot give {num_test} test problems and a training set; "
            "lower data.num_test or give data.test_source"
        )
    order = list(range(len(problems)))
    random.Random(seed).shuffle(order)
    test = [problems[i] for i in order[:num_test]]
    train = [problems[i] for i in order[num_test : num_test + num_train]]
    return train, test

__all__ = [
    "SETTINGS",
    "DataError",
    "Problem",
    "extract_answer",
    "format_prompt",
    "is_correct",
    "load_problems",
    "problem_splits",
    "tokenize_prompts",
    "train_tokenizer",
]
