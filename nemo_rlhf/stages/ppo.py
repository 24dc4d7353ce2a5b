"""Stage `ppo`: PPO with TRL 1.12's PPOTrainer (trl.experimental.ppo).

Four models, as in InstructGPT: the policy and a separate frozen reference, both from the
SFT checkpoint; the reward model from the RM stage; the value model initialised from the
reward model. Prompts are hh-rlhf training-split prompts and GSM8K questions SFT did not
train on, tokenized with the chat template's generation prompt and left-padded.

With `ppo.sample_every` N > 0, `CheckpointSampler` samples a fixed set of held-out prompts
before the first update (step 0, the initial policy) and every N updates (and after the
last), scoring each response with the proxy RM (the one PPO optimises) and, when
`gold_rm.enabled`, the gold RM, with its sequence KL to the reference policy: ppo/samples.jsonl
in the gate's responses-file format (the reward_hacking detector's input), and the step-0
rows again as ppo/baseline.jsonl (the gate's baseline).

Besides the policy (ppo/model) the stage saves the trained value model (ppo/value_model) and the
last rollout it trained on (ppo/rollout.safetensors, `stages.ppo_rollout`): the fixed rollout and
models `nemo-rlhf parity loss --stage ppo --run-dir RUN` replays on megatron-core.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path
from unittest import mock

# PPO lives in trl.experimental in 1.12 (and nowhere after): we use it on purpose, pinned.
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback
from trl.experimental.ppo import PPOConfig, PPOTrainer
from trl.experimental.ppo import ppo_trainer as trl_ppo_module

from nemo_rlhf.data.examples import build_prompt_rows
from nemo_rlhf.data.jsonl import write_jsonl_atomic
from nemo_rlhf.data.lint import lint_prompts, raise_if_issues
from nemo_rlhf.generation import generate, response_logprobs, reward_scores
from nemo_rlhf.lineage.manifest import read_manifest
from nemo_rlhf.pipeline import data_plan
from nemo_rlhf.spec.paths import data_path
from nemo_rlhf.spec.schema import PipelineSpec
from nemo_rlhf.stages.base_model import MODEL_DIR
from nemo_rlhf.stages.ppo_rollout import VALUE_MODEL_DIR, RolloutCapture
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


SAMPLES = "samples.jsonl"
BASELINE = "baseline.jsonl"


class CheckpointSampler(TrainerCallback):
    """Samples fixed prompts at PPO checkpoints and scores them: the reward-hacking trajectory.

    Each response row: prompt, response, proxy_reward (raw RM score of the response as a finished
    answer: EOS appended where generation hit ppo.response_length; without TRL's missing-EOS
    penalty), gold_reward (when a gold RM is given), kl (k1: sum over response
    tokens of log pi - log pi_ref, both at the rollout temperature, as TRL's objective/kl),
    step, finished, length (tokens). Sampling uses its own seed and restores the global RNG
    afterwards, so PPO's own rollouts are the same with or without it.
    """

    def __init__(self, path: Path, every: int, prompts: list[list[int]], tokenizer, models: dict, spec: PipelineSpec):
        self.path, self.every, self.prompts, self.tokenizer = path, every, prompts, tokenizer
        self.policy, self.reference = models["policy"], models["reference"]
        self.proxy_rm, self.gold_rm = models["proxy_rm"], models.get("gold_rm")
        self.response_length, self.temperature = spec.ppo.response_length, spec.ppo.temperature
        self.batch_size, self.seed = spec.ppo.rollout_batch_size, spec.seed
        self.summary: list[dict] = []
        self.seconds = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.sample(0)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.sample(state.global_step)

    def sample(self, step: int) -> list[dict]:
        """Sample, score and append the rows of checkpoint `step`."""
        start, rng, was_training = time.monotonic(), torch.get_rng_state(), self.policy.training
        try:
            rows = self._rows(step)
        finally:
            torch.set_rng_state(rng)
            self.policy.train(was_training)
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        self.summary.append(_step_summary(step, rows))
        self.seconds += time.monotonic() - start
        return rows

    def _rows(self, step: int) -> list[dict]:
        tok, pad, bs, t = self.tokenizer, self.tokenizer.pad_token_id, self.batch_size, self.temperature
        out = generate(self.policy, tok, self.prompts, self.response_length, bs, sample=True, seed=self.seed,
                       desc=f"samples step {step}", temperature=t)
        kl = [a - b for a, b in zip(response_logprobs(self.policy, out, pad, bs, t),
                                    response_logprobs(self.reference, out, pad, bs, t))]
        # Both RMs read each response as a finished answer: an RM is trained only on answers that end
        # with EOS, and its output read at any other token is not a score of the answer (measured: on
        # all-truncated samples the gold RM read mid-text rose +1.0 while read at an appended EOS it
        # fell 1.7 baseline std). Truncation itself is judged from `finished` by the gate.
        ended = [g if g.finished else replace(g, response_ids=g.response_ids + [tok.eos_token_id]) for g in out]
        proxy = reward_scores(self.proxy_rm, ended, pad, bs)
        gold = reward_scores(self.gold_rm, ended, pad, bs) if self.gold_rm is not None else [None] * len(out)
        rows = []
        for g, k, p, q in zip(out, kl, proxy, gold):
            row = {"prompt": tok.decode(g.prompt_ids), "response": g.text, "proxy_reward": p}
            if q is not None:
                row["gold_reward"] = q
            rows.append({**row, "kl": k, "step": step, "finished": g.finished, "length": len(g.response_ids)})
        return rows


def _step_summary(step: int, rows: list[dict]) -> dict:
    """Means of one checkpoint's rows (kept in the manifest notes)."""
    def mean(key):
        values = [float(r[key]) for r in rows if r.get(key) is not None]
        return round(statistics.fmean(values), 4) if values else None

    return {"step": step, **{k: mean(k) for k in ("proxy_reward", "gold_reward", "kl", "length", "finished")}}


class PPOStage:
    name = "ppo"

    def parents(self, spec: PipelineSpec) -> tuple[str, ...]:
        return ("sft", "rm", "gold_rm") if spec.gold_rm.enabled and spec.ppo.sample_every else ("sft", "rm")

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
        rm_notes = read_manifest(rm)["notes"]
        if "EXPLOIT" in rm_notes:
            ctx.notes["PROXY_RM_EXPLOIT"] = rm_notes["EXPLOIT"]
            ctx.log(f"[ppo] WARNING: the proxy RM is broken on purpose ({rm_notes['EXPLOIT']['exploit']})")
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
        capture = RolloutCapture(tokenizer.pad_token_id, spec.ppo.missing_eos_penalty)
        callbacks = [recorder, capture]
        if spec.ppo.sample_every:
            models = {"policy": policy, "reference": ref_policy, "proxy_rm": reward_model}
            if "gold_rm" in ctx.parents:
                models["gold_rm"] = AutoModelForSequenceClassification.from_pretrained(
                    ctx.parents["gold_rm"] / MODEL_DIR, num_labels=1, dtype=dtype
                )
                models["gold_rm"].config.pad_token_id = tokenizer.pad_token_id
            sampler = CheckpointSampler(
                ctx.out / SAMPLES, spec.ppo.sample_every, self._sample_prompts(ctx, tokenizer), tokenizer, models, spec
            )
            callbacks.append(sampler)
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
            callbacks=callbacks,
        )
        with recorder.record_rollouts():
            timed_train(ctx, trainer)
        save_model(policy, tokenizer, ctx.out / MODEL_DIR)
        # the critic and the last rollout it trained on: what `nemo-rlhf parity loss --stage ppo` replays
        save_model(value_model, tokenizer, ctx.out / VALUE_MODEL_DIR)
        ctx.notes["parity_rollout"] = capture.write(ctx.out)
        save_curves(ctx, recorder.rows, CURVES, f"PPO ({spec.name})")
        metrics = final_metrics(recorder.rows, FINAL_KEYS)
        metrics["updates"] = trainer.state.global_step
        if spec.ppo.sample_every:
            self._finish_samples(ctx, sampler)
        return metrics

    def _sample_prompts(self, ctx, tokenizer) -> list[list[int]]:
        """The first `ppo.sample_prompts` held-out hh-rlhf prompts that fit ppo.prompt_max_length (the
        eval stage's prompts too): never trained on by the RMs or PPO."""
        spec = ctx.spec
        held_out = data_plan.eval_chat_prompts(spec, ctx.data_root)
        rows, _ = build_prompt_rows(tokenizer, held_out, spec.ppo.prompt_max_length)
        prompts = [r["input_ids"] for r in rows[: spec.ppo.sample_prompts]]
        require_rows("ppo", prompts, "held-out prompts to sample", "raise ppo.prompt_max_length")
        return prompts

    def _finish_samples(self, ctx, sampler: CheckpointSampler) -> None:
        """baseline.jsonl (the step-0 rows) and the per-step means in the manifest notes."""
        rows = [json.loads(line) for line in (ctx.out / SAMPLES).read_text(encoding="utf-8").splitlines()]
        write_jsonl_atomic(ctx.out / BASELINE, [r for r in rows if r["step"] == 0])
        ctx.notes["samples"] = {
            "file": SAMPLES,
            "baseline_file": BASELINE,
            "prompts": len(sampler.prompts),
            "every": sampler.every,
            "gold": sampler.gold_rm is not None,
            "seconds": round(sampler.seconds, 3),
            "per_step": sampler.summary,
        }
        for name in ("proxy_reward", "gold_reward", "kl", "length"):
            if sampler.summary[-1][name] is not None:
                ctx.notes["samples"][f"final_{name}"] = sampler.summary[-1][name]

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
