"""Curve parity: N optimizer steps of SFT or RM with TRL and with megatron-core, from the same weights, data
order and hyperparameters; the per-step losses must agree.

* TRL side: the real `SFTTrainer` / `RewardTrainer` (trl 1.12) on the stage's first N x micro_batch
  rows, in order (`train_sampling_strategy="sequential"`), constant learning rate, no warmup,
  torch AdamW (not the fused kernel: megatron-core's CPU optimizer is torch's AdamW too) and no
  gradient clipping: megatron's clip_grad asserts CUDA tensors, so the megatron side runs with
  clip_grad=0 (FACTS.md) and TRL with max_grad_norm=0 to match.
* megatron side: `megatron_train_worker --mode train` at TP (default 2) on our conversion of the
  same HF weights: megatron's DDP, `get_megatron_optimizer`, NeMo's loss reduction, the NeMo-Aligner
  records of the same rows (or of the files in `aligner_dir`, in their order).

Tolerances (`STEP0_BASIS`, `CURVE_BASIS`): before the first update both sides hold the same weights, so
step 1's loss obeys the loss-parity bound. After it, any difference in the update moves the curves
apart; fp32 rounding amplified by Adam (early updates are ~ lr x gradient / |gradient|) stays at ~1e-6
here (RM; SFT with untied embeddings). Measured on the tiny recipe (init std 0.1, lr 1e-3, micro batch 2,
6 steps, TP=2, megatron-core 0.16.1):
  RM:  step 1 |diff| 1.2e-7, largest relative step-loss difference 3.0e-7;
  SFT: step 1 |diff| 9.5e-7, largest relative step-loss difference 2.8e-4..3.5e-4 (steps 3-4);
  a different data order moves step losses by ~1e-2 relative (SFT) and 5e-2..2e-1 (RM).
The SFT drift is NOT fp32 rounding: it is identical at TP=1 and TP=2 (1.087e-4 at step 2, 2.14e-3 at
step 3, 3.106e-3 at step 4, absolute), shrinks with the learning rate (lr 1e-4: <= 4.1e-4 absolute over
5 steps) and vanishes with untied embeddings (model.random.tie_word_embeddings=false: <= 6.7e-6 over 4
steps). Cause: our converter writes `share_embeddings_and_output_weights: False` (a copy of the tied
embedding as a separate output layer), so megatron trains two matrices where HF/TRL trains one: on
step 1 the embedding gradients differ by up to 0.097 (largest |gradient| 0.27), every vocabulary row.
Same logits, different training: `parity config` reports it (`model/tied_embeddings`) and results
here carry `tied_embeddings`.
CURVE_RTOL = 1e-4 sits ~150x above what equal updates give over these steps (RM 3e-7, untied SFT 6e-7
relative), 100x below what a wrong data order does, and below the tied-embedding drift (2.8e-4 by
step 3), which fails, as it should: it is a real difference. Long runs amplify rounding chaotically, so
the bound is for a few steps (the CLI's default is 4).
TRL's configs default to bf16=True (autocast on CPU too): the TRL side sets bf16=False, or step 1
alone differs by 4e-3 (RM) / 2e-4 (SFT).
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

import torch

from nemo_rlhf.parity.losses import bradley_terry
from nemo_rlhf.parity.report import Check, ParityResult
from nemo_rlhf.spec.schema import PipelineSpec

CURVE_RTOL = 1e-4
CURVE_MEASURED = ("measured over 4-6 steps: RM <= 3e-7, untied SFT <= 6e-7; tied SFT vs our untied .nemo 2.8e-4; "
                  "a shuffled order >= 1e-2")
STEP0_BASIS = "step 1 is computed before any update: the loss-parity bound (parity.loss.TOLERANCE_BASIS)"
CURVE_BASIS = f"{CURVE_RTOL:g} x max(1, |TRL loss|) per step ({CURVE_MEASURED})"
ADAM_EPSILON = 1e-8  # not a spec key: TRL's and megatron's default alike


def adam_settings(section) -> dict:
    """Adam's settings for both sides: the spec section's betas (canonical keys), the shared epsilon."""
    return {"adam_beta1": section.adam_beta1, "adam_beta2": section.adam_beta2, "adam_epsilon": ADAM_EPSILON}


def _trl_args(spec: PipelineSpec, stage: str, steps: int, out: Path) -> dict:
    section = getattr(spec, stage)
    return dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=section.micro_batch_size,
                gradient_accumulation_steps=1, learning_rate=section.lr, lr_scheduler_type="constant", warmup_steps=0,
                weight_decay=section.weight_decay, max_grad_norm=0.0, optim="adamw_torch", **adam_settings(section),
                logging_steps=1,
                train_sampling_strategy="sequential", report_to="none", save_strategy="no", seed=spec.seed,
                data_seed=spec.seed, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
                max_length=section.max_length, bf16=False, fp16=False)  # TRL's configs default to bf16=True


def trl_curve(spec: PipelineSpec, stage: str, steps: int, model, tokenizer, rows: list[dict], out: Path) -> list[dict]:
    """The TRL trainer's logged rows, one per step."""
    from datasets import Dataset

    from nemo_rlhf.stages.training import LogRecorder

    recorder = LogRecorder(out / "train_log.jsonl")
    if stage == "sft":
        from trl import SFTConfig, SFTTrainer

        data = Dataset.from_list([{"input_ids": r["input_ids"], "completion_mask": r["completion_mask"]} for r in rows])
        args = SFTConfig(**_trl_args(spec, stage, steps, out), completion_only_loss=True, packing=False)
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                             callbacks=[recorder])
    else:
        from trl import RewardConfig, RewardTrainer

        data = Dataset.from_list([{"chosen_ids": r["chosen_ids"], "rejected_ids": r["rejected_ids"]} for r in rows])
        args = RewardConfig(**_trl_args(spec, stage, steps, out), eval_strategy="no")
        trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                                callbacks=[recorder])
    with contextlib.redirect_stdout(sys.stderr):  # transformers prints each log row; stdout is for --json
        trainer.train()
    return [r for r in recorder.rows if "loss" in r]


def megatron_inputs(stage: str, tokenizer, records: list[dict], steps: int, micro_batch: int) -> dict:
    """Worker inputs: one micro-batch per step, in the records' order."""
    from nemo_rlhf.parity.loss import rm_nemo_inputs, sft_nemo_inputs

    make, per = (sft_nemo_inputs, 1) if stage == "sft" else (rm_nemo_inputs, 2)
    size = micro_batch * per
    inputs = {}
    for i in range(steps):
        inputs.update(make(tokenizer, records[i * size:(i + 1) * size], f"mb{i}"))
    return inputs


def curve_checks(stage: str, trl_rows: list[dict], mcore: dict, step0_tol: float) -> tuple[list[Check], list[dict]]:
    """Per-step comparison; the table of both curves."""
    trl_loss = torch.tensor([float(r["loss"]) for r in trl_rows])
    ours = mcore["step_loss"].float()
    n = min(len(trl_loss), len(ours))
    diff = (trl_loss[:n] - ours[:n]).abs()
    rel = diff / trl_loss[:n].abs().clamp(min=1.0)
    table = [{"step": i + 1, "TRL loss": float(trl_loss[i]), "megatron loss": float(ours[i]), "|diff|": float(diff[i])}
             for i in range(n)]
    checks = [Check.within(f"curves/{stage}/steps", abs(len(trl_loss) - len(ours)), 0,
                           f"{len(trl_loss)} TRL steps logged, {len(ours)} megatron steps"),
              Check.within(f"curves/{stage}/step1_loss", float(diff[0]), step0_tol, STEP0_BASIS),
              Check.within(f"curves/{stage}/loss", float(rel.max()), CURVE_RTOL,
                           f"max relative step-loss difference over {n} steps (worst at step {int(rel.argmax()) + 1})")]
    if stage == "rm":
        metrics = [bradley_terry(*r.chunk(2)) for r in mcore["step_rewards"][:n]]
        acc = max(abs(float(t["accuracy"]) - float(m["accuracy"])) for t, m in zip(trl_rows, metrics))
        checks.append(Check.within("curves/rm/accuracy", acc, 0.0, "per-step pair accuracy, TRL's log vs megatron"))
        for row, m in zip(table, metrics):
            row.update({"TRL accuracy": trl_rows[row["step"] - 1]["accuracy"],
                        "megatron accuracy": float(m["accuracy"])})
    return checks, table


def curve_parity(spec: PipelineSpec, stage: str, steps: int, *, tp: int = 2, pp: int = 1, hf_dir: Path | None = None,
                 nemo_path: Path | None = None, aligner_dir: Path | None = None,
                 report_dir: Path | None = None) -> ParityResult:
    """Train `steps` steps on both sides and compare the curves (see the module doc)."""
    from nemo_rlhf.parity.loss import _tolerance, fixed_batch
    from nemo_rlhf.parity.megatron_launch import run_train_worker
    from nemo_rlhf.parity.models import load_hf, stage_models

    section = getattr(spec, stage)
    with tempfile.TemporaryDirectory(prefix="nemo-rlhf-parity-curves-") as tmp:
        models = stage_models(spec, stage, Path(tmp), hf_dir, nemo_path)
        batch = fixed_batch(spec, models.tokenizer, stage, steps * section.micro_batch_size, aligner_dir)
        inputs = megatron_inputs(stage, models.tokenizer, batch.records, steps, section.micro_batch_size)
        adam = adam_settings(section)
        options = {"steps": steps, "micro-batches": 1, "lr": section.lr, "weight-decay": section.weight_decay,
                   "adam-beta1": adam["adam_beta1"], "adam-beta2": adam["adam_beta2"], "adam-eps": adam["adam_epsilon"]}
        run = run_train_worker(models.nemo_path, inputs, len(models.tokenizer), tp, stage, "train", options, pp=pp)
        model = load_hf(models, stage)
        tied = bool(getattr(model.config, "tie_word_embeddings", False)) and stage == "sft"
        trl_rows = trl_curve(spec, stage, steps, model, models.tokenizer, batch.trl_rows, Path(tmp))
    result = ParityResult("curves", meta={"stage": stage, "steps": steps, "tp": tp, "pp": pp, "lr": section.lr,
                                          "tied_embeddings": tied,
                                          "micro_batch": section.micro_batch_size, "tolerance": CURVE_BASIS,
                                          "aligner_data": str(aligner_dir or "rendered from the TRL rows")})
    if run.outputs is None:
        result.add(Check("megatron/run", False, detail=f"megatron-core failed:\n{run.tail}"))
        return result
    step0_tol = _tolerance(torch.tensor(float(trl_rows[0]["loss"])) if trl_rows else torch.tensor(1.0))
    checks, table = curve_checks(stage, trl_rows, run.outputs, step0_tol)
    result.checks += checks
    result.tables["curves"] = table
    result.meta["x_label"] = "optimizer step"
    result.meta["series"] = {"loss": {"nemo": [(r["step"], r["megatron loss"]) for r in table],
                                      "trl": [(r["step"], r["TRL loss"]) for r in table]}}
    return result
