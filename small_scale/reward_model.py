"""Run a spec's pipeline up to the reward model (TRL RewardTrainer) stage.

    python small_scale/reward_model.py SPEC --out RUN_DIR [dotted.key=value ...]
"""

import sys

from nemo_rlhf.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:], "--until", "rm"]))
