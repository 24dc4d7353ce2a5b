"""HF -> .nemo with the flags of NeMo's scripts/checkpoint_converters/convert_*_hf_to_nemo.py.

    python converters/convert_hf_to_nemo.py --input_name_or_path HF_DIR --output_path OUT.nemo [--precision bf16]

Thin over `nemo-rlhf convert hf-to-nemo`, which picks the architecture from config.json
(one table per family) so there is one script for every family.
"""

import argparse
import sys

from nemo_rlhf.cli.main import main

# NeMo's --precision values -> our stored dtype (mixed precisions store the low-precision type).
PRECISION = {"32": "float32", "32-true": "float32", "16": "float16", "16-mixed": "float16",
             "bf16": "bfloat16", "bf16-mixed": "bfloat16"}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_name_or_path", required=True, help="HF checkpoint directory")
    parser.add_argument("--output_path", required=True, help=".nemo file (or a directory for the extracted form)")
    parser.add_argument("--precision", choices=sorted(PRECISION), default=None, help="stored weight precision")
    parser.add_argument("--layer_spec", choices=("te", "local"), default="te")
    parser.add_argument("--no_verify", action="store_true", help="skip the TP=PP=1 certificate and its manifest")
    args = parser.parse_args()
    argv = ["convert", "hf-to-nemo", "--hf", args.input_name_or_path, "--out", args.output_path,
            "--layer-spec", args.layer_spec]
    if args.precision:
        argv += ["--dtype", PRECISION[args.precision]]
    if args.no_verify:
        argv.append("--no-verify")
    sys.exit(main(argv))
