"""The SFT and RM losses both frameworks train on, written once (the HF side and the megatron workers use them).

* SFT: masked token cross-entropy, sum(ce * mask) / sum(mask) over one micro-batch. TRL's SFTTrainer
  (labels -100 outside the completion, HF's ForCausalLMLoss) and NeMo's GPTSFTModel loss_func both
  reduce a micro-batch this way; across micro-batches TRL averages tokens of the accumulated batch,
  NeMo averages the micro-batch means (see parity.config, `sft/batch`).
* RM: Bradley-Terry, -log sigmoid(r_chosen - r_rejected) averaged over pairs, with the metrics TRL's
  RewardTrainer logs: accuracy (r_chosen > r_rejected) and mean margin.
"""

from __future__ import annotations

import torch


def masked_token_mean(token_loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(token_loss * mask) / sum(mask), in float32."""
    mask = mask.float()
    return (token_loss.float() * mask).sum() / mask.sum()


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy [B, S] of full-vocabulary logits [B, S, V] against labels [B, S] (any id
    where the mask is 0: positions are reduced by `masked_token_mean`, never by the labels)."""
    safe = labels.clamp(min=0, max=logits.shape[-1] - 1)
    return -logits.float().log_softmax(-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """Bradley-Terry loss and TRL's RewardTrainer metrics for paired rewards [P] (or [P, 1])."""
    chosen, rejected = chosen.float().flatten(), rejected.float().flatten()
    diff = chosen - rejected
    return {"loss": -torch.nn.functional.logsigmoid(diff).mean(), "accuracy": (diff > 0).float().mean(),
            "margin": diff.mean()}
