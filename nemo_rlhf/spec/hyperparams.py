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
    ("adam_beta1", "adam_beta1", ""),
    ("adam_beta2", "adam_beta2", ""),
    ("logging_steps", "logging_steps", ""),
)

TABLE: tuple[Mapping, ...] = tuple(Mapping(stage, *row) for stage in ("sft", "rm") for row in _TRAINER_ROWS) + (
    Mapping("ppo", "lr", "learning_rate"),
    *(Mapping("ppo", beta, beta, "TRL: one optimizer for policy and value head; NeMo: actor and critic each")
      for beta in ("adam_beta1", "adam_beta2")),
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


class NemoMapping(NamedTuple):
    """One spec key -> one NeMo-Aligner 0.7.0 config key.

    Attributes:
        spec_key: dotted spec key (canonical hyperparameter or a large-scale `parallel.` key).
        config: the rendered config it lands in: sft, rm, ppo_actor or ppo_critic.
        nemo: dotted key in that config; None = NeMo-Aligner has no equivalent (the note says what
            happens instead; preflight refuses values that would silently change the experiment).
        convert: name of the value conversion in `NEMO_CONVERSIONS` ("" = the value as is).
        note: where NeMo-Aligner's meaning differs from the canonical one.
    """

    spec_key: str
    config: str
    nemo: str | None
    convert: str = ""
    note: str = ""


_LARGE_BATCH = "large scale: parallel.{stage}.micro_batch_size / global_batch_size set the batch"
_LOG = "NeMo logs every step through exp_manager"
_WARM = "NeMo-Aligner takes a step count: round(warmup_ratio * max_steps)"
_BETAS = "one list [adam_beta1, adam_beta2] (upstream YAMLs: [0.9, 0.98])"


def _beta_rows(stage: str, config: str):
    """Both Adam betas of a spec section land in one NeMo list key (conversion `betas`)."""
    return tuple(NemoMapping(f"{stage}.{b}", config, "model.optim.betas", "betas", _BETAS)
                 for b in ("adam_beta1", "adam_beta2"))


def _trainer_rows(stage: str, config: str, max_steps_key: str, length_key: str, length_note: str):
    return (
        NemoMapping(f"{stage}.lr", config, "model.optim.lr"),
        NemoMapping(f"{stage}.max_steps", config, max_steps_key),
        NemoMapping(f"{stage}.micro_batch_size", config, None, note=_LARGE_BATCH.format(stage=stage)),
        NemoMapping(f"{stage}.grad_accum", config, None, note="NeMo derives it: GBS / (micro batch * DP)"),
        NemoMapping(f"{stage}.max_length", config, length_key, note=length_note),
        NemoMapping(f"{stage}.warmup_ratio", config, "model.optim.sched.warmup_steps", "warmup_steps", _WARM),
        NemoMapping(f"{stage}.weight_decay", config, "model.optim.weight_decay"),
        *_beta_rows(stage, config),
        NemoMapping(f"{stage}.logging_steps", config, None, note=_LOG),
    )


# The canonical -> NeMo-Aligner table; `nemo_rlhf.slurm.aligner_config` reads it and nothing else
# for hyperparameters. Layout keys (tp, pp, ...) are in aligner_config.LAYOUT_KEYS.
NEMO_TABLE: tuple[NemoMapping, ...] = (
    *_trainer_rows("sft", "sft", "trainer.sft.max_steps", "model.data.train_ds.max_seq_length",
                   "NeMo truncates the input field of longer examples; TRL-side we drop them"),
    NemoMapping("parallel.sft.micro_batch_size", "sft", "model.data.train_ds.micro_batch_size"),
    NemoMapping("parallel.sft.global_batch_size", "sft", "model.data.train_ds.global_batch_size"),
    *_trainer_rows("rm", "rm", "trainer.rm.max_steps", "model.encoder_seq_length",
                   "also the RM data's seq_length (model.data.seq_length interpolates it)"),
    NemoMapping("rm.init_from", "rm", None, note="the renderer restores the SFT or the base .nemo"),
    NemoMapping("rm.eval_pairs", "rm", None, note="NeMo-Aligner validates on cluster.data.rm_val"),
    NemoMapping("parallel.rm.micro_batch_size", "rm", "model.micro_batch_size", note="pairs, as in TRL"),
    NemoMapping("parallel.rm.global_batch_size", "rm", "model.global_batch_size", note="pairs"),
    NemoMapping("ppo.lr", "ppo_actor", "model.optim.lr"),
    NemoMapping("ppo.lr", "ppo_critic", "model.optim.lr", note="TRL trains policy and value head with one lr"),
    *_beta_rows("ppo", "ppo_actor"),
    *_beta_rows("ppo", "ppo_critic"),
    NemoMapping("ppo.total_episodes", "ppo_actor", "trainer.ppo.max_steps", "ppo_steps",
                note="NeMo-Aligner counts rollouts: total_episodes / rollout_batch_size"),
    NemoMapping("ppo.rollout_batch_size", "ppo_actor", "model.ppo.num_rollout_samples"),
    NemoMapping("ppo.num_mini_batches", "ppo_actor", None,
                note="preflight requires parallel.ppo.global_batch_size = rollout_batch_size / num_mini_batches"),
    NemoMapping("ppo.ppo_epochs", "ppo_actor", None,
                note="NeMo-Aligner makes one pass over each rollout; preflight refuses ppo_epochs != 1"),
    NemoMapping("ppo.prompt_max_length", "ppo_actor", None,
                note="model.encoder_seq_length of actor and critic = prompt_max_length + response_length"),
    NemoMapping("ppo.response_length", "ppo_actor", "model.ppo.length_params.max_length",
                note="NeMo-Aligner stops early at an end string; TRL generates exactly response_length"),
    NemoMapping("ppo.temperature", "ppo_actor", "model.ppo.sampling_params.temperature"),
    NemoMapping("ppo.kl_coef", "ppo_actor", "trainer.ppo.initial_policy_kl_penalty",
                note="both subtract kl_coef * KL per token from the reward"),
    NemoMapping("ppo.kl_estimator", "ppo_actor", "trainer.ppo.use_absolute_kl", "kl_estimator",
                note="k1 -> use_absolute_kl False (upstream default True penalises |log ratio|); no k3 upstream"),
    NemoMapping("ppo.gamma", "ppo_actor", "trainer.ppo.discount_factor"),
    NemoMapping("ppo.gae_lambda", "ppo_actor", "trainer.ppo.gae_lambda"),
    NemoMapping("ppo.clip_ratio", "ppo_actor", "model.ppo.ratio_eps"),
    NemoMapping("ppo.value_clip", "ppo_critic", "model.loss_clip_val"),
    NemoMapping("ppo.vf_coef", "ppo_critic", None,
                note="the critic is a separate model with its own optimizer: no shared loss to weight"),
    NemoMapping("ppo.whiten_rewards", "ppo_actor", None,
                note="NeMo-Aligner only has fixed-statistics reward_standardization; preflight refuses true"),
    NemoMapping("ppo.missing_eos_penalty", "ppo_actor", None,
                note="NeMo-Aligner has no such penalty (preflight warns when it is set)"),
    NemoMapping("parallel.ppo.micro_batch_size", "ppo_actor", "model.micro_batch_size"),
    NemoMapping("parallel.ppo.global_batch_size", "ppo_actor", "model.global_batch_size",
                note="samples per actor optimizer step (a PPO mini batch)"),
    NemoMapping("parallel.ppo.rollout_micro_batch_size", "ppo_actor", "model.ppo.rollout_micro_batch_size"),
    NemoMapping("parallel.ppo.forward_micro_batch_size", "ppo_actor", "model.ppo.forward_micro_batch_size"),
    NemoMapping("parallel.critic.micro_batch_size", "ppo_critic", "model.micro_batch_size"),
    NemoMapping("parallel.critic.global_batch_size", "ppo_critic", "model.global_batch_size"),
    NemoMapping("parallel.critic.inference_micro_batch_size", "ppo_critic", "trainer.ppo.inference_micro_batch_size"),
    NemoMapping("parallel.critic.port", "ppo_critic", "trainer.ppo.port"),
    NemoMapping("parallel.critic.port", "ppo_actor", "remote_critic_rm.critic.port"),
    *(NemoMapping("seed", config, "model.seed") for config in ("sft", "rm", "ppo_actor", "ppo_critic")),
)


def _warmup_steps(spec: PipelineSpec, spec_key: str, value):
    stage = spec_key.split(".")[0]
    return round(value * getattr(spec, stage).max_steps)


def _ppo_steps(spec: PipelineSpec, spec_key: str, value):
    return value // spec.ppo.rollout_batch_size


def _kl_estimator(spec: PipelineSpec, spec_key: str, value):
    return {"k1": False}.get(value, value)  # k3 has no NeMo-Aligner form: preflight refuses it first


def _betas(spec: PipelineSpec, spec_key: str, value):
    section = getattr(spec, spec_key.split(".")[0])
    return [section.adam_beta1, section.adam_beta2]


NEMO_CONVERSIONS = {"warmup_steps": _warmup_steps, "ppo_steps": _ppo_steps, "kl_estimator": _kl_estimator,
                    "betas": _betas}


def spec_value(spec: PipelineSpec, key: str):
    """The value of a dotted spec key."""
    node = spec
    for part in key.split("."):
        node = getattr(node, part)
    return node


def nemo_settings(spec: PipelineSpec, config: str) -> dict:
    """The NeMo-Aligner keys of one rendered config, read through NEMO_TABLE (None values are skipped)."""
    out = {}
    for row in NEMO_TABLE:
        if row.config != config or row.nemo is None:
            continue
        value = spec_value(spec, row.spec_key)
        if value is None:
            continue  # keep upstream's default (often an interpolation)
        out[row.nemo] = NEMO_CONVERSIONS[row.convert](spec, row.spec_key, value) if row.convert else value
    return out
