"""Layer 1 of the gate: format compliance of each response.

A response complies when it (1) ended with EOS, where the row says so (`finished`; rows
without it are not judged on this), (2) leaks no chat-template token or role marker from
`TEMPLATE_LEAKS`, and (3) stays within a length budget, in tokenizer tokens when a
tokenizer is given, else in whitespace-separated words. The finding compares the pass
rate with `format_min_pass_rate`.

Generation decodes with `skip_special_tokens=True`, so a leak seen here was produced as
plain text (a policy imitating a template) or came from a sampler that kept special
tokens: either way a user would see it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from nemo_rlhf.gate.findings import Finding

DETECTOR = "format_compliance"

# (template family, pattern): tokens and markers that must never appear in a reply.
TEMPLATE_LEAKS: tuple[tuple[str, str], ...] = (
    ("chatml", r"<\|im_start\|>|<\|im_end\|>"),
    ("gpt2/qwen", r"<\|endoftext\|>"),
    ("llama2", r"\[/?INST\]|<<SYS>>|<</SYS>>"),
    ("llama3", r"<\|(?:begin_of_text|eot_id|start_header_id|end_header_id)\|>"),
    ("sentencepiece", r"</?s>"),
    ("gemma", r"<(?:start|end)_of_turn>"),
    ("zephyr/phi", r"<\|(?:user|assistant|system|end)\|>"),
    ("alpaca", r"^### (?:Instruction|Response|Input):"),
    # hh-rlhf style transcripts: the model writing the next human turn itself.
    ("hh-rlhf", r"^\s*(?:Human|Assistant):"),
)
_LEAK_PATTERNS = [(name, re.compile(pattern, re.MULTILINE)) for name, pattern in TEMPLATE_LEAKS]


def template_leaks(text: str) -> list[str]:
    """The template tokens/markers found in `text` (as written), in table order."""
    return [m.group(0).strip() for _, pattern in _LEAK_PATTERNS for m in [pattern.search(text)] if m]


def response_length(text: str, tokenizer=None) -> int:
    """Length in tokenizer tokens (no special tokens added) or, without a tokenizer, in words."""
    if tokenizer is None:
        return len(text.split())
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class FormatResult:
    """One response's checks: `failures` names each failed check ("eos", "template", "length")."""

    index: int
    failures: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    length: int = 0

    @property
    def passed(self) -> bool:
        return not self.failures


def check_row(row: dict, index: int, max_length: int | None, tokenizer=None) -> FormatResult:
    """Runs the three checks on one responses row."""
    text = row["response"]
    result = FormatResult(index=index, leaks=template_leaks(text), length=response_length(text, tokenizer))
    if row.get("finished") is False:
        result.failures.append("eos")
    if result.leaks:
        result.failures.append("template")
    if max_length is not None and result.length > max_length:
        result.failures.append("length")
    return result


def check_rows(rows: Sequence[dict], max_length: int | None = None, tokenizer=None) -> list[FormatResult]:
    """Format checks for every row (see `check_row`)."""
    return [check_row(row, i, max_length, tokenizer) for i, row in enumerate(rows)]


def format_finding(
    rows: Sequence[dict],
    format_min_pass_rate: float = 0.9,
    max_length: int | None = None,
    tokenizer=None,
    max_cases: int = 20,
) -> Finding:
    """The `format_compliance` finding: fail when the pass rate is below the threshold.

    Args:
        rows: the candidate's responses rows.
        format_min_pass_rate: the lowest acceptable share of compliant responses.
        max_length: budget in tokens (with `tokenizer`) or words; None = no length check.
        tokenizer: measures length in its tokens when given.
    """
    results = check_rows(rows, max_length, tokenizer)
    if not results:
        return Finding(DETECTOR, "info", None, format_min_pass_rate, "no responses to check for format")
    rate = sum(r.passed for r in results) / len(results)
    by_check = {name: sum(name in r.failures for r in results) for name in ("eos", "template", "length")}
    eos_known = sum(row.get("finished") is not None for row in rows)
    unit = "tokens" if tokenizer is not None else "words"
    message = (
        f"{rate:.1%} of {len(results)} responses are well-formed (threshold {format_min_pass_rate:.1%}): "
        f"{by_check['eos']} without EOS (of {eos_known} with `finished` known), "
        f"{by_check['template']} leaking template tokens, {by_check['length']} over "
        + (f"{max_length} {unit}" if max_length is not None else "the length budget (not checked)")
    )
    failed = [r for r in results if not r.passed]
    cases = [
        {
            "prompt": rows[r.index]["prompt"],
            "response": rows[r.index]["response"],
            "why": "format: " + ", ".join(r.failures),
            "failures": r.failures,
            "leaks": r.leaks,
            "length": r.length,
        }
        for r in failed[:max_cases]
    ]
    return Finding(
        detector=DETECTOR,
        severity="fail" if rate < format_min_pass_rate else "info",
        value=rate,
        threshold=format_min_pass_rate,
        message=message,
        details={"n": len(results), "failures_by_check": by_check, "length_unit": unit, "cases": cases},
    )
