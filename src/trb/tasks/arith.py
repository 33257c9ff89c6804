"""Setting "arith": chains of 2 to 4 integer operations, small enough for a few-layer transformer trained on CPU.

    question: a = 37, b = a + 45, c = b - 18. Find c.
    solution: b = 37 + 45 = 82
              c = 82 - 18 = 64
              \\boxed{64}

Each step adds or subtracts a two-digit number or multiplies by a single digit, and every intermediate value stays
in 0..999, so the solution is one operation per line on at most three-digit numbers: a format regular enough that a
tiny model learns it to high accuracy at temperature 1.0, while still failing often enough early in training for
distillation to have something to fix. The question itself is the canonical key of the split.
"""

from __future__ import annotations

import random

from trb.tasks.problems import OPS, Problem, draw_split

MAX_VALUE = 999
VARIABLES = "abcde"


def draw_chain(rng: random.Random, n_steps: int, variables: str = VARIABLES) -> tuple[Problem, str]:
    """One chain of n_steps operations on a starting value (variables[0] = value, each next one from the previous),
    every result in 0..MAX_VALUE. Returns the problem and its question (the split key)."""
    value = rng.randint(10, 99)
    assignments = [f"a = {value}"]
    lines = []
    for prev, var in zip(variables, variables[1 : n_steps + 1]):
        choices = []  # every operation whose result can stay in 0..MAX_VALUE; subtraction or addition always can
        if value + 10 <= MAX_VALUE:
            choices.append(("+", rng.randint(10, min(99, MAX_VALUE - value))))
        if value >= 10:
            choices.append(("-", rng.randint(10, min(99, value))))
        if 2 * value <= MAX_VALUE:
            choices.append(("*", rng.randint(2, min(9, MAX_VALUE // max(value, 1)))))
        op, operand = rng.choice(choices)
        result = OPS[op](value, operand)
        assignments.append(f"{var} = {prev} {op} {operand}")
        lines.append(f"{var} = {value} {op} {operand} = {result}")
        value = result
    question = f"{', '.join(assignments)}. Find {variables[n_steps]}."
    solution = "\n".join([*lines, f"\\boxed{{{value}}}"])
    return Problem(question, solution, str(value)), question


def _draw(rng: random.Random) -> tuple[Problem, str]:
    return draw_chain(rng, rng.randint(2, 4))


def generate(split: str, n: int, seed: int) -> list[Problem]:
    """n distinct arithmetic-chain problems of split "train" or "test" (disjoint), reproducible for a seed."""
    return draw_split(_draw, split, n, seed)
