"""STAND-IN for NeMo-Aligner's examples/nlp/gpt/train_reward_model.py (tests only; trains nothing).

Checks the rendered RM config against the SLURM layout and the files it names, then rank 0 writes
the .nemo path NeMo would save. NeMo-Aligner's RM training adds a reward head to the policy it
starts from, which a stand-in cannot do: when $NEMO_RLHF_STANDIN_REWARD_NEMO names a reward-model
.nemo (a test makes one with our converter) that is what it "saves"; otherwise a copy of its input.
"""

import os
import sys

from standin_common import check_forced_failure, check_jsonl, check_layout, check_nemo, get, load_config, log, save_nemo

NAME = "rm"
REWARD_NEMO_ENV = "NEMO_RLHF_STANDIN_REWARD_NEMO"

if __name__ == "__main__":
    cfg = load_config(NAME, sys.argv[1:])
    check_forced_failure(NAME)
    check_layout(NAME, cfg)
    source = check_nemo(NAME, cfg, get(cfg, "pretrained_checkpoint.restore_from_path"))
    for split in ("train", "validation"):
        rows = check_jsonl(NAME, get(cfg, f"model.data.data_prefix.{split}")[0], ("text",))
        log(NAME, f"{split}: {rows} comparison rows")
    reward = os.environ.get(REWARD_NEMO_ENV)
    save_nemo(NAME, cfg, check_nemo(NAME, cfg, reward) if reward else source)
