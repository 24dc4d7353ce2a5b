"""Data lint: finds tokenized examples that would silently train the wrong thing.

It runs before every training stage on the exact rows handed to TRL. Each check returns
`LintIssue`s instead of raising, so one run reports every problem; `raise_if_issues` then
stops the stage with a count per check and the first few offending texts.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from nemo_rlhf.errors import LintError

# How many issues the error spells out; the rest are counted.
_SHOWN_ISSUES = 5
_SNIPPET_CHARS = 160

_FIXES = {
    "loss_mask": "the prompt/response boundary is wrong: check that responses are non-empty and the chat "
    "template's generation prompt is a prefix of the rendered conversation",
    "eos": "targets must end with the tokenizer's EOS token: check that tokenizer.eos_token is the token "
    "the chat template closes assistant turns with (<|im_end|> for chatml)",
    "split_merge": "the tokenizer merges the last prompt token with the first response token: strip "
    "leading whitespace from responses or trailing whitespace from prompts",
    "chat_template": "use the same chat template in every stage: set model.chat_template in the spec, or "
    "retrain the earlier stage with the template this stage uses",
    "prompt_end": "PPO prompts must end with the generation prompt (add_generation_prompt=True), not a "
    "finished turn",
}


@dataclass(frozen=True)
class LintIssue:
    """One problem in one example (or in the stage as a whole).

    Attributes:
        check: the check's name (a key of the fix table, e.g. "eos").
        example_index: the row's index in the dataset, None for stage-wide issues.
        message: what is wrong, including the decoded offending text.
    """

    check: str
    example_index: int | None
    message: str


def _snippet(text: str, tail: bool = False) -> str:
    """A short repr of `text`: its end when `tail` (where EOS should be), else its start."""
    if len(text) <= _SNIPPET_CHARS:
        return repr(text)
    return "..." + repr(text[-_SNIPPET_CHARS:]) if tail else repr(text[:_SNIPPET_CHARS]) + "..."


def _source(row: dict) -> str:
    """A " (source line N)" suffix for rows that know their line in the input file."""
    return f" (source line {row['source_line']})" if "source_line" in row else ""


def _decode(tokenizer, ids: Sequence[int]) -> str:
    # Special tokens are kept: a missing or misplaced EOS is often exactly the problem.
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def check_loss_masks(rows: Sequence[dict], mask_field: str = "completion_mask") -> list[LintIssue]:
    """Flags masks that train on nothing (all 0) or on the prompt too (all 1).

    Args:
        rows: examples with a 0/1 mask per token.
        mask_field: the mask's field name.

    Returns:
        One issue per bad row; its message shows the row's response text.
    """
    issues = []
    for index, row in enumerate(rows):
        mask = row[mask_field]
        if any(mask) and not all(mask):
            continue
        if not any(mask):
            what = f"{mask_field} is all 0: nothing in this example is trained"
        else:
            what = f"{mask_field} is all 1: the prompt is trained as if the model wrote it"
        response = row.get("completion_text", row.get("chosen_text", ""))
        message = f"{what} ({len(mask)} tokens){_source(row)}; response {_snippet(response)}"
        issues.append(LintIssue("loss_mask", index, message))
    return issues


def check_eos(
    rows: Sequence[dict], eos_token_id: int, fields: Sequence[str], tokenizer=None
) -> list[LintIssue]:
    """Flags target sequences whose last token is not EOS.

    A target without a final EOS teaches the policy never to stop (SFT) or scores a
    sequence the policy would never emit (reward model).

    Args:
        rows: examples.
        eos_token_id: the tokenizer's EOS id.
        fields: id-sequence fields that must end with EOS (e.g. ["input_ids"]).
        tokenizer: optional, to decode the offending tail into the message.

    Returns:
        One issue per bad (row, field).
    """
    issues = []
    for index, row in enumerate(rows):
        for name in fields:
            ids = row[name]
            if ids and ids[-1] == eos_token_id:
                continue
            tail = _snippet(_decode(tokenizer, ids[-16:]), tail=True) if tokenizer else str(list(ids[-8:]))
            last = ids[-1] if ids else "nothing (empty)"
            message = f"{name} ends with {last}, not EOS id {eos_token_id}{_source(row)}; ends {tail}"
            issues.append(LintIssue("eos", index, message))
    return issues


def check_split_merge(
    tokenizer, rows: Sequence[dict], prompt_field: str, completion_field: str
) -> list[LintIssue]:
    """Flags examples where prompt tokens are not a prefix of prompt+completion tokens.

    BPE tokenizers can merge the prompt's last characters with the completion's first
    ones (e.g. "\\n" + "\\n\\n"); the mask boundary, taken from the prompt's own tokens,
    then falls inside a token and the model is trained on a split it never sees.

    Args:
        tokenizer: the stage's tokenizer.
        rows: examples with prompt and completion text.
        prompt_field: field holding the prompt text.
        completion_field: field holding the completion text.

    Returns:
        One issue per bad row, showing the tokens on both sides of the boundary.
    """
    if not rows:
        return []
    prompts = [row[prompt_field] for row in rows]
    fulls = [row[prompt_field] + row[completion_field] for row in rows]
    # Batched calls: the fast tokenizer does them in parallel, and datasets have 1e4+ rows.
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(fulls, add_special_tokens=False)["input_ids"]
    issues = []
    for index, (alone, together) in enumerate(zip(prompt_ids, full_ids)):
        n = len(alone)
        if together[:n] == alone:
            continue
        alone_tokens = tokenizer.convert_ids_to_tokens(alone[-3:])
        together_tokens = tokenizer.convert_ids_to_tokens(together[max(n - 3, 0) : n + 2])
        issues.append(
            LintIssue(
                "split_merge",
                index,
                f"{prompt_field} ends in tokens {alone_tokens}{_source(rows[index])} but "
                f"{prompt_field}+{completion_field} has "
                f"{together_tokens} there; {completion_field} starts {_snippet(rows[index][completion_field])}",
            )
        )
    return issues


def template_hash(template: str | None) -> str:
    """Short sha256 of a chat template string ("none" when there is no template)."""
    if template is None:
        return "none"
    return hashlib.sha256(template.encode("utf-8")).hexdigest()[:16]


def check_chat_template(
    stage: str, template: str | None, expected_template: str | None, expected_from: str
) -> list[LintIssue]:
    """Flags a stage whose chat template differs from the one the pipeline started with.

    A policy trained on one template and rewarded or sampled with another sees prompts it
    was never trained on; the outputs degrade without any error.

    Args:
        stage: the stage being checked (e.g. "rm").
        template: the chat template this stage would use.
        expected_template: the template of the earlier stage / artifact.
        expected_from: where `expected_template` came from (e.g. "sft artifact manifest").

    Returns:
        One stage-wide issue when the sha256 hashes differ, else nothing.
    """
    got, expected = template_hash(template), template_hash(expected_template)
    if got == expected:
        return []
    return [
        LintIssue(
            "chat_template",
            None,
            f"stage {stage!r} uses chat template sha256 {got}, but {expected_from} has {expected}",
        )
    ]


def check_prompt_ends(rows: Sequence[dict], eos_token_id: int, tokenizer=None) -> list[LintIssue]:
    """Flags PPO prompts that are empty or end with EOS (a finished turn, no generation prompt)."""
    issues = []
    for index, row in enumerate(rows):
        ids = row["input_ids"]
        if ids and ids[-1] != eos_token_id:
            continue
        text = _snippet(_decode(tokenizer, ids[-16:]), tail=True) if tokenizer else str(list(ids[-8:]))
        what = "prompt is empty" if not ids else f"prompt ends with EOS{_source(row)}: {text}"
        issues.append(LintIssue("prompt_end", index, what))
    return issues


def lint_sft(tokenizer, rows: Sequence[dict]) -> list[LintIssue]:
    """All checks for SFT rows (`input_ids`, `completion_mask`, prompt/completion text)."""
    return [
        *check_loss_masks(rows),
        *check_eos(rows, tokenizer.eos_token_id, ["input_ids"], tokenizer),
        *check_split_merge(tokenizer, rows, "prompt_text", "completion_text"),
    ]


def _response_mask(prompt_len: int, length: int) -> list[int]:
    """0 over the first `prompt_len` tokens, 1 over the rest."""
    prompt_len = min(prompt_len, length)
    return [0] * prompt_len + [1] * (length - prompt_len)


def lint_preference(tokenizer, rows: Sequence[dict]) -> list[LintIssue]:
    """All checks for reward-model rows (`chosen_ids`, `rejected_ids`, `prompt_len`, texts)."""
    issues = []
    for side in ("chosen", "rejected"):
        # The reward model has no mask field; the response span is ids past `prompt_len`,
        # which must be non-empty and must not start at 0 for the same reasons as in SFT.
        masks = [
            {"mask": _response_mask(row["prompt_len"], len(row[f"{side}_ids"])), "completion_text": row[f"{side}_text"]}
            for row in rows
        ]
        issues += check_loss_masks(masks, mask_field="mask")
        issues += check_split_merge(tokenizer, rows, "prompt_text", f"{side}_text")
    issues += check_eos(rows, tokenizer.eos_token_id, ["chosen_ids", "rejected_ids"], tokenizer)
    return issues


def lint_prompts(tokenizer, rows: Sequence[dict]) -> list[LintIssue]:
    """All checks for PPO prompt rows (`input_ids`, `prompt_text`)."""
    return check_prompt_ends(rows, tokenizer.eos_token_id, tokenizer)


def _issues_to_show(issues: Sequence[LintIssue]) -> list[LintIssue]:
    """The first few issues, stage-wide ones and one per check first.

    Many rows usually fail one check; showing only the first five would hide a rarer
    check (or a stage-wide template mismatch) that needs a different fix.
    """
    ordered = sorted(issues, key=lambda issue: issue.example_index is not None)
    firsts, seen = [], set()
    for issue in ordered:
        if issue.check not in seen:
            seen.add(issue.check)
            firsts.append(issue)
    rest = [issue for issue in ordered if all(issue is not first for first in firsts)]
    return (firsts + rest)[:_SHOWN_ISSUES]


def raise_if_issues(stage: str, issues: Sequence[LintIssue]) -> None:
    """Stops a stage whose data has lint issues.

    Args:
        stage: the stage name, for the message.
        issues: everything the checks found.

    Raises:
        LintError: listing the count per check, the first few issues with their decoded
            text, and the fix for each check that fired.
    """
    if not issues:
        return
    counts = Counter(issue.check for issue in issues)
    lines = [f"data lint found {len(issues)} problem(s): "]
    lines[0] += ", ".join(f"{check}: {count}" for check, count in sorted(counts.items()))
    for issue in _issues_to_show(issues):
        where = "stage" if issue.example_index is None else f"example {issue.example_index}"
        lines.append(f"  [{issue.check}] {where}: {issue.message}")
    if len(issues) > _SHOWN_ISSUES:
        lines.append(f"  ... and {len(issues) - _SHOWN_ISSUES} more")
    fixes = "; ".join(f"{check}: {_FIXES.get(check, 'see the message')}" for check in sorted(counts))
    raise LintError("\n".join(lines), where=f"{stage} data", fix=fixes)
