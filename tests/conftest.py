"""Shared fixtures: a tiny student/teacher pair on disk with a real miniature tokenizer."""

import os
from pathlib import Path

import pytest
import torch

from trb.models import tiny_causal_lm
from trb.tasks import SETTINGS, train_tokenizer


# The suite's torch runs on one thread, in its processes and in those they start; `trb` leaves torch's threads as
# OMP_NUM_THREADS sets them (its own default would follow the machine's load: trb.loading.set_threads).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def make_pair(folder: Path, architecture: str = "qwen3", student_width: int = 32, teacher_width: int = 48) -> dict:
    problems = SETTINGS["arith"]("train", 400, 0)
    tokenizer = train_tokenizer([p.question + "\n" + p.solution for p in problems], 200)
    paths = {}
    for role, width, layers, seed in (("student", student_width, 2, 0), ("teacher", teacher_width, 2, 1)):
        model = tiny_causal_lm(len(tokenizer), width, layers, architecture=architecture, seed=seed, init_std=0.1,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        paths[role] = folder / role
        model.save_pretrained(paths[role])
        tokenizer.save_pretrained(paths[role])
    return paths


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> dict:
    """{'student': path, 'teacher': path} of tiny random Qwen3 models sharing an arith tokenizer."""
    torch.set_num_threads(1)
    return make_pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture
def loaded_pair(tiny_pair):
    """(tokenizer, student, teacher, vocab) of the tiny pair, freshly loaded (tests may train the student)."""
    from trb.models import load_causal_lm, load_tokenizer, vocab_space

    tokenizer = load_tokenizer(str(tiny_pair["student"]))
    student = load_causal_lm(str(tiny_pair["student"]), torch.device("cpu"))
    teacher = load_causal_lm(str(tiny_pair["teacher"]), torch.device("cpu"))
    return tokenizer, student, teacher, vocab_space(tokenizer, tokenizer, student, teacher)
