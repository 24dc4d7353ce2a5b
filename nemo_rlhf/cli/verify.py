"""`nemo-rlhf verify conversion`: the conversion certificate.

    nemo-rlhf verify conversion --hf DIR --nemo PATH [--tp N] [--pp M] [--json]

megatron-core (CPU, gloo, TP x PP processes) loads the .nemo with its own distributed-checkpoint
loader and runs GSM8K prompts; HF transformers runs the same tokens. Exit 0 when the logits
agree within the tolerance and every greedy next token matches, 1 when not, 2 on bad input.
A reward model (NeMo-Aligner .nemo vs HF *ForSequenceClassification) is compared on its
rewards instead: max |reward difference| within the tolerance.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Registers `verify conversion` on the main CLI's subparsers."""
    ver = subparsers.add_parser("verify", help="Prove that a conversion preserved the model.",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ver.add_subparsers(dest="verify_command", metavar="{conversion}", required=True)
    conv = sub.add_parser("conversion", help="Compare HF logits with megatron-core's reading of a .nemo.")
    conv.add_argument("--hf", required=True, type=Path, help="The HF directory the .nemo came from.")
    conv.add_argument("--nemo", required=True, type=Path, help="The .nemo file or extracted directory.")
    conv.add_argument("--tp", type=int, default=1, help="Tensor-parallel size megatron loads it at.")
    conv.add_argument("--pp", type=int, default=1, help="Pipeline-parallel size megatron loads it at.")
    conv.add_argument("--tolerance", type=float, default=None,
                      help="Largest allowed |logit difference|, or |reward difference| for a reward model "
                           "(default: 1e-5 x max(1, largest |HF output|), whatever dtype the checkpoint stores: "
                           "HF runs on the same rounded weights).")
    conv.add_argument("--json", action="store_true", help="Print one JSON object instead of a summary.")
    conv.set_defaults(func=cmd_conversion)
    return ver


def cmd_conversion(args: argparse.Namespace) -> int:
    from nemo_rlhf.verify.certificate import verify_conversion

    cert = verify_conversion(args.hf, args.nemo, tp=args.tp, pp=args.pp, tolerance=args.tolerance)
    if args.json:
        print(json.dumps(cert.to_dict()))
    else:
        print(f"TP={cert.tp} PP={cert.pp} megatron-core {cert.megatron_core}: "
              f"{'PASSED' if cert.passed else 'FAILED'}")
        if cert.error:
            print(cert.error)
        elif cert.kind == "reward":
            print(f"  max |reward diff| {cert.max_abs_reward_diff:.3g} (tolerance {cert.tolerance:g}), "
                  f"mean {cert.mean_abs_reward_diff:.3g} over {cert.num_prompts} prompts; "
                  f"reward read at {cert.reward_position}")
        else:
            print(f"  max |logit diff| {cert.max_abs_logit_diff:.3g} (tolerance {cert.tolerance:g}), "
                  f"mean {cert.mean_abs_logit_diff:.3g}, mean KL(HF||NeMo) {cert.mean_kl:.3g}, "
                  f"greedy agreement {cert.top1_agreement:.1%} over {cert.num_tokens} tokens "
                  f"of {cert.num_prompts} prompts")
        if not cert.error and cert.stored_dtype != "float32":
            print(f"  weights stored as {cert.stored_dtype}: rounding alone moves HF's own outputs by "
                  f"{cert.storage_max_abs_diff:.3g} (compared on the rounded weights)")
        if not cert.error and cert.nemo21_falcon_max_abs_diff is not None:
            print(f"  NeMo 2.1's falcon layer drops the linear_proj/linear_fc2 biases: it would differ from HF by "
                  f"{cert.nemo21_falcon_max_abs_diff:.3g} (docs/nemo-format-notes.md)")
    return 0 if cert.passed else 1

