"""A bare TRL script per stage, the baseline that bench_pipeline.py compares our stages to.

It does what a TRL user would write by hand: read prepared jsonl rows, let the TRL trainer
tokenize them, train with the same hyperparameters, save. No lint, manifests, hashing or
plots. It prints one JSON line with the seconds its body took (imports excluded, as they
are for our stages' duration_s) and the seconds of trainer.train() alone.

    python bench/bare_trl.py {sft,rm,ppo} --run RUN_DIR --rows ROWS.jsonl --spec SPEC --out DIR
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)
from trl import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer
from trl.experimental.ppo import PPOConfig, PPOTrainer

from nemo_rlhf.spec.hyperparams import trl_kwargs
from nemo_rlhf.spec.loader import load_spec


def common(spec, out: Path) -> dict:
    # bf16 must be explicit: TRL's configs default to bf16 mixed precision, which on this
    # CPU (avx512_bf16) is ~1.5x faster than the fp32 our recipe asks for.
    return dict(output_dir=str(out), report_to="none", save_strategy="no", seed=spec.seed, data_seed=spec.seed,
                use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, bf16=spec.model.dtype == "bfloat16")


def sft(spec, run: Path, rows: list[dict], out: Path) -> float:
    tok = AutoTokenizer.from_pretrained(run / "base" / "model")
    model = AutoModelForCausalLM.from_pretrained(run / "base" / "model")
    args = SFTConfig(**trl_kwargs(spec, "sft"), **common(spec, out), completion_only_loss=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    return _train_and_save(trainer, model, out)


def rm(spec, run: Path, rows: list[dict], out: Path) -> float:
    init = run / spec.rm.init_from / "model"
    tok = AutoTokenizer.from_pretrained(init)
    model = AutoModelForSequenceClassification.from_pretrained(init, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    args = RewardConfig(**trl_kwargs(spec, "rm"), **common(spec, out))
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    return _train_and_save(trainer, model, out)


def ppo(spec, run: Path, rows: list[dict], out: Path) -> float:
    tok = AutoTokenizer.from_pretrained(run / "sft" / "model", padding_side="left")
    ids = [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False)
           for r in rows]
    dataset = Dataset.from_list([{"input_ids": i} for i in ids])
    policy = AutoModelForCausalLM.from_pretrained(run / "sft" / "model")
    ref = AutoModelForCausalLM.from_pretrained(run / "sft" / "model")
    reward = AutoModelForSequenceClassification.from_pretrained(run / "rm" / "model", num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(run / "rm" / "model", num_labels=1)
    args = PPOConfig(**trl_kwargs(spec, "ppo"), **common(spec, out), stop_token="eos", num_sample_generations=0,
                     local_rollout_forward_batch_size=spec.ppo.rollout_batch_size, logging_steps=1)
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=dataset)
    return _train_and_save(trainer, policy, out)


def _train_and_save(trainer, model, out: Path) -> float:
    """Train, save, and return the seconds train() took."""
    start = time.monotonic()
    trainer.train()
    seconds = time.monotonic() - start
    model.save_pretrained(out / "model")
    return seconds


STAGES = {"sft": sft, "rm": rm, "ppo": ppo}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--rows", type=Path, required=True)
    parser.add_argument("--spec")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    spec = load_spec(args.spec)
    start = time.monotonic()
    rows = [json.loads(line) for line in args.rows.read_text().splitlines()]
    train_seconds = STAGES[args.stage](spec, args.run, rows, args.out)
    print(json.dumps({"stage": args.stage, "seconds": time.monotonic() - start, "train_seconds": train_seconds}))


if __name__ == "__main__":
    main()
