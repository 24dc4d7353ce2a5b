"""Responses files: what the gate judges.

One JSON object per line: `{"prompt": str, "response": str}` plus, optionally,
`proxy_reward` and `gold_reward` (numbers), `kl` (number: the sequence KL to the reference
policy, in nats), `step` (integer: the PPO step or checkpoint the response came from) and
`finished` (boolean: ended with EOS). Other fields are kept in `extra` (the small-scale eval
stage adds `checkpoint`, `length`, `gsm8k_correct`). Every problem points at `file:line`.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from nemo_rlhf.data.jsonl import read_jsonl, require_fields
from nemo_rlhf.errors import UserError

REQUIRED = {"prompt": str, "response": str}
NUMBER = (int, float)
OPTIONAL = {"proxy_reward": NUMBER, "gold_reward": NUMBER, "kl": NUMBER, "step": int, "finished": bool}


@dataclass
class Response:
    """One prompt and one response, with what is known about it."""

    prompt: str
    response: str
    proxy_reward: float | None = None
    gold_reward: float | None = None
    kl: float | None = None
    step: int | None = None
    finished: bool | None = None
    extra: dict = field(default_factory=dict)
    where: str = ""  # file:line it came from

    def to_json(self) -> dict:
        row = {"prompt": self.prompt, "response": self.response}
        for name in OPTIONAL:
            if getattr(self, name) is not None:
                row[name] = getattr(self, name)
        return {**row, **self.extra}


@dataclass
class ResponseSet:
    """The responses of one model (one file), in file order."""

    name: str
    rows: list[Response]

    def __len__(self) -> int:
        return len(self.rows)

    def has(self, attr: str) -> bool:
        """Whether every row has `attr` (e.g. `gold_reward`)."""
        return bool(self.rows) and all(getattr(r, attr) is not None for r in self.rows)

    def with_attr(self, attr: str) -> list[Response]:
        """The rows that have `attr`."""
        return [r for r in self.rows if getattr(r, attr) is not None]

    def steps(self) -> list[int]:
        return sorted({r.step for r in self.rows if r.step is not None})

    def at_step(self, step: int | None) -> ResponseSet:
        return ResponseSet(f"{self.name}@{step}", [r for r in self.rows if r.step == step])

    def final(self) -> ResponseSet:
        """The rows of the last PPO step (all rows when no row has a step)."""
        steps = self.steps()
        return self.at_step(steps[-1]) if steps else self


def read_responses(path: str | os.PathLike, name: str | None = None) -> ResponseSet:
    """Reads and checks a responses file (plain or gzip JSON lines).

    Raises:
        UserError: missing file, malformed JSON, a missing or wrong-typed field, or an
            empty file; `where` is `file:line`.
    """
    path = Path(path)
    rows = []
    for lineno, raw in read_jsonl(path):
        require_fields(raw, REQUIRED, path, lineno)
        present = {k: t for k, t in OPTIONAL.items() if raw.get(k) is not None}
        require_fields(raw, present, path, lineno)
        known = {k: raw.get(k) for k in OPTIONAL}
        for key in ("proxy_reward", "gold_reward", "kl"):
            if known[key] is not None:
                known[key] = float(known[key])
        extra = {k: v for k, v in raw.items() if k not in REQUIRED and k not in OPTIONAL}
        rows.append(Response(raw["prompt"], raw["response"], **known, extra=extra, where=f"{path}:{lineno}"))
    if not rows:
        raise UserError("responses file has no rows", where=str(path),
                        fix='write one {"prompt": ..., "response": ...} object per line')
    return ResponseSet(name or path.stem, rows)


def check_same_prompts(candidate: ResponseSet, baseline: ResponseSet) -> None:
    """Candidate and baseline must answer the same prompts (each set of prompts, not counts).

    Compared on the final PPO step of the candidate: earlier steps may use other prompts.

    Raises:
        UserError: listing how many prompts differ, with an example of each side.
    """
    cand = set(r.prompt for r in candidate.final().rows)
    base = set(r.prompt for r in baseline.rows)
    only_cand, only_base = cand - base, base - cand
    if not only_cand and not only_base:
        return
    examples = []
    if only_cand:
        examples.append(f"e.g. only in {candidate.name}: {_short(next(iter(sorted(only_cand))))}")
    if only_base:
        examples.append(f"e.g. only in {baseline.name}: {_short(next(iter(sorted(only_base))))}")
    raise UserError(
        f"candidate and baseline are not on the same prompts: {len(only_cand)} of {len(cand)} candidate prompts "
        f"are not in the baseline and {len(only_base)} of {len(base)} baseline prompts are not in the candidate "
        f"({'; '.join(examples)})",
        fix="generate both files from the same prompt list (the gate compares them prompt by prompt)",
    )


def group_by_prompt(rows: list[Response]) -> dict[str, list[Response]]:
    """Prompt -> its responses, in first-seen order."""
    groups: dict[str, list[Response]] = {}
    for r in rows:
        groups.setdefault(r.prompt, []).append(r)
    return groups


def responses_per_prompt(rows: list[Response]) -> Counter:
    return Counter(r.prompt for r in rows)


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")
