"""Llama family (Llama 2/3 layout, SmolLM2): GQA, RMSNorm, SwiGLU, rotary, optionally tied embeddings.

Megatron names are those of NeMo 2.1's TransformerEngine GPT spec; megatron-core's local spec
saves the same names (its input_layernorm / pre_mlp_layernorm map onto
`linear_qkv.layer_norm_weight` / `linear_fc1.layer_norm_weight` in sharded_state_dict), so one
table serves both `--layer-spec` values.
"""

from __future__ import annotations

from nemo_rlhf.convert.families import ConfigField, WeightEntry, register_family
from nemo_rlhf.convert.param_mapping import GATED_MLP, QKV, REPLICATED, ROW, VOCAB

_ATTN = "model.layers.{layer}.self_attn"
_MLP = "model.layers.{layer}.mlp"

WEIGHTS = (
    WeightEntry(("model.embed_tokens.weight",), "embedding.word_embeddings.weight", VOCAB),
    WeightEntry(("model.layers.{layer}.input_layernorm.weight",),
                "decoder.layers.self_attention.linear_qkv.layer_norm_weight", REPLICATED),
    WeightEntry((f"{_ATTN}.q_proj.weight", f"{_ATTN}.k_proj.weight", f"{_ATTN}.v_proj.weight"),
                "decoder.layers.self_attention.linear_qkv.weight", QKV),
    WeightEntry((f"{_ATTN}.o_proj.weight",), "decoder.layers.self_attention.linear_proj.weight", ROW),
    WeightEntry(("model.layers.{layer}.post_attention_layernorm.weight",),
                "decoder.layers.mlp.linear_fc1.layer_norm_weight", REPLICATED),
    WeightEntry((f"{_MLP}.gate_proj.weight", f"{_MLP}.up_proj.weight"), "decoder.layers.mlp.linear_fc1.weight",
                GATED_MLP),
    WeightEntry((f"{_MLP}.down_proj.weight",), "decoder.layers.mlp.linear_fc2.weight", ROW),
    WeightEntry(("model.norm.weight",), "decoder.final_layernorm.weight", REPLICATED),
    # NeMo always has an untied output layer (share_embeddings_and_output_weights: False, as NeMo's
    # own converter writes); a tied HF model saves no lm_head, so the embedding stands in.
    WeightEntry(("lm_head.weight",), "output_layer.weight", VOCAB, tied_to="model.embed_tokens.weight"),
    # Rotary inverse frequencies are recomputed from rope_theta; older checkpoints saved them.
    WeightEntry((f"{_ATTN}.rotary_emb.inv_freq",), None),
    WeightEntry(("model.rotary_emb.inv_freq",), None),
)

# Megatron modules whose `_extra_state` NeMo's TransformerEngine model requests on a strict load.
EXTRA_STATE = (
    "decoder.layers.self_attention.linear_qkv",
    "decoder.layers.self_attention.linear_proj",
    "decoder.layers.self_attention.core_attention",
    "decoder.layers.mlp.linear_fc1",
    "decoder.layers.mlp.linear_fc2",
    "decoder.final_layernorm",
)


def _rope_theta(cfg: dict) -> float:
    # transformers 5 writes rope_parameters; 4.x wrote rope_theta at the top level.
    params = cfg.get("rope_parameters") or {}
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _put_rope_theta(cfg: dict, value: float) -> None:
    params = dict(cfg.get("rope_parameters") or {"rope_type": "default"})
    params["rope_theta"] = value
    cfg["rope_parameters"] = params
    cfg["rope_theta"] = value  # what transformers 4.x (NeMo containers) reads


def _rope_type(cfg: dict) -> str:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    return params.get("rope_type", params.get("type", "default"))


CONFIG_FIELDS = (
    ConfigField("num_hidden_layers", ("num_layers",)),
    ConfigField("hidden_size", ("hidden_size",)),
    ConfigField("intermediate_size", ("ffn_hidden_size",)),
    ConfigField("num_attention_heads", ("num_attention_heads",)),
    ConfigField("num_key_value_heads", ("num_query_groups",),
                read_hf=lambda c: c.get("num_key_value_heads") or c["num_attention_heads"]),
    ConfigField("head_dim", ("kv_channels",),
                read_hf=lambda c: c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]),
    ConfigField("max_position_embeddings", ("max_position_embeddings", "encoder_seq_length")),
    ConfigField("initializer_range", ("init_method_std",), read_hf=lambda c: c.get("initializer_range", 0.02)),
    ConfigField("rms_norm_eps", ("layernorm_epsilon",)),
    ConfigField("rope_theta", ("rotary_base",), read_hf=_rope_theta, write_hf=_put_rope_theta),
    ConfigField("vocab_size", ("override_vocab_size",)),
)

# HF settings the table above assumes: key -> probe returning (value found, value supported).
REQUIRED_HF = {
    "hidden_act": lambda c: (c.get("hidden_act", "silu"), "silu"),
    "attention_bias": lambda c: (bool(c.get("attention_bias", False)), False),
    "mlp_bias": lambda c: (bool(c.get("mlp_bias", False)), False),
    "rope type": lambda c: (_rope_type(c), "default"),
}

# model_config.yaml values implied by the family (on top of the reference megatron_llama_config.yaml).
FIXED_NEMO = {
    "activation": "fast-swiglu",
    "normalization": "rmsnorm",
    "bias": False,
    "qkv_bias": False,
    "position_embedding_type": "rope",
    "rotary_percentage": 1.0,
}


@register_family("LlamaForCausalLM")
class Llama:
    model_type = "llama"
    reference_yaml = "megatron_llama_config.yaml"
    weights = WEIGHTS
    config_fields = CONFIG_FIELDS
    required_hf = REQUIRED_HF
    fixed_nemo = FIXED_NEMO
    extra_state = EXTRA_STATE
