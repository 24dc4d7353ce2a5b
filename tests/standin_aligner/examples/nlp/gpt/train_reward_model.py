"""STAND-IN for NeMo-Aligner's examples/nlp/gpt/train_reward_model.py (tests only; trains nothing).

Checks the rendered RM config against the SLURM layout and the files it names, then rank 0
copies pretrained_checkpoint.restore_from_path to the .nemo path NeMo would save.
"""

import sys

from standin_common import check_file, check_forced_failure, check_jsonl, check_layout, get, load_config, log, save_nemo

NAME = "rm"

if __name__ == "__main__":
    cfg = load_config(NAME, sys.argv[1:])
    check_forced_failure(NAME)
    check_layout(NAME, cfg)
    source = check_file(NAME, get(cfg, "pretrained_checkpoint.restore_from_path"), "restore_from_path")
    for split in ("train", "validation"):
        rows = check_jsonl(NAME, get(cfg, f"model.data.data_prefix.{split}")[0], ("text",))
        log(NAME, f"{split}: {rows} comparison rows")
    save_nemo(NAME, cfg, source)
