"""nemo-rlhf: the classic RLHF pipeline (SFT -> RM -> PPO) at two scales from one spec."""

__version__ = "0.1.0"
