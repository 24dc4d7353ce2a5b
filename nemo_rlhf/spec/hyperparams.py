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


TABLE: tuple[Mapping, ...] = (
    Mapping("sft", "lr", "learning_rate"),
    Mapping("sft", "max_steps", "max_steps"),
    Mapping("sft", "micro_batch_size", "per_device_train_batch_size"),
    Mapping("sft", "grad_accum", "gradient_accumulation_steps"),
    Mapping("sft", "max_length", "max_length", "we drop longer examples before TRL sees them; TRL would truncate"),
    Mapping("sft", "warmup_ratio", "warmup_steps", "transformers 5: a float in [0, 1) is a ratio of total steps"),
    Mapping("sft", "weight_decay", "weight_decay"),
    Mapping("sft", "logging_steps", "logging_steps"),
    Mapping("rm", "lr", "learning_rate"),
    Mapping("rm", "max_steps", "max_steps"),
    Mapping("rm", "micro_batch_size", "per_device_train_batch_size", "pairs per device; each pair is two sequences"),
    Mapping("rm", "grad_accum", "gradient_accumulation_steps"),
    Mapping("rm", "max_length", "max_length", "TRL drops longer pairs; we drop them first and count them"),
    Mapping("rm", "warmup_ratio", "warmup_steps", "transformers 5: a float in [0, 1) is a ratio of total steps"),
    Mapping("rm", "weight_decay", "weight_decay"),
    Mapping("rm", "logging_steps", "logging_steps"),
    Mapping("ppo", "lr", "learning_rate"),
    Mapping("ppo", "total_episodes", "total_episodes"),
    Mapping("ppo", "rollout_batch_size", "per_device_train_batch_size", "TRL: rollout batch = per_device_train_batch_size * grad accum * world size; we keep grad accum 1"),
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
    Mapping("ppo", "missing_eos_penalty", "missing_eos_penalty", "TRL subtracts it from the score; NeMo-Aligner instead masks responses without a stop string"),
)


def trl_kwargs(spec: PipelineSpec, stage: str) -> dict:
    """The TRL config keyword arguments for one stage, read through TABLE."""
    section = getattr(spec, stage)
    return {m.trl: getattr(section, m.canonical) for m in TABLE if m.stage == stage}
