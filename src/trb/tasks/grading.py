"""Answer extraction and grading, the verifier behind every pass@1 (METHOD.md section 4: graded by math-verify).

math-verify parses both answers to sympy and compares them, which costs milliseconds to seconds per call, while an
evaluation grades n samples of every problem (n = 32 to 512). Most answers are plain numbers, so `is_correct` first
tries an exact fast path that only decides when math-verify would give the same verdict (identical strings; equal
numbers; two different integers) and calls math-verify for everything else. The one difference: an answer identical
to the gold counts as correct even where math-verify cannot parse either.

math-verify bounds its own run time with SIGALRM, which only works in the main thread; elsewhere we run it without
a timeout and rely on the answer length cap. Grade in worker processes, not threads, to keep the bound.
"""

from __future__ import annotations

import re
import threading
from decimal import Decimal

from math_verify import parse, verify
from math_verify.errors import TimeoutException

BOXED = "\\boxed"
MAX_ANSWER_CHARS = 1000  # a longer "answer" is graded wrong unseen: math-verify can spend minutes on it
MATH_VERIFY_TIMEOUT_S = 2  # per parse and per comparison; legitimate answers take milliseconds

_GSM8K_ANSWER = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")
_BRACE = re.compile(r"[{}]")
_NUMBER = re.compile(r"-?(\d+|\d{1,3}(,\d{3})+)(\.\d+)?")  # 12, -0.5, 1,000 (thousands separators)


def extract_answer(text: str) -> str | None:
    """The content of the last complete \\boxed{...} (nested braces allowed), else the number after the last
    GSM8K-style "#### " (commas removed), else None. Linear time, whatever the input."""
    end = len(text)
    start = text.rfind(BOXED)
    while start != -1:
        # Scanning up to the next (later) box is enough: a box left open there stays open to the end of the text.
        i = start + len(BOXED)
        if text.startswith("{", i):
            depth = 0
            for brace in _BRACE.finditer(text, i, end):
                depth += 1 if brace.group() == "{" else -1
                if depth == 0:
                    return text[i + 1 : brace.start()].strip()
        end = start
        start = text.rfind(BOXED, 0, end)
    numbers = _GSM8K_ANSWER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def _fast_verdict(pred: str, gold: str) -> bool | None:
    """math-verify's verdict when it is certain without sympy, else None."""
    if pred == gold:
        return True
    if _NUMBER.fullmatch(pred) and _NUMBER.fullmatch(gold):
        p, g = Decimal(pred.replace(",", "")), Decimal(gold.replace(",", ""))
        if p == g:
            return True
        if "." not in pred and "." not in gold:  # two integers compare exactly; decimals are rounded by math-verify
            return False
    return None


def is_correct(response: str, gold: str) -> bool:
    """Whether the answer extracted from response equals gold, by math-verify's rules. Never raises."""
    pred = extract_answer(response)
    if not pred or len(pred) > MAX_ANSWER_CHARS:
        return False
    gold = gold.strip()
    verdict = _fast_verdict(pred, gold)
    if verdict is not None:
        return verdict
    timeout = MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    try:
        return verify(
            parse(f"{BOXED}{{{gold}}}", parsing_timeout=timeout),
            parse(f"{BOXED}{{{pred}}}", parsing_timeout=timeout),
            timeout_seconds=timeout,
        )
    except (Exception, TimeoutException):
        return False
