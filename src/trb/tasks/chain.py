"""Setting "chain": the arithmetic chains of "arith", 6 to 10 steps long, each step using the previous result.

    question: a = 37, b = a + 45, c = b - 18, d = c * 2, e = d - 60, f = e + 13. Find f.
    solution: b = 37 + 45 = 82
              c = 82 - 18 = 64
              d = 64 * 2 = 128
              e = 128 - 60 = 68
              f = 68 + 13 = 81
              \\boxed{81}

A regime where a student's early rollouts stay uninformative: one wrong digit anywhere ruins every later line, so a
student that gets each line right with probability q solves a problem with probability about q^(steps), and a weak
student's own rollouts carry little signal for many steps. The steps and numbers follow "arith" (two-digit addends,
single-digit factors, every value in 0..999); only the length differs. The question is the canonical key of the
split.
"""

from __future__ import annotations

import random

from trb.tasks.arith import draw_chain
from trb.tasks.problems import Problem, draw_split

MIN_STEPS, MAX_STEPS = 6, 10
VARIABLES = "abcdefghijk"  # a plus up to MAX_STEPS results


def _draw(rng: random.Random) -> tuple[Problem, str]:
    return draw_chain(rng, rng.randint(MIN_STEPS, MAX_STEPS), VARIABLES)


def generate(split: str, n: int, seed: int) -> list[Problem]:
    """n distinct chain problems of split "train" or "test" (disjoint), reproducible for a seed."""
    return draw_split(_draw, split, n, seed)
