"""GSM8K math word problems: loading, final-answer extraction, exact-match comparison.

A GSM8K answer is a worked solution whose last line is `#### N`. The same extraction reads
both the gold answers and model generations, so exact match cannot drift between them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from fractions import Fraction

from nemo_rlhf.data.jsonl import read_jsonl, require_fields
from nemo_rlhf.errors import UserError

FINAL_ANSWER_MARKER = "####"

# A number as people write it in GSM8K: optional "$", digits with optional thousands
# separators (only in groups of three, so "3,4,5" stays three numbers), and an optional
# decimal part. A trailing "." (end of sentence) is not part of the match. A "-" is a sign
# only when it does not follow a word or ")", so "10-5" and "(3)-2" are not read as "-5"/"-2".
_NUMBER = re.compile(r"(?:(?<![\w)])-)?(?:\$\s?)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


@dataclass(frozen=True)
class MathProblem:
    """One GSM8K problem.

    Attributes:
        question: the word problem.
        answer: the worked solution, ending with `#### N`.
        final_answer: the normalised number after `####` (e.g. "1000" for "#### 1,000").
        source_line: line number in the source jsonl, for tracing bad cases back.
    """

    question: str
    answer: str
    final_answer: str
    source_line: int


def load_gsm8k(path: str | os.PathLike, limit: int | None = None) -> list[MathProblem]:
    """Loads GSM8K problems from a jsonl file of `{question, answer}` rows.

    Args:
        path: the jsonl(.gz) file.
        limit: keep only the first `limit` problems (None or 0 = all).

    Returns:
        The problems in file order.

    Raises:
        UserError: a malformed line, a missing/wrong-typed field, or a gold answer without
            a `#### N` final answer (exact match would have nothing to compare against).
    """
    problems = []
    for lineno, row in read_jsonl(path):
        if limit and len(problems) >= limit:
            break
        require_fields(row, {"question": str, "answer": str}, path, lineno)
        final = _marked_answer(row["answer"])
        if final is None:
            raise UserError(
                f"gold answer has no '{FINAL_ANSWER_MARKER} N' final answer: {row['answer'][-80:]!r}",
                where=f"{path}:{lineno}",
                fix=f"end every answer with a line '{FINAL_ANSWER_MARKER} <number>', as GSM8K does",
            )
        problems.append(MathProblem(row["question"], row["answer"], final, lineno))
    return problems


def extract_final_answer(text: str) -> str | None:
    """Reads the final numeric answer from a solution or a model generation.

    The number after the first `####` wins; without a marker the last number in the text
    is used (models that never learned the marker still get credit for a right number). If
    a marker is present but no number follows it, the answer is None rather than a number
    from the reasoning: the model committed to a non-numeric answer.

    Args:
        text: a worked solution or a generation.

    Returns:
        The number with "$", thousands commas and a trailing "." removed ("1,000." ->
        "1000"), or None when there is no number.
    """
    if FINAL_ANSWER_MARKER in text:
        return _marked_answer(text)
    numbers = _NUMBER.findall(text)
    return _normalise(numbers[-1]) if numbers else None


def _marked_answer(text: str) -> str | None:
    """The first number after the first `####` marker, or None."""
    if FINAL_ANSWER_MARKER not in text:
        return None
    # Only the line of the marker: text generated after the answer must not be read.
    after = text.split(FINAL_ANSWER_MARKER, 1)[1].strip().split("\n", 1)[0]
    match = _NUMBER.search(after)
    return _normalise(match.group(0)) if match else None


def _normalise(number: str) -> str:
    return number.replace("$", "").replace(",", "").replace(" ", "").rstrip(".")


def _as_fraction(number: str | None) -> Fraction | None:
    if number is None:
        return None
    try:
        return Fraction(_normalise(number.strip()))
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(pred: str | None, gold: str | None) -> bool:
    """Compares two extracted answers numerically ("2.50" matches "2.5", "1,000" "1000").

    Exact rational arithmetic (`Fraction`) avoids float rounding making "0.1 + 0.2"-style
    answers differ. Anything that is not a number never matches, not even itself.

    Args:
        pred: the answer extracted from a generation (may be None).
        gold: the gold final answer.

    Returns:
        True when both are numbers with the same value.
    """
    left, right = _as_fraction(pred), _as_fraction(gold)
    return left is not None and right is not None and left == right
