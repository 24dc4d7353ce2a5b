"""Stage `rm`: a Bradley-Terry reward model on hh-rlhf pairs with TRL's RewardTrainer.

The reward model is AutoModelForSequenceClassification with one label, initialised from
the SFT model (InstructGPT) or the base model (`rm.init_from`). Pairs reach TRL already
tokenized in the policy's chat template so the PPO stage scores responses in exactly the
format the RM was trained on.

`rm.exploit` plants a known flaw for the controlled reward-hacking experiment (e.g.
longer_wins: the longer answer always chosen); the manifest notes say so loudly. The gold
RM (stage gold_rm, `nemo_rlhf.stages.gold_rm`) trains through the same `train_reward_model`.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification
from trl import RewardConfig, RewardTrainer

from nemo_rlhf.data.examples import build_preference_rows
from nemo_rlhf.data.hh_rlhf import PreferencePair
from nemo_rlhf.data.lint import lint_preference, raise_if_issues
from nemo_rlhf.lineage.manifest import read_manifest
from nemo_rlhf.pipeline import data_plan
from nemo_rlhf.spec.paths import data_path
from nemo_rlhf.spec.schema import PipelineSpec
from nemo_rlhf.stages.base_model import MODEL_DIR
from nemo_rlhf.stages.training import (
    TRAIN_LOG,
    LogRecorder,
    chat_template_sha256,
    final_metrics,
    load_tokenizer,
    require_rows,
    require_same_template,
    save_curves,
    save_model,
    timed_train,
    torch_dtype,
    trainer_args,
)

CURVES = {
    "loss": ["loss"],
    "accuracy": ["accuracy"],
    "margin": ["margin"],
    "reward": ["min_reward", "mean_reward", "max_reward"],
}


def _pairs_dataset(rows: list[dict]) -> Dataset:
    return Dataset.from_list([{"chosen_ids": r["chosen_ids"], "rejected_ids": r["rejected_ids"]} for r in rows])


class RewardModelStage:
    name = "rm"

    def parents(self, spec: PipelineSpec) -> tuple[str, ...]:
        return (spec.rm.init_from,)

    def config(self, spec: PipelineSpec) -> dict:
        return {"rm": asdict(spec.rm), "data.preference": asdict(spec.data.preference), "seed": spec.seed}

    def input_files(self, spec: PipelineSpec, root: Path) -> list[Path]:
        return [data_path(root, spec.data.preference.path)]

    def run(self, ctx) -> dict:
        spec = ctx.spec
        pairs, report = data_plan.apply_rm_exploit(data_plan.rm_train_pairs(spec, ctx.data_root), spec.rm.exploit)
        if report:
            ctx.notes["EXPLOIT"] = {
                **report,
                "warning": f"THIS REWARD MODEL IS BROKEN ON PURPOSE (rm.exploit={spec.rm.exploit}): its training "
                "pairs were rewritten so the longer answer is always chosen. Use it only for the controlled "
                "reward-hacking experiment; never promote a policy trained against it.",
            }
            ctx.log(f"[rm] WARNING: rm.exploit={spec.rm.exploit}: {report['swapped']} pairs swapped so the longer "
                    f"answer wins, {report['dropped_ties']} ties dropped; this RM is broken on purpose")
        return train_reward_model(ctx, "rm", spec.rm, pairs, spec.seed)


def train_reward_model(ctx, stage: str, cfg, pairs: list[PreferencePair], seed: int) -> dict:
    """Bradley-Terry training of an RM from `cfg.init_from` on `pairs`; held-out accuracy after.

    Args:
        stage: the stage's name (rm or gold_rm), for logs and errors.
        cfg: the stage's section (`spec.rm` or `spec.gold_rm`): lr, steps, batch, max_length, eval_pairs.
        pairs: the training pairs, already chosen (and, for an exploit, rewritten).
        seed: seed of the init of the score head and of the data order.
    """
    spec, init = ctx.spec, ctx.parents[cfg.init_from]
    tokenizer = load_tokenizer(init / MODEL_DIR)
    require_same_template(stage, tokenizer, read_manifest(init)["notes"]["chat_template_sha256"], init.name)
    split = data_plan.preference_split(spec, ctx.data_root)
    rows, dropped = build_preference_rows(tokenizer, pairs, cfg.max_length)
    heldout, heldout_dropped = build_preference_rows(tokenizer, split.heldout, cfg.max_length,
                                                     limit=cfg.eval_pairs or None)
    require_rows(stage, rows, "pairs that fit max_length", f"raise {stage}.max_length or the number of pairs")
    raise_if_issues(stage, lint_preference(tokenizer, rows))
    ctx.notes.update(
        pairs=len(rows),
        pair_source_lines=[r["source_line"] for r in rows],
        dropped_too_long=dropped,
        heldout_pairs=len(heldout),
        heldout_dropped_too_long=heldout_dropped,
        parse_report=split.report,
        chat_template_sha256=chat_template_sha256(tokenizer),
        seed=seed,
    )
    ctx.log(f"[{stage}] {len(rows)} training pairs ({dropped} too long), {len(heldout)} held-out pairs")
    torch.manual_seed(seed)  # the score head is initialised when the model is built
    model = AutoModelForSequenceClassification.from_pretrained(init / MODEL_DIR, num_labels=1, dtype=torch_dtype(ctx))
    model.config.pad_token_id = tokenizer.pad_token_id
    recorder = LogRecorder(ctx.out / TRAIN_LOG)
    kwargs = {**trainer_args(ctx, "rm", section=cfg), "seed": seed, "data_seed": seed}
    args = RewardConfig(**kwargs, eval_strategy="no")
    trainer = RewardTrainer(
        model=model, args=args, train_dataset=_pairs_dataset(rows), processing_class=tokenizer, callbacks=[recorder]
    )
    timed_train(ctx, trainer)
    start = time.monotonic()
    trainer.evaluate(_pairs_dataset(heldout))
    ctx.notes["heldout_eval_seconds"] = round(time.monotonic() - start, 3)
    save_model(trainer.model, tokenizer, ctx.out / MODEL_DIR)
    save_curves(ctx, recorder.rows, CURVES, f"Reward model {stage} ({spec.name})")
    metrics = final_metrics(recorder.rows, ["loss", "accuracy", "margin", "train_loss", "train_runtime"])
    # RewardTrainer logs its evaluation as eval_*: on held-out pairs here.
    last = recorder.rows[-1]
    keys = [k for k in ("loss", "accuracy", "margin", "mean_reward") if f"eval_{k}" in last]
    metrics.update({f"heldout_{k}": last[f"eval_{k}"] for k in keys})
    return metrics
