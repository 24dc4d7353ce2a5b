"""`nemo-rlhf convert`: HF checkpoints <-> NeMo 2.1 `.nemo` (Megatron distributed checkpoint inside).

    nemo-rlhf convert hf-to-nemo --hf DIR --out PATH.nemo [--kind policy|reward] [--layer-spec te|local] [--dtype D]
    nemo-rlhf convert nemo-to-hf --nemo PATH.nemo --out DIR

A `*ForSequenceClassification` checkpoint (num_labels=1) becomes a NeMo-Aligner reward-model
.nemo (rm_head), and exports back to the same HF architecture; a `*ForCausalLM` is a policy.

An --out ending in `.nemo` gets the tar form, anything else the extracted-directory form (NeMo
and NeMo-Aligner accept both). Check a conversion with `nemo-rlhf verify conversion`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

_DTYPES = ("float32", "bfloat16", "float16")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Registers `convert hf-to-nemo` and `convert nemo-to-hf` on the main CLI's subparsers."""
    conv = subparsers.add_parser("convert", help="Convert checkpoints between HF and NeMo (.nemo).",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = conv.add_subparsers(dest="convert_command", metavar="{hf-to-nemo,nemo-to-hf}", required=True)

    h2n = sub.add_parser("hf-to-nemo", help="HF causal LM or reward model -> .nemo for NeMo 2.1 / NeMo-Aligner 0.7.0.")
    h2n.add_argument("--hf", required=True, type=Path, help="HF directory (config.json, safetensors, tokenizer).")
    h2n.add_argument("--out", required=True, type=Path,
                     help="Output: PATH.nemo (tar) or a directory (extracted .nemo form).")
    h2n.add_argument("--kind", choices=("policy", "reward"), default=None,
                     help="Insist on a policy (*ForCausalLM) or reward model (*ForSequenceClassification); "
                          "default: what config.json's architectures says.")
    h2n.add_argument("--layer-spec", choices=("te", "local"), default="te",
                     help="Megatron layer spec the config names: te (TransformerEngine, cluster default) or local.")
    h2n.add_argument("--dtype", choices=_DTYPES, default=None, help="Stored weight dtype (default: as the source).")
    h2n.add_argument("--tokenizer-type", default=None,
                     help="model.tokenizer.type for NeMo: a hub id or a directory on the cluster "
                          "(default: the absolute --hf path, as NeMo's converter writes).")
    h2n.add_argument("--overwrite", action="store_true", help="Replace an existing output.")
    h2n.set_defaults(func=cmd_hf_to_nemo)

    n2h = sub.add_parser("nemo-to-hf", help=".nemo (tar or directory) -> HF directory.")
    n2h.add_argument("--nemo", required=True, type=Path, help="The .nemo file or extracted .nemo directory.")
    n2h.add_argument("--out", required=True, type=Path, help="HF directory to create.")
    n2h.add_argument("--overwrite", action="store_true", help="Replace a non-empty output directory.")
    n2h.set_defaults(func=cmd_nemo_to_hf)
    return conv


def cmd_hf_to_nemo(args: argparse.Namespace) -> int:
    import torch

    from nemo_rlhf.convert.convert import hf_to_nemo

    dtype = getattr(torch, args.dtype) if args.dtype else None
    out = hf_to_nemo(args.hf, args.out, layer_spec=args.layer_spec, dtype=dtype,
                     tokenizer_type=args.tokenizer_type, overwrite=args.overwrite, kind=args.kind)
    print(out)
    return 0


def cmd_nemo_to_hf(args: argparse.Namespace) -> int:
    from nemo_rlhf.convert.convert import nemo_to_hf

    print(nemo_to_hf(args.nemo, args.out, overwrite=args.overwrite))
    return 0

