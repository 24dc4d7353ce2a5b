"""NeMo-Aligner 0.7.0 config YAMLs from a spec: upstream's own file, our keys set, the whole result written.

Each config starts from the real upstream YAML (shipped in `reference/`, unmodified) loaded with
OmegaConf and unresolved (interpolations such as `${multiply:...}` stay for NeMo's resolvers). Then:

* hyperparameters through `nemo_rlhf.spec.hyperparams.NEMO_TABLE` (the one canonical -> NeMo table);
* the layout through `LAYOUT_KEYS`;
* paths, sizes and fixed choices through `_stage_settings` (each with the reason it is fixed).

Every key set must already exist in the upstream file, or, for `model.*`, in NeMo's
megatron_gpt_config.yaml (the model config a .nemo carries, which NeMo-Aligner merges under
`model:`). Anything else raises: a key NeMo would silently ignore is a bug (NeMo-Aligner #173).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from nemo_rlhf.data.aligner_format import SFT_CONFIG_SETTINGS
from nemo_rlhf.slurm.preflight import StageLayout
from nemo_rlhf.spec.architectures import ModelDims
from nemo_rlhf.spec.hyperparams import nemo_settings
from nemo_rlhf.spec.schema import PipelineSpec

REFERENCE_DIR = Path(__file__).parent / "reference"
CONFIG_FILES = {
    "sft": "gpt_sft.yaml",
    "rm": "training_rm.yaml",
    "ppo_actor": "gpt_ppo_actor.yaml",
    "ppo_critic": "gpt_ppo_critic.yaml",
}
MODEL_CONFIG_FILE = "megatron_gpt_config.yaml"
# rendered config -> the layout (parallel.<stage>) it runs with
CONFIG_LAYOUT = {"sft": "sft", "rm": "rm", "ppo_actor": "ppo", "ppo_critic": "critic"}

# parallel.<stage> field -> NeMo model key. Activation recomputation is two keys (see _recompute).
LAYOUT_KEYS = (
    ("tp", "model.tensor_model_parallel_size"),
    ("pp", "model.pipeline_model_parallel_size"),
    ("vpp", "model.virtual_pipeline_model_parallel_size"),
    ("sequence_parallel", "model.sequence_parallel"),
)


@dataclass(frozen=True)
class StagePaths:
    """Where a config's stage reads and writes, as the container sees them."""

    log_dir: str  # exp_manager.explicit_log_dir
    restore: str  # the .nemo the stage starts from
    train: str | None = None
    val: str | None = None


class UpstreamKeyError(KeyError):
    """A key we set does not exist upstream: a bug in this module, never the user's input."""


def reference_config(config: str) -> DictConfig:
    """The upstream NeMo-Aligner YAML of one rendered config, unresolved."""
    return OmegaConf.load(REFERENCE_DIR / CONFIG_FILES[config])


def upstream_keys(config: str, reference_dir: Path = REFERENCE_DIR) -> set[str]:
    """Every dotted key (sections and leaves) that may be set in `config`: its own YAML's keys plus
    `model.<key>` for each key of NeMo's megatron_gpt_config.yaml model section."""
    keys = _dotted_keys(OmegaConf.to_container(OmegaConf.load(reference_dir / CONFIG_FILES[config])))
    model = OmegaConf.to_container(OmegaConf.load(reference_dir / MODEL_CONFIG_FILE))["model"]
    return keys | {f"model.{k}" for k in _dotted_keys(model)}


def _dotted_keys(node: Any, prefix: str = "") -> set[str]:
    keys = set()
    if isinstance(node, dict):
        for key, value in node.items():
            full = f"{prefix}{key}"
            keys.add(full)
            keys |= _dotted_keys(value, f"{full}.")
    return keys


def leaf_keys(node: Any, prefix: str = "") -> set[str]:
    """Dotted keys of the leaves of a nested dict (a value that is a dict counts as its leaves)."""
    if isinstance(node, dict) and node:
        return set().union(*(leaf_keys(v, f"{prefix}{k}.") for k, v in node.items()))
    return {prefix.rstrip(".")}


def _recompute(mode: str | None) -> dict:
    if mode == "full":  # recompute every layer from its input, one layer per checkpoint
        return {"model.activations_checkpoint_granularity": "full",
                "model.activations_checkpoint_method": "uniform",
                "model.activations_checkpoint_num_layers": 1}
    return {"model.activations_checkpoint_granularity": mode, "model.activations_checkpoint_method": None}


def _layout_settings(spec: PipelineSpec, layout: StageLayout) -> dict:
    precision = spec.cluster.precision
    settings = {
        "trainer.num_nodes": layout.nodes,
        "trainer.devices": spec.cluster.gpus_per_node,
        "trainer.precision": precision if precision == "bf16" else int(precision),
    }
    for field, key in LAYOUT_KEYS:
        settings[key] = getattr(layout, field)
    return {**settings, **_recompute(layout.recompute)}


def _data_prefix(paths: StagePaths) -> dict:
    """NeMo-Aligner's jsonl data_prefix (its docs pass the validation file as test too)."""
    return {"train": [paths.train], "validation": [paths.val], "test": [paths.val]}


def _stage_settings(spec: PipelineSpec, config: str, dims: ModelDims, paths: StagePaths) -> dict:
    """Paths and fixed choices of one config."""
    bf16 = spec.cluster.precision == "bf16"
    common = {
        "exp_manager.explicit_log_dir": paths.log_dir,
        # The .nemo lands at <log_dir>/checkpoints/<name>.nemo: a fixed name lets the next stage find it.
        "exp_manager.name": config,
        # Preemption: a requeued job continues from its last checkpoint (NeMo's exp_manager writes last.ckpt:
        # CallbackParams.save_last defaults to True; that key is not in the upstream YAMLs, so it is not set).
        "exp_manager.resume_if_exists": True,
        "exp_manager.resume_ignore_no_checkpoint": True,  # the first run has no checkpoint yet
        "exp_manager.create_checkpoint_callback": True,
        "exp_manager.checkpoint_callback_params.save_nemo_on_train_end": True,  # the next stage reads the .nemo
        "model.megatron_amp_O2": bf16,
        "model.optim.name": "distributed_fused_adam" if spec.cluster.distributed_optimizer else "fused_adam",
    }
    if config != "ppo_critic":
        # No run timer: a run stopped by trainer.max_time exits 0 and would be recorded as finished. Runs
        # cut short by SLURM's time limit fail instead, and `slurm resume` continues them from the checkpoint.
        common["trainer.max_time"] = None
    ppo_seq = spec.ppo.prompt_max_length + spec.ppo.response_length
    if config == "sft":
        return {**common, **SFT_CONFIG_SETTINGS,
                "model.restore_from_path": paths.restore,
                "model.encoder_seq_length": dims.seq_length,
                "model.data.train_ds.file_path": paths.train,
                "model.data.validation_ds.file_path": paths.val}
    if config == "rm":
        return {**common,
                "pretrained_checkpoint.restore_from_path": paths.restore,
                "model.data.data_impl": "jsonl",
                "model.data.data_prefix": _data_prefix(paths)}
    if config == "ppo_actor":
        return {**common,
                "pretrained_checkpoint.restore_from_path": paths.restore,
                # The actor's sequences are prompt + response; upstream's 4096 would also pad every critic request.
                "model.encoder_seq_length": ppo_seq,
                "model.data.data_impl": "jsonl",
                "model.data.data_prefix": _data_prefix(paths),
                "remote_critic_rm.combine_rm_and_critic_server": True,
                # TRL whitens advantages too; stated, not left to a default.
                "trainer.ppo.normalize_advantages": True}
    return {**common,  # ppo_critic
            "pretrained_checkpoint.restore_from_path": paths.restore,
            "model.encoder_seq_length": ppo_seq,
            "trainer.ppo.combine_rm_and_critic_server": True}


def build_config(spec: PipelineSpec, config: str, layout: StageLayout, dims: ModelDims, paths: StagePaths
                 ) -> DictConfig:
    """The full NeMo-Aligner config of one stage: upstream YAML + layout + table + paths.

    Raises:
        UpstreamKeyError: a key to set exists neither upstream nor in NeMo's model config.
    """
    cfg = reference_config(config)
    allowed = upstream_keys(config)
    settings = {**_layout_settings(spec, layout), **nemo_settings(spec, config),
                **_stage_settings(spec, config, dims, paths)}
    unknown = sorted(k for k in settings if k not in allowed)
    if unknown:
        raise UpstreamKeyError(f"{CONFIG_FILES[config]}: keys not in NeMo-Aligner 0.7.0 or NeMo 2.1: {unknown}")
    for key, value in settings.items():
        OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    return cfg


def write_config(cfg: DictConfig, path: Path) -> Path:
    """Write a config unresolved (NeMo's resolvers run inside the container)."""
    path.write_text(OmegaConf.to_yaml(cfg, resolve=False), encoding="utf-8")
    return path
