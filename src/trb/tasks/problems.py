"""The problem record every task produces, and the split rule the synthetic generators share.

A synthetic generator draws problems at random, so without care the same problem can land in both the training
prompts and the evaluation set, and a student that memorizes it looks like one that learned to solve it. Instead a
problem's split is a pure function of a canonical key (a hash), and `draw_split` keeps only draws whose key hashes
into the requested split: no seed or count can ever put a test problem in the train split.
"""

from __future__ import annotations

import hashlib
import operator
import random
from collections.abc import Callable
from dataclasses import dataclass

SPLITS = ("train", "test")
TEST_PERCENT = 10  # share of the problem space held out; generating n test problems costs ~10 n draws

# Integer arithmetic of the worked solutions; "/" only ever divides exactly.
OPS: dict[str, Callable[[int, int], int]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.floordiv,
}


@dataclass(frozen=True)
class Problem:
    """A question, a worked solution that states the final answer in \\boxed{...}, and the gold answer string."""

    question: str
    solution: str
    answer: str


def split_of(key: str) -> str:
    """"test" for TEST_PERCENT% of keys, "train" for the rest; stable across runs, machines and Python versions."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 100
    return "test" if bucket < TEST_PERCENT else "train"


def draw_split(draw: Callable[[random.Random], tuple[Problem, str]], split: str, n: int, seed: int) -> list[Problem]:
    """n distinct problems of one split from draw(rng) -> (problem, canonical key), reproducible for a seed.

    Draws whose key belongs to the other split, or that repeat an earlier key, are discarded.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    rng = random.Random(seed)
    problems: list[Problem] = []
    seen: set[str] = set()
    while len(problems) < n:
        problem, key = draw(rng)
        if key not in seen and split_of(key) == split:
            seen.add(key)
            problems.append(problem)
    return problems
