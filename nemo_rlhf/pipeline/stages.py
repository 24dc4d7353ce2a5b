"""The small-scale stages, in run order. Each one's parents come before it.

A stage may define `enabled(spec)`; the runner passes over a disabled one (gold_rm is off
unless `gold_rm.enabled`; gate, which judges the PPO checkpoint samples, unless
`ppo.sample_every`).
"""

from nemo_rlhf.stages.base_model import BaseModelStage
from nemo_rlhf.stages.evaluate import EvalStage
from nemo_rlhf.stages.gate import GateStage
from nemo_rlhf.stages.gold_rm import GoldRewardModelStage
from nemo_rlhf.stages.ppo import PPOStage
from nemo_rlhf.stages.rm import RewardModelStage
from nemo_rlhf.stages.sft import SFTStage

STAGES = (BaseModelStage(), SFTStage(), RewardModelStage(), GoldRewardModelStage(), PPOStage(), GateStage(), EvalStage())
STAGE_NAMES = tuple(s.name for s in STAGES)


def stage_enabled(stage, spec) -> bool:
    """Whether `stage` runs for `spec` (stages without `enabled` always do)."""
    return getattr(stage, "enabled", lambda _spec: True)(spec)
