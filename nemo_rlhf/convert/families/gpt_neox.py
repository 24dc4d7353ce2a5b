"""GPT-NeoX family (Pythia, e.g. pythia-410m): parallel attention + MLP, two LayerNorms, partial rotary, biases.

NeMo 2.1 has no GPT-NeoX model; it runs parallel-residual models through its Falcon layer,
which a model_config.yaml selects with `name: megatron_falcon_gpt` and
`mcore_customization_config: {new_decoder_architecture: True, parallel_attention: True}` (what
NeMo's convert_falcon_hf_to_nemo.py writes). In that mode the layer computes
`x + attention(input_layernorm(x)) + mlp(pre_mlp_layernorm(x))`, Pythia's
`use_parallel_residual` block, so the base config is NeMo 2.1's megatron_falcon_config.yaml.

What the table says, and why:

* `query_key_value` is stored per head as [q, k, v]: Megatron's `linear_qkv` layout with one
  query group per head, so it is copied unchanged (kind `fused_qkv`; TP still splits it by
  whole heads). Its bias has the same layout.
* The Falcon spec builds its norms as separate modules with no key map, so the checkpoint
  keys are `decoder.layers.input_layernorm.*` and `decoder.layers.pre_mlp_layernorm.*`, not
  the `linear_qkv.layer_norm_*` names of the GPT spec.
* Every linear has a bias (`bias: True`; mcore then also gives `linear_qkv` one).
* `embed_out` is untied; older checkpoints also hold the causal-mask buffers and rotary
  inverse frequencies, which are recomputed, so they are dropped rows.
* HF's `gelu` is the exact erf GELU; mcore's fused bias-GELU is the tanh approximation, so
  `bias_activation_fusion` is False.

Known gap (docs/nemo-format-notes.md): NeMo 2.1's Falcon layer adds `linear_proj` and
`linear_fc2` outputs without their biases (it keeps the bias-free part of each and adds
them to the residual), so NeMo 2.1 computes a Pythia model slightly differently from HF
while those biases are non-zero. The checkpoint still holds them; the certificate checks the
mapping against the HF semantics.
"""

from __future__ import annotations

from nemo_rlhf.convert.families import ConfigField, WeightEntry, register_family
from nemo_rlhf.convert.families.rotary_decoder import TE_EXTRA_STATE
from nemo_rlhf.convert.hf_rope import rope_type
from nemo_rlhf.convert.param_mapping import COLUMN, FUSED_QKV, REPLICATED, ROW, VOCAB

_LAYER = "gpt_neox.layers.{layer}"
_ATTN = f"{_LAYER}.attention"
_MLP = f"{_LAYER}.mlp"
_DEC = "decoder.layers"

WEIGHTS = (
    WeightEntry(("gpt_neox.embed_in.weight",), "embedding.word_embeddings.weight", VOCAB),
    WeightEntry((f"{_LAYER}.input_layernorm.weight",), f"{_DEC}.input_layernorm.weight", REPLICATED),
    WeightEntry((f"{_LAYER}.input_layernorm.bias",), f"{_DEC}.input_layernorm.bias", REPLICATED),
    WeightEntry((f"{_ATTN}.query_key_value.weight",), f"{_DEC}.self_attention.linear_qkv.weight", FUSED_QKV),
    WeightEntry((f"{_ATTN}.query_key_value.bias",), f"{_DEC}.self_attention.linear_qkv.bias", FUSED_QKV),
    WeightEntry((f"{_ATTN}.dense.weight",), f"{_DEC}.self_attention.linear_proj.weight", ROW),
    WeightEntry((f"{_ATTN}.dense.bias",), f"{_DEC}.self_attention.linear_proj.bias", REPLICATED),
    WeightEntry((f"{_LAYER}.post_attention_layernorm.weight",), f"{_DEC}.pre_mlp_layernorm.weight", REPLICATED),
    WeightEntry((f"{_LAYER}.post_attention_layernorm.bias",), f"{_DEC}.pre_mlp_layernorm.bias", REPLICATED),
    WeightEntry((f"{_MLP}.dense_h_to_4h.weight",), f"{_DEC}.mlp.linear_fc1.weight", COLUMN),
    WeightEntry((f"{_MLP}.dense_h_to_4h.bias",), f"{_DEC}.mlp.linear_fc1.bias", COLUMN),
    WeightEntry((f"{_MLP}.dense_4h_to_h.weight",), f"{_DEC}.mlp.linear_fc2.weight", ROW),
    WeightEntry((f"{_MLP}.dense_4h_to_h.bias",), f"{_DEC}.mlp.linear_fc2.bias", REPLICATED),
    WeightEntry(("gpt_neox.final_layer_norm.weight",), "decoder.final_layernorm.weight", REPLICATED),
    WeightEntry(("gpt_neox.final_layer_norm.bias",), "decoder.final_layernorm.bias", REPLICATED),
    # Pythia is untied; the embedding stands in only for a tied model or a reward model (no lm head).
    WeightEntry(("embed_out.weight",), "output_layer.weight", VOCAB, tied_to="gpt_neox.embed_in.weight"),
    # Buffers of older checkpoints: the causal mask and rotary frequencies are recomputed.
    WeightEntry((f"{_ATTN}.bias",), None),
    WeightEntry((f"{_ATTN}.masked_bias",), None),
    WeightEntry((f"{_ATTN}.rotary_emb.inv_freq",), None),
    WeightEntry(("gpt_neox.rotary_emb.inv_freq",), None),
)

# The Falcon spec's norms are TE modules of their own, so NeMo may request their extra state too.
EXTRA_STATE = TE_EXTRA_STATE + (f"{_DEC}.input_layernorm", f"{_DEC}.pre_mlp_layernorm")


def _rope(cfg: dict) -> dict:
    return cfg.get("rope_parameters") or {}


def _rotary_pct(cfg: dict) -> float:
    """transformers 5 keeps it in rope_parameters.partial_rotary_factor, 4.x as rotary_pct (default 0.25)."""
    return float(_rope(cfg).get("partial_rotary_factor", cfg.get("rotary_pct", 0.25)))


def _rotary_base(cfg: dict) -> float:
    return float(_rope(cfg).get("rope_theta", cfg.get("rotary_emb_base", cfg.get("rope_theta", 10000.0))))


def _put_rope(key: str, legacy: str):
    """Writes a rotary value where transformers 5 (rope_parameters) and 4.x (top level) both read it."""

    def put(cfg: dict, value) -> None:
        cfg["rope_parameters"] = {"rope_type": "default", **_rope(cfg), key: value}
        cfg[legacy] = value

    return put


def _derived(cfg: dict, value) -> None:
    """GPT-NeoX's config has no such key: the value follows from the others."""


CONFIG_FIELDS = (
    ConfigField("num_hidden_layers", ("num_layers",)),
    ConfigField("hidden_size", ("hidden_size",)),
    ConfigField("intermediate_size", ("ffn_hidden_size",)),
    ConfigField("num_attention_heads", ("num_attention_heads",)),
    # Multi-head attention: one query group per head, head size H / heads.
    ConfigField("num_key_value_heads", ("num_query_groups",), read_hf=lambda c: c["num_attention_heads"],
                write_hf=_derived),
    ConfigField("head_dim", ("kv_channels",), read_hf=lambda c: c["hidden_size"] // c["num_attention_heads"],
                write_hf=_derived),
    ConfigField("max_position_embeddings", ("max_position_embeddings", "encoder_seq_length")),
    ConfigField("initializer_range", ("init_method_std",), read_hf=lambda c: c.get("initializer_range", 0.02)),
    ConfigField("layer_norm_eps", ("layernorm_epsilon",)),
    ConfigField("rotary_pct", ("rotary_percentage",), read_hf=_rotary_pct,
                write_hf=_put_rope("partial_rotary_factor", "rotary_pct")),
    ConfigField("rotary_emb_base", ("rotary_base",), read_hf=_rotary_base,
                write_hf=_put_rope("rope_theta", "rotary_emb_base")),
    ConfigField("vocab_size", ("override_vocab_size",)),
)

# HF settings the table above assumes: key -> probe returning (value found, value supported).
REQUIRED_HF = {
    # The sequential variant would need NeMo's non-parallel layer: not converted.
    "use_parallel_residual": lambda c: (bool(c.get("use_parallel_residual", True)), True),
    "hidden_act": lambda c: (c.get("hidden_act", "gelu"), "gelu"),
    "attention_bias": lambda c: (bool(c.get("attention_bias", True)), True),
    "rope type": lambda c: (rope_type(c), "default"),
}

# model_config.yaml values implied by the family (on top of megatron_falcon_config.yaml).
FIXED_NEMO = {
    "name": "megatron_falcon_gpt",
    "mcore_customization_config": {"new_decoder_architecture": True, "parallel_attention": True},
    "activation": "gelu",
    "normalization": "layernorm",
    "bias": True,
    "bias_activation_fusion": False,
    "position_embedding_type": "rope",
    "transformer_block_type": "pre_ln",
}


@register_family("GPTNeoXForCausalLM")
class GPTNeoX:
    model_type = "gpt_neox"
    reference_yaml = "megatron_falcon_config.yaml"
    weights = WEIGHTS
    config_fields = CONFIG_FIELDS
    required_hf = REQUIRED_HF
    fixed_nemo = FIXED_NEMO
    extra_state = EXTRA_STATE
