"""Stage `sft`: supervised fine-tuning of the base model on GSM8K with TRL's SFTTrainer.

The examples reach TRL already tokenized (input_ids + completion_mask, built by
nemo_rlhf.data.examples from the model's chat template), so the lint checks exactly the
tokens and loss mask that are trained: loss on the assistant answer only.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

from nemo_rlhf.data.examples import build_sft_rows
from nemo_rlhf.data.lint import lint_sft, raise_if_issues
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
    "token accuracy": ["mean_token_accuracy"],
    "learning rate": ["learning_rate"],
    "grad norm": ["grad_norm"],
}


class SFTStage:
    name = "sft"

    def parents(self, spec: PipelineSpec) -> tuple[str, ...]:
        return ("base",)

    def config(self, spec: PipelineSpec) -> dict:
        return {"sft": asdict(spec.sft), "data.sft": asdict(spec.data.sft), "seed": spec.seed}

    def input_files(self, spec: PipelineSpec, root: Path) -> list[Path]:
        return [data_path(root, spec.data.sft.path)]

    def run(self, ctx) -> dict:
        spec, base = ctx.spec, ctx.parents["base"]
        tokenizer = load_tokenizer(base / MODEL_DIR)
        require_same_template("sft", tokenizer, read_manifest(base)["notes"]["chat_template_sha256"], "base")
        rows, dropped = build_sft_rows(tokenizer, data_plan.sft_problems(spec, ctx.data_root), spec.sft.max_length)
        require_rows("sft", rows, "examples that fit sft.max_length", "raise sft.max_length or data.sft.num_examples")
        raise_if_issues("sft", lint_sft(tokenizer, rows))
        ctx.notes.update(
            examples=len(rows),
            dropped_too_long=dropped,
            chat_template_sha256=chat_template_sha256(tokenizer),
            loss_tokens=sum(sum(r["completion_mask"]) for r in rows),
        )
        ctx.log(f"[sft] {len(rows)} GSM8K examples ({dropped} longer than {spec.sft.max_length} tokens dropped)")
        dataset = Dataset.from_list(
            [{"input_ids": r["input_ids"], "completion_mask": r["completion_mask"]} for r in rows]
        )
        model = AutoModelForCausalLM.from_pretrained(base / MODEL_DIR, dtype=torch_dtype(ctx))
        recorder = LogRecorder(ctx.out / TRAIN_LOG)
        args = SFTConfig(**trainer_args(ctx, "sft"), completion_only_loss=True, packing=False)
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[recorder]
        )
        timed_train(ctx, trainer)
        save_model(trainer.model, tokenizer, ctx.out / MODEL_DIR)
        save_curves(ctx, recorder.rows, CURVES, f"SFT ({spec.name})")
        return final_metrics(recorder.rows, ["loss", "mean_token_accuracy", "train_loss", "train_runtime"])
