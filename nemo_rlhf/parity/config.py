"""Config parity: the spec's hyperparameters as TRL 1.12 arguments and as NeMo-Aligner 0.7.0 keys.

Two outputs, one `ParityResult`:

* the side-by-side table: every canonical key (spec.hyperparams.TABLE joined with NEMO_TABLE on the
  spec key) with the spec value, the TRL argument and the value TRL gets, the NeMo-Aligner key and
  the value the rendered config holds. A TRL or NeMo value that is not the spec's (after the table's
  conversion) is a failed check: one of the two launchers dropped or changed it.
* the semantic differences (`DIFFERENCES`): places where the same-named knob means different things.
  Each is judged on this spec's values as
  - `equivalent`: both sides compute the same thing here,
  - `configurable`: they differ now, and `how` says which setting aligns them (a failed check),
  - `incomparable`: no setting of either framework removes the difference; reported with its size,
    not judged (the check passes, its detail starts with "incomparable").

The TRL values come from the TRL config classes' own defaults overlaid with what the small-scale
stages pass (`hyperparams.trl_kwargs`); the NeMo values from the configs the renderer writes
(`slurm.aligner_config.build_config`) or, with `configs_dir`, from rendered YAML files on disk
(e.g. a run's `configs/` folder, possibly edited by hand).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from nemo_rlhf.errors import UserError
from nemo_rlhf.parity.report import Check, ParityResult
from nemo_rlhf.spec.hyperparams import NEMO_CONVERSIONS, NEMO_TABLE, TABLE, spec_value, trl_kwargs
from nemo_rlhf.spec.schema import PipelineSpec

EQUIVALENT, CONFIGURABLE, INCOMPARABLE = "equivalent", "configurable", "incomparable"
NEMO_CONFIGS = ("sft", "rm", "ppo_actor", "ppo_critic")
_TRL_STAGE_CONFIG = {"sft": ("trl", "SFTConfig"), "rm": ("trl", "RewardConfig"),
                     "ppo": ("trl.experimental.ppo", "PPOConfig")}


# ----------------------------------------------------------------------------------------- the two sides

@dataclass
class Sides:
    """What each framework will run with: TRL args per stage, NeMo-Aligner configs per rendered config."""

    spec: PipelineSpec
    trl: dict[str, dict[str, Any]]
    nemo: dict[str, DictConfig]

    def nemo_value(self, config: str, key: str) -> Any:
        """A NeMo key's value; interpolations NeMo resolves at run time are shown unresolved."""
        node: Any = self.nemo[config]
        for part in key.split("."):
            if not isinstance(node, (DictConfig, dict)) or part not in node:
                return None
            node = node._get_node(part) if isinstance(node, DictConfig) else node[part]
        if OmegaConf.is_config(node):
            return OmegaConf.to_container(node, resolve=False)
        value = node._value() if hasattr(node, "_value") else node
        return value


def trl_defaults(stage: str) -> dict[str, Any]:
    """The field defaults of trl 1.12's config class of a stage (SFTConfig, RewardConfig, PPOConfig)."""
    import importlib

    module, name = _TRL_STAGE_CONFIG[stage]
    cls = getattr(importlib.import_module(module), name)
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def rendered_configs(spec: PipelineSpec) -> dict[str, DictConfig]:
    """The four NeMo-Aligner configs as `nemo-rlhf slurm render` writes them (placeholder paths).

    The model's dimensions only size sequence lengths and paths, never a hyperparameter, so a spec
    whose dimensions are unknown here (a small-scale recipe) gets placeholder ones.
    """
    from nemo_rlhf.slurm import aligner_config
    from nemo_rlhf.slurm.preflight import stage_layouts
    from nemo_rlhf.spec.architectures import ModelDims, model_dims

    try:
        dims = model_dims(spec)
    except UserError:
        dims = ModelDims("llama", 1, 1, 1, 1, 1, 1, spec.sft.max_length, True)
    layouts = stage_layouts(spec)
    paths = aligner_config.StagePaths("<log_dir>", "<restore.nemo>", "<train.jsonl>", "<val.jsonl>")
    return {c: aligner_config.build_config(spec, c, layouts[aligner_config.CONFIG_LAYOUT[c]], dims, paths)
            for c in NEMO_CONFIGS}


def read_configs(configs_dir: Path) -> dict[str, DictConfig]:
    """Rendered configs from a folder holding sft.yaml, rm.yaml, ppo_actor.yaml, ppo_critic.yaml."""
    configs_dir = Path(configs_dir)
    missing = [f"{c}.yaml" for c in NEMO_CONFIGS if not (configs_dir / f"{c}.yaml").is_file()]
    if missing:
        raise UserError(f"no {', '.join(missing)} in {configs_dir}", where="--configs",
                        fix="point at the configs/ folder `nemo-rlhf slurm render` wrote")
    return {c: OmegaConf.load(configs_dir / f"{c}.yaml") for c in NEMO_CONFIGS}


def build_sides(spec: PipelineSpec, configs_dir: Path | None = None) -> Sides:
    trl = {stage: {**trl_defaults(stage), **trl_kwargs(spec, stage)} for stage in _TRL_STAGE_CONFIG}
    nemo = read_configs(configs_dir) if configs_dir else rendered_configs(spec)
    return Sides(spec, trl, nemo)


# ----------------------------------------------------------------------------------------- side by side

def _expected_nemo(spec: PipelineSpec, row) -> Any:
    value = spec_value(spec, row.spec_key)
    return NEMO_CONVERSIONS[row.convert](spec, row.spec_key, value) if row.convert and value is not None else value


def side_by_side(sides: Sides) -> tuple[list[dict], list[Check]]:
    """One row per (canonical key, NeMo config) and a check that each side holds the spec's value."""
    spec, rows, checks = sides.spec, [], []
    trl_rows = {f"{m.stage}.{m.canonical}": m for m in TABLE}
    nemo_rows: dict[str, list] = {}
    for row in NEMO_TABLE:
        nemo_rows.setdefault(row.spec_key, []).append(row)
    for key in dict.fromkeys([*trl_rows, *nemo_rows]):
        value = spec_value(spec, key)
        t = trl_rows.get(key)
        trl_value = sides.trl[t.stage].get(t.trl) if t else None
        for n in nemo_rows.get(key, [None]):
            nemo_value = sides.nemo_value(n.config, n.nemo) if n and n.nemo else None
            rows.append({"spec key": key, "spec value": value, "TRL arg": t.trl if t else "-",
                         "TRL value": trl_value, "NeMo key": f"{n.config}:{n.nemo}" if n and n.nemo else "-",
                         "NeMo value": nemo_value,
                         "note": "; ".join(x for x in (t.note if t else "", n.note if n else "") if x)})
            if t is not None and trl_value != value:
                checks.append(Check(f"config/trl/{key}", False, detail=f"TRL {t.trl}={trl_value!r}, spec {value!r}"))
            expected = _expected_nemo(spec, n) if n and n.nemo else None
            if n and n.nemo and value is not None and nemo_value != expected:
                checks.append(Check(f"config/nemo/{n.config}/{key}", False,
                                    detail=f"NeMo {n.nemo}={nemo_value!r}, the spec says {expected!r}",
                                    extra={"fix": f"set {n.nemo}: {expected!r} in {n.config}.yaml"}))
    checks.append(Check("config/keys", not checks, detail=f"{len(rows)} canonical keys carried to TRL and NeMo-Aligner"
                        if not checks else "some keys do not carry the spec's value (see the checks above)"))
    return rows, checks


# ----------------------------------------------------------------------------------------- differences

@dataclass(frozen=True)
class Verdict:
    status: str
    trl: str
    nemo: str
    detail: str
    how: str = ""


@dataclass(frozen=True)
class Difference:
    """One semantic difference between the frameworks; `judge` rates it on a spec's actual values."""

    name: str
    what: str
    judge: Callable[[Sides], Verdict]


def _ppo(s: Sides, key: str) -> Any:
    return s.nemo_value("ppo_actor", key)


def _kl_estimator(s: Sides) -> Verdict:
    est, absolute = s.trl["ppo"]["kl_estimator"], _ppo(s, "trainer.ppo.use_absolute_kl")
    trl, nemo = f"kl_estimator={est}", f"use_absolute_kl={absolute}"
    if est == "k1" and absolute is False:
        return Verdict(EQUIVALENT, trl, nemo, "both penalise k1 = log pi - log ref per token")
    if est == "k3":
        return Verdict(INCOMPARABLE, trl, nemo, "TRL's k3 = exp(r) - 1 - r (r = log ref - log pi) has no NeMo-Aligner "
                       "form (it offers k1 and |k1|)", "use ppo.kl_estimator=k1 to make it comparable")
    return Verdict(CONFIGURABLE, trl, nemo, "NeMo-Aligner penalises |log pi - log ref| (upstream default), TRL the "
                   "signed k1: negative log ratios add reward in TRL, cost reward in NeMo",
                   "set trainer.ppo.use_absolute_kl: false in ppo_actor.yaml (the renderer does for k1)")


def _kl_coef(s: Sides) -> Verdict:
    trl, nemo = s.trl["ppo"]["kl_coef"], _ppo(s, "trainer.ppo.initial_policy_kl_penalty")
    defaults = "defaults differ: TRL PPOConfig.kl_coef 0.05, NeMo-Aligner initial_policy_kl_penalty 0.01"
    if trl == nemo:
        return Verdict(EQUIVALENT, f"kl_coef={trl}", f"initial_policy_kl_penalty={nemo}",
                       f"both {trl} from ppo.kl_coef ({defaults}); both fixed, no adaptive controller")
    return Verdict(CONFIGURABLE, f"kl_coef={trl}", f"initial_policy_kl_penalty={nemo}", defaults,
                   f"set trainer.ppo.initial_policy_kl_penalty: {trl} (ppo.kl_coef)")


def _logprob_temperature(s: Sides) -> Verdict:
    trl, nemo = s.trl["ppo"]["temperature"], _ppo(s, "model.ppo.sampling_params.temperature")
    texts = f"log-probs of logits / {trl} (sampling at {trl})", f"log-probs of raw logits (sampling at {nemo})"
    if trl == 1.0 and nemo == 1.0:
        return Verdict(EQUIVALENT, *texts, "both sample at temperature 1 and score the samples with the untempered "
                       "policy")
    return Verdict(CONFIGURABLE, *texts, "TRL divides the logits by temperature + 1e-7 for the rollout, reference and "
                   "training log-probs (PPOTrainer.train), so its KL and ratios are of the tempered policy; "
                   "NeMo-Aligner's from_parallel_logits_to_logprobs reads the raw logits whatever it samples at",
                   "set ppo.temperature=1.0 (the cluster recipes do)")


def _adv_whitening(s: Sides) -> Verdict:
    norm = _ppo(s, "trainer.ppo.normalize_advantages")
    if norm is True:
        return Verdict(EQUIVALENT, "always whitens advantages", "normalize_advantages=True",
                       "both whiten advantages over the batch's response tokens")
    return Verdict(CONFIGURABLE, "always whitens advantages", f"normalize_advantages={norm}",
                   "advantages whitened on the TRL side only", "set trainer.ppo.normalize_advantages: true")


def _whitening_variance(s: Sides) -> Verdict:
    tokens = s.spec.ppo.rollout_batch_size * s.spec.ppo.response_length
    factor = (tokens / max(tokens - 1, 1)) ** 0.5
    return Verdict(INCOMPARABLE, "masked_whiten: Bessel-corrected variance", "normalize_tensor: uncorrected variance",
                   f"whitened advantages differ by a factor sqrt(N/(N-1)) = {factor:.5f} at N <= {tokens} response "
                   "tokens per rollout (ppo_math.STRUCTURAL unbiased_whitening)")


def _reward_whitening(s: Sides) -> Verdict:
    whiten = s.trl["ppo"]["whiten_rewards"]
    std = s.nemo_value("ppo_critic", "model.reward_standardization.enable")
    trl, nemo = f"whiten_rewards={whiten}", f"reward_standardization.enable={std}"
    if not whiten and not std:
        return Verdict(EQUIVALENT, trl, nemo, "raw reward-model scores on both sides; neither clips rewards")
    if whiten:
        return Verdict(INCOMPARABLE, trl, nemo, "TRL whitens per-token rewards per batch; NeMo-Aligner only has a "
                       "fixed mean/std standardisation", "set ppo.whiten_rewards=false")
    return Verdict(CONFIGURABLE, trl, nemo, "NeMo standardises scores with a fixed mean/std, TRL does not",
                   "set model.reward_standardization.enable: false in ppo_critic.yaml")


def _value_clip(s: Sides) -> Verdict:
    trl, nemo = s.trl["ppo"]["cliprange_value"], s.nemo_value("ppo_critic", "model.loss_clip_val")
    if trl == nemo:
        return Verdict(EQUIVALENT, f"cliprange_value={trl}", f"loss_clip_val={nemo}",
                       "both 0.5 * max(unclipped, clipped) squared error around the rollout's values")
    return Verdict(CONFIGURABLE, f"cliprange_value={trl}", f"loss_clip_val={nemo}", "value clip differs",
                   f"set model.loss_clip_val: {trl} in ppo_critic.yaml")


def _vf_coef(s: Sides) -> Verdict:
    return Verdict(INCOMPARABLE, f"vf_coef={s.trl['ppo']['vf_coef']}: pg_loss + vf_coef * vf_loss, one optimizer",
                   "a separate critic with its own optimizer and lr",
                   "policy and value parameters are disjoint and Adam is invariant to a loss scale, so vf_coef mostly "
                   "acts through TRL's joint gradient clipping and Adam's eps; no NeMo key corresponds")


def _gae(s: Sides) -> Verdict:
    trl = (s.trl["ppo"]["gamma"], s.trl["ppo"]["lam"])
    nemo = (_ppo(s, "trainer.ppo.discount_factor"), _ppo(s, "trainer.ppo.gae_lambda"))
    text = lambda g, lam: f"gamma={g}, lam={lam}"  # noqa: E731
    if trl != nemo:
        return Verdict(CONFIGURABLE, text(*trl), text(*nemo), "GAE parameters differ",
                       f"set trainer.ppo.discount_factor: {trl[0]}, gae_lambda: {trl[1]}")
    if trl == (1.0, 1.0):
        return Verdict(EQUIVALENT, text(*trl), text(*nemo), "same GAE; with gamma = lam = 1 the score's placement "
                       "(after vs on the EOS) does not change any advantage")
    return Verdict(INCOMPARABLE, text(*trl), text(*nemo),
                   "same parameters, but TRL puts the score one position after the EOS and bootstraps the critic's "
                   "value there, NeMo-Aligner puts it on the EOS (ppo_math.STRUCTURAL score_after_eos): advantages "
                   "of responses shorter than response_length differ unless gamma = lam = 1")


def _ppo_batches(s: Sides) -> Verdict:
    p = s.spec.ppo
    trl = f"rollout {p.rollout_batch_size}, {p.num_mini_batches} mini batches, {p.ppo_epochs} epochs"
    nemo = (f"num_rollout_samples={_ppo(s, 'model.ppo.num_rollout_samples')}, "
            f"global_batch_size={_ppo(s, 'model.global_batch_size')}, one pass")
    mini = p.rollout_batch_size // max(p.num_mini_batches, 1)
    problems = []
    if p.ppo_epochs != 1:
        problems.append(f"ppo.ppo_epochs={p.ppo_epochs}: NeMo-Aligner makes one pass over each rollout")
    if _ppo(s, "model.global_batch_size") != mini:
        problems.append(f"parallel.ppo.global_batch_size={_ppo(s, 'model.global_batch_size')} but a TRL mini batch "
                        f"is {mini} samples")
    if problems:
        return Verdict(CONFIGURABLE, trl, nemo, "; ".join(problems),
                       f"set ppo.ppo_epochs=1 and parallel.ppo.global_batch_size={mini}")
    return Verdict(EQUIVALENT, trl, nemo, "same rollout size, optimizer steps per rollout and samples per step")


def _train_batches(stage: str) -> Callable[[Sides], Verdict]:
    def judge(s: Sides) -> Verdict:
        section, par = getattr(s.spec, stage), getattr(s.spec.parallel, stage)
        trl_global = section.micro_batch_size * section.grad_accum  # one CPU process
        unit = "pairs" if stage == "rm" else "sequences"
        trl = f"{section.micro_batch_size} x {section.grad_accum} accumulation = {trl_global} {unit}/step"
        nemo = f"global_batch_size={par.global_batch_size} {unit}/step (micro {par.micro_batch_size})"
        if trl_global != par.global_batch_size:
            return Verdict(CONFIGURABLE, trl, nemo, f"{unit} per optimizer step differ",
                           f"set parallel.{stage}.global_batch_size={trl_global} (or {stage}.grad_accum)")
        detail = "same samples per optimizer step"
        if stage == "sft" and section.grad_accum > 1:
            detail += ("; TRL averages tokens over the accumulated batch, NeMo averages the micro-batch token "
                       "means: equal only when micro batches hold equally many trained tokens")
        return Verdict(EQUIVALENT, trl, nemo, detail)

    return judge


def _lr_schedule(stage: str, config: str) -> Callable[[Sides], Verdict]:
    def judge(s: Sides) -> Verdict:
        sched = s.nemo_value(config, "model.optim.sched") or {}
        trl = (f"{s.trl[stage]['lr_scheduler_type']} decay to 0 over max_steps, warmup "
               f"{s.trl[stage].get('warmup_steps', 0)}")
        nemo = ", ".join(f"{k}={v}" for k, v in sched.items())
        return Verdict(INCOMPARABLE, trl, nemo, "transformers' schedulers have no CosineAnnealing with a min_lr "
                       "hold (constant_steps); the spec has no schedule key, so the lr follows different curves "
                       "after the first step", "by hand: TRL lr_scheduler_type=cosine_with_min_lr and NeMo "
                       "sched.constant_steps=0, warmup_steps equal")

    return judge


def _adam(stage: str, config: str) -> Callable[[Sides], Verdict]:
    def judge(s: Sides) -> Verdict:
        betas = s.nemo_value(config, "model.optim.betas")
        trl = [s.trl[stage]["adam_beta1"], s.trl[stage]["adam_beta2"]]
        if list(betas or []) == trl:
            return Verdict(EQUIVALENT, f"betas={trl}", f"betas={betas}", "same Adam moment decays")
        # The renderer writes the spec's betas, so a mismatch means hand-edited (or old) configs.
        return Verdict(CONFIGURABLE, f"betas={trl}", f"betas={betas}",
                       "Adam's moment decays differ (upstream NeMo-Aligner YAMLs use [0.9, 0.98])",
                       f"set model.optim.betas: {trl} in {config}.yaml (re-render: the spec's {stage}.adam_beta1/"
                       f"adam_beta2 give both sides)")

    return judge


def _grad_clip(stage: str, config: str) -> Callable[[Sides], Verdict]:
    def judge(s: Sides) -> Verdict:
        section = {"sft": "sft", "rm": "rm", "ppo_actor": "ppo", "ppo_critic": "ppo"}[config]
        clip = s.nemo_value(config, f"trainer.{section}.gradient_clip_val")
        trl = s.trl[stage]["max_grad_norm"]
        if clip == trl:
            return Verdict(EQUIVALENT, f"max_grad_norm={trl}", f"gradient_clip_val={clip}",
                           "both clip the global gradient norm")
        return Verdict(CONFIGURABLE, f"max_grad_norm={trl}", f"gradient_clip_val={clip}", "clip norms differ",
                       f"set trainer.{section}.gradient_clip_val: {trl} in {config}.yaml")

    return judge


def _missing_eos(s: Sides) -> Verdict:
    penalty = s.trl["ppo"]["missing_eos_penalty"]
    return Verdict(INCOMPARABLE, f"missing_eos_penalty={penalty}: trains on responses without EOS"
                   + (f", their score lowered by {penalty}" if penalty is not None else ""),
                   "responses without an end string are left out of the policy loss (is_end mask)",
                   "no setting of either side reproduces the other (ppo_math.STRUCTURAL train_unended); "
                   "the share of truncated responses decides how much it matters")


def _sft_truncation(s: Sides) -> Verdict:
    return Verdict(EQUIVALENT, "examples longer than max_length are dropped before training",
                   "GPTSFTDataset would truncate, but the data files hold only examples that fit",
                   "the NeMo-Aligner files are written from the same kept rows (`nemo-rlhf parity data`)")


def _spec_ties_embeddings(spec: PipelineSpec) -> bool | None:
    """Whether the small-scale model ties its input embedding and output layer (None: unknown here)."""
    from nemo_rlhf.spec.architectures import model_dims

    if spec.model.source == "random":
        return bool(spec.model.random.tie_word_embeddings)
    try:
        return bool(model_dims(spec).tie_word_embeddings)
    except UserError:
        return None


def _tied_embeddings(s: Sides) -> Verdict:
    # nemo_rlhf.convert.model_config writes share_embeddings_and_output_weights: False for every model (Aligner's
    # RM and critic request an output layer), copying a tied HF embedding into a separate output layer.
    tied = _spec_ties_embeddings(s.spec)
    nemo = "share_embeddings_and_output_weights=False (nemo-rlhf convert): two matrices"
    if tied is None:
        return Verdict(INCOMPARABLE, "unknown (model dimensions not in the spec)", nemo,
                       "set model.arch so the check knows whether the model ties its embeddings")
    if not tied:
        return Verdict(EQUIVALENT, "tie_word_embeddings=False", nemo, "both train separate embedding and output "
                       "matrices")
    return Verdict(CONFIGURABLE, "tie_word_embeddings=True: one matrix, both gradients", nemo,
                   "same logits, different training: megatron updates the embedding and the output layer apart "
                   "(measured by `parity curves --stage sft`: step-2 loss 1e-4 apart, 3e-3 by step 4 at lr 1e-3)",
                   "convert the SFT / actor model with share_embeddings_and_output_weights: True (no converter flag "
                   "yet), or untie the HF model before the TRL run")


def _rm_loss(s: Sides) -> Verdict:
    center = s.trl["rm"].get("center_rewards_coefficient")
    trl = f"-logsigmoid(r_c - r_r), mean over pairs; center_rewards_coefficient={center}"
    nemo = "-logsigmoid(r_c - r_r), mean over a micro batch's pairs"
    if center:
        return Verdict(CONFIGURABLE, trl, nemo, "TRL adds a reward-centering term", "leave center_rewards_coefficient "
                       "unset")
    return Verdict(EQUIVALENT, trl, nemo, "the same Bradley-Terry loss, reward read at the last real token")


DIFFERENCES: tuple[Difference, ...] = (
    Difference("model/tied_embeddings", "tied input embedding / output layer", _tied_embeddings),
    Difference("ppo/kl_estimator", "KL estimator", _kl_estimator),
    Difference("ppo/kl_coef", "KL coefficient", _kl_coef),
    Difference("ppo/logprob_temperature", "temperature of the log-probs", _logprob_temperature),
    Difference("ppo/advantage_whitening", "advantage whitening", _adv_whitening),
    Difference("ppo/whitening_variance", "whitening statistics", _whitening_variance),
    Difference("ppo/reward_whitening", "reward whitening / clipping", _reward_whitening),
    Difference("ppo/value_clip", "value loss clipping", _value_clip),
    Difference("ppo/vf_coef", "value loss weight", _vf_coef),
    Difference("ppo/gae", "GAE lambda and gamma, score placement", _gae),
    Difference("ppo/batches", "rollout vs training batch, PPO epochs", _ppo_batches),
    Difference("ppo/missing_eos", "EOS / truncation handling", _missing_eos),
    Difference("ppo/lr_schedule", "learning-rate schedule (actor)", _lr_schedule("ppo", "ppo_actor")),
    Difference("ppo/adam", "Adam betas (actor)", _adam("ppo", "ppo_actor")),
    Difference("ppo/adam_critic", "Adam betas (critic; TRL: the value head's shared optimizer)",
               _adam("ppo", "ppo_critic")),
    Difference("ppo/grad_clip", "gradient clipping (actor)", _grad_clip("ppo", "ppo_actor")),
    Difference("sft/batch", "samples per optimizer step", _train_batches("sft")),
    Difference("sft/truncation", "over-long examples", _sft_truncation),
    Difference("sft/lr_schedule", "learning-rate schedule", _lr_schedule("sft", "sft")),
    Difference("sft/adam", "Adam betas", _adam("sft", "sft")),
    Difference("sft/grad_clip", "gradient clipping", _grad_clip("sft", "sft")),
    Difference("rm/batch", "pairs per optimizer step", _train_batches("rm")),
    Difference("rm/loss", "Bradley-Terry loss", _rm_loss),
    Difference("rm/lr_schedule", "learning-rate schedule", _lr_schedule("rm", "rm")),
    Difference("rm/adam", "Adam betas", _adam("rm", "rm")),
    Difference("rm/grad_clip", "gradient clipping", _grad_clip("rm", "rm")),
)


def differences(sides: Sides) -> tuple[list[dict], list[Check]]:
    rows, checks = [], []
    for diff in DIFFERENCES:
        v = diff.judge(sides)
        rows.append({"difference": diff.name, "what": diff.what, "status": v.status, "TRL": v.trl,
                     "NeMo-Aligner": v.nemo, "detail": v.detail, "how to align": v.how})
        detail = f"{v.status}: {v.detail}" + (f" -> {v.how}" if v.how and v.status != EQUIVALENT else "")
        checks.append(Check(f"config/{diff.name}", v.status != CONFIGURABLE, detail=detail,
                            extra={"status": v.status, "trl": v.trl, "nemo": v.nemo, "how": v.how}))
    return rows, checks


def config_parity(spec: PipelineSpec, configs_dir: Path | None = None, spec_path: str = "") -> ParityResult:
    """The whole config parity result of a spec (NeMo side rendered from it, or read from `configs_dir`)."""
    sides = build_sides(spec, configs_dir)
    result = ParityResult("config", meta={"spec": spec_path, "nemo_configs": str(configs_dir) if configs_dir
                                          else "rendered from the spec (nemo-rlhf slurm render)",
                                          "statuses": {EQUIVALENT: "same computation for this spec",
                                                       CONFIGURABLE: "differs now; `how` aligns it (fails)",
                                                       INCOMPARABLE: "no setting removes it (reported, not judged)"}})
    table, key_checks = side_by_side(sides)
    diff_rows, diff_checks = differences(sides)
    result.checks += key_checks + diff_checks
    result.tables["hyperparameters"] = table
    result.tables["semantic differences"] = diff_rows
    return result
