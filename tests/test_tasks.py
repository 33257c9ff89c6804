"""trb.tasks: synthetic generators, tokenizer and prompt format, answer extraction and grading, data loading."""

from __future__ import annotations

import json
import random
import re
import threading
import time
from pathlib import Path

import pytest
from math_verify import parse, verify
from transformers import AutoTokenizer

from trb.tasks import SETTINGS, DataError, Problem, extract_answer, format_prompt, is_correct, load_problems
from trb.tasks.grading import MATH_VERIFY_TIMEOUT_S, _fast_verdict
from trb.tasks.problems import split_of
from trb.tasks.tokenizer import PROMPT_FORMAT, train_tokenizer

GSM8K_TEST = Path(__file__).parent / "data" / "gsm8k" / "test.jsonl"
VOCAB_SIZE = {"arith": 256, "word": 512, "chain": 256}
MAX_TOKENS = {"arith": 80, "word": 100, "chain": 176}  # prompt + solution + EOS: the budget of the miniature models
STEPS = {"arith": (2, 4), "word": (1, 3), "chain": (6, 10)}  # solution lines before the boxed answer
STEP = re.compile(r"(?:[a-k] = )?(\d+) ([-+*/]) (\d+) = (\d+)")  # "b = 37 + 45 = 82" (arith), "4 * 6 = 24" (word)


@pytest.fixture(scope="module", params=sorted(SETTINGS))
def setting(request):
    return request.param


@pytest.fixture(scope="module")
def problems(setting) -> dict[str, list[Problem]]:
    return {split: SETTINGS[setting](split, 2000, seed=0) for split in ("train", "test")}


@pytest.fixture(scope="module")
def tokenizer(setting, problems):
    texts = [PROMPT_FORMAT.format(question=p.question) + p.solution for p in problems["train"]]
    return train_tokenizer(texts, VOCAB_SIZE[setting])


@pytest.fixture(scope="module")
def gsm8k_rows() -> list[dict]:
    return [json.loads(line) for line in GSM8K_TEST.read_text().splitlines()]


def _math_verify(pred: str, gold: str) -> bool:
    """The reference verdict: math-verify alone, on both answers boxed."""
    return verify(parse(f"\\boxed{{{gold}}}"), parse(f"\\boxed{{{pred}}}"))


# ---- generators ---------------------------------------------------------------------------------------------------


def test_generators_are_deterministic_per_seed_and_differ_across_seeds(setting):
    generate = SETTINGS[setting]
    for split in ("train", "test"):
        assert generate(split, 50, seed=1) == generate(split, 50, seed=1)
        assert generate(split, 50, seed=1) != generate(split, 50, seed=2)
        assert len({p.question for p in generate(split, 500, seed=3)}) == 500  # distinct within a call


def test_train_and_test_splits_are_disjoint_whatever_the_seed(setting):
    generate = SETTINGS[setting]
    train = {p.question for seed in (0, 1) for p in generate("train", 2000, seed)}
    test = {p.question for seed in (0, 7) for p in generate("test", 2000, seed)}
    assert len(train) > 3000 and len(test) > 3000
    assert not train & test


def test_splits_are_a_function_of_the_content():
    assert split_of("a = 1, b = a + 10. Find b.") == split_of("a = 1, b = a + 10. Find b.")
    shares = [split_of(str(i)) == "test" for i in range(10_000)]
    assert 0.08 < sum(shares) / len(shares) < 0.12
    with pytest.raises(ValueError, match="split"):
        SETTINGS["arith"]("validation", 1, seed=0)


def test_every_solution_line_is_correct_arithmetic_and_ends_in_the_boxed_answer(setting, problems):
    ops = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y, "/": lambda x, y: x / y}
    for p in problems["train"] + problems["test"]:
        *steps, last = p.solution.split("\n")
        assert STEPS[setting][0] <= len(steps) <= STEPS[setting][1]
        assert last == f"\\boxed{{{p.answer}}}"
        for line in steps:
            x, op, y, result = STEP.fullmatch(line).groups()
            assert ops[op](int(x), int(y)) == int(result), line
            assert 0 <= int(result) <= 999
        assert int(result) == int(p.answer)
        assert extract_answer(p.solution) == p.answer
        assert is_correct(p.solution, p.answer)


@pytest.mark.parametrize("name", ["arith", "chain"])
def test_arith_solutions_follow_the_question(name):
    for p in SETTINGS[name]("test", 1000, seed=0):
        # "a = 37, b = a + 45, c = b - 18. Find c." -> solution lines "b = 37 + 45 = 82", "c = 82 - 18 = 64"
        head, target = re.fullmatch(r"(.*)\. Find ([a-k])\.", p.question).groups()
        values = {}
        for assignment in head.split(", "):
            var, expr = assignment.split(" = ")
            tokens = expr.split()
            if len(tokens) == 1:
                values[var] = int(tokens[0])
                continue
            prev, op, operand = tokens
            assert (10 <= int(operand) <= 99) if op in "+-" else (2 <= int(operand) <= 9)
            values[var] = eval(f"{values[prev]} {op} {operand}")  # noqa: S307 (digits and one operator)
        assert str(values[target]) == p.answer


def test_word_problems_vary_in_wording():
    questions = [p.question for p in SETTINGS["word"]("train", 2000, seed=0)]
    openings = {" ".join(re.sub(r"\d+", "N", q).split()[1:3]) for q in questions}
    assert len(openings) >= 8
    assert len({q.split()[0] for q in questions}) >= 10  # names


def test_wrong_answers_are_graded_incorrect(problems):
    for p in problems["test"][:200]:
        wrong = str(int(p.answer) + random.Random(p.question).choice([-10, -1, 1, 2, 100]))
        assert not is_correct(p.solution.replace(f"\\boxed{{{p.answer}}}", f"\\boxed{{{wrong}}}"), p.answer)
        assert not is_correct(p.solution.replace(f"\\boxed{{{p.answer}}}", ""), p.answer)  # no final answer


# ---- tokenizer and prompt format ----------------------------------------------------------------------------------


def test_tokenizer_round_trips_and_prompt_boundary_is_a_token_boundary(setting, problems, tokenizer):
    for p in problems["train"] + problems["test"]:
        prompt = format_prompt(tokenizer, p.question)
        prompt_ids = tokenizer(prompt)["input_ids"]
        solution_ids = tokenizer(p.solution)["input_ids"]
        assert tokenizer.decode(prompt_ids + solution_ids) == prompt + p.solution
        assert tokenizer(prompt + p.solution)["input_ids"] == prompt_ids + solution_ids
        assert len(prompt_ids) + len(solution_ids) + 1 <= MAX_TOKENS[setting]


def test_digits_are_single_tokens(tokenizer):
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("b = 123 + 45 = 168\n")["input_ids"])
    assert [t for t in tokens if any(c.isdigit() for c in t)] == list("12345168")


def test_tokenizer_round_trips_gsm8k(gsm8k_rows):
    texts = [text for row in gsm8k_rows for text in (row["question"], row["answer"])]
    tokenizer = train_tokenizer(texts, 1024)
    for text in texts:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_tokenizer_save_load_identity(tokenizer, problems, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert (loaded.eos_token, loaded.pad_token, loaded.bos_token) == ("<|endoftext|>", "<|pad|>", None)
    assert loaded.chat_template == tokenizer.chat_template
    for p in problems["test"][:100]:
        text = format_prompt(tokenizer, p.question) + p.solution
        assert format_prompt(loaded, p.question) == format_prompt(tokenizer, p.question)
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.decode([loaded.eos_token_id]) == "<|endoftext|>"


def test_chat_template_renders_the_miniature_format(tokenizer):
    prompt = "Question: a = 12, b = a + 30. Find b.\nAnswer:\n"
    messages = [{"role": "user", "content": "a = 12, b = a + 30. Find b."}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == prompt
    system = [{"role": "system", "content": "Put the final answer in \\boxed{}."}]
    assert tokenizer.apply_chat_template(system + messages, tokenize=False, add_generation_prompt=True) == prompt
    assert format_prompt(tokenizer, "a = 12, b = a + 30. Find b.", system_prompt="Be brief.") == prompt


def test_format_prompt_falls_back_without_a_chat_template():
    plain = train_tokenizer(["Question: 1 + 1?\nAnswer:\n2"], 64)
    plain.chat_template = None
    assert format_prompt(plain, "1 + 1?") == "Question: 1 + 1?\nAnswer:\n"
    assert format_prompt(plain, "1 + 1?", system_prompt="Be brief.") == "Be brief.\n\nQuestion: 1 + 1?\nAnswer:\n"


# ---- extraction and grading ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{\\frac{\\sqrt{3}}{2}} ok", "\\frac{\\sqrt{3}}{2}"),
        ("first \\boxed{1}, then \\boxed{ 2 }", "2"),
        ("\\boxed{7} and a truncated \\boxed{8", "7"),
        ("He makes $18.\n#### 18", "18"),
        ("#### 1,000", "1000"),
        ("#### 5 then #### -7.5", "-7.5"),
        ("\\boxed{3}\n#### 4", "3"),
        ("", None),
        ("no answer here", None),
        ("\\boxed{", None),
        ("}}{{\\boxed}", None),
        ("####", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("1/2", "0.5"),
        ("\\frac{1}{2}", "0.5"),
        ("0.5", "\\frac{1}{2}"),
        ("3", "3.0"),
        ("3.0", "3"),
        ("1,000", "1000"),
        ("1000", "1,000"),
        ("1,234,567", "1234567"),
        ("-1,000", "-1000"),
        ("007", "7"),
        ("42", "42"),
        ("42", "43"),
        ("-5", "5"),
        ("0.5", "0.50"),
        ("3.0000001", "3"),
        ("1,5", "15"),
        ("\\$18", "18"),
        ("50\\%", "50"),
        ("x + 1", "1 + x"),
        ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"),
    ],
)
def test_is_correct_agrees_with_math_verify(pred, gold):
    assert is_correct(f"The answer is \\boxed{{{pred}}}.", gold) == _math_verify(pred, gold)


def test_fast_path_decides_only_where_math_verify_agrees():
    rng = random.Random(0)
    decided = 0
    for _ in range(300):
        g = rng.choice([rng.randint(-50, 50), rng.randint(0, 10**7), round(rng.uniform(-10, 10), rng.randint(0, 8))])
        p = rng.choice([g, g + rng.choice([1, -1, 1e-7, 0.5]), float(g) if isinstance(g, int) else g])
        gold, pred = (f"{x:,}" if rng.random() < 0.3 and abs(x) >= 1000 else str(x) for x in (g, p))
        verdict = _fast_verdict(pred, gold)
        if verdict is not None:
            decided += 1
            assert verdict == _math_verify(pred, gold), (pred, gold)
    assert decided > 200


@pytest.mark.parametrize(
    "response",
    [
        "",
        "\\boxed{",
        "\\boxed{}",
        "}{" * 1000,
        "\\boxed{" * 10_000,
        "\\boxed{" + "(" * 5000 + "}",
        "\\boxed{" + "1+" * 2000 + "1}",
        "\\boxed{\\frac{1}{0}}",
        "\\boxed{\\text{abc}}",
        "\x00\\boxed{\ud800}",
        "#### " + "9" * 100_000,
    ],
)
def test_is_correct_never_raises_on_garbage(response):
    assert is_correct(response, "42") is False


def test_is_correct_bounds_math_verify_time():
    start = time.perf_counter()
    assert not is_correct("\\boxed{9^{9^{9^{9}}}}", "42")  # sympy would evaluate this power for hours
    assert time.perf_counter() - start < 3 * MATH_VERIFY_TIMEOUT_S


def test_is_correct_works_off_the_main_thread():
    results = []
    thread = threading.Thread(target=lambda: results.append(is_correct("\\boxed{\\frac{1}{2}}", "0.5")))
    thread.start()
    thread.join()
    assert results == [True]


def test_gsm8k_gold_answers_are_recovered_for_every_problem(gsm8k_rows):
    problems = load_problems(GSM8K_TEST)
    assert len(problems) == len(gsm8k_rows) == 1319
    for p, row in zip(problems, gsm8k_rows):
        assert p.question == row["question"].strip()
        assert p.answer == row["answer"].split("####")[-1].strip().replace(",", "")
        assert "<<" not in p.solution and "####" not in p.solution
        assert p.solution.endswith(f"\\boxed{{{p.answer}}}")
        assert is_correct(p.solution, p.answer)
        assert is_correct(row["answer"], p.answer)  # the raw "#### N" format grades too


# ---- loading problem files ----------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))
    return path


def test_load_math_and_mapped_fields(tmp_path):
    math = _write_jsonl(
        tmp_path / "math.jsonl",
        [
            {"problem": "What is $1/2 + 1/2$?", "solution": "It is $\\boxed{1}$."},
            "\n",
            {"problem": "Half of 1?", "solution": "$\\boxed{\\frac{1}{2}}$", "answer": "\\frac12"},
        ],
    )
    assert load_problems(math) == [
        Problem("What is $1/2 + 1/2$?", "It is $\\boxed{1}$.", "1"),
        Problem("Half of 1?", "$\\boxed{\\frac{1}{2}}$", "\\frac12"),
    ]
    custom = _write_jsonl(tmp_path / "custom.jsonl", [{"prompt": "2 + 2?", "target": 4}])
    assert load_problems(custom, fields={"question": "prompt", "answer": "target"}) == [
        Problem("2 + 2?", "\\boxed{4}", "4")
    ]
    with pytest.raises(ValueError, match="fields"):
        load_problems(custom, fields={"question": "prompt"})


def test_load_parquet(tmp_path, gsm8k_rows):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed (pip install pyarrow)")
    import pyarrow.parquet as pq

    path = tmp_path / "gsm8k.parquet"
    pq.write_table(pa.Table.from_pylist(gsm8k_rows[:20]), path)
    assert load_problems(path) == load_problems(GSM8K_TEST)[:20]
    pq.write_table(pa.Table.from_pylist([{"question": "q", "answer": "no final line"}]), path)
    with pytest.raises(DataError, match="gsm8k.parquet: row 1"):
        load_problems(path)


@pytest.mark.parametrize(
    "rows, line, what",
    [
        ([{"question": "q", "answer": "1\n#### 1"}, "{'question': 'q'}\n"], 2, "not valid JSON"),
        (["\n", "[1, 2]\n"], 2, "expected a JSON object"),
        ([{"question": "q", "answer": "1\n#### 1"}] * 3 + [{"question": "q", "answer": ""}], 4, "'answer'"),
        ([{"problem": "p", "solution": "no box"}], 1, "no final answer"),
        ([{"question": "q", "answer": "no final line"}], 1, "no final answer"),
        ([{"prompt": "q", "response": "r"}], 1, "unknown format"),
    ],
)
def test_data_errors_name_the_file_and_line(tmp_path, rows, line, what):
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_problems(path)
    message = str(info.value)
    assert f"bad.jsonl:{line}: " in message and what in message and "\n" not in message


def test_data_errors_for_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="missing.jsonl: no such file"):
        load_problems(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="empty.jsonl: no problems"):
        load_problems(_write_jsonl(tmp_path / "empty.jsonl", ["\n", "  \n"]))
    assert issubclass(DataError, ValueError)
