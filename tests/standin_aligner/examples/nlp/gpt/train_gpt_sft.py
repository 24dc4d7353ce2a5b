"""STAND-IN for NeMo-Aligner's examples/nlp/gpt/train_gpt_sft.py (tests only; trains nothing).

Checks the rendered SFT config against the SLURM layout and the files it names, then rank 0
copies model.restore_from_path to the .nemo path NeMo would save.
"""

import sys

from standin_common import check_forced_failure, check_jsonl, check_layout, check_nemo, get, load_config, log, save_nemo

NAME = "sft"

if __name__ == "__main__":
    cfg = load_config(NAME, sys.argv[1:])
    check_forced_failure(NAME)
    check_layout(NAME, cfg)
    source = check_nemo(NAME, cfg, get(cfg, "model.restore_from_path"))
    for split in ("train_ds", "validation_ds"):
        rows = check_jsonl(NAME, get(cfg, f"model.data.{split}.file_path"), ("input", "output"))
        log(NAME, f"{split}: {rows} rows")
    save_nemo(NAME, cfg, source)
