"""The small-scale stages, in run order. Each one's parents come before it."""

from nemo_rlhf.stages.base_model import BaseModelStage
from nemo_rlhf.stages.evaluate import EvalStage
from nemo_rlhf.stages.ppo import PPOStage
from nemo_rlhf.stages.rm import RewardModelStage
from nemo_rlhf.stages.sft import SFTStage

STAGES = (BaseModelStage(), SFTStage(), RewardModelStage(), PPOStage(), EvalStage())
STAGE_NAMES = tuple(s.name for s in STAGES)
