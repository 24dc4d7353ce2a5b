""".nemo -> HF with the flags of NeMo's scripts/checkpoint_converters/convert_*_nemo_to_hf.py.

    python converters/convert_nemo_to_hf.py --input_name_or_path IN.nemo --output_path HF_DIR

Thin over `nemo-rlhf convert nemo-to-hf`; the output is a whole HF directory (config,
safetensors, tokenizer), so NeMo's --hf_input_path / --hf_output_path are not needed.
"""

import argparse
import sys

from nemo_rlhf.cli.main import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_name_or_path", required=True, help=".nemo file or extracted .nemo directory")
    parser.add_argument("--output_path", required=True, help="HF directory to create")
    args = parser.parse_args()
    sys.exit(main(["convert", "nemo-to-hf", "--nemo", args.input_name_or_path, "--out", args.output_path]))
