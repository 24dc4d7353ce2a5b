"""Bootstrap confidence intervals shared by the gate's benchmark and battle layers.

One place for the resampling math: GSM8K accuracy, the paired candidate - baseline
difference and battle win rates are all means over the same items, resampled by item with
a seeded generator so a gate run is reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided percentile-bootstrap interval.

    Attributes:
        estimate: the statistic on the full sample.
        low: the alpha/2 quantile of the bootstrap distribution.
        high: the 1 - alpha/2 quantile.
        level: the confidence level (1 - alpha).
    """

    estimate: float
    low: float
    high: float
    level: float

    def to_dict(self) -> dict:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "level": self.level}


def resample_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """`n_boot` rows of `n` item indices drawn with replacement (seeded)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def statistic_ci(
    n: int,
    statistic: Callable[[np.ndarray], float],
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> Interval:
    """Percentile bootstrap of any statistic of `n` items.

    Args:
        n: number of items (> 0).
        statistic: maps an index array (items, possibly repeated) to a number.
        n_boot: bootstrap replicates.
        seed: generator seed.
        alpha: 1 - confidence level.
    """
    estimate = float(statistic(np.arange(n)))
    replicates = np.array([statistic(idx) for idx in resample_indices(n, n_boot, seed)], dtype=float)
    low, high = np.quantile(replicates, [alpha / 2, 1 - alpha / 2])
    return Interval(estimate, float(low), float(high), 1 - alpha)


def mean_ci(values: Sequence[float], n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> Interval:
    """Percentile bootstrap of a mean. For a paired comparison pass per-item differences."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        raise ValueError("mean_ci needs at least one value")
    means = data[resample_indices(data.size, n_boot, seed)].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return Interval(float(data.mean()), float(low), float(high), 1 - alpha)
