"""Which data rows each stage uses, decided in one place.

GSM8K train is shuffled once with the spec's seed: the first `data.sft.num_examples`
rows train SFT and the next `data.prompts.gsm8k` questions are PPO prompts, so PPO never
sees a question SFT was trained on. hh-rlhf pairs are split by a hash of the prompt into
train (RM training and PPO prompts) and held-out (RM accuracy and the evaluation stage).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from nemo_rlhf.data.gsm8k import MathProblem, load_gsm8k
from nemo_rlhf.data.hh_rlhf import PreferencePair, load_preference_pairs, split_heldout
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
