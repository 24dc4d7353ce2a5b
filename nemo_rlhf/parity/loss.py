"""Loss parity: one fixed batch of real data rows, the loss TRL trains on vs the loss NeMo trains on.

SFT and RM (`sft_rm_loss_parity`):

* TRL side: the small-scale rows (`aligner_format.build_trl_rows`: the very rows the TRL stages
  train on), batched by TRL's own collators (`DataCollatorForLanguageModeling` with labels -100
  outside the completion, as SFTTrainer builds them; `DataCollatorForPreference`), through the HF
  model: SFT `model(...).loss` (HF's ForCausalLMLoss, what SFTTrainer backpropagates with one
  micro-batch), RM the classifier's rewards and TRL's Bradley-Terry loss, accuracy and margin.
* NeMo side: the NeMo-Aligner data records (rendered from the same rows, or read from the files in
  `aligner_dir`) tokenized as NeMo does (`parity.data`), shifted as GPTSFTDataset shifts them, and
  run by megatron-core's GPTModel on the converted .nemo at TP (default 2) under gloo on CPU:
  megatron's vocab-parallel cross-entropy and NeMo's masked mean; NeMo-Aligner's reward at lengths-1.

Tolerances (`TOLERANCE_BASIS`): both sides compute in fp32 from the same weights, so what is left is
summation order (fused GEMMs, TP partial sums); the certificate bounds logits (and rewards) by
RELATIVE_TOLERANCE x max |HF output| (measured: 1e-6 relative at TP=2). A cross-entropy moves by at
most 2 x the largest logit change (log-softmax is 2-Lipschitz in the max norm), and a Bradley-Terry
loss or margin by at most 2 x the largest reward change, so the bounds are 2 x that logit (reward)
bound. Accuracy and the trained positions must be identical.

PPO (`ppo_parity`): the current policy's log-probs and critic's values of one fixed rollout, from the HF
models the TRL way and from megatron-core on their .nemo at TP the NeMo-Aligner way (`ppo_models`), each
side's numbers through its own PPO math (`ppo_math`) with the spec's TRL PPOConfig values and the
NeMo-Aligner keys of the rendered (or given) configs; `math_only` compares the formulations alone.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from nemo_rlhf.errors import UserError
from nemo_rlhf.parity import data as data_parity
from nemo_rlhf.parity.losses import bradley_terry, token_cross_entropy
from nemo_rlhf.parity.report import Check, ParityResult
from nemo_rlhf.spec.schema import PipelineSpec

TOLERANCE_BASIS = ("2 x certificate.RELATIVE_TOLERANCE (1e-5) x max(1, largest |HF logit or reward|): "
                   "cross-entropy and Bradley-Terry are 2-Lipschitz in the logits / rewards")


def _tolerance(reference: torch.Tensor) -> float:
    from nemo_rlhf.verify.certificate import RELATIVE_TOLERANCE

    return 2 * RELATIVE_TOLERANCE * max(1.0, float(reference.abs().max()))


def _pad(seqs: list[list[int]], value: int, width: int | None = None) -> torch.Tensor:
    width = width or max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out


# stage -> (what a row is, the spec key that adds rows, the spec key that sets the batch)
SOURCES = {"sft": ("examples", "data.sft.num_examples", "sft.micro_batch_size"),
           "rm": ("pairs", "data.preference.num_examples", "rm.micro_batch_size"),
           "ppo": ("prompts", "data.prompts.hh_rlhf / gsm8k", "ppo.rollout_batch_size (or --batch-size)")}


@dataclass
class Batch:
    """One fixed batch: the TRL rows and the NeMo-Aligner records made from (or written for) them."""

    trl_rows: list[dict]
    records: list[dict]


def fixed_batch(spec: PipelineSpec, tokenizer, stage: str, size: int, aligner_dir: Path | None = None,
                offset: int = 0) -> Batch:
    """`size` examples (RM: pairs) of the stage's training file, from row `offset` on."""
    from nemo_rlhf.data.aligner_format import build_trl_rows, read_records, to_records
    from nemo_rlhf.spec.paths import data_root

    name = f"{stage}_train"
    rows, _ = build_trl_rows(spec, data_root(spec.data.root), tokenizer)
    records = read_records(aligner_dir)[name] if aligner_dir else to_records(name, rows[name])
    per_row = 2 if stage == "rm" else 1
    available = min(len(rows[name]), len(records) // per_row) - offset
    if available < size:
        unit, source, size_key = SOURCES[stage]
        raise UserError(f"{size} {unit} needed, {name} has {max(available, 0)} (after dropping over-long ones)",
                        where=name, fix=f"raise {source}, or lower the steps / {size_key}")
    trl_rows = rows[name][offset:offset + size]
    return Batch(trl_rows, records[offset * per_row:(offset + size) * per_row])


# ----------------------------------------------------------------------------------------------- SFT

def sft_nemo_inputs(tokenizer, records: list[dict], prefix: str = "mb0") -> dict[str, torch.Tensor]:
    """A micro-batch as GPTSFTDataset hands it to the model: tokens = ids[:-1], labels = ids[1:],
    loss_mask = mask[1:]."""
    pairs = [data_parity.nemo_sft_tokens(tokenizer, r) for r in records]
    pad = tokenizer.pad_token_id
    return {f"{prefix}.tokens": _pad([ids[:-1] for ids, _ in pairs], pad),
            f"{prefix}.labels": _pad([ids[1:] for ids, _ in pairs], pad),
            f"{prefix}.loss_mask": _pad([m[1:] for _, m in pairs], 0)}


def sft_trl_side(model, tokenizer, rows: list[dict]) -> dict[str, torch.Tensor]:
    """TRL's SFT loss of one micro-batch and its per-token CE, in NeMo's shifted coordinates."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    examples = [{"input_ids": list(r["input_ids"]),  # SFTTrainer's build_labels: -100 outside the completion
                 "labels": [t if m else -100 for t, m in zip(r["input_ids"], r["completion_mask"])]} for r in rows]
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(examples)
    with torch.no_grad():
        out = model(**batch)
    labels = batch["labels"][:, 1:]
    return {"loss": out.loss.float(), "token_ce": token_cross_entropy(out.logits[:, :-1], labels),
            "mask": labels != -100, "tokens": batch["input_ids"][:, :-1], "logits_max": out.logits.abs().max()}


def _aligned(a: torch.Tensor, b: torch.Tensor, fill=0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad two [B, *] tensors to the same width."""
    width = max(a.shape[1], b.shape[1])
    grow = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill)  # noqa: E731
    return grow(a), grow(b)


def sft_checks(trl: dict, nemo_inputs: dict, mcore: dict, mb: int = 0) -> list[Check]:
    """TRL's side of micro-batch `mb` against the worker's results for it."""
    tol = _tolerance(trl["logits_max"])
    trl_mask, nemo_mask = _aligned(trl["mask"], nemo_inputs[f"mb{mb}.loss_mask"].bool(), False)
    trl_ids, nemo_ids = _aligned(trl["tokens"], nemo_inputs[f"mb{mb}.tokens"])
    real = trl_mask | nemo_mask
    both = trl_mask & nemo_mask & (trl_ids == nemo_ids)
    ce_trl, ce_nemo = _aligned(trl["token_ce"], mcore[f"mb{mb}.token_ce"])
    nemo_loss = float(mcore["mb_loss"][mb])
    checks = [
        Check.within("sft/token_ids", int(((trl_ids != nemo_ids) & real).sum()), 0,
                     "input positions (of trained targets) whose token differs between TRL and NeMo"),
        Check.within("sft/loss_mask", int((trl_mask != nemo_mask).sum()), 0,
                     f"positions trained on one side only ({int(trl_mask.sum())} TRL, {int(nemo_mask.sum())} NeMo)"),
        Check.within("sft/token_ce", float((ce_trl - ce_nemo).abs()[both].max()) if both.any() else float("nan"),
                     tol, "per-token CE: HF logits vs megatron's vocab-parallel CE, on positions both train"),
        Check.within("sft/loss", abs(float(trl["loss"]) - nemo_loss), tol,
                     f"masked mean CE: TRL {float(trl['loss']):.6f}, NeMo {nemo_loss:.6f}",
                     trl=float(trl["loss"]), nemo=nemo_loss),
    ]
    gathered = mcore.get(f"mb{mb}.token_ce_gathered")  # the worker computes it at PP 1 only
    if gathered is not None:
        ce_gathered = _aligned(trl["token_ce"], gathered)[1]
        checks.append(Check.within("sft/vocab_parallel_ce", float((ce_gathered - ce_nemo).abs()[both].max())
                                   if both.any() else float("nan"), tol,
                                   "megatron's vocab-parallel CE vs CE of its gathered logits"))
    return checks


# ----------------------------------------------------------------------------------------------- RM

def rm_nemo_inputs(tokenizer, records: list[dict], prefix: str = "mb0") -> dict[str, torch.Tensor]:
    """A micro-batch as NeMo-Aligner's reward model takes it: chosen then rejected on the batch axis, and lengths."""
    ids = [data_parity.nemo_text_to_ids(tokenizer, r["text"]) for r in records]
    ordered = ids[0::2] + ids[1::2]  # the file alternates chosen, rejected
    return {f"{prefix}.tokens": _pad(ordered, tokenizer.pad_token_id),
            f"{prefix}.lengths": torch.tensor([len(i) for i in ordered])}


def rm_trl_side(model, tokenizer, rows: list[dict]) -> dict[str, torch.Tensor]:
    """TRL RewardTrainer's rewards (chosen then rejected) and metrics for one micro-batch."""
    from trl.trainer.reward_trainer import DataCollatorForPreference

    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(
        [{"chosen_ids": list(r["chosen_ids"]), "rejected_ids": list(r["rejected_ids"])} for r in rows])
    with torch.no_grad():
        rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float().flatten()
    return {"rewards": rewards, "tokens": batch["input_ids"], **bradley_terry(*rewards.chunk(2))}


def rm_checks(trl: dict, nemo_inputs: dict, mcore: dict, mb: int = 0) -> list[Check]:
    """TRL's side of micro-batch `mb` against the worker's results for it."""
    ours = mcore[f"mb{mb}.rewards"].flatten()
    theirs = bradley_terry(*ours.chunk(2))
    tol = _tolerance(trl["rewards"])
    trl_ids, nemo_ids = _aligned(trl["tokens"], nemo_inputs[f"mb{mb}.tokens"])
    lengths = nemo_inputs[f"mb{mb}.lengths"]
    real = torch.arange(nemo_ids.shape[1])[None] < lengths[:, None]
    metric = lambda k: abs(float(trl[k]) - float(theirs[k]))  # noqa: E731
    return [
        Check.within("rm/token_ids", int(((trl_ids != nemo_ids) & real).sum()), 0,
                     "tokens of the chosen/rejected sequences that differ between TRL and NeMo"),
        Check.within("rm/rewards", float((trl["rewards"] - ours).abs().max()), tol,
                     "HF classifier (last non-pad token) vs NeMo-Aligner's rm_head at lengths-1",
                     trl=trl["rewards"].tolist(), nemo=ours.tolist()),
        Check.within("rm/loss", metric("loss"), 2 * tol, f"Bradley-Terry loss: TRL {float(trl['loss']):.6f}, "
                     f"NeMo {float(theirs['loss']):.6f}", trl=float(trl["loss"]), nemo=float(theirs["loss"])),
        Check.within("rm/accuracy", metric("accuracy"), 0.0, f"share of pairs ranked right: TRL "
                     f"{float(trl['accuracy']):.3f}, NeMo {float(theirs['accuracy']):.3f}"),
        Check.within("rm/margin", metric("margin"), 2 * tol, f"mean r_chosen - r_rejected: TRL "
                     f"{float(trl['margin']):.6f}, NeMo {float(theirs['margin']):.6f}"),
    ]


STAGES = {"sft": (sft_trl_side, sft_nemo_inputs, sft_checks), "rm": (rm_trl_side, rm_nemo_inputs, rm_checks)}


def sft_rm_loss_parity(spec: PipelineSpec, stage: str, *, hf_dir: Path | None = None, nemo_path: Path | None = None,
                       aligner_dir: Path | None = None, tp: int = 2, batch_size: int | None = None,
                       pp: int = 1) -> ParityResult:
    """Loss parity of the SFT or RM stage on one fixed batch (see the module doc)."""
    from nemo_rlhf.parity.megatron_launch import run_train_worker
    from nemo_rlhf.parity.models import load_hf, stage_models

    trl_side, nemo_inputs, checks = STAGES[stage]
    size = batch_size or getattr(spec, stage).micro_batch_size
    with tempfile.TemporaryDirectory(prefix="nemo-rlhf-parity-loss-") as tmp:
        models = stage_models(spec, stage, Path(tmp), hf_dir, nemo_path)
        batch = fixed_batch(spec, models.tokenizer, stage, size, aligner_dir)
        inputs = nemo_inputs(models.tokenizer, batch.records)
        run = run_train_worker(models.nemo_path, inputs, len(models.tokenizer), tp, stage, "loss", pp=pp)
        trl = trl_side(load_hf(models, stage), models.tokenizer, batch.trl_rows)
    result = ParityResult("loss", meta={"stage": stage, "tp": tp, "pp": pp, "batch": len(batch.trl_rows),
                                        "hf": str(hf_dir or "built from the spec"),
                                        "nemo": str(nemo_path or "converted by nemo-rlhf convert"),
                                        "aligner_data": str(aligner_dir or "rendered from the TRL rows"),
                                        "megatron_core": run.meta.get("megatron_core", ""),
                                        "tolerance": TOLERANCE_BASIS})
    if run.outputs is None:
        result.add(Check("megatron/run", False, detail=f"megatron-core failed:\n{run.tail}"))
        return result
    result.checks += checks(trl, inputs, run.outputs)
    return result


# ----------------------------------------------------------------------------------------------- PPO

def ppo_parity(spec: PipelineSpec, configs_dir: Path | None = None, seed: int | None = None,
               rollouts: Path | None = None, *, math_only: bool = False, policy_hf: Path | None = None,
               policy_nemo: Path | None = None, critic_hf: Path | None = None, critic_nemo: Path | None = None,
               tp: int = 2, batch_size: int | None = None, aligner_dir: Path | None = None,
               save_rollout: Path | None = None, pp: int = 1) -> ParityResult:
    """PPO loss parity: TRL's PPOConfig values (from the spec) vs the NeMo-Aligner keys of the rendered configs.

    By default on the models (`ppo_models`): the current policy's log-probs and the critic's values of a
    fixed rollout (`rollouts` with tokens, else sampled from the policy) from HF the TRL way and from
    megatron-core at `tp` the NeMo-Aligner way, each side's numbers through its own PPO math. With
    `math_only`, only the two formulations on the numbers of `rollouts` (or a seeded synthetic rollout).
    `save_rollout` writes the rollout used (with its tokens) for a later `rollouts`.
    """
    from dataclasses import fields

    from nemo_rlhf.parity.config import build_sides
    from nemo_rlhf.parity.ppo_math import NemoSettings, TRLSettings, ppo_loss_parity

    sides = build_sides(spec, configs_dir)
    trl = TRLSettings(**{f.name: sides.trl["ppo"][f.name] for f in fields(TRLSettings)})
    nemo = NemoSettings.from_configs(sides.nemo)
    seed = spec.seed if seed is None else seed
    if math_only:
        from nemo_rlhf.parity.rollout_file import read_rollout

        if save_rollout is not None:
            raise UserError("--save-rollout writes the tokens of a rollout the models ran on", where="--save-rollout",
                            fix="drop --math-only (or --save-rollout)")
        result = ppo_loss_parity(trl, nemo, read_rollout(rollouts) if rollouts else None, seed=seed)
        result.meta["rollouts"] = str(rollouts or f"synthetic (ppo_math.synthetic_rollout, seed {seed})")
    else:
        from nemo_rlhf.parity.ppo_math import trl_ppo
        from nemo_rlhf.parity.ppo_models import loss_tolerances, ppo_model_sides

        models = ppo_model_sides(spec, policy_hf=policy_hf, policy_nemo=policy_nemo, critic_hf=critic_hf,
                                 critic_nemo=critic_nemo, rollouts=rollouts, tp=tp, batch_size=batch_size, seed=seed,
                                 aligner_dir=aligner_dir, save_rollout=save_rollout, pp=pp)
        if models.nemo_rollout is None:
            result = ParityResult("loss", meta={"stage": "ppo", **models.meta})
            result.checks += models.checks
            return result
        tolerances = loss_tolerances(models.rollout, models.nemo_rollout, trl_ppo(models.rollout, trl),
                                     models.logprob_tol,
                                     models.value_tol, max(trl.cliprange_value, nemo.loss_clip_val))
        tempered = [] if spec.ppo.temperature == 1.0 else [
            f"log-prob temperature: TRL's log-probs are of logits / {spec.ppo.temperature}, NeMo-Aligner's of the "
            "raw logits (set ppo.temperature=1.0)"]
        result = ppo_loss_parity(trl, nemo, models.rollout, seed=seed, nemo_rollout=models.nemo_rollout,
                                 model_tolerance=tolerances, model_differences=tempered)
        result.meta.update(models.meta, model_tolerance=tolerances, tolerance=f"{result.meta['tolerance']}; models: "
                           f"{TOLERANCE_BASIS}; losses: + what that moves them by (ppo_models.loss_tolerances)")
        result.checks[:0] = models.checks
    result.meta["nemo_configs"] = str(configs_dir or "rendered from the spec")
    return result
