"""Llama family (Llama 2/3 layout, SmolLM2): GQA, RMSNorm, SwiGLU, rotary, optionally tied embeddings.

Megatron names are those of NeMo 2.1's TransformerEngine GPT spec; megatron-core's local spec
saves the same names (its input_layernorm / pre_mlp_layernorm map onto
`linear_qkv.layer_norm_weight` / `linear_fc1.layer_norm_weight` in sharded_state_dict), so one
table serves both `--layer-spec` values.
"""

from __future__ import annotations

from nemo_rlhf.convert.families import WeightEntry, register_family
from nemo_rlhf.convert.families.rotary_decoder import CONFIG_FIELDS as ROTARY_CONFIG_FIELDS
from nemo_rlhf.convert.families.rotary_decoder import TE_EXTRA_STATE
from nemo_rlhf.convert.hf_rope import rope_type
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

EXTRA_STATE = TE_EXTRA_STATE
CONFIG_FIELDS = ROTARY_CONFIG_FIELDS

# HF settings the table above assumes: key -> probe returning (value found, value supported).
REQUIRED_HF = {
    "hidden_act": lambda c: (c.get("hidden_act", "silu"), "silu"),
    "attention_bias": lambda c: (bool(c.get("attention_bias", False)), False),
    "mlp_bias": lambda c: (bool(c.get("mlp_bias", False)), False),
    "rope type": lambda c: (rope_type(c), "default"),
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
