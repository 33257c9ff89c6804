"""Tasks: problems (synthetic settings and user files), prompt formatting, answer extraction and grading."""

import random
from typing import NamedTuple

from trb.tasks import arith, chain, word
from trb.tasks.data import DataError, load_problems
from trb.tasks.grading import extract_answer, is_correct
from trb.tasks.problems import Problem
from trb.tasks.tokenizer import format_prompt, tokenize_prompts, train_tokenizer

# Synthetic settings by name: generate(split, n, seed) -> list[Problem], split "train" or "test" (disjoint).
SETTINGS = {"arith": arith.generate, "word": word.generate, "chain": chain.generate}


class Splits(NamedTuple):
    train: list[Problem]
    val: list[Problem]  # validation: checkpoint selection, never trained on, never the reported score
    test: list[Problem]


def data_splits(
    source: str,
    num_train: int,
    num_val: int,
    num_test: int,
    seed: int,
    test_source: str | None = None,
    val_source: str | None = None,
    fields: dict[str, str] | None = None,
) -> Splits:
    """Train, validation and test problems, pairwise disjoint (no question in two of them).

    A built-in setting: train from its train split; test and validation from its (hash-disjoint) held-out split,
    test the first num_test draws and validation the next num_val, so adding a validation split changes neither the
    training prompts nor the test problems. A file without a test file: a seeded shuffle gives num_test test
    problems, num_val validation problems from its far end, and training problems (up to num_train) between them.
    A file with a test file: validation from val_source, or else num_val problems of the source chosen by a seeded
    shuffle, training the remaining ones in file order. Problems of a file whose question is also a test (or
    validation) question are dropped from training (and validation).
    """
    if source in SETTINGS:
        held_out = SETTINGS[source]("test", num_test + num_val, seed)
        return Splits(SETTINGS[source]("train", num_train, seed), held_out[num_test:], held_out[:num_test])
    problems = load_problems(source, fields)
    if test_source is None:
        if len(problems) <= num_test + num_val:
            raise DataError(
                f"{source}: {len(problems)} problems cannot give {num_test} test and {num_val} validation problems "
                "and a training set; lower data.num_test / data.num_val or give data.test_source"
            )
        order = list(range(len(problems)))
        random.Random(seed).shuffle(order)
        test = [problems[i] for i in order[:num_test]]
        val = [problems[i] for i in order[len(order) - num_val :]]
        train = [problems[i] for i in order[num_test : len(order) - num_val]]
    else:
        test = load_problems(test_source, fields)[:num_test]
        if val_source is not None:
            val, train = load_problems(val_source, fields)[:num_val], problems
        else:
            order = list(range(len(problems)))
            random.Random(seed).shuffle(order)
            chosen = set(order[:num_val])
            val = [problems[i] for i in sorted(chosen)]
            train = [p for i, p in enumerate(problems) if i not in chosen]
    test_questions = {p.question for p in test}
    val = [p for p in val if p.question not in test_questions]
    held_out = test_questions | {p.question for p in val}
    train = [p for p in train if p.question not in held_out][:num_train]
    if not train:
        raise DataError(f"{source}: no training problems left once the test and validation problems are held out")
    return Splits(train, val, test)


def problem_splits(
    source: str,
    num_train: int,
    num_test: int,
    seed: int,
    test_source: str | None = None,
    fields: dict[str, str] | None = None,
) -> tuple[list[Problem], list[Problem]]:
    """(train, test) problems of `data_splits` without a validation split."""
    splits = data_splits(source, num_train, 0, num_test, seed, test_source, None, fields)
    return splits.train, splits.test

__all__ = [
    "SETTINGS",
    "DataError",
    "Splits",
    "data_splits",
    "Problem",
    "extract_answer",
    "format_prompt",
    "is_correct",
    "load_problems",
    "problem_splits",
    "tokenize_prompts",
    "train_tokenizer",
]
