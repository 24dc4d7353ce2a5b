"""Data parity: our TRL examples and the NeMo-Aligner data files give the same tokens and loss masks.

The NeMo side is re-implemented here from NeMo 2.1 / NeMo-Aligner 0.7.0's documented formats
(not imported: NeMo is not installed outside the container):

* SFT, `GPTSFTDataset` with `model.data.chat=False` (what `train_gpt_sft.py` builds): each row
  `{"input", "output"}` is put through `prompt_template`; the template is split at its
  `{placeholder}`s and every piece is tokenized on its own with `text_to_ids` (HF `tokenize` +
  `convert_tokens_to_ids`, no special tokens added); values are `.strip(' ')`ed; BOS / SEP / EOS
  are added only when `add_bos` / `add_sep` / `add_eos` say so; the loss covers the tokens from
  the label piece on (`answer_only_loss`).
* RM, `RewardModelDataset`: consecutive `{"text"}` lines, chosen then rejected, each
  `text_to_ids(text)` (EOS appended only with `data.append_eod`, which we leave off).
* PPO, `RLHFDataset`: `{"text"}` prompt lines, `text_to_ids(text)`.

A check compares token ids and (SFT) the loss mask example by example and reports the first
mismatch with both sides decoded, so a wrong mask or a template difference is visible at once.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

# What the SFT config must say for `nemo_sft_tokens` to be what NeMo computes (aligner_format sets them).
SFT_TEMPLATE_SETTINGS = {
    "prompt_template": "{input}{output}",
    "label_key": "output",
    "add_bos": False,
    "add_sep": False,
    "add_eos": False,
}


def nemo_text_to_ids(tokenizer, text: str) -> list[int]:
    """NeMo's `AutoTokenizer.text_to_ids`: HF `tokenize` then `convert_tokens_to_ids` (no BOS/EOS added)."""
    return list(tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text)))


def space_sensitive(tokenizer) -> bool:
    """NeMo's `AutoTokenizer.space_sensitive`: does 'x y' tokenize differently from 'x' + 'y'?"""
    return tokenizer.tokenize("x y") != tokenizer.tokenize("x") + tokenizer.tokenize("y")


def _template_pieces(template: str, values: dict[str, str], sensitive: bool) -> list[tuple[str, str]]:
    """`GPTSFTDataset._separate_template`: (key, text) per piece, key "<template>" for literal
    template text; a piece's first leading space is dropped when the tokenizer is not space sensitive."""
    pieces = []
    for part in (p for p in re.split("( *?{.+?})", template) if p):
        part = part[1:] if part[0] == " " and not sensitive else part
        bare = part.lstrip(" ")
        spaces = " " * (len(part) - len(bare))
        key = bare[1:-1] if bare.startswith("{") and bare.endswith("}") and bare[1:-1] in values else "<template>"
        pieces.append((key, spaces + values[key] if key != "<template>" else part))
    return pieces


def nemo_sft_tokens(tokenizer, record: dict, settings: dict = SFT_TEMPLATE_SETTINGS) -> tuple[list[int], list[int]]:
    """Token ids and loss mask (1 = trained) of one SFT jsonl row as NeMo's `GPTSFTDataset` builds them
    (before truncation, which our rows never need: they are dropped at `max_length` instead).

    Args:
        tokenizer: the HF tokenizer the .nemo carries.
        record: one row of the SFT jsonl.
        settings: prompt_template, label_key, add_bos, add_sep, add_eos as in the rendered config.
    """
    template, label_key = settings["prompt_template"], settings["label_key"]
    keys = re.findall(r"{(.*?)}", template)
    values = {k: str(record[k]).strip(" ") for k in keys}
    pieces = _template_pieces(template, values, space_sensitive(tokenizer))
    if not pieces or pieces[-1][0] != label_key:
        raise ValueError(f"prompt_template {template!r} must end with {{{label_key}}} (NeMo asserts it)")
    context = [i for _, text in pieces[:-1] for i in nemo_text_to_ids(tokenizer, text)]
    answer = nemo_text_to_ids(tokenizer, pieces[-1][1])
    if settings.get("add_bos"):
        context = [tokenizer.bos_token_id, *context]
    if settings.get("add_sep"):
        context = [*context, 0]  # NeMo-Aligner's build_sft_dataset passes sep_id=0
    ids = context + answer
    if settings.get("add_eos"):
        ids.append(tokenizer.eos_token_id)
    return ids, [0] * len(context) + [1] * (len(ids) - len(context))


@dataclass
class ParityCheck:
    """One file's comparison: `passed` when every example matched."""

    name: str
    examples: int = 0
    mismatches: int = 0
    first_mismatch: dict | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.mismatches == 0 and not self.notes

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def render(self) -> str:
        status = "ok  " if self.passed else "FAIL"
        head = f"{status} {self.name}: {self.examples - self.mismatches}/{self.examples} identical"
        lines = [head, *(f"     {n}" for n in self.notes)]
        if self.first_mismatch:
            m = self.first_mismatch
            lines.append(f"     first mismatch: example {m['index']} (source line {m.get('source_line')}), "
                         f"{m['what']} differ at token {m['position']}")
            lines.append(f"       TRL:  {m['trl']!r}")
            lines.append(f"       NeMo: {m['nemo']!r}")
        return "\n".join(lines)


def _first_difference(a: Sequence, b: Sequence) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def _show(tokenizer, ids: Sequence[int], mask: Sequence[int] | None, at: int) -> str:
    """The tokens around position `at`, decoded; with a mask, trained tokens are wrapped in [[...]]."""
    lo, hi = max(at - 8, 0), min(at + 8, len(ids))
    parts = []
    for i in range(lo, hi):
        text = tokenizer.decode([ids[i]])
        parts.append(f"[[{text}]]" if mask is not None and mask[i] else text)
    return ("..." if lo else "") + "".join(parts) + ("..." if hi < len(ids) else "")


def _compare(check: ParityCheck, index: int, source_line, tokenizer, trl: tuple, nemo: tuple) -> None:
    """Count one example; keep the first mismatch (ids first, then the mask)."""
    check.examples += 1
    (trl_ids, trl_mask), (nemo_ids, nemo_mask) = trl, nemo
    if trl_ids != nemo_ids:
        what, at = "token ids", _first_difference(trl_ids, nemo_ids)
    elif trl_mask != nemo_mask:
        what, at = "loss masks", _first_difference(trl_mask, nemo_mask)
    else:
        return
    check.mismatches += 1
    if check.first_mismatch is None:
        check.first_mismatch = {"index": index, "source_line": source_line, "what": what, "position": at,
                                "trl": _show(tokenizer, trl_ids, trl_mask, at),
                                "nemo": _show(tokenizer, nemo_ids, nemo_mask, at)}


def _count_note(check: ParityCheck, trl_count: int, nemo_count: int, unit: str) -> None:
    if trl_count != nemo_count:
        check.notes.append(f"{trl_count} {unit} on the TRL side, {nemo_count} in the NeMo-Aligner file")


def compare_sft(name: str, tokenizer, trl_rows: Sequence[dict], records: Sequence[dict],
                settings: dict = SFT_TEMPLATE_SETTINGS) -> ParityCheck:
    """TRL SFT rows (`input_ids`, `completion_mask`) against SFT jsonl rows through `nemo_sft_tokens`."""
    check = ParityCheck(name)
    _count_note(check, len(trl_rows), len(records), "examples")
    for i, (row, record) in enumerate(zip(trl_rows, records)):
        _compare(check, i, row.get("source_line"), tokenizer, (list(row["input_ids"]), list(row["completion_mask"])),
                 nemo_sft_tokens(tokenizer, record, settings))
    return check


def compare_comparisons(name: str, tokenizer, trl_rows: Sequence[dict], records: Sequence[dict]) -> ParityCheck:
    """TRL RM rows (`chosen_ids`, `rejected_ids`) against comparison jsonl lines (chosen, rejected, chosen, ...)."""
    check = ParityCheck(name)
    _count_note(check, 2 * len(trl_rows), len(records), "comparison lines")
    expected = [ids for row in trl_rows for ids in (row["chosen_ids"], row["rejected_ids"])]
    lines = [row.get("source_line") for row in trl_rows for _ in range(2)]
    for i, (ids, record) in enumerate(zip(expected, records)):
        _compare(check, i, lines[i], tokenizer, (list(ids), None), (nemo_text_to_ids(tokenizer, record["text"]), None))
    return check


def compare_prompts(name: str, tokenizer, trl_rows: Sequence[dict], records: Sequence[dict]) -> ParityCheck:
    """TRL PPO prompt rows (`input_ids`) against prompt jsonl rows."""
    check = ParityCheck(name)
    _count_note(check, len(trl_rows), len(records), "prompts")
    for i, (row, record) in enumerate(zip(trl_rows, records)):
        _compare(check, i, row.get("source_line"), tokenizer, (list(row["input_ids"]), None),
                 (nemo_text_to_ids(tokenizer, record["text"]), None))
    return check


COMPARE = {"sft": compare_sft, "rm": compare_comparisons, "ppo": compare_prompts}


def compare_all(tokenizer, trl_rows: dict[str, list[dict]], records: dict[str, list[dict]]) -> list[ParityCheck]:
    """Every file: `trl_rows` and `records` are keyed alike (`sft_train`, `rm_val`, ...)."""
    return [COMPARE[name.split("_")[0]](name, tokenizer, trl_rows[name], records[name]) for name in trl_rows]


def summary(checks: Iterable[ParityCheck]) -> dict:
    """JSON for reports and manifests: overall `passed` and each check."""
    checks = list(checks)
    return {"passed": all(c.passed for c in checks), "checks": [c.to_dict() for c in checks]}
