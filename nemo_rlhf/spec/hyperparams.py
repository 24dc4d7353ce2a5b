"""Canonical hyperparameter names -> TRL arguments, in one table.

Each row: (stage, canonical spec key, TRL config argument, note). The note states where
TRL's meaning differs from the canonical one; the NeMo-Aligner column is added by the
large-scale launcher. Building a TRL config reads this table and nothing else.
"""

from __future__ import annotations

from typing import NamedTuple

from nemo_rlhf.spec.schema import PipelineSpec


class Mapping(NamedTuple):
    stage: str
    canonical: str
    trl: str
    note: str = ""


_WARMUP = "transformers 5: a float in [0, 1) is a ratio of total steps"
# SFT and RM train through the same transformers Trainer arguments.
_TRAINER_ROWS = (
    ("lr", "learning_rate", ""),
    ("max_steps", "max_steps", ""),
    ("micro_batch_size", "per_device_train_batch_size", "RM: pairs per device; each pair is two sequences"),
    ("grad_accum", "gradient_accumulation_steps", ""),
    ("max_length", "max_length", "we drop longer examples first and count them; TRL would truncate (SFT) or drop (RM)"),
    ("warmup_ratio", "warmup_steps", _WARMUP),
    ("weight_decay", "weight_decay", ""),
    ("logging_steps", "logging_steps", ""),
)

TABLE: tuple[Mapping, ...] = tuple(Mapping(stage, *row) for stage in ("sft", "rm") for row in _TRAINER_ROWS) + (
    Mapping("ppo", "lr", "learning_rate"),
    Mapping("ppo", "total_episodes", "total_episodes"),
    Mapping(
        "ppo",
        "rollout_batch_size",
        "per_device_train_batch_size",
        "TRL: rollout batch = per_device_train_batch_size * grad accum * world size; we keep grad accum 1",
    ),
    Mapping("ppo", "num_mini_batches", "num_mini_batches"),
    Mapping("ppo", "ppo_epochs", "num_ppo_epochs"),
    Mapping("ppo", "response_length", "response_length"),
    Mapping("ppo", "temperature", "temperature"),
    Mapping("ppo", "kl_coef", "kl_coef", "TRL folds -kl_coef * KL per token into the reward (estimator: kl_estimator)"),
    Mapping("ppo", "kl_estimator", "kl_estimator"),
    Mapping("ppo", "gamma", "gamma"),
    Mapping("ppo", "gae_lambda", "lam"),
    Mapping("ppo", "clip_ratio", "cliprange"),
    Mapping("ppo", "value_clip", "cliprange_value"),
    Mapping("ppo", "vf_coef", "vf_coef"),
    Mapping("ppo", "whiten_rewards", "whiten_rewards", "TRL always whitens advantages; this switch is for rewards"),
    Mapping(
        "ppo",
        "missing_eos_penalty",
        "missing_eos_penalty",
        "TRL subtracts it from the score; NeMo-Aligner instead masks responses without a stop string",
    ),
)


def trl_kwargs(spec: PipelineSpec, stage: str) -> dict:
    """The TRL config keyword arguments for one stage, read through TABLE."""
    section = getattr(spec, stage)
    return {m.trl: getattr(section, m.canonical) for m in TABLE if m.stage == stage}
