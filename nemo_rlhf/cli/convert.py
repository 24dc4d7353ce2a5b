"""`nemo-rlhf convert`: HF checkpoints <-> NeMo 2.1 `.nemo` (Megatron distributed checkpoint inside).

    nemo-rlhf convert hf-to-nemo --hf DIR --out PATH.nemo [--kind policy|reward] [--layer-spec te|local] [--dtype D]
                          [--no-verify]
    nemo-rlhf convert nemo-to-hf --nemo PATH.nemo --out DIR [--max-shard-size 2GB]

A `*ForSequenceClassification` checkpoint (num_labels=1) becomes a NeMo-Aligner reward-model
.nemo (rm_head), and exports back to the same HF architecture; a `*ForCausalLM` is a policy.

An --out ending in `.nemo` gets the tar form, anything else the extracted-directory form (NeMo
and NeMo-Aligner accept both). Every hf-to-nemo then runs the conversion certificate at TP=PP=1
(`nemo-rlhf verify conversion`) and records it, with sha256 of the source files and of the
output, in `conversion_manifest.json` inside a directory output or in `<out>.manifest.json`
beside a .nemo tar. A failed certificate exits 1 and renames the output to `<out>.failed`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_DTYPES = ("float32", "bfloat16", "float16")


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _size(text: str) -> int:
    """'500MB' -> 500_000_000 (HF's units: KB/MB/GB are powers of 10, KiB/MiB/GiB of 2)."""
    number = text.rstrip("BbKkMmGgIi")
    unit = text[len(number):].upper()
    try:
        value = int(float(number) * _UNITS[unit])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 500MB or 2GB") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


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
    h2n.add_argument("--no-verify", action="store_true",
                     help="Skip the TP=PP=1 certificate (and write no manifest).")
    h2n.set_defaults(func=cmd_hf_to_nemo)

    n2h = sub.add_parser("nemo-to-hf", help=".nemo (tar or directory) -> HF directory.")
    n2h.add_argument("--nemo", required=True, type=Path, help="The .nemo file or extracted .nemo directory.")
    n2h.add_argument("--out", required=True, type=Path, help="HF directory to create.")
    n2h.add_argument("--overwrite", action="store_true", help="Replace a non-empty output directory.")
    n2h.add_argument("--max-shard-size", type=_size, default=None, metavar="SIZE",
                     help="Largest safetensors shard, e.g. 500MB or 2GB (default 2GB, as HF counts: 10^9 bytes). "
                          "Shards are written as they fill; a model that fits is one model.safetensors.")
    n2h.set_defaults(func=cmd_nemo_to_hf)
    return conv


def cmd_hf_to_nemo(args: argparse.Namespace) -> int:
    import torch

    from nemo_rlhf.convert.convert import hf_to_nemo
    from nemo_rlhf.verify.certificate import certify_conversion, manifest_path

    dtype = getattr(torch, args.dtype) if args.dtype else None
    out = hf_to_nemo(args.hf, args.out, layer_spec=args.layer_spec, dtype=dtype,
                     tokenizer_type=args.tokenizer_type, overwrite=args.overwrite, kind=args.kind)
    if args.no_verify:
        manifest_path(out).unlink(missing_ok=True)  # a sidecar left by an earlier convert would vouch for this one
        print(out)
        return 0
    cert, where, manifest = certify_conversion(args.hf, out)
    if not cert.passed:
        if cert.error:
            detail = cert.error
        elif cert.kind == "policy":
            detail = (f"max |logit diff| {cert.max_abs_logit_diff:.3g} (tolerance {cert.tolerance:g}), "
                      f"greedy agreement {cert.top1_agreement:.1%}")
        else:
            detail = f"max |reward diff| {cert.max_abs_reward_diff:.3g} (tolerance {cert.tolerance:g})"
        print(f"conversion certificate FAILED at TP=1 PP=1: {detail}\n"
              f"  the output was renamed to {where}; manifest: {manifest}", file=sys.stderr)
        return 1
    print(out)
    print(f"certificate passed (TP=1 PP=1, max |diff| "
          f"{cert.max_abs_logit_diff if cert.kind == 'policy' else cert.max_abs_reward_diff:.3g}); "
          f"manifest: {manifest}", file=sys.stderr)
    return 0


def cmd_nemo_to_hf(args: argparse.Namespace) -> int:
    from nemo_rlhf.convert.convert import nemo_to_hf

    kwargs = {} if args.max_shard_size is None else {"max_shard_size": args.max_shard_size}
    print(nemo_to_hf(args.nemo, args.out, overwrite=args.overwrite, **kwargs))
    return 0

