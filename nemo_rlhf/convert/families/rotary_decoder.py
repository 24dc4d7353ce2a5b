"""What the rotary, RMSNorm, SwiGLU decoder families (Llama, Qwen2) share.

A family file still owns its weight table and checks; the config translation and the list of
modules whose `_extra_state` NeMo requests are the same for these families, so they live once.
"""

from __future__ import annotations

from nemo_rlhf.convert.families import ConfigField
from nemo_rlhf.convert.hf_rope import put_rope_theta, rope_theta

# Megatron modules whose `_extra_state` NeMo's TransformerEngine model requests on a strict load.
TE_EXTRA_STATE = (
    "decoder.layers.self_attention.linear_qkv",
    "decoder.layers.self_attention.linear_proj",
    "decoder.layers.self_attention.core_attention",
    "decoder.layers.mlp.linear_fc1",
    "decoder.layers.mlp.linear_fc2",
    "decoder.final_layernorm",
)

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
    ConfigField("rope_theta", ("rotary_base",), read_hf=rope_theta, write_hf=put_rope_theta),
    # The rows are pinned (override_vocab_size), as NeMo's converters do: NeMo would otherwise
    # size the vocabulary from the tokenizer, which can be shorter than the embedding (Qwen2:
    # 151665 tokens, 151936 rows).
    ConfigField("vocab_size", ("override_vocab_size",)),
)
