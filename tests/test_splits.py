"""Train, validation and test problems: pairwise disjoint for built-in settings and files, and adding a validation
split changes neither the training prompts nor the test problems."""

import json

import pytest

from trb.config import ConfigError, load_config
from trb.tasks import DataError, data_splits, problem_splits


def questions(problems):
    return [p.question for p in problems]


def assert_disjoint(splits):
    train, val, test = (set(questions(part)) for part in splits)
    assert not train & val and not train & test and not val & test


@pytest.mark.parametrize("setting", ["arith", "word"])
def test_builtin_splits_are_disjoint_and_leave_train_and_test_unchanged(setting):
    splits = data_splits(setting, 3000, 150, 200, seed=4)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (3000, 150, 200)
    assert_disjoint(splits)
    assert len(set(questions(splits.val))) == 150
    train, test = problem_splits(setting, 3000, 200, seed=4)
    assert questions(splits.train) == questions(train) and questions(splits.test) == questions(test)


def write_problems(path, start, count, repeat=()):
    rows = [{"question": f"What is {i} plus 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}
            for i in range(start, start + count)]
    rows += [{"question": f"What is {i} plus 1?", "answer": f"#### {i + 1}"} for i in repeat]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_single_file_split_is_disjoint_and_keeps_the_test_set(tmp_path):
    source = write_problems(tmp_path / "all.jsonl", 0, 300)
    splits = data_splits(source, 1000, 40, 50, seed=1)
    assert (len(splits.val), len(splits.test), len(splits.train)) == (40, 50, 210)
    assert_disjoint(splits)
    _, test = problem_splits(source, 1000, 50, seed=1)
    assert questions(splits.test) == questions(test)
    with pytest.raises(DataError, match="cannot give 50 test and 260 validation"):
        data_splits(source, 10, 260, 50, seed=1)


def test_files_with_overlaps_are_made_disjoint(tmp_path):
    """Questions that a test (or validation) file shares with the training file leave training (and validation)."""
    source = write_problems(tmp_path / "train.jsonl", 0, 100)
    test_source = write_problems(tmp_path / "test.jsonl", 90, 20)  # 90..109: ten also in the source
    val_source = write_problems(tmp_path / "val.jsonl", 200, 10, repeat=(5, 95))  # 5 in train, 95 in test
    splits = data_splits(source, 1000, 12, 20, 0, test_source, val_source)
    assert_disjoint(splits)
    assert len(splits.test) == 20 and len(splits.val) == 11 and len(splits.train) == 89
    carved = data_splits(source, 1000, 12, 20, 0, test_source)  # validation carved from the source
    assert_disjoint(carved)
    assert len(carved.val) + len(carved.train) == 90 and len(carved.val) >= 2


def test_config_validates_the_validation_split(tmp_path):
    assert load_config(None, ["models.student=s", "models.teacher=t", "data.num_test=200"]).data.val_count == 100
    assert load_config(None, ["models.student=s", "models.teacher=t", "data.num_val=0"]).data.val_count == 0
    with pytest.raises(ConfigError, match="num_val must be >= 0"):
        load_config(None, ["models.student=s", "models.teacher=t", "data.num_val=-1"])
    with pytest.raises(ConfigError, match="val_source needs data.test_source"):
        load_config(None, ["models.student=s", "models.teacher=t", "data.val_source=v.jsonl"])
    with pytest.raises(ConfigError, match="did you mean 'data.num_val'"):
        load_config(None, ["models.student=s", "models.teacher=t", "data.num_vals=3"])
