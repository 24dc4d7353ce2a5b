"""Stage `sft`: supervised fine-tuning of the base model with TRL's SFTTrainer.

`data.sft.format` picks the examples (`SFT_SOURCES`): gsm8k (worked math answers, the
default), hh_rlhf_chosen (the chosen answers of hh-rlhf training pairs: short chat replies
that end, what the reward-hacking experiment needs from a small policy) or chat_jsonl
(conversations, e.g. reviewed gate bad cases from `nemo-rlhf data add-badcases`).

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

from nemo_rlhf.data.chat_sft import ChatExample, build_chat_sft_rows
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


def _gsm8k_rows(spec: PipelineSpec, root: Path, tokenizer) -> tuple[list[dict], int]:
    return build_sft_rows(tokenizer, data_plan.sft_problems(spec, root), spec.sft.max_length)


def _chosen_rows(spec: PipelineSpec, root: Path, tokenizer) -> tuple[list[dict], int]:
    pairs = data_plan.sft_chosen_pairs(spec, root)
    examples = [ChatExample(p.prompt, p.chosen, p.source_line) for p in pairs]
    return build_chat_sft_rows(tokenizer, examples, spec.sft.max_length)


def _chat_jsonl_rows(spec: PipelineSpec, root: Path, tokenizer) -> tuple[list[dict], int]:
    return build_chat_sft_rows(tokenizer, data_plan.sft_chat_examples(spec, root), spec.sft.max_length)


# data.sft.format -> (rows builder, the spec path its data comes from, what it is for logs).
SFT_SOURCES = {
    "gsm8k": (_gsm8k_rows, lambda spec: spec.data.sft.path, "GSM8K examples"),
    "hh_rlhf_chosen": (_chosen_rows, lambda spec: spec.data.preference.path, "hh-rlhf chosen answers"),
    "chat_jsonl": (_chat_jsonl_rows, lambda spec: spec.data.sft.path, "chat examples"),
}


class SFTStage:
    name = "sft"

    def parents(self, spec: PipelineSpec) -> tuple[str, ...]:
        return ("base",)

    def config(self, spec: PipelineSpec) -> dict:
        config = {"sft": asdict(spec.sft), "data.sft": asdict(spec.data.sft), "seed": spec.seed}
        if spec.data.sft.format == "hh_rlhf_chosen":  # which pairs: the split and the PPO prompts' share
            config.update({"data.preference": asdict(spec.data.preference), "data.prompts": asdict(spec.data.prompts)})
        return config

    def input_files(self, spec: PipelineSpec, root: Path) -> list[Path]:
        return [data_path(root, SFT_SOURCES[spec.data.sft.format][1](spec))]

    def run(self, ctx) -> dict:
        spec, base = ctx.spec, ctx.parents["base"]
        tokenizer = load_tokenizer(base / MODEL_DIR)
        require_same_template("sft", tokenizer, read_manifest(base)["notes"]["chat_template_sha256"], "base")
        build, _, what = SFT_SOURCES[spec.data.sft.format]
        rows, dropped = build(spec, ctx.data_root, tokenizer)
        require_rows("sft", rows, "examples that fit sft.max_length", "raise sft.max_length or data.sft.num_examples")
        raise_if_issues("sft", lint_sft(tokenizer, rows))
        ctx.notes.update(
            examples=len(rows),
            dropped_too_long=dropped,
            chat_template_sha256=chat_template_sha256(tokenizer),
            loss_tokens=sum(sum(r["completion_mask"]) for r in rows),
        )
        ctx.log(f"[sft] {len(rows)} {what} ({dropped} longer than {spec.sft.max_length} tokens dropped)")
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
