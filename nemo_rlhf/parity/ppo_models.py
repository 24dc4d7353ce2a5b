"""PPO loss parity on the models: one fixed rollout, the current policy and critic run by both frameworks.

The rollout (prompt and response tokens, old and reference log-probs, old values, scores) is fixed:
read from `--rollouts` or built here (`build_rollout`). What each framework computes itself, from
its own model, is what PPO trains on in the epoch: the current policy's log-probs of the response
tokens and the critic's values.

* TRL side: the HF policy and value model through TRL 1.12's own `forward`, `get_reward` and
  `selective_log_softmax` on TRL's layout (prompts left-padded to one width, responses right-padded,
  pad tokens masked out, positions counted over real tokens), logits divided by temperature + 1e-7
  as PPOTrainer.train does.
* NeMo side: the .nemo of each (`nemo-rlhf convert`) in megatron-core's GPTModel at TP (default 2)
  under gloo, on NeMo-Aligner's layout (prompt and response in one right-padded row, positions
  0..S-1): log-probs are megatron's vocab-parallel CE of the next token with the sign flipped (what
  NeMo-Aligner's DistributedLogprob computes, raw logits), values the critic's `rm_head` at every
  position; response token t of row i sits at index prompt_length_i - 1 + t of both.

Then `ppo_math` runs TRL's formulation on the TRL side's numbers and NeMo-Aligner's on megatron's.
Tolerances: the models' numbers are bounded like the certificate's (`loss.TOLERANCE_BASIS`), and
the losses get what that bound can move them by (`loss_tolerances`).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from nemo_rlhf.errors import UserError
from nemo_rlhf.parity.ppo_math import Rollout
from nemo_rlhf.parity.report import Check
from nemo_rlhf.parity.rollout_file import RolloutTokens, read_token_rollout, save_token_rollout

# Seeded moves of the rollout-time numbers away from the current models' (built rollouts only): a policy and
# critic one PPO epoch further on, so ratios reach past a 0.2 clip and values past a 0.2 value clip; a
# reference the policy drifted from (KL ~0.05 per token). Same sizes as ppo_math.synthetic_rollout.
OLD_POLICY_STD, REFERENCE_STD, OLD_VALUE_STD = 0.15, 0.3, 0.3


# ------------------------------------------------------------------------------------------- the rollout

def _left_pad(prompts: list[list[int]], pad_id: int) -> torch.Tensor:
    width = max(len(p) for p in prompts)
    out = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        out[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
    return out


def sample_responses(policy, tokenizer, prompts: list[list[int]], response_length: int, temperature: float,
                     seed: int) -> tuple[RolloutTokens, torch.Tensor, torch.Tensor]:
    """Sample responses as TRL's rollout does (temperature + 1e-7, top_k 0, top_p 1), then end them.

    An untrained policy almost never samples the EOS, so responses that did not stop get an EOS at a
    seeded length in [response_length / 4, response_length) (as a trained policy stops), except the
    first, which stays truncated without one: both kinds are in every batch.

    Returns:
        (tokens, lengths: real response tokens with the EOS, ends_with_eos).
    """
    from transformers import GenerationConfig

    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    queries = _left_pad(prompts, pad)
    config = GenerationConfig(max_new_tokens=response_length, min_new_tokens=response_length,
                              temperature=temperature + 1e-7, top_k=0, top_p=1.0, do_sample=True,
                              pad_token_id=pad, eos_token_id=None)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        out = policy.generate(input_ids=queries, attention_mask=queries != pad, generation_config=config)
    responses = out[:, queries.shape[1]:]
    batch = len(prompts)
    lengths = torch.randint(max(2, response_length // 4), response_length, (batch,), generator=g)
    lengths[0] = response_length
    ends = torch.ones(batch, dtype=torch.bool)
    ends[0] = False
    for i in range(batch):
        hit = (responses[i] == eos).nonzero()
        if len(hit):  # the policy stopped by itself
            lengths[i], ends[i] = int(hit[0]) + 1, True
        elif ends[i]:
            responses[i, lengths[i] - 1] = eos
        responses[i, lengths[i]:] = pad
    tokens = RolloutTokens(queries, torch.tensor([len(p) for p in prompts]), responses)
    return tokens, lengths, ends


def hf_current(policy, critic, tokens: RolloutTokens, pad_id: int, temperature: float) -> dict[str, torch.Tensor]:
    """What TRL's training step computes from its models (trl 1.12 PPOTrainer.train, forward / get_reward).

    Returns per response position: logprobs at temperature (TRL's), logprobs_t1 (raw logits), values;
    and scores (the value model's get_reward at the last real token), logits_max.
    """
    from trl.experimental.ppo.ppo_trainer import forward
    from trl.experimental.utils import get_reward
    from trl.trainer.utils import selective_log_softmax

    query_responses, context = tokens.query_responses(), tokens.prompt_ids.shape[1]
    with torch.no_grad():
        logits = forward(policy, query_responses, pad_id).logits[:, context - 1:-1].float()
        full_value, scores, _ = get_reward(critic, query_responses, pad_id, context)
    return {"logprobs": selective_log_softmax(logits / (temperature + 1e-7), tokens.response_ids),
            "logprobs_t1": selective_log_softmax(logits, tokens.response_ids),
            "values": full_value[:, context - 1:-1].squeeze(-1).float(), "scores": scores.float(),
            "logits_max": logits.abs().max()}


def build_rollout(current: dict[str, torch.Tensor], lengths: torch.Tensor, ends: torch.Tensor, seed: int) -> Rollout:
    """A fixed rollout around the current models' numbers (see OLD_POLICY_STD); `new_*` are the TRL side's."""
    g = torch.Generator().manual_seed(seed + 1)
    noise = lambda std: torch.randn(current["values"].shape, generator=g) * std  # noqa: E731
    old = current["logprobs_t1"] + noise(OLD_POLICY_STD)
    return Rollout(lengths=lengths, ends_with_eos=ends, logprobs=old, ref_logprobs=old + noise(REFERENCE_STD),
                   values=current["values"] + noise(OLD_VALUE_STD), scores=current["scores"],
                   new_logprobs=current["logprobs"], new_values=current["values"])


# ------------------------------------------------------------------------------------------- the NeMo side

def megatron_current(policy_nemo: Path, critic_nemo: Path, tokens: RolloutTokens, pad_id: int, vocab_len: int,
                     tp: int, pp: int = 1) -> tuple[dict[str, torch.Tensor] | None, str, dict]:
    """megatron-core's log-probs (policy) and values (critic) of the response positions; (None, tail, {}) on failure."""
    from nemo_rlhf.parity.megatron_launch import run_train_worker

    rows = tokens.nemo_rows(pad_id)
    index = tokens.response_index()
    loss_mask = torch.zeros(rows[:, 1:].shape, dtype=torch.long).scatter_(1, index, 1)
    policy = run_train_worker(policy_nemo, {"mb0.tokens": rows[:, :-1], "mb0.labels": rows[:, 1:],
                                            "mb0.loss_mask": loss_mask}, vocab_len, tp, "sft", "loss", pp=pp)
    if policy.outputs is None:
        return None, f"policy:\n{policy.tail}", {}
    critic = run_train_worker(critic_nemo, {"mb0.tokens": rows}, vocab_len, tp, "critic", "loss", pp=pp)
    if critic.outputs is None:
        return None, f"critic:\n{critic.tail}", {}
    return {"logprobs": -policy.outputs["mb0.token_ce"].gather(1, index),
            "values": critic.outputs["mb0.values"].gather(1, index)}, "", policy.meta


# ------------------------------------------------------------------------------------------- checks

def loss_tolerances(r: Rollout, r_nemo: Rollout, trl_out: dict, logprob_tol: float, value_tol: float,
                    value_clip: float) -> dict[str, float]:
    """How far the models' fp32 differences (logprob_tol, value_tol) can move each loss.

    Policy: each token's term is -A r or -A clamp(r) (the max of the two moves by at most the larger
    move, the clamp moves less), r = exp(new - old); two log-probs within d give ratios within
    min(r, r') (e^d - 1), so the masked mean moves by at most the masked mean of |A| min(r, r') (e^d - 1).
    Value: 0.5 x^2 and 0.5 x'^2 with |x - x'| <= d differ by at most min(|x|, |x'|) d + d^2 / 2, x = v - R
    (clipped: the clamped residual, at most |v - R| + the clip). The smaller side's numbers are used so
    that a side far off (another model, tempered log-probs) cannot widen its own tolerance.
    """
    from nemo_rlhf.parity.losses import masked_token_mean

    ratio = torch.minimum(torch.exp(r.new_logprobs - r.logprobs), torch.exp(r_nemo.new_logprobs - r.logprobs))
    policy = masked_token_mean(trl_out["advantages_whitened"].abs() * ratio, r.token_mask)
    residual = torch.minimum((r.new_values - trl_out["returns"]).abs(),
                             (r_nemo.new_values - trl_out["returns"]).abs()) + value_clip
    value = masked_token_mean(residual * value_tol + value_tol ** 2 / 2, trl_out["value_mask"])
    return {"policy_loss": float(policy * (torch.exp(torch.tensor(logprob_tol)) - 1)), "value_loss": float(value)}


def model_checks(tokens: RolloutTokens, r: Rollout, hf: dict, mcore: dict, temperature: float,
                 logprob_tol: float, value_tol: float) -> list[Check]:
    """The two sides' model numbers on the rollout's response positions."""
    mask = r.token_mask
    value_positions = mask | (torch.arange(mask.shape[1]).unsqueeze(0) == r.lengths.unsqueeze(1))  # TRL: +1
    logprob_diff = float((hf["logprobs_t1"] - mcore["logprobs"]).abs()[mask].max())
    value_diff = float((hf["values"] - mcore["values"]).abs()[value_positions].max())
    tempered = float((hf["logprobs"] - hf["logprobs_t1"]).abs()[mask].max())
    return [
        Check.within("ppo/policy_logprobs", logprob_diff, logprob_tol,
                     "current policy's log-probs of the response tokens: HF (TRL's forward) vs megatron-core's "
                     "vocab-parallel CE on the .nemo"),
        Check.within("ppo/critic_values", value_diff, value_tol,
                     "critic values of the response positions (and the one after, which TRL trains): HF get_reward "
                     "vs megatron-core's rm_head at every position"),
        Check.within("ppo/logprob_temperature", tempered, logprob_tol,
                     f"TRL's training log-probs are of logits / {temperature} (+1e-7), NeMo-Aligner's of the raw "
                     "logits" + ("" if temperature == 1.0 else ": set ppo.temperature=1.0 to align them"),
                     temperature=temperature),
    ]


@dataclass
class ModelSides:
    tokens: RolloutTokens
    rollout: Rollout  # the TRL side's current numbers in new_*
    nemo_rollout: Rollout | None  # the NeMo side's; None when megatron failed
    checks: list[Check]
    logprob_tol: float
    value_tol: float
    meta: dict


def ppo_model_sides(spec, *, policy_hf: Path | None, policy_nemo: Path | None, critic_hf: Path | None,
                    critic_nemo: Path | None, rollouts: Path | None, tp: int, batch_size: int | None,
                    seed: int, aligner_dir: Path | None = None, save_rollout: Path | None = None,
                    pp: int = 1) -> ModelSides:
    """Both sides' current log-probs and values of one fixed rollout (module doc)."""
    from nemo_rlhf.parity import data as data_parity
    from nemo_rlhf.parity.loss import _tolerance, fixed_batch
    from nemo_rlhf.parity.models import load_hf, stage_models

    given = read_token_rollout(rollouts) if rollouts is not None else None  # bad files fail before any work
    with tempfile.TemporaryDirectory(prefix="nemo-rlhf-parity-ppo-") as tmp:
        policy = stage_models(spec, "sft", Path(tmp) / "policy", policy_hf, policy_nemo)
        critic = stage_models(spec, "rm", Path(tmp) / "critic", critic_hf, critic_nemo)
        tokenizer = policy.tokenizer
        pad = tokenizer.pad_token_id
        if pad is None or pad == tokenizer.eos_token_id:
            raise UserError(f"the policy's tokenizer pads with {pad!r}, its EOS is {tokenizer.eos_token_id}: TRL's "
                            "PPO masks pad tokens, so an EOS that is the pad token is never trained or scored",
                            where=str(policy.hf_dir), fix="give the tokenizer its own pad token (the pipeline's "
                                                          "base stage does)")
        if len(critic.tokenizer) != len(tokenizer):
            raise UserError(f"policy and critic tokenizers differ ({len(tokenizer)} vs {len(critic.tokenizer)} "
                            "tokens)", where="--critic", fix="pass the value model trained for this policy")
        hf_policy, hf_critic = load_hf(policy, "sft"), load_hf(critic, "rm")
        temperature = spec.ppo.temperature
        checks: list[Check] = []
        if given is not None:
            tokens = given[0]
            hf = hf_current(hf_policy, hf_critic, tokens, pad, temperature)
            rollout = replace(given[1], new_logprobs=hf["logprobs"], new_values=hf["values"])
            source = str(rollouts)
        else:
            size = batch_size or spec.ppo.rollout_batch_size
            batch = fixed_batch(spec, tokenizer, "ppo", size, aligner_dir)
            prompts = [list(r["input_ids"]) for r in batch.trl_rows]
            nemo_prompts = [data_parity.nemo_text_to_ids(tokenizer, r["text"]) for r in batch.records]
            differing = sum(a != b for a, b in zip(prompts, nemo_prompts))
            checks.append(Check.within("ppo/prompt_token_ids", differing, 0,
                                       "prompts whose TRL token ids differ from the NeMo-Aligner prompt file's"))
            tokens, lengths, ends = sample_responses(hf_policy, tokenizer, prompts, spec.ppo.response_length,
                                                     temperature, seed)
            hf = hf_current(hf_policy, hf_critic, tokens, pad, temperature)
            rollout = build_rollout(hf, lengths, ends, seed)
            source = f"sampled from the policy (seed {seed}); rollout-time numbers = current +- seeded noise"
        if save_rollout is not None:
            save_token_rollout(save_rollout, tokens, rollout)
        mcore, tail, meta = megatron_current(policy.nemo_path, critic.nemo_path, tokens, pad, len(tokenizer), tp,
                                             pp)
    logprob_tol, value_tol = _tolerance(hf["logits_max"]), _tolerance(hf["values"])
    info = {"policy": str(policy_hf or "built from the spec"), "critic": str(critic_hf or "built from the spec"),
            "tp": tp, "pp": pp, "rollouts": source, "megatron_core": meta.get("megatron_core", ""),
            "response_tokens": int(rollout.token_mask.sum())}
    if mcore is None:
        checks.append(Check("megatron/run", False, detail=f"megatron-core failed:\n{tail}"))
        return ModelSides(tokens, rollout, None, checks, logprob_tol, value_tol, info)
    checks += model_checks(tokens, rollout, hf, mcore, temperature, logprob_tol, value_tol)
    nemo_rollout = replace(rollout, new_logprobs=mcore["logprobs"], new_values=mcore["values"])
    return ModelSides(tokens, rollout, nemo_rollout, checks, logprob_tol, value_tol, info)
