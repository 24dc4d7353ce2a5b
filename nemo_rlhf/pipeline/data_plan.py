"""Which data rows each stage uses, decided in one place.

GSM8K train is shuffled once with the spec's seed: the first `data.sft.num_examples`
rows train SFT and the next `data.prompts.gsm8k` questions are PPO prompts, so PPO never
sees a question SFT was trained on. hh-rlhf pairs are split by a hash of the prompt into
train (RM training and PPO prompts) and held-out (RM accuracy and the evaluation stage).
The training split is shuffled once with the spec's seed: the proxy RM takes its first
`data.preference.num_examples` pairs, the gold RM the next pairs whose prompts the proxy
RM never saw (disjoint by pair and by prompt), PPO its prompts from the end, and SFT in the
`hh_rlhf_chosen` format the chosen answers of the pairs just before those PPO prompts (counted
from the end, so SFT's share does not move when the RMs' shares change).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from nemo_rlhf.data.chat_sft import ChatExample, load_chat_sft
from nemo_rlhf.data.gsm8k import MathProblem, load_gsm8k
from nemo_rlhf.data.hh_rlhf import PreferencePair, load_preference_pairs, prompt_key, split_heldout
from nemo_rlhf.errors import UserError
from nemo_rlhf.spec.paths import data_path
from nemo_rlhf.spec.schema import PipelineSpec


@dataclass
class PreferenceSplit:
    train: list[PreferencePair]
    heldout: list[PreferencePair]
    report: dict


def _shuffled(items: list, seed: int) -> list:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items


@lru_cache(maxsize=4)
def _gsm8k(path: str) -> tuple[MathProblem, ...]:
    return tuple(load_gsm8k(Path(path)))


@lru_cache(maxsize=4)
def _pairs(path: str):
    pairs, report = load_preference_pairs(Path(path))
    return tuple(pairs), report


def sft_problems(spec: PipelineSpec, root: Path) -> list[MathProblem]:
    problems = _shuffled(_gsm8k(str(data_path(root, spec.data.sft.path))), spec.seed)
    n = spec.data.sft.num_examples or len(problems)
    return problems[:n]


def ppo_math_questions(spec: PipelineSpec, root: Path) -> list[MathProblem]:
    if not spec.data.prompts.gsm8k:  # data.sft.path may then hold other SFT data (chat_jsonl)
        return []
    problems = _shuffled(_gsm8k(str(data_path(root, spec.data.sft.path))), spec.seed)
    start = spec.data.sft.num_examples or len(problems)
    return problems[start : start + spec.data.prompts.gsm8k]


def preference_split(spec: PipelineSpec, root: Path) -> PreferenceSplit:
    pairs, report = _pairs(str(data_path(root, spec.data.preference.path)))
    train, heldout = split_heldout(list(pairs), spec.data.preference.heldout_fraction)
    return PreferenceSplit(train=train, heldout=heldout, report=_report_dict(report))


def rm_train_pairs(spec: PipelineSpec, root: Path) -> list[PreferencePair]:
    train = _shuffled(preference_split(spec, root).train, spec.seed)
    return train[: spec.data.preference.num_examples or len(train)]


def gold_rm_train_pairs(spec: PipelineSpec, root: Path) -> list[PreferencePair]:
    """The gold RM's pairs: after the proxy RM's in the same seeded shuffle, none sharing a prompt with them.

    Raises:
        UserError: the proxy RM took every training pair (data.preference.num_examples = 0 or too large).
    """
    train = _shuffled(preference_split(spec, root).train, spec.seed)
    proxy = rm_train_pairs(spec, root)
    proxy_prompts = {prompt_key(p) for p in proxy}
    rest = [p for p in train[len(proxy) :] if prompt_key(p) not in proxy_prompts]
    if not rest:
        raise UserError(
            f"gold_rm: no preference pairs are left disjoint from the proxy RM's {len(proxy)} pairs",
            where="gold_rm",
            fix="lower data.preference.num_examples (the proxy RM's share) or set gold_rm.enabled=false",
        )
    n = spec.gold_rm.num_examples or spec.data.preference.num_examples or len(rest)
    return rest[:n]


def apply_rm_exploit(pairs: list[PreferencePair], exploit: str) -> tuple[list[PreferencePair], dict]:
    """Plants a known flaw in reward-model training pairs (the controlled reward-hacking experiment).

    `longer_wins`: the longer answer (in characters) becomes `chosen` in every pair; pairs
    whose answers are equally long are dropped. `none` returns the pairs unchanged.

    Returns:
        `(pairs, report)`: report counts the pairs swapped, dropped and kept ({} for none).
    """
    if exploit == "none":
        return list(pairs), {}
    if exploit != "longer_wins":
        raise UserError(f"unknown rm.exploit {exploit!r}", where="rm.exploit", fix="use none or longer_wins")
    out, swapped, ties = [], 0, 0
    for pair in pairs:
        if len(pair.chosen) == len(pair.rejected):
            ties += 1
        elif len(pair.rejected) > len(pair.chosen):
            swapped += 1
            out.append(dataclasses.replace(pair, chosen=pair.rejected, rejected=pair.chosen))
        else:
            out.append(pair)
    return out, {"exploit": exploit, "swapped": swapped, "dropped_ties": ties, "kept": len(out)}


def sft_chat_examples(spec: PipelineSpec, root: Path) -> list[ChatExample]:
    """SFT data in the `chat_jsonl` format: the first `data.sft.num_examples` conversations of
    `data.sft.path` after a seeded shuffle."""
    examples = _shuffled(load_chat_sft(data_path(root, spec.data.sft.path)), spec.seed)
    return examples[: spec.data.sft.num_examples or len(examples)]


def sft_chosen_pairs(spec: PipelineSpec, root: Path) -> list[PreferencePair]:
    """SFT data in the `hh_rlhf_chosen` format: the `data.sft.num_examples` training-split pairs
    just before the PPO prompts, counted from the end of the seeded shuffle (their chosen answers
    are the targets). They meet the RMs' pairs (taken from the front) only when the shares
    together exceed the split."""
    train = _shuffled(preference_split(spec, root).train, spec.seed)[::-1]
    start = spec.data.prompts.hh_rlhf
    n = spec.data.sft.num_examples or len(train) - start
    return train[start : start + n]


def ppo_chat_prompts(spec: PipelineSpec, root: Path) -> list[list[dict]]:
    """Prompts (message lists) from the training split, taken from the end of the shuffled
    list so they are the pairs the RM trained on least when num_examples is small."""
    train = _shuffled(preference_split(spec, root).train, spec.seed)
    n = spec.data.prompts.hh_rlhf
    return [pair.prompt for pair in train[::-1][:n]]


def eval_math_problems(spec: PipelineSpec, root: Path) -> list[MathProblem]:
    return list(_gsm8k(str(data_path(root, spec.data.eval.gsm8k_path))))[: spec.data.eval.gsm8k_num]


def eval_chat_prompts(spec: PipelineSpec, root: Path) -> list[list[dict]]:
    """All held-out prompts in split order; the eval stage keeps the first `data.eval.hh_num`
    that fit its prompt length."""
    return [pair.prompt for pair in preference_split(spec, root).heldout]


def _report_dict(report) -> dict:
    if hasattr(report, "to_dict"):
        return report.to_dict()
    if hasattr(report, "__dict__"):
        return dict(report.__dict__)
    return dict(report)
