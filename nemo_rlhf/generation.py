"""Batched generation, response log-probabilities and reward scores for evaluation.

Kept apart from the stages so the evaluation gate can score checkpoints the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass
class Generated:
    prompt_ids: list[int]
    response_ids: list[int]  # up to and including the first EOS
    text: str  # decoded response without special tokens
    finished: bool  # ended with EOS within the token budget


def compute_device() -> torch.device:
    """Where evaluation runs: the first GPU when there is one (as the TRL stages train), else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int,
    sample: bool,
    seed: int,
    desc: str = "generating",
    temperature: float = 1.0,
) -> list[Generated]:
    """Generate one response per prompt (token ids with the generation prompt applied).

    Greedy when `sample` is False; otherwise ancestral sampling at `temperature` (default 1)
    with no top-k/top-p, so log-ratio averages (from `response_logprobs` at the same
    temperature) are unbiased KL estimates.
    """
    torch.manual_seed(seed)
    model.eval()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    out: list[Generated] = []
    for batch in tqdm(list(_batches(prompts, batch_size)), desc=desc, leave=False):
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=model.device)
        options = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
        result = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
            **options,
        )
        for prompt, row in zip(batch, result[:, width:].tolist()):
            finished = eos in row
            response = row[: row.index(eos) + 1] if finished else row
            text = tokenizer.decode(response, skip_special_tokens=True)
            out.append(Generated(list(prompt), response, text, finished))
    return out


def _right_padded(seqs: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
    return ids, mask


@torch.no_grad()
def response_logprobs(
    model, items: list[Generated], pad: int, batch_size: int, temperature: float = 1.0
) -> list[float]:
    """Sum over response tokens of log p(token | prefix) under `model` (logits / `temperature`, as TRL's PPO)."""
    totals = []
    for batch in _batches(items, batch_size):
        ids, mask = _right_padded([g.prompt_ids + g.response_ids for g in batch], pad, model.device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        logprobs = torch.log_softmax(logits / temperature, dim=-1)
        token_lp = logprobs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        for row, g in enumerate(batch):
            start = len(g.prompt_ids) - 1  # logits at position t predict token t+1
            totals.append(token_lp[row, start : start + len(g.response_ids)].sum().item())
    return totals


@torch.no_grad()
def reward_scores(reward_model, items: list[Generated], pad: int, batch_size: int) -> list[float]:
    """The reward model's scalar for each prompt + response (read at the last real token)."""
    scores = []
    for batch in _batches(items, batch_size):
        ids, mask = _right_padded([g.prompt_ids + g.response_ids for g in batch], pad, reward_model.device)
        last = mask.sum(dim=1) - 1
        logits = reward_model(input_ids=ids, attention_mask=mask).logits  # [B, 1] at the last non-pad token
        if logits.dim() == 3:
            logits = logits[torch.arange(len(batch), device=last.device), last]
        scores += logits.squeeze(-1).float().tolist()
    return scores
