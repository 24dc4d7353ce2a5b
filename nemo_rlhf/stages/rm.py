"""Stage `rm`: a Bradley-Terry reward model on hh-rlhf pairs with TRL's RewardTrainer.

The reward model is AutoModelForSequenceClassification with one label, initialised from
the SFT model (InstructGPT) or the base model (`rm.init_from`). Pairs reach TRL already
tokenized in the policy's chat template so the PPO stage scores responses in exactly the
format the RM was trained on.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from datasets import Dataset
from transformers import AutoModelForSequenceClassification
from trl import RewardConfig, RewardTrainer

from nemo_rlhf.data.examples import build_preference_rows
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
        spec, init = ctx.spec, ctx.parents[ctx.spec.rm.init_from]
        tokenizer = load_tokenizer(init / MODEL_DIR)
        require_same_template("rm", tokenizer, read_manifest(init)["notes"]["chat_template_sha256"], init.name)
        split = data_plan.preference_split(spec, ctx.data_root)
        rows, dropped = build_preference_rows(
            tokenizer, data_plan.rm_train_pairs(spec, ctx.data_root), spec.rm.max_length
        )
        heldout, heldout_dropped = build_preference_rows(
            tokenizer, split.heldout, spec.rm.max_length, limit=spec.rm.eval_pairs or None
        )
        require_rows("rm", rows, "pairs that fit rm.max_length", "raise rm.max_length or data.preference.num_examples")
        raise_if_issues("rm", lint_preference(tokenizer, rows))
        ctx.notes.update(
            pairs=len(rows),
            dropped_too_long=dropped,
            heldout_pairs=len(heldout),
            heldout_dropped_too_long=heldout_dropped,
            parse_report=split.report,
            chat_template_sha256=chat_template_sha256(tokenizer),
        )
        ctx.log(f"[rm] {len(rows)} training pairs ({dropped} too long), {len(heldout)} held-out pairs")
        model = AutoModelForSequenceClassification.from_pretrained(
            init / MODEL_DIR, num_labels=1, dtype=torch_dtype(ctx)
        )
        model.config.pad_token_id = tokenizer.pad_token_id
        recorder = LogRecorder(ctx.out / TRAIN_LOG)
        args = RewardConfig(**trainer_args(ctx, "rm"), eval_strategy="no")
        trainer = RewardTrainer(
            model=model, args=args, train_dataset=_pairs_dataset(rows), processing_class=tokenizer, callbacks=[recorder]
        )
        timed_train(ctx, trainer)
        start = time.monotonic()
        trainer.evaluate(_pairs_dataset(heldout))
        ctx.notes["heldout_eval_seconds"] = round(time.monotonic() - start, 3)
        save_model(trainer.model, tokenizer, ctx.out / MODEL_DIR)
        save_curves(ctx, recorder.rows, CURVES, f"Reward model ({spec.name})")
        metrics = final_metrics(recorder.rows, ["loss", "accuracy", "margin", "train_loss", "train_runtime"])
        # RewardTrainer logs its evaluation as eval_*: on held-out pairs here.
        last = recorder.rows[-1]
        metrics.update(
            {
                f"heldout_{k}": last[f"eval_{k}"]
                for k in ("loss", "accuracy", "margin", "mean_reward")
                if f"eval_{k}" in last
            }
        )
        return metrics
