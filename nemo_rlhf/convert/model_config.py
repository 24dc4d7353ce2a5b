"""model_config.yaml for NeMo 2.1's megatron_gpt models, built from and read back into HF configs.

Like NeMo's own HF converters, a config starts from the complete `model:` section of the
family's reference yaml (NeMo v2.1.0's megatron_llama_config.yaml or megatron_qwen2_config.yaml,
shipped in `reference/` under Apache-2.0), so it carries every key NeMo 2.1 and NeMo-Aligner
0.7.0 read. A reward model adds reward_head.NEMO_CONFIG (NeMo-Aligner's training_rm.yaml keys).
The family's field table then sets the architecture, and a few settings are fixed on purpose:

* `mcore_gpt: True`, `transformer_engine: True` (or False for `--layer-spec local`);
* `share_embeddings_and_output_weights: False`: the checkpoint always has an output layer
  (NeMo-Aligner's reward model and critic request it even for tied models);
* `scale_positional_embedding: False`: NeMo's Llama converter defaults it to True, which
  applies Llama-3.1 frequency scaling to every model and silently changes SmolLM2;
* `override_vocab_size` = the HF embedding rows, so NeMo builds exactly the stored rows at any
  TP size that divides them (NeMo would otherwise size the vocabulary from the tokenizer);
* `apply_query_key_layer_scaling: False`: HF has no such scaling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from nemo_rlhf.convert.families import FamilySpec
from nemo_rlhf.convert.param_mapping import Geometry
from nemo_rlhf.errors import UserError

REFERENCE_DIR = Path(__file__).parent / "reference"
NEMO_TARGET = "nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel"
NEMO_VERSION = "2.1.0"
LAYER_SPECS = ("te", "local")

# torch dtype <-> NeMo `precision` (the trainer/model precision key NeMo 2.1 accepts).
PRECISION = {torch.float32: 32, torch.bfloat16: "bf16", torch.float16: 16}

# Keys the verifier and the exporter read; a config without them is not a megatron_gpt config.
REQUIRED_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "encoder_seq_length",
                 "layernorm_epsilon", "tokenizer", "mcore_gpt")


def _reference_model_section(family: FamilySpec) -> DictConfig:
    """The `model:` section of the family's reference yaml (still attached to its root, so that
    interpolations such as `${model.encoder_seq_length}` resolve against the values we set)."""
    return OmegaConf.load(REFERENCE_DIR / family.reference_yaml).model


def _vocab_divisor(vocab_size: int) -> int:
    """Largest power of two <= 128 dividing the vocabulary: NeMo then adds no padding at TP=1."""
    divisor = 128
    while vocab_size % divisor:
        divisor //= 2
    return divisor


def tokenizer_section(tokenizer_type: str) -> dict:
    """NeMo's `library: huggingface` tokenizer section.

    `type` must resolve where NeMo runs: a hub id or a directory on that machine. The
    tokenizer files also travel inside the archive (see nemo_archive.HF_ASSETS) so they can be
    unpacked there; NeMo itself never reads them from the archive for this library.
    """
    return {"library": "huggingface", "type": tokenizer_type, "model": None, "vocab_file": None,
            "merge_file": None, "delimiter": None, "sentencepiece_legacy": False, "use_fast": True}


def build_model_config(family: FamilySpec, hf_cfg: dict, *, layer_spec: str, dtype: torch.dtype,
                       tokenizer_type: str) -> dict:
    """A complete model_config.yaml (as a dict) for an HF config of `family`.

    Args:
        family: The architecture family (its field table and fixed values).
        hf_cfg: The HF config.json contents.
        layer_spec: "te" (TransformerEngine, the cluster default) or "local".
        dtype: Dtype of the stored weights; sets `precision`.
        tokenizer_type: Value of `tokenizer.type` (hub id or directory).
    """
    if layer_spec not in LAYER_SPECS:
        raise UserError(f"unknown layer spec {layer_spec!r}", fix=f"use one of: {', '.join(LAYER_SPECS)}")
    model = _reference_model_section(family)
    for field in family.config_fields:
        value = field.get(hf_cfg)
        for key in field.nemo:
            model[key] = value
    for key, value in family.fixed_nemo.items():
        model[key] = value
    vocab = model["override_vocab_size"]
    model.update({
        "mcore_gpt": True, "transformer_engine": layer_spec == "te",
        "share_embeddings_and_output_weights": False, "scale_positional_embedding": False,
        "seq_len_interpolation_factor": None, "apply_query_key_layer_scaling": False,
        "make_vocab_size_divisible_by": _vocab_divisor(vocab), "precision": PRECISION[dtype],
        "micro_batch_size": 1, "use_cpu_initialization": False,
        "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
    })
    model.tokenizer = tokenizer_section(tokenizer_type)
    cfg = OmegaConf.to_container(model, resolve=True)
    cfg["target"] = NEMO_TARGET
    cfg["nemo_version"] = NEMO_VERSION
    return cfg


def hf_config_updates(family: FamilySpec, nemo_cfg: dict) -> dict:
    """The HF config.json values the field table recovers from a model_config.yaml."""
    out: dict[str, Any] = {}
    for field in family.config_fields:
        value = nemo_cfg.get(field.nemo[0])
        if value is None and field.hf == "head_dim":  # NeMo's null kv_channels means H / heads
            value = nemo_cfg["hidden_size"] // nemo_cfg["num_attention_heads"]
        if value is None:
            continue  # e.g. no override_vocab_size: the caller sizes the vocabulary
        field.put(out, value)
    return out


def dump_model_config(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)


def load_model_config(path: Path) -> dict:
    """Reads and checks a model_config.yaml file (safe YAML: no Python objects)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path.name} is missing", where=str(path.parent),
                        fix="a .nemo must contain model_config.yaml: convert the model again") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"model_config.yaml is not text ({exc})", where=str(path)) from exc
    return parse_model_config(text, str(path))


def parse_model_config(text: str, where: str) -> dict:
    """Parses and checks model_config.yaml text."""
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"model_config.yaml is not valid YAML ({exc})", where=where) from exc
    if not isinstance(cfg, dict):
        raise UserError("model_config.yaml is not a mapping", where=where)
    missing = [k for k in REQUIRED_KEYS if k not in cfg]
    if missing:
        raise UserError(f"model_config.yaml lacks {', '.join(missing)}", where=where,
                        fix="this is not a NeMo megatron_gpt model config")
    if not cfg.get("mcore_gpt"):
        raise UserError("mcore_gpt is False: pre-mcore NeMo checkpoints are not supported yet", where=where,
                        fix="convert it with NeMo's convert_gpt_nemo_to_mcore.py first")
    return cfg


def vocab_sizes(nemo_cfg: dict, tokenizer_len: int | None, tp: int = 1) -> tuple[int, int]:
    """(real vocabulary, padded vocabulary) as NeMo 2.1 computes them for a TP size.

    NeMo pads the tokenizer's length to a multiple of make_vocab_size_divisible_by * TP, unless
    override_vocab_size is set, which it uses verbatim.
    """
    override = nemo_cfg.get("override_vocab_size")
    if override:
        return int(override), int(override)
    if tokenizer_len is None:
        raise UserError("model_config.yaml has no override_vocab_size and the tokenizer is unavailable",
                        fix="set model.override_vocab_size to the number of embedding rows")
    multiple = int(nemo_cfg.get("make_vocab_size_divisible_by", 128)) * tp
    return tokenizer_len, -(-tokenizer_len // multiple) * multiple


def geometry(nemo_cfg: dict, vocab_size: int, padded_vocab_size: int) -> Geometry:
    """The sizes the mapping kinds need, from a model_config.yaml."""
    heads = int(nemo_cfg["num_attention_heads"])
    return Geometry(
        num_heads=heads,
        num_query_groups=int(nemo_cfg.get("num_query_groups") or heads),
        head_dim=int(nemo_cfg.get("kv_channels") or nemo_cfg["hidden_size"] // heads),
        vocab_size=vocab_size, padded_vocab_size=padded_vocab_size,
    )


def geometry_from_hf(family: FamilySpec, hf_cfg: dict) -> Geometry:
    """The same sizes, from an HF config (through the family's field table)."""
    values = {f.hf: f.get(hf_cfg) for f in family.config_fields}
    vocab = int(values["vocab_size"])
    return Geometry(num_heads=int(values["num_attention_heads"]), num_query_groups=int(values["num_key_value_heads"]),
                    head_dim=int(values["head_dim"]), vocab_size=vocab, padded_vocab_size=vocab)
