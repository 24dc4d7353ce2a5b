"""SFT rows as chat conversations: the `chat_jsonl` format.

One JSON object per line, `{"messages": [{"role": ..., "content": ...}, ...]}` (TRL's
conversational format): user/assistant turns (an optional system turn first) ending with the
assistant turn that is trained. Any other field (e.g. `badcase`, the lineage of an example
made from a reviewed gate case) is kept but not used. `nemo-rlhf data add-badcases` writes
this format; GSM8K's `{question, answer}` cannot hold chat prompts or answers without a
`#### N` line.

`build_chat_sft_rows` tokenizes the examples with `examples.sft_example`, the same function
(chat template, EOS cut, loss mask) the GSM8K SFT rows go through.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from nemo_rlhf.data.examples import sft_example
from nemo_rlhf.data.jsonl import read_jsonl, require_fields
from nemo_rlhf.errors import UserError

FORMAT = "chat_jsonl"
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatExample:
    """One SFT example: the conversation before the response, the response, where it came from."""

    prompt: list[dict]
    response: str
    source_line: int


def check_messages(messages: object, where: str) -> list[dict]:
    """Validates a conversation: role/content objects, user first (after an optional system turn),
    alternating, ending with a non-empty assistant turn.

    Raises:
        UserError: naming the turn that is wrong; `where` is `file:line`.
    """
    fix = ('write {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}, '
           "turns alternating user/assistant, the last one the assistant's")
    if not isinstance(messages, list) or not messages:
        raise UserError("`messages` must be a non-empty list of turns", where=where, fix=fix)
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise UserError(f"turn {i + 1} is not a {{role: {'|'.join(ROLES)}, content: string}} object: {turn!r:.80}",
                            where=where, fix=fix)
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for i, turn in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn["role"] != expected:
            raise UserError(f"turn {i + 1} is {turn['role']!r}, expected {expected!r}", where=where, fix=fix)
    if turns[-1]["role"] != "assistant" or not turns[-1]["content"].strip():
        raise UserError("the last turn must be a non-empty assistant response (the trained target)",
                        where=where, fix=fix)
    return messages


def load_chat_sft(path: str | os.PathLike) -> list[ChatExample]:
    """Reads a `chat_jsonl` SFT file.

    Raises:
        UserError: a malformed line, a missing `messages` list or a wrong turn (`file:line`).
    """
    examples = []
    for lineno, row in read_jsonl(path):
        require_fields(row, {"messages": list}, path, lineno)
        messages = check_messages(row["messages"], f"{path}:{lineno}")
        examples.append(ChatExample([dict(m) for m in messages[:-1]], messages[-1]["content"], lineno))
    if not examples:
        raise UserError("SFT file has no rows", where=str(path), fix='write one {"messages": [...]} object per line')
    return examples


def build_chat_sft_rows(tokenizer, examples: list[ChatExample], max_length: int) -> tuple[list[dict], int]:
    """SFT rows (`input_ids`, `completion_mask`, ...) for chat examples.

    Returns:
        `(rows, dropped)`: rows carry `source_line`; `dropped` counts examples longer than `max_length`.
    """
    rows, dropped = [], 0
    for example in examples:
        row = sft_example(tokenizer, example.prompt, example.response, max_length)
        if row is None:
            dropped += 1
            continue
        rows.append({**row, "source_line": example.source_line})
    return rows, dropped
