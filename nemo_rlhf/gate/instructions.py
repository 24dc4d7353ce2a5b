"""Layer 1 of the gate: instruction following on prompts with verifiable constraints.

`data/instructions.jsonl` (ours, written for this gate) holds ~30 prompts, each with
constraints `{"kind": ..., "value": ...}`; `CHECKERS` maps every kind to a function
`(response, value) -> bool`. A response follows its instruction when every constraint
holds (prompt-level strict accuracy, as in IFEval). The finding compares the candidate's
pass rate with the baseline's on the prompts both answered.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from nemo_rlhf.data.jsonl import read_jsonl, require_fields
from nemo_rlhf.errors import UserError
from nemo_rlhf.gate.findings import Finding

DETECTOR = "instruction_following"

_BULLET = re.compile(r"^\s*[-*\u2022]\s+\S", re.MULTILINE)
_NUMBERED = re.compile(r"^\s*(\d+)[.)]\s+\S", re.MULTILINE)
_FENCE = re.compile(r"^```(?:json)?\s*\n(.*?)\n?```$", re.DOTALL)


def _words(text: str) -> list[str]:
    return text.split()


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE) is not None


def _numbered_items(text: str, n: int) -> bool:
    """Exactly `n` numbered lines, numbered 1..n in order."""
    return [int(m) for m in _NUMBERED.findall(text)] == list(range(1, n + 1))


def _json_with_keys(text: str, keys: list[str]) -> bool:
    """The whole response (a ```json fence allowed) is a JSON object with exactly these keys."""
    body = text.strip()
    fenced = _FENCE.match(body)
    try:
        obj = json.loads(fenced.group(1) if fenced else body)
    except json.JSONDecodeError:
        return False
    return isinstance(obj, dict) and set(obj) == set(keys)


def _ends_with(text: str, phrase: str) -> bool:
    return text.rstrip().rstrip("\"'").rstrip().endswith(phrase)


# constraint kind -> (checker, what the value is); one entry per kind.
CHECKERS: dict[str, tuple[Callable[[str, object], bool], str]] = {
    "max_words": (lambda text, n: len(_words(text)) <= n, "int"),
    "min_words": (lambda text, n: len(_words(text)) >= n, "int"),
    "bullet_count": (lambda text, n: len(_BULLET.findall(text)) == n, "int"),
    "numbered_items": (_numbered_items, "int"),
    "json_keys": (_json_with_keys, "list of keys"),
    "lowercase": (lambda text, _: text == text.lower() and any(c.isalpha() for c in text), "none"),
    "include_word": (_has_word, "word"),
    "exclude_word": (lambda text, word: not _has_word(text, word), "word"),
    "ends_with": (_ends_with, "phrase"),
}


@dataclass(frozen=True)
class Instruction:
    id: str
    prompt: str
    constraints: tuple[dict, ...]


def default_path() -> Path:
    return Path(str(resources.files("nemo_rlhf.gate") / "data" / "instructions.jsonl"))


def load_instructions(path: str | Path | None = None) -> list[Instruction]:
    """Reads instruction prompts; every constraint kind must be in `CHECKERS`."""
    path = path or default_path()
    items = []
    for lineno, row in read_jsonl(path):
        require_fields(row, {"id": str, "prompt": str, "constraints": list}, path, lineno)
        for c in row["constraints"]:
            if not isinstance(c, dict) or c.get("kind") not in CHECKERS:
                raise UserError(
                    f"unknown constraint {c!r}",
                    where=f"{path}:{lineno}",
                    fix=f"use one of the kinds {sorted(CHECKERS)} as {{'kind': ..., 'value': ...}}",
                )
        items.append(Instruction(row["id"], row["prompt"], tuple(row["constraints"])))
    return items


def check_response(instruction: Instruction, response: str) -> dict[str, bool]:
    """Each constraint's verdict, keyed `kind` (or `kind#i` when a kind repeats)."""
    verdicts = {}
    for i, c in enumerate(instruction.constraints):
        checker, _ = CHECKERS[c["kind"]]
        key = c["kind"] if c["kind"] not in verdicts else f"{c['kind']}#{i}"
        verdicts[key] = bool(checker(response, c.get("value")))
    return verdicts


@dataclass
class InstructionScore:
    """Per-instruction verdicts for one model: `passed[id]` is True when all constraints hold."""

    passed: dict[str, bool]
    verdicts: dict[str, dict[str, bool]]
    responses: dict[str, str]
    prompts: dict[str, str] = field(default_factory=dict)
    unmatched_rows: int = 0

    @property
    def pass_rate(self) -> float:
        return sum(self.passed.values()) / len(self.passed) if self.passed else float("nan")


def score_rows(rows: Sequence[dict], instructions: Sequence[Instruction] | None = None) -> InstructionScore:
    """Checks the rows whose prompt is (or contains) an instruction prompt; first row wins."""
    instructions = list(instructions or load_instructions())
    score = InstructionScore({}, {}, {})
    for row in rows:
        item = next((i for i in instructions if i.prompt in row["prompt"]), None)
        if item is None:
            score.unmatched_rows += 1
            continue
        if item.id in score.passed:
            continue
        verdicts = check_response(item, row["response"])
        score.verdicts[item.id] = verdicts
        score.passed[item.id] = all(verdicts.values())
        score.responses[item.id] = row["response"]
        score.prompts[item.id] = item.prompt
    return score


def checkpoint_rows(
    model_dir: str | Path, instructions: Sequence[Instruction] | None = None, **generation
) -> list[dict]:
    """Greedy responses of an HF checkpoint to the instruction prompts (see capability.checkpoint_responses)."""
    from nemo_rlhf.gate.capability import checkpoint_responses

    instructions = list(instructions or load_instructions())
    return checkpoint_responses(model_dir, [i.prompt for i in instructions], desc="instructions", **generation)


def instruction_finding(
    candidate: InstructionScore, baseline: InstructionScore, instruction_max_drop: float = 0.1, max_cases: int = 20
) -> Finding:
    """The `instruction_following` finding: fail when the pass rate drops by more than the threshold."""
    shared = sorted(set(candidate.passed) & set(baseline.passed))
    if not shared:
        return Finding(
            DETECTOR,
            "info",
            None,
            instruction_max_drop,
            "no instruction prompts answered by both candidate and baseline; check skipped",
        )
    cand = sum(candidate.passed[k] for k in shared) / len(shared)
    base = sum(baseline.passed[k] for k in shared) / len(shared)
    drop = base - cand
    lost = [k for k in shared if baseline.passed[k] and not candidate.passed[k]]
    kinds: dict[str, list[int]] = {}
    for k in shared:
        for kind, ok in candidate.verdicts[k].items():
            kinds.setdefault(kind.split("#")[0], []).append(int(ok))
    return Finding(
        detector=DETECTOR,
        severity="fail" if drop > instruction_max_drop else "info",
        value=drop,
        threshold=instruction_max_drop,
        message=(
            f"instruction following {cand:.1%} vs baseline {base:.1%} on {len(shared)} prompts: "
            f"drop {drop:+.1%} (allowed {instruction_max_drop:.1%})"
        ),
        details={
            "n": len(shared),
            "candidate_pass_rate": cand,
            "baseline_pass_rate": base,
            "candidate_pass_rate_by_kind": {k: sum(v) / len(v) for k, v in sorted(kinds.items())},
            "cases": [
                {
                    "prompt": candidate.prompts[k],
                    "response": candidate.responses[k],
                    "why": "failed " + ", ".join(c for c, ok in candidate.verdicts[k].items() if not ok),
                    "id": k,
                    "baseline_response": baseline.responses[k],
                    "verdicts": candidate.verdicts[k],
                }
                for k in lost[:max_cases]
            ],
        },
    )
