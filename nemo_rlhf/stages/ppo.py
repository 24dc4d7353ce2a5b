"""Stage `ppo`: PPO with TRL 1.12's PPOTrainer (trl.experimental.ppo).

Four models, as in InstructGPT: the policy and a separate frozen reference, both from the
SFT checkpoint; the reward model from the RM stage; the value model initialised from the
reward model. Prompts are hh-rlhf training-split prompts and GSM8K questions SFT did not
train on, tokenized with the chat template's generation prompt and left-padded.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from unittest import mock

# PPO lives in trl.experimental in 1.12 (and nowhere after): we use it on purpose, pinned.
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from trl.experimental.ppo import PPOConfig, PPOTrainer
from trl.experimental.ppo import ppo_trainer as trl_ppo_module

from nemo_rlhf.data.examples import build_prompt_rows
from nemo_rlhf.data.lint import lint_prompts, raise_if_issues
from nemo_rlhf.lineage.manifest import read_manifest
from nemo_rlhf.pipeline import data_plan
from nemo_rlhf.spec.paths import data_path
from nemo_rlhf.spec.schema import PipelineSpec
from nemo_rlhf.stages.base_model import MODEL_DIR
from nemo_rlhf.stages.training import (
    TRAIN_LOG,
    LogRecorder,
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
    "reward": ["objective/scores", "objective/rlhf_reward"],
    "KL to reference": ["objective/kl"],
    "loss": ["loss/policy_avg", "loss/value_avg"],
    "response length (tokens)": ["response_length"],
}
FINAL_KEYS = [
    "objective/scores",
    "objective/rlhf_reward",
    "objective/kl",
    "objective/entropy",
    "loss/policy_avg",
    "loss/value_avg",
    "policy/clipfrac_avg",
    "response_length",
    "eos_rate",
]


def response_lengths(responses: torch.Tensor, eos_id: int) -> list[int]:
    """Tokens up to and including the first EOS (the whole row when there is none)."""
    is_eos = responses == eos_id
    has_eos = is_eos.any(dim=1)
    first = torch.where(
        has_eos, is_eos.int().argmax(dim=1) + 1, torch.full_like(has_eos, responses.shape[1], dtype=torch.long)
    )
    return first.tolist()


class PPOLogRecorder(LogRecorder):
    """Adds response length and EOS rate, which TRL 1.12's PPOTrainer does not log.

    TRL generates rollouts through the module-level `batch_generation`; `record_rollouts`
    wraps it to see each rollout's responses without changing them.
    """

    def __init__(self, path: Path, eos_id: int):
        super().__init__(path)
        self.eos_id = eos_id
        self.lengths: list[int] = []
        self.finished: list[bool] = []

    def record_rollouts(self):
        original = trl_ppo_module.batch_generation

        def recording(model, queries, *args, **kwargs):
            query_responses, logits = original(model, queries, *args, **kwargs)
            responses = query_responses[:, queries.shape[1] :]
            self.lengths += response_lengths(responses, self.eos_id)
            self.finished += (responses == self.eos_id).any(dim=1).tolist()
            return query_responses, logits

        return mock.patch.object(trl_ppo_module, "batch_generation", recording)

    def augment(self, row: dict) -> dict:
        if self.lengths:
            row["response_length"] = sum(self.lengths) / len(self.lengths)
            row["eos_rate"] = sum(self.finished) / len(self.finished)
            self.lengths, self.finished = [], []
        return row


class PPOStage:
    name = "ppo"

    def parents(self, spec: PipelineSpec) -> tuple[str, ...]:
        return ("sft", "rm")

    def config(self, spec: PipelineSpec) -> dict:
        return {
            "ppo": asdict(spec.ppo),
            "data.prompts": asdict(spec.data.prompts),
            "data.preference": asdict(spec.data.preference),
            "data.sft": asdict(spec.data.sft),
            "seed": spec.seed,
        }

    def input_files(self, spec: PipelineSpec, root: Path) -> list[Path]:
        return [data_path(root, spec.data.sft.path), data_path(root, spec.data.preference.path)]

    def run(self, ctx) -> dict:
        spec, sft, rm = ctx.spec, ctx.parents["sft"], ctx.parents["rm"]
        tokenizer = load_tokenizer(sft / MODEL_DIR)
        tokenizer.padding_side = "left"
        for parent in (sft, rm):
            require_same_template("ppo", tokenizer, read_manifest(parent)["notes"]["chat_template_sha256"], parent.name)
        dataset = self._prompts(ctx, tokenizer)
        dtype = torch_dtype(ctx)
        policy = AutoModelForCausalLM.from_pretrained(sft / MODEL_DIR, dtype=dtype)
        ref_policy = AutoModelForCausalLM.from_pretrained(sft / MODEL_DIR, dtype=dtype)
        reward_model = AutoModelForSequenceClassification.from_pretrained(rm / MODEL_DIR, num_labels=1, dtype=dtype)
        value_model = AutoModelForSequenceClassification.from_pretrained(rm / MODEL_DIR, num_labels=1, dtype=dtype)
        for m in (policy, ref_policy, reward_model, value_model):
            m.config.pad_token_id = tokenizer.pad_token_id
        recorder = PPOLogRecorder(ctx.out / TRAIN_LOG, tokenizer.eos_token_id)
        args = PPOConfig(
            **trainer_args(ctx, "ppo"),
            stop_token="eos",
            num_sample_generations=0,
            logging_steps=1,
            local_rollout_forward_batch_size=spec.ppo.rollout_batch_size,
            gradient_accumulation_steps=1,
        )
        trainer = PPOTrainer(
            args=args,
            processing_class=tokenizer,
            model=policy,
            ref_model=ref_policy,
            reward_model=reward_model,
            value_model=value_model,
            train_dataset=dataset,
            callbacks=[recorder],
        )
        with recorder.record_rollouts():
            timed_train(ctx, trainer)
        save_model(policy, tokenizer, ctx.out / MODEL_DIR)
        save_curves(ctx, recorder.rows, CURVES, f"PPO ({spec.name})")
        metrics = final_metrics(recorder.rows, FINAL_KEYS)
        metrics["updates"] = trainer.state.global_step
        return metrics

    def _prompts(self, ctx, tokenizer) -> Dataset:
        spec, root = ctx.spec, ctx.data_root
        prompts = data_plan.ppo_chat_prompts(spec, root) + data_plan.ppo_math_questions(spec, root)
        rows, dropped = build_prompt_rows(tokenizer, prompts, spec.ppo.prompt_max_length)
        require_rows(
            "ppo", rows, "prompts that fit ppo.prompt_max_length", "raise ppo.prompt_max_length or data.prompts.*"
        )
        raise_if_issues("ppo", lint_prompts(tokenizer, rows))
        ctx.notes.update(prompts=len(rows), dropped_too_long=dropped)
        ctx.log(f"[ppo] {len(rows)} prompts ({dropped} longer than {spec.ppo.prompt_max_length} tokens dropped)")
        return Dataset.from_list([{"input_ids": r["input_ids"]} for r in rows])
