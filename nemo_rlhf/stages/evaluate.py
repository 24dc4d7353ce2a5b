"""Stage `eval`: base vs SFT vs PPO side by side (a first, simple evaluation).

Per checkpoint: GSM8K exact match on a fixed slice of the real test set (greedy), and on
held-out hh-rlhf prompts (sampled at temperature 1 with a fixed seed) the mean score of
the trained reward model, the response length, the EOS rate and the KL to the reference
policy (the SFT model: the anchor PPO was constrained to), estimated as the mean over
responses of sum_t log pi(y_t) - log pi_ref(y_t). `nemo-rlhf eval --run-dir` gates these
files; the pipeline's own gate stage (with ppo.sample_every) gates PPO's checkpoint samples.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from nemo_rlhf.data.examples import build_prompt_rows
from nemo_rlhf.data.jsonl import write_jsonl_atomic
from nemo_rlhf.gate.capability import exact_match
from nemo_rlhf.generation import compute_device, generate, response_logprobs, reward_scores
from nemo_rlhf.pipeline import data_plan
from nemo_rlhf.plotting import plot_eval_summary, plot_length_histogram
from nemo_rlhf.spec.paths import data_path
from nemo_rlhf.spec.schema import PipelineSpec
from nemo_rlhf.stages.base_model import MODEL_DIR
from nemo_rlhf.stages.training import load_tokenizer, torch_dtype

CHECKPOINTS = ("base", "sft", "ppo")
REFERENCE = "sft"
SUMMARY_METRICS = ["gsm8k_exact_match", "rm_score_mean", "response_length_mean", "kl_to_ref_mean", "eos_rate"]


class EvalStage:
    name = "eval"

    def parents(self, spec: PipelineSpec) -> tuple[str, ...]:
        return ("base", "sft", "rm", "ppo")

    def config(self, spec: PipelineSpec) -> dict:
        return {
            "eval": asdict(spec.eval),
            "data.eval": asdict(spec.data.eval),
            "ppo.prompt_max_length": spec.ppo.prompt_max_length,
            "data.preference": asdict(spec.data.preference),
            "seed": spec.seed,
        }

    def input_files(self, spec: PipelineSpec, root: Path) -> list[Path]:
        return [data_path(root, spec.data.eval.gsm8k_path), data_path(root, spec.data.preference.path)]

    def run(self, ctx) -> dict:
        spec, cfg = ctx.spec, ctx.spec.eval
        tokenizer = load_tokenizer(ctx.parents[REFERENCE] / MODEL_DIR)
        math = data_plan.eval_math_problems(spec, ctx.data_root)
        chats = data_plan.eval_chat_prompts(spec, ctx.data_root)
        # Every question of the fixed GSM8K slice is kept; hh-rlhf prompts are held to the
        # PPO prompt length so the policy is judged on prompts like those it trained on.
        math_rows, _ = build_prompt_rows(tokenizer, math, max_length=1 << 20)
        chat_rows, _ = build_prompt_rows(tokenizer, chats, spec.ppo.prompt_max_length)
        math_prompts = [r["input_ids"] for r in math_rows]
        chat_prompts = [r["input_ids"] for r in chat_rows[: spec.data.eval.hh_num]]
        dtype = torch_dtype(ctx)
        device = compute_device()
        reference = AutoModelForCausalLM.from_pretrained(ctx.parents[REFERENCE] / MODEL_DIR, dtype=dtype).to(device)
        reward_model = AutoModelForSequenceClassification.from_pretrained(
            ctx.parents["rm"] / MODEL_DIR, num_labels=1, dtype=dtype
        ).to(device)
        reward_model.config.pad_token_id = tokenizer.pad_token_id
        results, lengths, responses = {}, {}, {}
        for name in CHECKPOINTS:
            model = (
                reference
                if name == REFERENCE
                else AutoModelForCausalLM.from_pretrained(ctx.parents[name] / MODEL_DIR, dtype=dtype).to(device)
            )
            ctx.log(f"[eval] {name}: {len(math_prompts)} GSM8K + {len(chat_prompts)} hh-rlhf prompts")
            math_out = generate(
                model,
                tokenizer,
                math_prompts,
                cfg.max_new_tokens,
                cfg.batch_size,
                sample=False,
                seed=spec.seed,
                desc=f"{name} gsm8k",
            )
            chat_out = generate(
                model,
                tokenizer,
                chat_prompts,
                cfg.max_new_tokens,
                cfg.batch_size,
                sample=True,
                seed=spec.seed,
                desc=f"{name} hh-rlhf",
            )
            pad = tokenizer.pad_token_id
            scores = reward_scores(reward_model, chat_out, pad, cfg.batch_size)
            kl = [
                a - b
                for a, b in zip(
                    response_logprobs(model, chat_out, pad, cfg.batch_size),
                    response_logprobs(reference, chat_out, pad, cfg.batch_size),
                )
            ]
            correct = exact_match([g.text for g in math_out], math)
            results[name] = _summary(correct, chat_out, scores, kl)
            lengths[name] = [len(g.response_ids) for g in chat_out]
            responses[name] = [_record(tokenizer, g, s, k, name) for g, s, k in zip(chat_out, scores, kl)]
            responses[name] += [_record(tokenizer, g, None, None, name, ok) for g, ok in zip(math_out, correct)]
        self._write(ctx, results, lengths, responses)
        return {f"{ckpt}/{metric}": value for ckpt, row in results.items() for metric, value in row.items()}

    def _write(self, ctx, results: dict, lengths: dict, responses: dict) -> None:
        samples = [
            {
                "prompt": responses[CHECKPOINTS[0]][i]["prompt"],
                **{name: responses[name][i]["response"] for name in CHECKPOINTS},
            }
            for i in range(min(ctx.spec.eval.num_samples, len(responses[CHECKPOINTS[0]])))
        ]
        report = {"reference_policy": REFERENCE, "checkpoints": results, "samples": samples}
        (ctx.out / "results.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (ctx.out / "responses").mkdir()
        for name, rows in responses.items():
            write_jsonl_atomic(ctx.out / "responses" / f"{name}.jsonl", rows)
        plot_eval_summary(results, SUMMARY_METRICS, ctx.out / "summary.png", f"base vs SFT vs PPO ({ctx.spec.name})")
        plot_length_histogram(lengths, ctx.out / "lengths.png", "hh-rlhf response lengths")


def _summary(correct: list[bool], chat_out: list, scores: list[float], kl: list[float]) -> dict:
    def mean(values):
        return statistics.fmean(values) if values else None

    return {
        "gsm8k_exact_match": mean([float(c) for c in correct]),
        "gsm8k_n": len(correct),
        "rm_score_mean": mean(scores),
        "response_length_mean": mean([len(g.response_ids) for g in chat_out]),
        "eos_rate": mean([float(g.finished) for g in chat_out]),
        "kl_to_ref_mean": mean(kl),
        "hh_n": len(chat_out),
    }


def _record(tokenizer, g, score, kl, checkpoint: str, correct: bool | None = None) -> dict:
    """One response in the gate's responses-file format."""
    row = {
        "prompt": tokenizer.decode(g.prompt_ids),
        "response": g.text,
        "finished": g.finished,
        "checkpoint": checkpoint,
        "length": len(g.response_ids),
    }
    if score is not None:
        row.update(proxy_reward=score, kl=kl)
    if correct is not None:
        row["gsm8k_correct"] = correct
    return row
