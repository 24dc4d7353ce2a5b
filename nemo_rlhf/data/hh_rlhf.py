"""Anthropic HH-RLHF preference data: transcripts -> (shared prompt, chosen, rejected).

Each row holds two full transcripts ("\\n\\nHuman: ...\\n\\nAssistant: ...") that should
differ only in the final assistant turn. Real files break that promise in a few rows
(different earlier turns, two assistant turns in a row, an empty final response). Those
rows are skipped and counted by reason in a `ParseReport`, never silently dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from nemo_rlhf.data.jsonl import read_jsonl, require_fields
from nemo_rlhf.errors import UserError

# A turn starts at "Human:" / "Assistant:" at the start of the text or after a blank line.
# An inline "Human:" inside a response (the original data has some: the assistant
# role-playing the user) is content, not a turn boundary, exactly as the HH authors split it.
_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}

T = TypeVar("T")

# How many example locations a report keeps per skip reason.
_EXAMPLES_PER_REASON = 3

SKIP_REASONS = {
    "parse_error": "a transcript has no turns or its turns do not alternate user/assistant",
    "final_turn_not_assistant": "the last turn is not an assistant response",
    "prompt_mismatch": "chosen and rejected differ before the final assistant turn",
    "empty_response": "a final assistant response is empty",
    "identical_responses": "chosen and rejected final responses are the same",
}


class TranscriptParseError(ValueError):
    """A transcript that cannot be read as alternating user/assistant turns."""


def parse_transcript(text: str) -> list[dict]:
    """Splits an HH transcript into chat messages.

    Args:
        text: "\\n\\nHuman: ...\\n\\nAssistant: ..." as stored in HH-RLHF.

    Returns:
        `[{"role": "user"|"assistant", "content": str}, ...]`, content stripped.

    Raises:
        TranscriptParseError: no turns, text before the first turn, a first turn that is not
            the user's, or two turns in a row by the same role.
    """
    pieces = _TURN.split(text)
    # re.split with one group gives [preamble, role, content, role, content, ...].
    preamble, rest = pieces[0], pieces[1:]
    if not rest:
        raise TranscriptParseError(f"no 'Human:'/'Assistant:' turns in {text[:60]!r}")
    if preamble.strip():
        raise TranscriptParseError(f"text before the first turn: {preamble[:60]!r}")
    messages = [{"role": _ROLES[role], "content": content.strip()} for role, content in zip(rest[::2], rest[1::2])]
    for index, message in enumerate(messages):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise TranscriptParseError(
                f"turn {index + 1} is {message['role']!r}, expected {expected!r} (turns must alternate, user first)"
            )
    return messages


@dataclass(frozen=True)
class PreferencePair:
    """A prompt shared by two responses, one preferred.

    Attributes:
        prompt: the conversation before the final assistant turn (ends with a user turn).
        chosen: the preferred final assistant response.
        rejected: the other final assistant response.
        source_line: line number in the source jsonl.
    """

    prompt: list[dict]
    chosen: str
    rejected: str
    source_line: int


@dataclass
class ParseReport:
    """What happened to every row of a preference file.

    Attributes:
        path: the file read.
        total_rows: rows read.
        kept: rows turned into pairs.
        skipped: skip reason -> count (reasons in `SKIP_REASONS`).
        examples: skip reason -> the first few "file:line: detail" strings.
    """

    path: str
    total_rows: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, lineno: int, detail: str) -> None:
        """Counts one skipped row and keeps its location if it is among the first few."""
        self.skipped[reason] += 1
        kept_examples = self.examples.setdefault(reason, [])
        if len(kept_examples) < _EXAMPLES_PER_REASON:
            kept_examples.append(f"{self.path}:{lineno}: {detail}")

    def summary(self) -> str:
        """A human-readable account: kept/total, then each skip reason with examples."""
        lines = [f"{self.path}: kept {self.kept} of {self.total_rows} rows"]
        for reason, count in sorted(self.skipped.items()):
            lines.append(f"  skipped {count}: {reason} ({SKIP_REASONS.get(reason, reason)})")
            lines.extend(f"    {example}" for example in self.examples.get(reason, []))
        return "\n".join(lines)


def load_preference_pairs(path: str | os.PathLike) -> tuple[list[PreferencePair], ParseReport]:
    """Reads an HH-style `{chosen, rejected}` jsonl(.gz) into preference pairs.

    Args:
        path: the preference file.

    Returns:
        `(pairs, report)`: the usable pairs in file order and what was skipped, by reason.

    Raises:
        UserError: a malformed line or a row without string `chosen`/`rejected` fields
            (the file is not HH-style at all; skipping would hide that).
    """
    report = ParseReport(path=str(path))
    pairs = []
    for lineno, row in read_jsonl(path):
        report.total_rows += 1
        require_fields(row, {"chosen": str, "rejected": str}, path, lineno)
        pair = _pair_from_row(row, lineno, report)
        if pair is not None:
            pairs.append(pair)
    report.kept = len(pairs)
    return pairs, report


def _pair_from_row(row: dict, lineno: int, report: ParseReport) -> PreferencePair | None:
    """Builds one pair, or records in `report` why the row is unusable."""
    turns = {}
    for side in ("chosen", "rejected"):
        try:
            turns[side] = parse_transcript(row[side])
        except TranscriptParseError as exc:
            report.skip("parse_error", lineno, f"{side}: {exc}")
            return None
        if turns[side][-1]["role"] != "assistant":
            report.skip("final_turn_not_assistant", lineno, f"{side} ends with a user turn")
            return None
    chosen, rejected = turns["chosen"], turns["rejected"]
    if chosen[:-1] != rejected[:-1]:
        report.skip("prompt_mismatch", lineno, _first_difference(chosen[:-1], rejected[:-1]))
        return None
    for side in ("chosen", "rejected"):
        if not turns[side][-1]["content"]:
            report.skip("empty_response", lineno, f"{side} final response is empty")
            return None
    if chosen[-1]["content"] == rejected[-1]["content"]:
        report.skip("identical_responses", lineno, f"both responses are {chosen[-1]['content'][:60]!r}")
        return None
    return PreferencePair(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"], lineno)


def _first_difference(left: list[dict], right: list[dict]) -> str:
    """Describes where two prompts first differ (for the report)."""
    for index, (a, b) in enumerate(zip(left, right)):
        if a != b:
            return f"turn {index + 1} differs: {a['content'][:40]!r} vs {b['content'][:40]!r}"
    return f"prompts have {len(left)} vs {len(right)} turns"


def prompt_key(pair: PreferencePair) -> str:
    """The canonical text of a pair's prompt, used to hash it for splitting."""
    return json.dumps(pair.prompt, ensure_ascii=False, sort_keys=True)


def split_heldout(
    pairs: Sequence[T], fraction: float, key: Callable[[T], str] = prompt_key
) -> tuple[list[T], list[T]]:
    """Splits items into train and held-out sets by a hash of their prompt.

    Each item's side depends only on sha256 of its prompt text: the split is stable
    across runs and machines, an item keeps its side when the dataset is subsampled or
    grows, and items sharing a prompt always land on the same side (no prompt leaks from
    train into held-out evaluation).

    Args:
        pairs: the items (PreferencePair by default; pass `key` for other types).
        fraction: expected share of held-out items, in [0, 1).
        key: item -> prompt text to hash.

    Returns:
        `(train, heldout)`, each in input order.

    Raises:
        UserError: `fraction` outside [0, 1).
    """
    if not 0.0 <= fraction < 1.0:
        raise UserError(
            f"held-out fraction must be in [0, 1), got {fraction}", fix="use e.g. 0.1 for 10% held out"
        )
    train, heldout = [], []
    for item in pairs:
        digest = hashlib.sha256(key(item).encode("utf-8")).digest()
        # The first 8 bytes as a uniform number in [0, 1).
        position = int.from_bytes(digest[:8], "big") / 2**64
        (heldout if position < fraction else train).append(item)
    return train, heldout
