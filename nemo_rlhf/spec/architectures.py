"""Model dimensions: known architectures (values copied from their HF config.json) and resolving a spec's model.

Preflight and the NeMo-Aligner renderer need a model's shape (layers, heads, query groups, ...).
A large-scale checkpoint lives on the cluster, so the spec names a preset from `PRESETS` and/or
gives the fields under `model.arch`; a small model present here is read from its config.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from nemo_rlhf.errors import UserError
from nemo_rlhf.spec.schema import ArchConfig, PipelineSpec

FAMILIES = ("llama", "qwen2", "gpt_neox")


@dataclass(frozen=True)
class ModelDims:
    """A decoder-only transformer's shape, with the HF config.json meaning of each field.

    `gated_mlp` (SwiGLU: gate, up, down matrices) and `bias` follow from the family.
    """

    family: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    vocab_size: int
    seq_length: int
    tie_word_embeddings: bool

    @property
    def gated_mlp(self) -> bool:
        return self.family in ("llama", "qwen2")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def layer_params(self) -> int:
        """Parameters of one transformer layer (attention, MLP, norms; biases where the family has them)."""
        h, d = self.hidden_size, self.head_dim
        qkv = h * (self.num_attention_heads + 2 * self.num_query_groups) * d
        proj = self.num_attention_heads * d * h
        mlp = (3 if self.gated_mlp else 2) * h * self.ffn_hidden_size
        bias = 0
        if self.family == "qwen2":  # q, k, v biases only
            bias = (self.num_attention_heads + 2 * self.num_query_groups) * d
        elif self.family == "gpt_neox":  # every linear has a bias; two LayerNorms with bias
            bias = (self.num_attention_heads + 2 * self.num_query_groups) * d + h + self.ffn_hidden_size + h + 2 * h
        return qkv + proj + mlp + 2 * h + bias

    def total_params(self) -> int:
        embed = self.vocab_size * self.hidden_size
        output = 0 if self.tie_word_embeddings else embed
        return self.num_layers * self.layer_params() + embed + output + self.hidden_size


def _dims(family, layers, hidden, heads, groups, ffn, vocab, seq, tied) -> ModelDims:
    return ModelDims(family, layers, hidden, heads, groups, ffn, vocab, seq, tied)


# name -> dimensions, from each model's published config.json (num_hidden_layers, hidden_size,
# num_attention_heads, num_key_value_heads, intermediate_size, vocab_size, max_position_embeddings,
# tie_word_embeddings).
PRESETS: dict[str, ModelDims] = {
    "smollm2-135m": _dims("llama", 30, 576, 9, 3, 1536, 49152, 8192, True),
    "smollm2-360m": _dims("llama", 32, 960, 15, 5, 2560, 49152, 8192, True),
    "qwen2.5-0.5b": _dims("qwen2", 24, 896, 14, 2, 4864, 151936, 32768, True),
    "pythia-410m": _dims("gpt_neox", 24, 1024, 16, 16, 4096, 50304, 2048, False),
    "llama3-8b": _dims("llama", 32, 4096, 32, 8, 14336, 128256, 8192, False),
    "llama3-70b": _dims("llama", 80, 8192, 64, 8, 28672, 128256, 8192, False),
}

# The registry's PyPI-shipped models have the shape of a preset.
_REGISTRY_PRESET = {"smollm2-135m-instruct": "smollm2-135m"}

# HF config.json key -> ModelDims field.
_HF_KEYS = {
    "num_hidden_layers": "num_layers",
    "hidden_size": "hidden_size",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_query_groups",
    "intermediate_size": "ffn_hidden_size",
    "vocab_size": "vocab_size",
    "max_position_embeddings": "seq_length",
    "tie_word_embeddings": "tie_word_embeddings",
}
_HF_FAMILY = {"llama": "llama", "qwen2": "qwen2", "gpt_neox": "gpt_neox"}


def model_dims(spec: PipelineSpec) -> ModelDims:
    """The shape of the spec's base model: model.arch (preset, then fields), else the source's own config.

    Raises:
        UserError: the shape cannot be known, or a field is missing; names the keys to set.
    """
    arch = spec.model.arch
    base = _base_dims(spec)
    given = {f.name: getattr(arch, f.name) for f in dataclasses.fields(ArchConfig) if f.name != "preset"}
    given = {k: v for k, v in given.items() if v is not None}
    values = {**base, **given}
    missing = [f.name for f in dataclasses.fields(ModelDims) if f.name not in values]
    if missing:
        raise UserError(
            "the model's dimensions are unknown: " + ", ".join(f"model.arch.{k}" for k in missing) + " not set",
            where="model.arch",
            fix=f"set model.arch.preset to one of {', '.join(PRESETS)}, or give the missing fields "
            "(the values of the model's config.json)",
        )
    return ModelDims(**values)


def _base_dims(spec: PipelineSpec) -> dict:
    """What the spec's model source says about its shape (possibly partial, possibly nothing)."""
    m = spec.model
    if m.arch.preset is not None:
        if m.arch.preset not in PRESETS:
            raise UserError(
                f"unknown architecture preset {m.arch.preset!r}",
                where="model.arch.preset",
                fix=f"use one of {', '.join(PRESETS)}, or give the model.arch fields",
            )
        return dataclasses.asdict(PRESETS[m.arch.preset])
    if m.source == "pypi_gguf" and m.name in _REGISTRY_PRESET:
        return dataclasses.asdict(PRESETS[_REGISTRY_PRESET[m.name]])
    if m.source == "random":  # the vocabulary comes from the tokenizer file: model.arch.vocab_size
        r = m.random
        return {
            "family": r.architecture, "num_layers": r.num_layers, "hidden_size": r.hidden_size,
            "num_attention_heads": r.num_heads, "num_query_groups": r.num_kv_heads,
            "ffn_hidden_size": r.intermediate_size, "seq_length": r.max_position_embeddings,
            "tie_word_embeddings": r.tie_word_embeddings,
        }
    if m.source == "hf_dir" and m.path and (Path(m.path).expanduser() / "config.json").is_file():
        return _from_hf_config(Path(m.path).expanduser() / "config.json")
    return {}


def _from_hf_config(path: Path) -> dict:
    """Dimensions from an HF config.json present on this machine."""
    config = json.loads(path.read_text(encoding="utf-8"))
    values = {field: config[key] for key, field in _HF_KEYS.items() if key in config}
    if config.get("model_type") in _HF_FAMILY:
        values["family"] = _HF_FAMILY[config["model_type"]]
    if "num_query_groups" not in values and "num_attention_heads" in values:
        values["num_query_groups"] = values["num_attention_heads"]  # plain multi-head attention
    values.setdefault("tie_word_embeddings", False)
    return values
