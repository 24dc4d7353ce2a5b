"""Test helper: writes legacy per-rank `.nemo` weight files with real megatron-core (torchrun, gloo, CPU).

    torchrun --standalone --nproc-per-node 4 tests/legacy_writer.py --config model_config.yaml \
        --weights model_weights/ --tokenizer-len N --out DIR --layout 1x1:local --layout 2x2:te ...

One launch serves every layout (starting megatron is the slow part): for each `TPxPP:naming`
the 4 processes re-initialise megatron's model parallelism at that TP x PP (the rest is data
parallel), build megatron-core's own GPTModel (local spec), load our distributed checkpoint
with megatron's `dist_checkpointing.load`, and the data-parallel rank 0 of each model-parallel
rank torch.saves `model.state_dict()` with NeMo's `model.` prefix where NeMo's
inject_model_parallel_rank puts it: `DIR/<TPxPP>/model_weights.ckpt`,
`.../mp_rank_XX/model_weights.ckpt` or `.../tp_rank_XX_pp_rank_XXX/model_weights.ckpt`.

The vocabulary is sized as NeMo sizes it for that TP: `override_vocab_size` when the config
has one, else the tokenizer length padded to a multiple of 128 * TP (megatron's loader
zero-fills rows beyond the checkpoint's).

Naming `te` stands in for a TransformerEngine model, which this machine cannot build: the norms
get TE's fused names (`linear_qkv.layer_norm_weight`, `linear_fc1.layer_norm_weight`) and every
`_extra_state` is an `io.BytesIO` holding `torch.save(None)`, as TE 1.x's get_extra_state returns.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path

import torch
import yaml

TE_NAMES = {".input_layernorm.": ".self_attention.linear_qkv.layer_norm_",
            ".pre_mlp_layernorm.": ".mlp.linear_fc1.layer_norm_"}


def _nemo_rank_path(tp_rank: int, pp_rank: int, tp: int, pp: int) -> str:
    """NeMo 2.1's inject_model_parallel_rank layout (written out here, independent of the reader)."""
    if pp > 1:
        return f"tp_rank_{tp_rank:02d}_pp_rank_{pp_rank:03d}/model_weights.ckpt"
    if tp > 1:
        return f"mp_rank_{tp_rank:02d}/model_weights.ckpt"
    return "model_weights.ckpt"


def _te_style(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        for local, fused in TE_NAMES.items():
            key = key.replace(local, fused)
        if key.endswith("._extra_state"):
            value = io.BytesIO()
            torch.save(None, value)
        out[key] = value
    return out


def _write_layout(cfg: dict, weights: str, tokenizer_len: int, tp: int, pp: int, naming: str, out: Path) -> None:
    from megatron.core import dist_checkpointing, parallel_state

    from nemo_rlhf.verify.megatron_cpu import build_gpt_model

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    multiple = int(cfg.get("make_vocab_size_divisible_by", 128)) * tp
    vocab = cfg.get("override_vocab_size") or -(-tokenizer_len // multiple) * multiple
    model = build_gpt_model(cfg, int(vocab), tp, pp)
    loaded = dist_checkpointing.load(model.sharded_state_dict(prefix="model."), weights, strict="raise_unexpected")
    model.load_state_dict({k[len("model."):]: v for k, v in loaded.items()}, strict=True)
    if parallel_state.get_data_parallel_rank() == 0:
        state = {f"model.{k}": v for k, v in model.state_dict().items()}
        if naming == "te":
            state = _te_style(state)
        path = out / _nemo_rank_path(parallel_state.get_tensor_model_parallel_rank(),
                                     parallel_state.get_pipeline_model_parallel_rank(), tp, pp)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
    torch.distributed.barrier()
    parallel_state.destroy_model_parallel()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--tokenizer-len", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--layout", action="append", required=True, help="TPxPP:local|te, e.g. 2x2:local")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    from nemo_rlhf.verify.megatron_cpu import apply_cpu_shims

    apply_cpu_shims()
    cfg = yaml.safe_load(Path(args.config).read_text(encoding="utf-8"))
    for layout in args.layout:
        sizes, naming = layout.split(":")
        tp, pp = (int(n) for n in sizes.split("x"))
        _write_layout(cfg, args.weights, args.tokenizer_len, tp, pp, naming, Path(args.out) / layout.replace(":", "-"))
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
