"""`nemo-rlhf parity all`: every layer in order (config, data, model, loss, curves) and one verdict.

Each layer is the same function its own verb runs, with the same models: with `run_dir` the run's
stage outputs (RUN/sft/model, RUN/rm/model, RUN/ppo/model with the value model and rollout the PPO
stage kept), otherwise the spec's random models built as the pipeline builds them. The summary has
one check per layer result ("loss-ppo": passed when all its checks pass, the failing check names in
its detail); the layer results themselves are returned for writing and recording one by one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from nemo_rlhf.parity.report import Check, ParityResult
from nemo_rlhf.spec.schema import PipelineSpec

LAYERS = ("config", "data", "model", "loss", "curves")


@dataclass
class Inputs:
    """What the layers share: the spec and where its two sides come from."""

    spec: PipelineSpec
    spec_path: str = ""
    run_dir: Path | None = None
    configs_dir: Path | None = None
    aligner_dir: Path | None = None
    tp: int = 2
    steps: int = 4
    pp: int = 1

    def run_path(self, *parts: str) -> Path | None:
        """RUN/<parts> when the run has it, else None (the layer builds its model from the spec)."""
        if self.run_dir is None:
            return None
        path = self.run_dir.joinpath(*parts)
        return path if path.exists() else None


def _jobs(x: Inputs) -> list[tuple[str, str, Callable[[], ParityResult]]]:
    """(layer, result name, thunk) for every check `parity all` runs, in order."""
    from nemo_rlhf.parity.config import config_parity
    from nemo_rlhf.parity.curves import curve_parity
    from nemo_rlhf.parity.data_model import data_parity, model_parity
    from nemo_rlhf.parity.loss import ppo_parity, sft_rm_loss_parity
    from nemo_rlhf.stages.base_model import MODEL_DIR
    from nemo_rlhf.stages.ppo_rollout import ROLLOUT, VALUE_MODEL_DIR

    spec = x.spec
    hf = {stage: x.run_path(stage, MODEL_DIR) for stage in ("sft", "rm", "ppo")}
    critic = x.run_path("ppo", VALUE_MODEL_DIR) or hf["rm"]
    rollout = x.run_path("ppo", ROLLOUT) if hf["ppo"] is not None else None
    return [
        ("config", "config", lambda: config_parity(spec, x.configs_dir, x.spec_path)),
        ("data", "data", lambda: data_parity(spec, x.aligner_dir)),
        *[("model", f"model-{s}", lambda s=s: model_parity(spec, s, hf[s])) for s in ("sft", "rm", "ppo")],
        *[("loss", f"loss-{s}", lambda s=s: sft_rm_loss_parity(spec, s, hf_dir=hf[s], aligner_dir=x.aligner_dir,
                                                                tp=x.tp, pp=x.pp)) for s in ("sft", "rm")],
        ("loss", "loss-ppo", lambda: ppo_parity(spec, x.configs_dir, rollouts=rollout, policy_hf=hf["ppo"],
                                                critic_hf=critic, tp=x.tp, pp=x.pp, aligner_dir=x.aligner_dir)),
        *[("curves", f"curves-{s}", lambda s=s: curve_parity(spec, s, x.steps, tp=x.tp, pp=x.pp, hf_dir=hf[s],
                                                              aligner_dir=x.aligner_dir)) for s in ("sft", "rm")],
    ]


def summary_check(result: ParityResult, seconds: float) -> Check:
    failed = [c.name for c in result.checks if not c.passed]
    detail = f"{len(result.checks) - len(failed)}/{len(result.checks)} checks passed in {seconds:.0f} s"
    if failed:
        detail += f"; failed: {', '.join(failed)}"
    return Check(result.name, result.passed, detail=detail)


def all_layers(x: Inputs, layers: tuple[str, ...] = LAYERS) -> tuple[ParityResult, list[ParityResult]]:
    """Run the chosen layers; (the summary, each layer's result).

    Raises:
        UserError: bad input in any layer (nothing later runs).
    """
    from tqdm import tqdm

    jobs = [job for job in _jobs(x) if job[0] in layers]
    summary = ParityResult("all", meta={"layers": list(layers), "run_dir": str(x.run_dir or ""),
                                        "models": "the run's stage outputs" if x.run_dir else "built from the spec"})
    results = []
    progress = tqdm(jobs, desc="parity", unit="check")
    for _, name, run in progress:
        progress.set_postfix_str(name)
        start = time.monotonic()
        result = run()
        results.append(result)
        summary.add(summary_check(result, time.monotonic() - start))
    summary.tables["layers"] = [{"result": c.name, "passed": c.passed, "detail": c.detail} for c in summary.checks]
    return summary, results
