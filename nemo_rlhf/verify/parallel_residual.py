"""The parallel-residual decoder layer (GPT-NeoX / Pythia) built from megatron-core's own modules.

megatron-core has no parallel-residual GPT spec; NeMo 2.1 runs such models through its Falcon
layer (`name: megatron_falcon_gpt`, `mcore_customization_config: {new_decoder_architecture:
True, parallel_attention: True}`). This layer computes what HF's GPT-NeoX computes with
`use_parallel_residual`:

    out = x + attention(input_layernorm(x)) + mlp(pre_mlp_layernorm(x))

Everything inside is megatron-core's: the layer is its TransformerLayer, built from its local
GPT spec (SelfAttention with ColumnParallelLinear / DotProductAttention / RowParallelLinear,
MLP, the torch-backed norm), so the weights still reach it through megatron's own
`sharded_state_dict` and `dist_checkpointing.load`. Only two things change: the forward, and
the key map. The local GPT spec saves its norms under the TE names (`linear_qkv.layer_norm_*`);
NeMo's Falcon spec has separate norm modules and no key map, so its checkpoint keys are
`decoder.layers.input_layernorm.*` / `decoder.layers.pre_mlp_layernorm.*`, and so are ours.

`linear_proj` and `linear_fc2` return their bias apart from their output (megatron builds
them with skip_bias_add); both biases are added here, as HF adds them. Switched by
`set_drop_output_biases`, they are left out instead, which is what NeMo 2.1's Falcon layer does
(it adds only the bias-free outputs to the residual): the certificate uses that to report how
far NeMo 2.1 itself would be from HF for the checkpoint at hand.
"""

from __future__ import annotations

import dataclasses

from nemo_rlhf.errors import UserError

FALCON_NAME = "megatron_falcon_gpt"


def is_parallel_residual(cfg: dict) -> bool:
    """True for a model_config.yaml that NeMo 2.1 runs with its parallel-attention Falcon layer.

    Raises:
        UserError: A Falcon config this verifier cannot build (one shared norm, or sequential).
    """
    if cfg.get("name") != FALCON_NAME:
        return False
    custom = cfg.get("mcore_customization_config") or {}
    if not (custom.get("new_decoder_architecture") and custom.get("parallel_attention")):
        raise UserError(f"mcore_customization_config {custom} is not supported by the verifier",
                        where="model_config.yaml",
                        fix="the verifier builds new_decoder_architecture: true, parallel_attention: true "
                            "(two norms, parallel attention and MLP: GPT-NeoX)")
    return True


def layer_spec(normalization: str):
    """megatron-core's local GPT layer spec, turned into the parallel-residual layer."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from nemo_rlhf.verify.megatron_compat import gpt_local_spec

    class ParallelResidualLayer(TransformerLayer):
        """out = x + attention(input_layernorm(x)) + mlp(pre_mlp_layernorm(x)), biases included."""

        drop_output_biases = False  # True: NeMo 2.1's Falcon semantics (see set_drop_output_biases)

        def forward(self, hidden_states, attention_mask=None, rotary_pos_emb=None, **kwargs):
            attn, attn_bias = self.self_attention(self.input_layernorm(hidden_states), attention_mask=attention_mask,
                                                  rotary_pos_emb=rotary_pos_emb)
            mlp, mlp_bias = self.mlp(self.pre_mlp_layernorm(hidden_states))
            out = hidden_states + attn + mlp
            if not self.drop_output_biases:
                out = out + sum(b for b in (attn_bias, mlp_bias) if b is not None)
            return out, kwargs.get("context")

    spec = gpt_local_spec(normalization)
    submodules = dataclasses.replace(spec.submodules, sharded_state_dict_keys_map={})
    return dataclasses.replace(spec, module=ParallelResidualLayer, submodules=submodules)


def set_drop_output_biases(model, drop: bool) -> None:
    """Switches every parallel-residual layer of `model` between HF's and NeMo 2.1's semantics."""
    for module in model.modules():
        if hasattr(type(module), "drop_output_biases"):
            module.drop_output_biases = drop
