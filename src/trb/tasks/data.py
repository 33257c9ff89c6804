"""Loading user problem sets (JSONL, or parquet with pyarrow) into Problems.

Two formats are recognized from their keys: GSM8K (question, answer = worked solution with <<a*b=c>> calculator
annotations ending in "#### N") and MATH (problem, solution containing \\boxed{...}, optional answer). Anything else
needs fields={"question": ..., "solution": ..., "answer": ...}, naming the columns to read; solution or answer may be
left out (the answer is then extracted from the solution, or the solution is just the boxed answer).

A bad record stops the load with one line naming the file, the line (the row for parquet) and the fix, rather than
being skipped: a silently shrunk evaluation set changes every pass@1 computed on it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from trb.errors import DataError
from trb.preflight import json_lines
from trb.tasks.grading import extract_answer
from trb.tasks.problems import Problem

_CALCULATOR = re.compile(r"<<[^>]*>>")


def _records(path: Path) -> Iterator[tuple[str, object]]:
    """(location, record) for every record of the file; location is "file:line" or "file: row N"."""
    if path.suffix == ".parquet":
        try:
            import pyarrow
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading parquet needs pyarrow: pip install 'trb[parquet]'") from None
        try:
            rows = pq.read_table(path).to_pylist()
        except (pyarrow.ArrowException, OSError) as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"{path}: not a readable parquet file ({first_line}); rewrite it or convert it to JSONL"
                            ) from None
        for row, record in enumerate(rows, start=1):
            yield f"{path}: row {row}", record
        return
    for line_no, record in json_lines(path):
        yield f"{path}:{line_no}", record


def _text(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: missing or empty field {key!r} (keys: {sorted(record)}); fill it or map it with data.fields")
    return value


def _problem(record: dict, fields: dict[str, str] | None, where: str) -> Problem:
    if fields is not None:
        question = _text(record, fields["question"], where)
        solution = _text(record, fields["solution"], where) if "solution" in fields else None
        answer = _text(record, fields["answer"], where) if "answer" in fields else extract_answer(solution or "")
        if solution is None and answer is not None:
            solution = f"\\boxed{{{answer}}}"
    elif "question" in record and "answer" in record:  # GSM8K
        question, worked = _text(record, "question", where), _text(record, "answer", where)
        answer = extract_answer(worked)
        steps, _, _ = worked.rpartition("####")
        solution = f"{_CALCULATOR.sub('', steps).rstrip()}\n\\boxed{{{answer}}}"
    elif "problem" in record and "solution" in record:  # MATH
        question, solution = _text(record, "problem", where), _text(record, "solution", where)
        answer = _text(record, "answer", where) if record.get("answer") else extract_answer(solution)
    else:
        raise DataError(
            f"{where}: unknown format, keys {sorted(record)}; expected GSM8K (question, answer) or "
            f"MATH (problem, solution), or pass fields={{'question': ..., 'solution': ..., 'answer': ...}}"
        )
    if not answer:
        raise DataError(
            f"{where}: no final answer: the solution needs \\boxed{{...}} or a last line '#### N' "
            f"(for a column holding just the answer, pass fields=)"
        )
    return Problem(question.strip(), solution.strip(), answer.strip())


def load_problems(path: str | Path, fields: dict[str, str] | None = None) -> list[Problem]:
    """Every problem of a .jsonl (blank lines skipped) or .parquet file; raises DataError on the first bad record."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if fields is not None and (
        "question" not in fields
        or not fields.keys() & {"solution", "answer"}
        or fields.keys() - {"question", "solution", "answer"}
    ):
        raise DataError(f"fields must map 'question' and 'solution' and/or 'answer' to column names, got {fields}")
    problems = []
    for where, record in _records(path):
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        problems.append(_problem(record, fields, where))
    if not problems:
        raise DataError(f"{path}: no problems (the file is empty); give one JSON problem per line")
    return problems
