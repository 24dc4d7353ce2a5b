"""PPO loss parity: one fixed rollout batch through TRL 1.12's and NeMo-Aligner 0.7.0's PPO math.

Both formulations are written here from the frameworks' published code (read, not copied; the
line references are to trl 1.12.0 `trl/experimental/ppo/ppo_trainer.py` and NeMo-Aligner v0.7.0):

TRL (`PPOTrainer.train`, lines 757-798 and 823-847):
  * sequence_lengths = index of the last real response token; padding_mask = positions after it;
    padding_mask_p1 = positions more than one after it (763-769).
  * scores of responses without EOS lose `missing_eos_penalty` (757-759).
  * logprobs and ref logprobs are set to INVALID_LOGPROB (1.0) on padding, so the KL there is 0;
    values are zeroed beyond padding_mask_p1 (765-769).
  * kl = -logr (k1) or exp(logr) - 1 - logr (k3), logr = ref - logprob; reward = -kl_coef * kl, and
    the score is added at sequence_lengths + 1 when that is inside the response, else at the last
    token (773-779): one position AFTER the EOS, where the critic's value of the first padding
    token is kept and bootstraps GAE.
  * optional reward whitening over ~padding_mask_p1 without shifting the mean (782-784).
  * GAE over all positions without a mask (787-796); returns = advantages + values; advantages
    always whitened over ~padding_mask with the Bessel-corrected variance (`masked_whiten`,
    `masked_var(unbiased=True)`, 245-270), then zeroed on padding (797-798).
  * value loss 0.5 * masked_mean(max((v - R)^2, (clamp(v, V-c, V+c) - R)^2)) over ~padding_mask_p1;
    policy loss masked_mean(max(-A r, -A clamp(r, 1-e, 1+e))) over ~padding_mask (828-846).

NeMo-Aligner (`algorithms/ppo.py` generate_ppo_data 199-276, `utils/ppo_utils.py`,
`models/nlp/gpt/megatron_gpt_ppo_actor.py` 125-155, `megatron_gpt_critic.py` 160-178):
  * KL = logprob - init_logprob, absolute value when `use_absolute_kl` (ppo_utils.py:75-82).
  * rewards = score on the last response token (the EOS) minus penalty_factor * KL (ppo_utils.py:63-72).
  * mask = the response tokens including one EOS (ppo_utils.py:85-94); GAE with values and rewards
    multiplied by the mask, so nothing is bootstrapped after the EOS (ppo_utils.py:24-49).
  * `normalize_advantages`: (A - mean) * rsqrt(var + 1e-8) with the UNcorrected variance over the
    mask, global over data parallel ranks (ppo.py:270-275, utils/distributed.py:200-235).
  * actor loss masked_mean(max(-A r, -A clamp(r)), mask * is_end): responses that never produced an
    end string are left out of the policy loss (actor.py:132, 150).
  * critic loss 0.5 * masked_mean(max((V + clamp(v - V, -c, c) - R)^2, (v - R)^2), mask); with
    loss_clip_val 0 the unclipped loss (critic.py:168-178).

Differences no config can remove (score placement, the whitening variance, the is_end mask) are
`STRUCTURAL`: the NeMo formulation can bridge each one, and a quantity whose raw difference vanishes
once they are bridged is reported as explained. Everything else (KL estimator, coefficients,
whitening switched off on one side, clip values, the EOS penalty) is a configuration difference
and fails the check.

The TRL side is validated against TRL itself: `trl_source_reference` runs the very source lines of
`PPOTrainer.train` (located by marker lines, so a changed TRL says so) on the same batch, with
TRL's own `masked_whiten` / `masked_mean`.
"""

from __future__ import annotations

import inspect
import textwrap
from dataclasses import asdict, dataclass, fields, replace
from types import SimpleNamespace

import torch

from nemo_rlhf.parity.report import Check, ParityResult

INVALID_LOGPROB = 1.0  # trl ppo_trainer.py:69
ATOL = 1e-5  # fp32: GAE over ~50 tokens and whitening accumulate ~1e-6 rounding
RTOL = 1e-5


@dataclass(frozen=True)
class Rollout:
    """A fixed PPO rollout batch in response coordinates (B responses x T = response_length positions).

    Position t holds what both frameworks hold for response token t: its log-prob under the rollout
    policy and the reference, the critic's value of the state before it, and (for the loss) the
    current policy's log-prob and the current critic's value after some optimizer steps.
    """

    lengths: torch.Tensor  # (B,) real tokens of each response, EOS included
    ends_with_eos: torch.Tensor  # (B,) bool: the response produced the stop token
    logprobs: torch.Tensor  # (B, T) old (rollout) policy
    ref_logprobs: torch.Tensor  # (B, T) reference / initial policy
    values: torch.Tensor  # (B, T) old critic values
    scores: torch.Tensor  # (B,) reward-model scores
    new_logprobs: torch.Tensor  # (B, T) current policy (in the PPO epoch)
    new_values: torch.Tensor  # (B, T) current critic

    @property
    def token_mask(self) -> torch.Tensor:
        t = torch.arange(self.logprobs.shape[1])
        return t.unsqueeze(0) < self.lengths.unsqueeze(1)


def synthetic_rollout(batch: int = 8, response_length: int = 24, seed: int = 0, truncated: int = 1) -> Rollout:
    """A seeded rollout with realistic magnitudes: responses of varied length ending in EOS, `truncated`
    of them cut at response_length without EOS, a policy that drifted from the reference (KL ~0.05/token),
    an updated policy whose ratios reach past a 0.2 clip, an updated critic moving past a 0.2 value clip.
    """
    g = torch.Generator().manual_seed(seed)
    b, t = batch, response_length

    def normal(*shape, std=1.0, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    lengths = torch.randint(max(2, t // 4), t + 1, (b,), generator=g)
    ends = torch.ones(b, dtype=torch.bool)
    ends[:truncated] = False
    lengths[:truncated] = t
    logprobs = -normal(b, t, mean=1.2, std=1.0).abs()
    ref_logprobs = logprobs + normal(b, t, std=0.3)
    values = normal(b, t, mean=0.3, std=0.8)
    return Rollout(lengths=lengths, ends_with_eos=ends, logprobs=logprobs, ref_logprobs=ref_logprobs, values=values,
                   scores=normal(b, mean=0.5, std=1.5), new_logprobs=logprobs + normal(b, t, std=0.15),
                   new_values=values + normal(b, t, std=0.3))


@dataclass(frozen=True)
class TRLSettings:
    """The PPOConfig fields (trl 1.12) that enter the math."""

    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    whiten_rewards: bool = False
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    missing_eos_penalty: float | None = None

    @classmethod
    def from_config(cls, config) -> "TRLSettings":
        """Read the fields from a real `trl.experimental.ppo.PPOConfig`."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class NemoSettings:
    """The NeMo-Aligner 0.7.0 keys that enter the math (defaults: upstream gpt_ppo_actor/critic.yaml)."""

    initial_policy_kl_penalty: float = 0.01  # trainer.ppo
    use_absolute_kl: bool = True  # trainer.ppo
    discount_factor: float = 1.0  # trainer.ppo
    gae_lambda: float = 0.95  # trainer.ppo
    normalize_advantages: bool = True  # trainer.ppo
    ratio_eps: float = 0.2  # model.ppo (actor)
    loss_clip_val: float = 0.2  # model (critic)

    # where each field lives in the rendered configs
    KEYS = {
        "initial_policy_kl_penalty": ("ppo_actor", "trainer.ppo.initial_policy_kl_penalty"),
        "use_absolute_kl": ("ppo_actor", "trainer.ppo.use_absolute_kl"),
        "discount_factor": ("ppo_actor", "trainer.ppo.discount_factor"),
        "gae_lambda": ("ppo_actor", "trainer.ppo.gae_lambda"),
        "normalize_advantages": ("ppo_actor", "trainer.ppo.normalize_advantages"),
        "ratio_eps": ("ppo_actor", "model.ppo.ratio_eps"),
        "loss_clip_val": ("ppo_critic", "model.loss_clip_val"),
    }

    @classmethod
    def from_configs(cls, configs: dict) -> "NemoSettings":
        """Read the fields from rendered configs: {"ppo_actor": DictConfig, "ppo_critic": DictConfig}."""
        from omegaconf import OmegaConf

        values = {name: OmegaConf.select(configs[config], key) for name, (config, key) in cls.KEYS.items()}
        return cls(**values)


@dataclass(frozen=True)
class Bridges:
    """Switches that make the NeMo formulation behave like TRL where no config can (all off = NeMo-Aligner)."""

    unbiased_whitening: bool = False
    score_after_eos: bool = False
    train_unended: bool = False


STRUCTURAL = {
    "unbiased_whitening": "advantage whitening statistics: TRL's masked_whiten divides by the Bessel-corrected std "
                          "(ppo_trainer.py:245-270), NeMo-Aligner's normalize_tensor by the uncorrected one "
                          "(distributed.py:211-235): a factor sqrt(N/(N-1)), N = response tokens in the batch",
    "score_after_eos": "score placement: TRL adds the score one position after the EOS (ppo_trainer.py:778-779), on "
                       "the first padding token whose critic value is kept (padding_mask_p1) and enters GAE and the "
                       "value loss; NeMo-Aligner puts it on the EOS and bootstraps nothing after it "
                       "(ppo_utils.py:63-72, 24-49). Equal only with gamma = lam = 1 or responses that fill "
                       "response_length",
    "train_unended": "responses without a stop string: NeMo-Aligner leaves them out of the policy loss "
                     "(megatron_gpt_ppo_actor.py:132,150), TRL trains on them (and may lower their score with "
                     "missing_eos_penalty)",
}

# (TRL field, NeMo field, TRL value -> the NeMo value that means the same, why)
SETTING_PAIRS = (
    ("kl_coef", "initial_policy_kl_penalty", lambda v: v, "KL coefficient"),
    ("kl_estimator", "use_absolute_kl", {"k1": False}.get,
     "KL estimator: TRL k1 = log pi - log ref = NeMo use_absolute_kl False; TRL k3 has no NeMo form, NeMo |k1| no "
     "TRL form"),
    ("gamma", "discount_factor", lambda v: v, "discount"),
    ("lam", "gae_lambda", lambda v: v, "GAE lambda"),
    ("cliprange", "ratio_eps", lambda v: v, "policy ratio clip"),
    ("cliprange_value", "loss_clip_val", lambda v: v, "value clip (NeMo: 0 = unclipped)"),
    (None, "normalize_advantages", lambda v: True, "advantage whitening: TRL always whitens"),
    ("whiten_rewards", None, lambda v: False, "reward whitening: NeMo-Aligner has none (only fixed "
                                              "reward_standardization)"),
    ("missing_eos_penalty", None, lambda v: None, "EOS penalty: NeMo-Aligner has none"),
)


def setting_differences(trl: TRLSettings, nemo: NemoSettings) -> list[str]:
    """The configuration differences between the two sides, one sentence each (empty = aligned)."""
    out = []
    for trl_key, nemo_key, same, why in SETTING_PAIRS:
        trl_value = getattr(trl, trl_key) if trl_key else None
        if nemo_key is None:
            if trl_value != same(trl_value):
                out.append(f"{why}: TRL {trl_key}={trl_value!r}")
            continue
        nemo_value = getattr(nemo, nemo_key)
        if nemo_value != same(trl_value):
            trl_text = f"TRL {trl_key}={trl_value!r}" if trl_key else "TRL (always)"
            out.append(f"{why}: {trl_text} vs NeMo {nemo_key}={nemo_value!r}")
    return out


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the mask; 0 for an empty mask (NeMo-Aligner's actor when no response ended: loss x 0)."""
    if not mask.any():
        return (x * 0).sum()
    return (x * mask).sum() / mask.sum()


def _whiten(x: torch.Tensor, mask: torch.Tensor, unbiased: bool, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the mask; the variance Bessel-corrected when `unbiased`."""
    mean = _masked_mean(x, mask)
    var = _masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out + mean if not shift_mean else out


def _gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimation backwards over positions; nothing is bootstrapped past the end."""
    steps = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(steps)):
        next_values = values[:, t + 1] if t < steps - 1 else 0.0
        last = rewards[:, t] + gamma * next_values - values[:, t] + gamma * lam * last
        advantages[:, t] = last
    return advantages


def _losses(r: Rollout, advantages, returns, old_values, policy_mask, value_mask, ratio_clip, value_clip):
    ratio = torch.exp(r.new_logprobs - r.logprobs)
    policy = torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - ratio_clip, 1 + ratio_clip))
    unclipped = (r.new_values - returns) ** 2
    if value_clip > 0:
        clipped = (old_values + torch.clamp(r.new_values - old_values, -value_clip, value_clip) - returns) ** 2
        value = torch.max(unclipped, clipped)
    else:
        value = unclipped
    return _masked_mean(policy, policy_mask), 0.5 * _masked_mean(value, value_mask)


def trl_ppo(r: Rollout, s: TRLSettings) -> dict[str, torch.Tensor]:
    """TRL 1.12's PPO quantities for one rollout (see the module docstring for the lines)."""
    steps = r.logprobs.shape[1]
    pos = torch.arange(steps).unsqueeze(0)
    last = (r.lengths - 1).unsqueeze(1)
    padding = pos > last
    padding_p1 = pos > last + 1
    scores = r.scores.clone()
    if s.missing_eos_penalty is not None:
        scores[~r.ends_with_eos] -= s.missing_eos_penalty
    logprobs = r.logprobs.masked_fill(padding, INVALID_LOGPROB)
    ref = r.ref_logprobs.masked_fill(padding, INVALID_LOGPROB)
    values = r.values.masked_fill(padding_p1, 0.0)
    log_ratio = ref - logprobs
    kl = -log_ratio if s.kl_estimator == "k1" else torch.exp(log_ratio) - 1 - log_ratio
    kl_penalty = s.kl_coef * kl
    rewards = -kl_penalty
    end = torch.where(last + 1 < steps, last + 1, last).squeeze(1)
    rewards[torch.arange(len(end)), end] += scores
    if s.whiten_rewards:
        rewards = _whiten(rewards, ~padding_p1, unbiased=True, shift_mean=False).masked_fill(padding_p1, 0.0)
    advantages = _gae(rewards, values, s.gamma, s.lam)
    returns = advantages + values
    whitened = _whiten(advantages, ~padding, unbiased=True).masked_fill(padding, 0.0)
    new_values = r.new_values.masked_fill(padding_p1, 0.0)
    policy_loss, value_loss = _losses(replace(r, new_values=new_values), whitened, returns, values,
                                      (~padding).float(), (~padding_p1).float(), s.cliprange, s.cliprange_value)
    return {"kl_penalty": kl_penalty, "rewards": rewards, "advantages": advantages, "returns": returns,
            "advantages_whitened": whitened, "policy_loss": policy_loss, "value_loss": value_loss,
            "value_mask": ~padding_p1}


def nemo_ppo(r: Rollout, s: NemoSettings, bridges: Bridges = Bridges()) -> dict[str, torch.Tensor]:
    """NeMo-Aligner 0.7.0's PPO quantities for one rollout; `bridges` switch structural differences to TRL's."""
    steps = r.logprobs.shape[1]
    mask = r.token_mask.float()
    last = r.lengths - 1
    if bridges.score_after_eos:
        score_at = torch.where(last + 1 < steps, last + 1, last)
        value_mask = (torch.arange(steps).unsqueeze(0) <= score_at.unsqueeze(1)).float()
    else:
        score_at, value_mask = last, mask
    kl = r.logprobs - r.ref_logprobs
    if s.use_absolute_kl:
        kl = kl.abs()
    if bridges.score_after_eos:
        kl = kl * mask  # TRL's KL is 0 on the padding position that carries the score
    kl_penalty = s.initial_policy_kl_penalty * kl
    scores = torch.zeros_like(r.values)
    scores[torch.arange(len(score_at)), score_at] = r.scores
    rewards = scores - kl_penalty
    values = r.values * value_mask
    advantages = _gae(rewards * value_mask, values, s.discount_factor, s.gae_lambda)
    returns = advantages + values
    whitened = _whiten(advantages, mask, unbiased=bridges.unbiased_whitening) if s.normalize_advantages \
        else advantages
    policy_mask = mask if bridges.train_unended else mask * r.ends_with_eos.float().unsqueeze(1)
    policy_loss, value_loss = _losses(r, whitened, returns, r.values, policy_mask, value_mask, s.ratio_eps,
                                      s.loss_clip_val)
    return {"kl_penalty": kl_penalty, "rewards": rewards * value_mask, "advantages": advantages, "returns": returns,
            "advantages_whitened": whitened, "policy_loss": policy_loss, "value_loss": value_loss,
            "value_mask": value_mask.bool()}


# ---------------------------------------------------------------------------------------------------------
# TRL itself: run the source lines of PPOTrainer.train on the same batch.

_TRL_BLOCKS = {
    # from the EOS penalty to the whitened advantages (ppo_trainer.py:757-798)
    "rollout": ("contain_eos_token = torch.any(", "advantages = torch.masked_fill(advantages, padding_mask, 0)"),
    # from the new log-probs to the combined loss (ppo_trainer.py:824-847)
    "loss": ("new_logprobs = torch.masked_fill(", "loss = pg_loss + args.vf_coef * vf_loss"),
}


class TRLSourceChanged(RuntimeError):
    """The marker lines of a TRL block are not in this TRL's PPOTrainer.train."""


def _trl_block(source: str, name: str) -> str:
    start, end = _TRL_BLOCKS[name]
    lines = source.splitlines()
    try:
        first = next(i for i, line in enumerate(lines) if line.strip().startswith(start))
        last = next(i for i in range(first, len(lines)) if lines[i].strip() == end)
    except StopIteration:
        raise TRLSourceChanged(f"PPOTrainer.train no longer has the lines {start!r} .. {end!r}") from None
    return textwrap.dedent("\n".join(lines[first:last + 1]))


def trl_source_reference(r: Rollout, s: TRLSettings, eos_id: int = 2, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """The same quantities computed by TRL's own source lines and utilities (trl 1.12.0).

    Builds the tensors TRL has at that point (post-processed responses with EOS and padding, sequence
    lengths from TRL's `first_true_indices`), then executes the located blocks of `PPOTrainer.train`
    with TRL's `masked_whiten` and `masked_mean`.

    Raises:
        TRLSourceChanged: the installed TRL's train loop does not contain the expected lines.
    """
    from trl.experimental.ppo import ppo_trainer as trl_ppo_module
    from trl.experimental.utils import first_true_indices

    steps = r.logprobs.shape[1]
    pos = torch.arange(steps).unsqueeze(0)
    last = (r.lengths - 1).unsqueeze(1)
    responses = torch.full(r.logprobs.shape, 5, dtype=torch.long)  # any ordinary token id
    responses[pos > last] = pad_id
    ended = r.ends_with_eos.unsqueeze(1) & (pos == last)
    responses[ended] = eos_id
    sequence_lengths = first_true_indices(responses == pad_id) - 1
    args = SimpleNamespace(**asdict(s))
    source = inspect.getsource(trl_ppo_module.PPOTrainer.train)
    ns = {"torch": torch, "INVALID_LOGPROB": trl_ppo_module.INVALID_LOGPROB,
          "masked_whiten": trl_ppo_module.masked_whiten, "masked_mean": trl_ppo_module.masked_mean,
          "args": args, "self": SimpleNamespace(args=args, processing_class=SimpleNamespace(eos_token_id=eos_id)),
          "postprocessed_responses": responses, "responses": responses, "scores": r.scores.clone(),
          "sequence_lengths": sequence_lengths, "logprobs": r.logprobs.clone(), "ref_logprobs": r.ref_logprobs.clone(),
          "values": r.values.clone()}
    exec(compile(_trl_block(source, "rollout"), "<trl PPOTrainer.train: rollout>", "exec"), ns)
    out = {"kl_penalty": -ns["non_score_reward"], "rewards": ns["rewards"], "returns": ns["returns"],
           "advantages_whitened": ns["advantages"]}
    batch = torch.arange(r.logprobs.shape[0])
    ns.update(micro_batch_inds=batch, new_logprobs=r.new_logprobs.clone(), context_length=1,
              vpred_temp=torch.cat([r.new_values, torch.zeros_like(r.new_values[:, :1])], 1).unsqueeze(-1),
              mb_values=ns["values"][batch], mb_return=ns["returns"][batch], mb_logprobs=ns["logprobs"][batch],
              mb_advantage=ns["advantages"][batch])
    # the loss block, on TRL's own rollout tensors (vpred_temp[:, context_length - 1 : -1] = new_values)
    exec(compile(_trl_block(source, "loss"), "<trl PPOTrainer.train: loss>", "exec"), ns)
    out.update(policy_loss=ns["pg_loss"], value_loss=ns["vf_loss"])
    return out


# ---------------------------------------------------------------------------------------------------------
# Comparison.

# (quantity, positions compared, what it is). "tokens": the response tokens (EOS included);
# "values": the positions either side's critic is trained on; None: a scalar.
QUANTITIES = (
    ("kl_penalty", "tokens", "kl coefficient x per-token KL estimate, subtracted from the reward"),
    ("rewards", "values", "per-token rewards: the score plus the KL penalty"),
    ("advantages", "tokens", "GAE advantages before whitening"),
    ("returns", "values", "GAE returns (advantages + values): the critic's targets"),
    ("advantages_whitened", "tokens", "advantages as the policy loss uses them"),
    ("policy_loss", None, "clipped surrogate policy loss"),
    ("value_loss", None, "clipped value loss, 0.5 x masked mean"),
)


def _diff(a: dict, b: dict, r: Rollout, quantity: str, where: str | None) -> tuple[float, float]:
    """(max |a - b| over the compared positions, max |a| there: the scale for the relative tolerance)."""
    x, y = a[quantity].float(), b[quantity].float()
    if where is None:
        return float((x - y).abs()), float(x.abs())
    mask = r.token_mask if where == "tokens" else a["value_mask"] | b["value_mask"]
    return float((x - y).abs()[mask].max()), float(x.abs()[mask].max())


def tolerance(scale: float) -> float:
    """fp32 tolerance for a quantity of magnitude `scale`."""
    return ATOL + RTOL * scale


def ppo_checks(r: Rollout, trl: TRLSettings, nemo: NemoSettings, strict: bool = False,
               nemo_rollout: Rollout | None = None, model_tolerance: dict[str, float] | None = None,
               model_differences: list[str] | None = None) -> list[Check]:
    """One check per quantity: TRL's formulation against NeMo-Aligner's on rollout `r`.

    With `nemo_rollout` (the same rollout with the NeMo side's own current log-probs and values, from
    megatron-core) the NeMo formulation runs on it, and `model_tolerance` adds, per quantity, how far
    the two models' fp32 difference can move it (see `ppo_models.loss_tolerances`); `model_differences`
    names settings that make the models' numbers differ (reported with the configuration differences).

    A quantity passes when (unless `strict`) its difference vanishes once the `STRUCTURAL` differences
    are bridged: the check's value is that residual, and `extra` keeps the raw difference and which
    structural differences explain it (a raw match with a residual left is two differences cancelling,
    and fails). `strict` judges the raw difference. Configuration
    differences (`setting_differences`) are never bridged: they fail, and the detail names them.
    """
    r_nemo = nemo_rollout if nemo_rollout is not None else r
    ours, theirs = trl_ppo(r, trl), nemo_ppo(r_nemo, nemo)
    everything = Bridges(**{name: True for name in STRUCTURAL})
    bridged = nemo_ppo(r_nemo, nemo, everything)
    without = {name: nemo_ppo(r_nemo, nemo, replace(everything, **{name: False})) for name in STRUCTURAL}
    config_diffs = setting_differences(trl, nemo) + (model_differences or [])
    checks = []
    for quantity, where, what in QUANTITIES:
        raw, scale = _diff(ours, theirs, r, quantity, where)
        residual, _ = _diff(ours, bridged, r, quantity, where)
        tol = tolerance(scale) + (model_tolerance or {}).get(quantity, 0.0)
        explained = [n for n, out in without.items() if raw > tol and _diff(ours, out, r, quantity, where)[0] > tol]
        value = raw if strict else residual  # not strict: TRL against NeMo made to behave like TRL
        if value <= tol and raw <= tol:
            detail = f"{what}: equal"
        elif value <= tol:
            detail = f"{what}: differs by {raw:.3g}, explained by: {', '.join(explained)}"
        else:
            # a raw match with a residual left is a coincidence of two differences cancelling in a mean
            detail = f"{what}: differs by {raw:.3g}" + ("" if strict else f" ({residual:.3g} once the structural "
                                                         "differences are bridged)")
            detail += f"; config differences: {'; '.join(config_diffs)}" if config_diffs else ""
        checks.append(Check.within(f"ppo/{quantity}", value, tol, detail, raw_max_diff=raw, structural=explained,
                                   trl=_summary(ours[quantity], r, where), nemo=_summary(theirs[quantity], r, where)))
    return checks


def _summary(x: torch.Tensor, r: Rollout, where: str | None) -> float:
    """A number to show for a quantity: the scalar itself, or the mean over the response tokens."""
    return float(x) if where is None else float(x[r.token_mask].float().mean())


def trl_source_checks(r: Rollout, trl: TRLSettings) -> list[Check]:
    """Our TRL formulation against TRL's own source lines on the same batch (`trl_source_reference`)."""
    try:
        reference = trl_source_reference(r, trl)
    except TRLSourceChanged as err:
        return [Check("trl_source/located", False, detail=str(err))]
    ours = trl_ppo(r, trl)
    checks = []
    for quantity in reference:
        diff = float((ours[quantity].float() - reference[quantity].float()).abs().max())
        scale = float(reference[quantity].abs().max())
        checks.append(Check.within(f"trl_source/{quantity}", diff, tolerance(scale),
                                   "our TRL formulation vs trl 1.12's PPOTrainer.train lines run on the same batch"))
    return checks


def ppo_loss_parity(trl: TRLSettings, nemo: NemoSettings, rollout: Rollout | None = None, *, seed: int = 0,
                    strict: bool = False, nemo_rollout: Rollout | None = None,
                    model_tolerance: dict[str, float] | None = None,
                    model_differences: list[str] | None = None) -> ParityResult:
    """The whole PPO loss parity result for two settings objects (a seeded synthetic rollout by default;
    `nemo_rollout` and `model_tolerance` as in `ppo_checks`)."""
    r = rollout if rollout is not None else synthetic_rollout(seed=seed)
    result = ParityResult("loss", meta={
        "stage": "ppo", "seed": seed, "strict": strict, "batch": list(r.logprobs.shape),
        "responses_without_eos": int((~r.ends_with_eos).sum()), "trl": asdict(trl),
        "nemo": {k: v for k, v in asdict(nemo).items()},
        "config_differences": setting_differences(trl, nemo) + (model_differences or []),
        "structural_differences": STRUCTURAL, "tolerance": f"{ATOL} + {RTOL} x max |TRL value|"})
    result.checks += trl_source_checks(r, trl)
    result.checks += ppo_checks(r, trl, nemo, strict, nemo_rollout, model_tolerance, model_differences)
    result.tables["ppo quantities"] = [
        {"quantity": c.name, "TRL": c.extra.get("trl"), "NeMo-Aligner": c.extra.get("nemo"),
         "raw max diff": c.extra.get("raw_max_diff"), "after structural bridges": c.value, "tolerance": c.tolerance,
         "explained by": ", ".join(c.extra.get("structural", []))} for c in result.checks if c.name.startswith("ppo/")]
    return result
