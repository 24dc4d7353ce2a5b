"""Real large-scale logs against small-scale logs: NeMo-Aligner's TensorBoard event files vs TRL's train_log.jsonl.

NeMo-Aligner 0.7.0 logs through PTL's TensorBoard logger with a prefix per loop (read from its
`algorithms/supervised.py` and `algorithms/ppo.py`):

* SFT / RM (`SupervisedTrainer.fit`): `train/loss`, `train/consumed_samples` (cumulative), `train/lr`,
  `train/grad_norm`; the RM adds `train/acc`, `train/rewards_chosen_mean`, `train/rewards_rejected_mean`.
* PPO (`PPOTrainer.fit`): `train_rollouts/rewards` (mean RM score), `train_rollouts/init_policy_kl`
  (per-sample mean over response tokens of log pi - log pi_init, averaged over samples),
  `train_rollouts/generation_length` (response tokens), `train_rollouts/consumed_samples` (cumulative
  prompts), and `train_optim/loss` per optimizer step.

TRL's rows (our `LogRecorder`: one JSON object per logging step with `step`) carry `loss`, and for
the RM `accuracy`; PPO `objective/scores`, `objective/kl` (SUM over response tokens, mean over the
batch) and our `response_length`. `METRICS` pairs them; a pair whose units differ says so and how it
is converted (`nemo_scale`). Points are aligned on consumed samples: NeMo logs them; the TRL side is
step x samples per step (`samples_per_step`). Each metric's divergence is the mean |NeMo - TRL| over
the aligned points relative to the mean |TRL| there; `max_divergence` (default 0.1) is the bound:
a cluster run differs from a CPU one by precision and data order, so this is a drift alarm, not an
fp32 equality.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from nemo_rlhf.errors import UserError
from nemo_rlhf.parity.report import Check, ParityResult

MAX_DIVERGENCE = 0.1


@dataclass(frozen=True)
class Metric:
    name: str
    nemo_tag: str
    trl_key: str
    note: str = ""
    scale_by: str | None = None  # NeMo tag whose value multiplies the NeMo metric (unit conversion)


CONSUMED = {"sft": "train/consumed_samples", "rm": "train/consumed_samples", "ppo": "train_rollouts/consumed_samples"}
METRICS: dict[str, tuple[Metric, ...]] = {
    "sft": (Metric("loss", "train/loss", "loss", "masked token CE; NeMo: mean of micro-batch means"),),
    "rm": (Metric("loss", "train/loss", "loss", "Bradley-Terry loss"),
           Metric("accuracy", "train/acc", "accuracy", "share of pairs ranked right")),
    "ppo": (Metric("reward", "train_rollouts/rewards", "objective/scores", "mean reward-model score"),
            Metric("kl", "train_rollouts/init_policy_kl", "objective/kl",
                   "NeMo logs the per-token mean KL, TRL the per-sequence sum: NeMo's is multiplied by its mean "
                   "generation_length (exact only for equal lengths)", scale_by="train_rollouts/generation_length"),
            Metric("response_length", "train_rollouts/generation_length", "response_length",
                   "response tokens; NeMo stops at end strings, TRL generates response_length then truncates")),
}


def read_tensorboard(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in a TensorBoard log folder (or one event file): tag -> [(step, value)] in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = Path(path)
    files = [path] if path.is_file() else sorted(path.rglob("events.out.tfevents.*"))
    if not files:
        raise UserError(f"no TensorBoard event files under {path}", where="--tensorboard",
                        fix="point at the NeMo run's log folder (exp_manager.explicit_log_dir) or an events file")
    scalars: dict[str, dict[int, float]] = {}
    for file in files:
        acc = EventAccumulator(str(file), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            for event in acc.Scalars(tag):
                scalars.setdefault(tag, {})[int(event.step)] = float(event.value)  # a resumed run rewrites steps
    return {tag: sorted(points.items()) for tag, points in scalars.items()}


def read_trl_log(path: Path) -> list[dict]:
    """The rows of a TRL stage's train_log.jsonl that carry a step (final summary rows are kept too)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found", where="--trl-log", fix="pass RUN/<stage>/train_log.jsonl")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UserError(f"line {number} is not JSON: {err}", where=str(path),
                                fix="pass an intact log") from None
    return rows


def _trl_series(rows: list[dict], key: str, samples_per_step: int) -> dict[int, float]:
    return {int(r["step"]) * samples_per_step: float(r[key]) for r in rows
            if key in r and "step" in r and isinstance(r[key], (int, float))}


def _nemo_series(scalars: dict, metric: Metric, consumed_tag: str) -> dict[int, float]:
    """NeMo values keyed by consumed samples (the tag NeMo logs at the same step), unit-converted."""
    consumed = dict(scalars.get(consumed_tag, []))
    scale = dict(scalars.get(metric.scale_by, [])) if metric.scale_by else {}
    out = {}
    for step, value in scalars.get(metric.nemo_tag, []):
        if step in consumed and (not metric.scale_by or step in scale):
            out[int(round(consumed[step]))] = value * (scale[step] if metric.scale_by else 1.0)
    return out


def compare_logs(scalars: dict, trl_rows: list[dict], stage: str, samples_per_step: int,
                 max_divergence: float = MAX_DIVERGENCE) -> ParityResult:
    """Align both logs on consumed samples and report each metric's divergence (see the module doc)."""
    result = ParityResult("curves", meta={"stage": stage, "source": "logs", "samples_per_step": samples_per_step,
                                          "aligned_on": "consumed samples", "max_divergence": max_divergence})
    series = {}
    for metric in METRICS[stage]:
        nemo, trl = _nemo_series(scalars, metric, CONSUMED[stage]), _trl_series(trl_rows, metric.trl_key,
                                                                               samples_per_step)
        common = sorted(set(nemo) & set(trl))
        series[metric.name] = (nemo, trl)
        if not common:
            result.add(Check(f"logs/{stage}/{metric.name}", False,
                             detail=f"no common consumed-sample points (NeMo {metric.nemo_tag}: {len(nemo)} points, "
                                    f"TRL {metric.trl_key}: {len(trl)} points)"))
            continue
        diffs = [abs(nemo[c] - trl[c]) for c in common]
        scale = sum(abs(trl[c]) for c in common) / len(common)
        divergence = (sum(diffs) / len(diffs)) / scale if scale > 0 else (0.0 if max(diffs) == 0 else math.inf)
        result.add(Check.within(f"logs/{stage}/{metric.name}", divergence, max_divergence,
                                f"mean |NeMo - TRL| / mean |TRL| over {len(common)} aligned points "
                                f"(max |diff| {max(diffs):.3g}); {metric.note}",
                                points=len(common), max_abs_diff=max(diffs)))
    result.tables["aligned metrics"] = [
        {"metric": m.name, "NeMo tag": m.nemo_tag, "TRL key": m.trl_key, "note": m.note} for m in METRICS[stage]]
    result.meta["series"] = {name: {"nemo": sorted(n.items()), "trl": sorted(t.items())}
                             for name, (n, t) in series.items()}
    return result


def plot_series(result: ParityResult, path: Path) -> Path | None:
    """Both curves of every metric against consumed samples (from result.meta["series"]); None if there are none."""
    series = result.meta.get("series") or {}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(series), 1, figsize=(7, 2.6 * len(series)), squeeze=False)
    for ax, (name, sides) in zip(axes[:, 0], series.items()):
        for label, points, style in (("NeMo-Aligner / megatron", sides["nemo"], "-o"), ("TRL", sides["trl"], "--x")):
            if points:
                ax.plot(*zip(*points), style, label=label, markersize=3)
        ax.set_ylabel(name)
        ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel(result.meta.get("x_label", "consumed samples"))
    fig.suptitle(f"parity {result.name}: {'passed' if result.passed else 'FAILED'}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
