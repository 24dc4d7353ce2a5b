"""Reward models: HF `*ForSequenceClassification` (one label) <-> NeMo-Aligner 0.7.0's reward-model .nemo.

A reward model is its family's language model plus a head; only the head differs, so it is
one more table row and a few config keys on top of the family (no family knows about it):

| HF | NeMo-Aligner | note |
|---|---|---|
| `score.weight` [1, H] | `model.rm_head.weight` [1, H] | mcore RowParallelLinear: TP splits dim 1 |
| (none) | `model.rm_head.bias` [1] | zeros on import; HF's score has no bias, so export refuses a non-zero one |
| (none) | `model.output_layer.weight` | Aligner builds and requests it (never uses it): a copy of the embedding |

Aligner stores the head in `force_head_dtype` (float32 here); export casts it back to the
dtype of the other weights, which is exact for weights that came from that dtype.

The reward is read at position `lengths - 1` (Aligner pads on the right; HF reads the last
token that is not `pad_token_id`: the same token whenever the text holds no pad token).
"""

from __future__ import annotations

import torch

from nemo_rlhf.convert.families import WeightEntry
from nemo_rlhf.convert.param_mapping import ROW
from nemo_rlhf.errors import UserError

POLICY, REWARD = "policy", "reward"
KINDS = (POLICY, REWARD)
# HF architecture suffix of each kind: Qwen2ForCausalLM <-> Qwen2ForSequenceClassification.
HF_SUFFIX = {POLICY: "ForCausalLM", REWARD: "ForSequenceClassification"}

SCORE = WeightEntry(("score.weight",), "rm_head.weight", ROW)
BIAS_KEY = "model.rm_head.bias"
HEAD_DTYPE = torch.float32
NEMO_TARGET = "nemo_aligner.models.nlp.gpt.megatron_gpt_reward_model.MegatronGPTRewardModel"

# model_config.yaml keys of a NeMo-Aligner 0.7.0 reward model, each as training_rm.yaml names it
# (serving reads reward_model_type, regression.num_attributes and force_head_dtype; the rest
# keep their defaults). float32 head: the certificate's tolerance is for fp32 weights.
NEMO_CONFIG = {
    "reward_model_type": "binary_ranking",
    "regression": {"num_attributes": 1, "merge_attributes": False, "attribute_weights": None,
                   "loss_mask_val": -100, "loss_func": "regression", "load_rm_head_weights": False},
    "output_sequence": False,
    "use_avg_pool": False,
    "force_head_dtype": "float32",
}


def split_architecture(architecture: str) -> tuple[str, str]:
    """("LlamaForSequenceClassification") -> ("LlamaForCausalLM", "reward"); causal LMs are policies."""
    suffix = HF_SUFFIX[REWARD]
    if architecture.endswith(suffix):
        return architecture[: -len(suffix)] + HF_SUFFIX[POLICY], REWARD
    return architecture, POLICY


def hf_architecture(family_name: str, kind: str) -> str:
    """The HF architecture of a family's policy or reward model."""
    return family_name[: -len(HF_SUFFIX[POLICY])] + HF_SUFFIX[kind] if kind == REWARD else family_name


def kind_of_nemo(nemo_cfg: dict) -> str:
    """A model_config.yaml with `reward_model_type` is a NeMo-Aligner reward model (or critic)."""
    return REWARD if "reward_model_type" in nemo_cfg else POLICY


def check_kind(detected: str, requested: str | None, where: str) -> str:
    """The kind to convert: what config.json says, which --kind may only confirm."""
    if requested not in (None, detected):
        fixes = {REWARD: "a reward model needs an AutoModelForSequenceClassification checkpoint (num_labels=1)",
                 POLICY: "drop --kind, or pass --kind reward for a *ForSequenceClassification checkpoint"}
        raise UserError(f"--kind {requested} but config.json describes a {detected} model", where=where,
                        fix=fixes[requested])
    return detected


def weight_rows(family_rows: tuple[WeightEntry, ...], kind: str) -> tuple[WeightEntry, ...]:
    """The family's table, plus the score row for a reward model."""
    return family_rows + (SCORE,) if kind == REWARD else family_rows


def check_num_labels(hf_cfg: dict, score_shape: tuple[int, ...], where: str) -> None:
    """Only one-label heads map onto binary_ranking; more labels would be Aligner's regression RM."""
    if score_shape[0] != 1:
        raise UserError(f"score.weight has {score_shape[0]} outputs (num_labels={len(hf_cfg.get('id2label') or {})})",
                        where=where, fix="convert a reward model with num_labels=1 (multi-attribute "
                        "regression heads are not supported yet)")


def zero_bias() -> torch.Tensor:
    """The rm_head bias NeMo-Aligner expects: HF's score layer has none, so it is zero."""
    return torch.zeros(1, dtype=HEAD_DTYPE)


def check_exportable_bias(bias: torch.Tensor, where: str) -> None:
    """HF's score layer has no bias: a trained, non-zero rm_head bias cannot be exported as is."""
    if bias.numel() != 1:
        raise UserError(f"rm_head has {bias.numel()} outputs", where=where,
                        fix="export reward models with regression.num_attributes=1 only")
    if bool(bias.ne(0).any()):
        raise UserError(f"rm_head.bias is {bias.tolist()}, but HF's score layer has no bias", where=where,
                        fix="a constant bias shifts every reward equally: retrain with the bias frozen at 0 "
                            "or set model.rm_head.bias to 0 (rewards then shift by that constant)")


def export_rows(family_rows: tuple[WeightEntry, ...], kind: str,
                prefix: str) -> tuple[tuple[WeightEntry, ...], frozenset[str]]:
    """(table to export through, checkpoint keys with no HF counterpart) for a kind.

    A reward model's output layer (the family row that may stand in for a tied lm_head) and
    its rm_head bias exist only for Aligner; HF's *ForSequenceClassification has neither.
    """
    if kind != REWARD:
        return family_rows, frozenset()
    output_layers = {prefix + row.megatron for row in family_rows if row.tied_to}
    return family_rows + (SCORE,), frozenset(output_layers | {BIAS_KEY})


def finish_hf(tensors: dict[str, torch.Tensor], hf_cfg: dict, dtype: torch.dtype) -> None:
    """The score head back in the model's dtype, and the one-label config HF's classifier needs."""
    name = SCORE.hf[0]
    tensors[name] = tensors[name].to(dtype)
    if len(hf_cfg.get("id2label") or {}) != 1:  # no source config: HF's default for num_labels=1
        hf_cfg["id2label"], hf_cfg["label2id"] = {"0": "LABEL_0"}, {"LABEL_0": 0}
