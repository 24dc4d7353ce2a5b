"""What the TRL stages share: training arguments, logging, curves, saving."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, TrainerCallback

from nemo_rlhf.errors import LintError, UserError
from nemo_rlhf.models.materialize import make_portable
from nemo_rlhf.plotting import plot_curves
from nemo_rlhf.spec.hyperparams import TABLE, trl_kwargs

TRAIN_LOG = "train_log.jsonl"


def trainer_args(ctx, stage: str, section=None) -> dict:
    """TRL config kwargs for `stage`: the canonical hyperparameters plus run plumbing.

    Args:
        stage: the row set of the hyperparameter table (sft, rm, ppo).
        section: read the values from this spec section instead of `spec.<stage>` (the gold RM
            trains with the rm rows from `spec.gold_rm`).
    """
    spec = ctx.spec
    if section is None:
        kwargs = trl_kwargs(spec, stage)
    else:
        kwargs = {m.trl: getattr(section, m.canonical) for m in TABLE if m.stage == stage}
    kwargs.update(
        output_dir=str(ctx.out / "trainer"),
        report_to="none",
        save_strategy="no",
        seed=spec.seed,
        data_seed=spec.seed,
        use_cpu=not torch.cuda.is_available(),
        bf16=spec.model.dtype == "bfloat16",
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    return kwargs


def torch_dtype(ctx) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[ctx.spec.model.dtype]


class LogRecorder(TrainerCallback):
    """Keeps every trainer log row (with its step) and appends it to train_log.jsonl."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict] = []

    def augment(self, row: dict) -> dict:
        """Subclasses add values the trainer does not log."""
        return row

    def on_log(self, args, state, control, logs=None, **kwargs):
        row = self.augment({"step": state.global_step, **(logs or {})})
        self.rows.append(row)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=float) + "\n")


def load_tokenizer(model_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def chat_template_sha256(tokenizer) -> str:
    return hashlib.sha256((tokenizer.chat_template or "").encode("utf-8")).hexdigest()


def require_same_template(stage: str, tokenizer, expected_sha: str, expected_from: str) -> None:
    """Fail the stage when its chat template differs from the one an earlier stage used."""
    actual = chat_template_sha256(tokenizer)
    if actual != expected_sha:
        raise LintError(
            f"chat template differs between stages: {stage} uses sha256 {actual[:12]}, "
            f"{expected_from} used {expected_sha[:12]}",
            where=stage,
            fix="train every stage with one tokenizer and chat template (re-run from the stage that changed it)",
        )


def timed_train(ctx, trainer) -> None:
    """trainer.train(), with its seconds kept in the manifest notes (the benchmark compares them)."""
    start = time.monotonic()
    trainer.train()
    ctx.notes["train_seconds"] = round(time.monotonic() - start, 3)


def require_rows(stage: str, rows: list, what: str, fix: str) -> None:
    """Stop a stage that has nothing to train on, naming the key to change."""
    if not rows:
        raise UserError(f"{stage}: no {what} left to train on", where=stage, fix=fix)


def final_metrics(rows: list[dict], keys: list[str]) -> dict:
    """The last logged value of each key, plus the trainer's summary row."""
    out = {}
    for key in keys:
        values = [r[key] for r in rows if key in r]
        if values:
            out[key] = values[-1]
    return out


def save_curves(ctx, rows: list[dict], panels: dict[str, list[str]], title: str) -> None:
    path = plot_curves(rows, panels, ctx.out / "curves.png", title)
    if path is None:
        ctx.log(f"no training logs to plot for {title}")


def save_model(model, tokenizer, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    make_portable(out)  # also readable by transformers 4.x (NeMo containers): see make_portable
    return out
