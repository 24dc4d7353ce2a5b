"""Stage `gold_rm`: a second reward model that PPO never optimises against, judging PPO.

Gao et al. (2022) measure reward over-optimisation with a gold reward model beside the proxy
one. Here the gold RM trains like the proxy RM (`nemo_rlhf.stages.rm.train_reward_model`)
but on preference pairs disjoint from the proxy's (pairs and prompts; see
`data_plan.gold_rm_train_pairs`), with its own seed and never with `rm.exploit`. The PPO
stage scores its checkpoint samples with both; the gate's reward_hacking detector compares them.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from nemo_rlhf.pipeline import data_plan
from nemo_rlhf.spec.paths import data_path
from nemo_rlhf.spec.schema import PipelineSpec
from nemo_rlhf.stages.rm import train_reward_model


def gold_seed(spec: PipelineSpec) -> int:
    """gold_rm.seed, else the spec's seed + 1 (another seed than the proxy RM's)."""
    return spec.gold_rm.seed if spec.gold_rm.seed is not None else spec.seed + 1


class GoldRewardModelStage:
    name = "gold_rm"

    def enabled(self, spec: PipelineSpec) -> bool:
        return spec.gold_rm.enabled

    def parents(self, spec: PipelineSpec) -> tuple[str, ...]:
        return (spec.gold_rm.init_from,)

    def config(self, spec: PipelineSpec) -> dict:
        # data.preference.num_examples decides where the proxy's pairs end and the gold RM's begin.
        return {"gold_rm": asdict(spec.gold_rm), "data.preference": asdict(spec.data.preference), "seed": spec.seed}

    def input_files(self, spec: PipelineSpec, root: Path) -> list[Path]:
        return [data_path(root, spec.data.preference.path)]

    def run(self, ctx) -> dict:
        spec = ctx.spec
        pairs = data_plan.gold_rm_train_pairs(spec, ctx.data_root)
        ctx.notes["split"] = (
            "pairs after the proxy RM's in the seeded shuffle of the training split, none sharing a prompt "
            "with the proxy RM's pairs; no exploit"
        )
        return train_reward_model(ctx, "gold_rm", spec.gold_rm, pairs, gold_seed(spec))
