"""Qwen2 family (Qwen2 / Qwen2.5, e.g. Qwen2.5-0.5B): Llama's layout plus biases on q, k and v.

What differs from Llama, and why the table says so:

* q/k/v carry biases (HF hard-codes `bias=True`); NeMo's `qkv_bias: True` (mcore
  `add_qkv_bias`) gives `linear_qkv` a bias, stored per query group interleaved exactly like
  the weight, so the same QKV kind maps both (it carries trailing dims along, none for a bias);
* o_proj and the MLP have no bias (`bias: False`);
* sliding-window attention (`use_sliding_window`) has no NeMo equivalent: refused.

The base config is NeMo 2.1's megatron_qwen2_config.yaml (shipped in `reference/`), as NeMo's
own convert_qwen2_hf_to_nemo.py uses. Names are those of the TE spec; the local spec saves the
same keys (see llama.py).
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
    WeightEntry((f"{_ATTN}.q_proj.bias", f"{_ATTN}.k_proj.bias", f"{_ATTN}.v_proj.bias"),
                "decoder.layers.self_attention.linear_qkv.bias", QKV),
    WeightEntry((f"{_ATTN}.o_proj.weight",), "decoder.layers.self_attention.linear_proj.weight", ROW),
    WeightEntry(("model.layers.{layer}.post_attention_layernorm.weight",),
                "decoder.layers.mlp.linear_fc1.layer_norm_weight", REPLICATED),
    WeightEntry((f"{_MLP}.gate_proj.weight", f"{_MLP}.up_proj.weight"), "decoder.layers.mlp.linear_fc1.weight",
                GATED_MLP),
    WeightEntry((f"{_MLP}.down_proj.weight",), "decoder.layers.mlp.linear_fc2.weight", ROW),
    WeightEntry(("model.norm.weight",), "decoder.final_layernorm.weight", REPLICATED),
    # Qwen2.5-0.5B ties its embeddings and saves no lm_head; NeMo keeps an untied output layer
    # (as NeMo's converter writes), so the embedding stands in.
    WeightEntry(("lm_head.weight",), "output_layer.weight", VOCAB, tied_to="model.embed_tokens.weight"),
    WeightEntry((f"{_ATTN}.rotary_emb.inv_freq",), None),  # recomputed from rope_theta
    WeightEntry(("model.rotary_emb.inv_freq",), None),
)

EXTRA_STATE = TE_EXTRA_STATE
CONFIG_FIELDS = ROTARY_CONFIG_FIELDS

# HF settings the table above assumes: key -> probe returning (value found, value supported).
REQUIRED_HF = {
    "hidden_act": lambda c: (c.get("hidden_act", "silu"), "silu"),
    "use_sliding_window": lambda c: (bool(c.get("use_sliding_window", False)), False),
    "rope type": lambda c: (rope_type(c), "default"),
}

# model_config.yaml values implied by the family (on top of megatron_qwen2_config.yaml).
FIXED_NEMO = {
    "activation": "fast-swiglu",
    "normalization": "rmsnorm",
    "bias": False,
    "qkv_bias": True,
    "position_embedding_type": "rope",
    "rotary_percentage": 1.0,
}


@register_family("Qwen2ForCausalLM")
class Qwen2:
    model_type = "qwen2"
    reference_yaml = "megatron_qwen2_config.yaml"
    weights = WEIGHTS
    config_fields = CONFIG_FIELDS
    required_hf = REQUIRED_HF
    fixed_nemo = FIXED_NEMO
    extra_state = EXTRA_STATE
