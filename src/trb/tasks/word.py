"""Setting "word": templated grade-school word problems of 1 to 3 steps, a miniature GSM8K.

    question: Mia has 23 marbles and buys 4 bags with 6 marbles in each. How many marbles does Mia have in total?
    solution: 4 * 6 = 24
              23 + 24 = 47
              \\boxed{47}

Unlike "arith", the question does not spell out the operations: the model must read them off the wording (14
templates over names, objects and numbers), then do one operation per line. Division is always exact.

The canonical key of the split is the template and its arithmetic, not the names or objects: a test problem is a
computation never seen in training, not a seen one with the names swapped.
"""

from __future__ import annotations

import random

from trb.tasks.problems import OPS, Problem, draw_split

NAMES = [
    ("Tom", "he"), ("Mia", "she"), ("Leo", "he"), ("Ava", "she"), ("Sam", "he"), ("Zoe", "she"), ("Ben", "he"),
    ("Lily", "she"), ("Max", "he"), ("Emma", "she"), ("Omar", "he"), ("Nora", "she"), ("Ravi", "he"),
    ("Ines", "she"), ("Jack", "he"), ("Yuki", "she"),
]  # fmt: skip
OBJECTS = [
    "apples", "marbles", "stickers", "pencils", "cookies", "cards", "shells", "stamps", "beads", "eggs",
    "balloons", "flowers", "crayons", "buttons", "coins", "books",
]  # fmt: skip
CONTAINERS = [("box", "boxes"), ("bag", "bags"), ("pack", "packs"), ("jar", "jars")]
ITEMS = [("pen", "pens"), ("notebook", "notebooks"), ("toy", "toys"), ("ticket", "tickets"), ("cake", "cakes")]

Step = tuple[int, str, int]  # (x, op, y), one line "x op y = result" of the worked solution


def _people(rng: random.Random) -> tuple[str, str, str]:
    """A name, its pronoun, and a second, different name."""
    (a, he), (b, _) = rng.sample(NAMES, 2)
    return a, he, b


def _more(rng: random.Random) -> tuple[str, list[Step]]:
    a, he, _ = _people(rng)
    obj, x, y = rng.choice(OBJECTS), rng.randint(10, 99), rng.randint(2, 99)
    verb = rng.choice(["buys", "finds", "is given"])
    return f"{a} has {x} {obj}. {he.capitalize()} {verb} {y} more. How many {obj} does {a} have now?", [(x, "+", y)]


def _give_away(rng: random.Random) -> tuple[str, list[Step]]:
    a, _, b = _people(rng)
    obj, x = rng.choice(OBJECTS), rng.randint(20, 99)
    y = rng.randint(2, x - 1)
    return f"{a} had {x} {obj} and gave {y} of them to {b}. How many {obj} does {a} have left?", [(x, "-", y)]


def _boxes(rng: random.Random) -> tuple[str, list[Step]]:
    a, _, _ = _people(rng)
    obj, (box, boxes) = rng.choice(OBJECTS), rng.choice(CONTAINERS)
    p, q = rng.randint(2, 9), rng.randint(2, 30)
    question = f"{a} buys {p} {boxes} of {obj}. Each {box} holds {q} {obj}. How many {obj} does {a} buy?"
    return question, [(p, "*", q)]


def _share(rng: random.Random) -> tuple[str, list[Step]]:
    a, _, _ = _people(rng)
    obj, k, each = rng.choice(OBJECTS), rng.randint(2, 9), rng.randint(2, 20)
    question = f"{a} shares {k * each} {obj} equally among {k} friends. How many {obj} does each friend get?"
    return question, [(k * each, "/", k)]


def _per_day(rng: random.Random) -> tuple[str, list[Step]]:
    a, he, _ = _people(rng)
    obj, x, d = rng.choice(OBJECTS), rng.randint(2, 40), rng.randint(2, 9)
    verbs, verb = rng.choice([("collects", "collect"), ("makes", "make"), ("gets", "get")])
    return f"Every day {a} {verbs} {x} {obj}. How many {obj} does {he} {verb} in {d} days?", [(x, "*", d)]


def _boxes_and_have(rng: random.Random) -> tuple[str, list[Step]]:
    a, _, _ = _people(rng)
    obj, (_, boxes) = rng.choice(OBJECTS), rng.choice(CONTAINERS)
    x, p, q = rng.randint(10, 99), rng.randint(2, 9), rng.randint(2, 30)
    question = (
        f"{a} has {x} {obj} and buys {p} {boxes} with {q} {obj} in each. How many {obj} does {a} have in total?"
    )
    return question, [(p, "*", q), (x, "+", p * q)]


def _more_than(rng: random.Random) -> tuple[str, list[Step]]:
    a, _, b = _people(rng)
    obj, x, y = rng.choice(OBJECTS), rng.randint(10, 99), rng.randint(2, 50)
    question = f"{a} has {x} {obj}. {b} has {y} more {obj} than {a}. How many {obj} do they have together?"
    return question, [(x, "+", y), (x, "+", x + y)]


def _times_as_many(rng: random.Random) -> tuple[str, list[Step]]:
    a, _, b = _people(rng)
    obj, x, k = rng.choice(OBJECTS), rng.randint(2, 50), rng.randint(2, 9)
    y = rng.randint(1, min(99, x * k - 1))
    question = (
        f"{b} has {x} {obj}. {a} has {k} times as many, then gives away {y}. How many {obj} does {a} have now?"
    )
    return question, [(x, "*", k), (x * k, "-", y)]


def _change(rng: random.Random) -> tuple[str, list[Step]]:
    a, he, _ = _people(rng)
    (item, items), price, k = rng.choice(ITEMS), rng.randint(2, 20), rng.randint(2, 9)
    bill = next(b for b in (20, 50, 100, 200) if b > price * k)
    question = (
        f"A {item} costs ${price}. {a} buys {k} {items} and pays with a ${bill} bill. "
        f"How many dollars of change does {he} get?"
    )
    return question, [(k, "*", price), (bill, "-", price * k)]


def _basket(rng: random.Random) -> tuple[str, list[Step]]:
    a, _, b = _people(rng)
    obj, x = rng.choice(OBJECTS), rng.randint(20, 99)
    y = rng.randint(1, x - 2)
    z = rng.randint(1, x - y - 1)
    question = f"There are {x} {obj} in a basket. {a} takes {y} and {b} takes {z}. How many {obj} are left?"
    return question, [(x, "-", y), (x - y, "-", z)]


def _pool(rng: random.Random) -> tuple[str, list[Step]]:
    a, _, b = _people(rng)
    obj, k, each = rng.choice(OBJECTS), rng.randint(2, 9), rng.randint(2, 20)
    total = k * each
    x = rng.randint(1, total - 1)
    question = (
        f"{a} has {x} {obj} and {b} has {total - x}. They share them all equally among {k} friends. "
        f"How many {obj} does each friend get?"
    )
    return question, [(x, "+", total - x), (total, "/", k)]


def _wages(rng: random.Random) -> tuple[str, list[Step]]:
    a, he, _ = _people(rng)
    x, d = rng.randint(5, 99), rng.randint(2, 9)
    y = rng.randint(1, x * d - 1)
    question = f"{a} earns ${x} a week. After {d} weeks {he} spends ${y}. How many dollars does {he} have left?"
    return question, [(x, "*", d), (x * d, "-", y)]


def _boxes_keep_share(rng: random.Random) -> tuple[str, list[Step]]:
    a, he, _ = _people(rng)
    obj, (_, boxes) = rng.choice(OBJECTS), rng.choice(CONTAINERS)
    p, q = rng.randint(2, 9), rng.randint(2, 30)
    total = p * q
    k = rng.randint(2, min(9, total // 2))
    kept = rng.choice(range(total % k or k, total - k + 1, k))  # leaves a positive multiple of k to share
    question = (
        f"{a} buys {p} {boxes} of {obj} with {q} in each. {he.capitalize()} keeps {kept} and shares the rest "
        f"equally among {k} friends. How many {obj} does each friend get?"
    )
    return question, [(p, "*", q), (total, "-", kept), (total - kept, "/", k)]


def _buy_then_give(rng: random.Random) -> tuple[str, list[Step]]:
    a, he, b = _people(rng)
    obj, (_, boxes) = rng.choice(OBJECTS), rng.choice(CONTAINERS)
    x, p, q = rng.randint(10, 99), rng.randint(2, 9), rng.randint(2, 30)
    y = rng.randint(1, min(99, x + p * q - 1))
    question = (
        f"{a} has {x} {obj}. {he.capitalize()} buys {p} {boxes} of {q} {obj}, then gives {y} {obj} to {b}. "
        f"How many {obj} does {a} have now?"
    )
    return question, [(p, "*", q), (x, "+", p * q), (x + p * q, "-", y)]


TEMPLATES = [
    _more, _give_away, _boxes, _share, _per_day, _boxes_and_have, _more_than, _times_as_many, _change, _basket,
    _pool, _wages, _boxes_keep_share, _buy_then_give,
]  # fmt: skip


def _draw(rng: random.Random) -> tuple[Problem, str]:
    template = rng.choice(TEMPLATES)
    question, steps = template(rng)
    lines = []
    for x, op, y in steps:
        result = OPS[op](x, y)
        lines.append(f"{x} {op} {y} = {result}")
    solution = "\n".join([*lines, f"\\boxed{{{result}}}"])
    return Problem(question, solution, str(result)), f"{template.__name__}:{steps}"


def generate(split: str, n: int, seed: int) -> list[Problem]:
    """n distinct word problems of split "train" or "test" (disjoint), reproducible for a seed."""
    return draw_split(_draw, split, n, seed)
