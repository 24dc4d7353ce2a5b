"""Small helpers the detectors share: words, cases for the bad-case export, bootstrap CIs."""

from __future__ import annotations

import re

import numpy as np

from nemo_rlhf.gate.findings import Finding
from nemo_rlhf.gate.responses import Response

_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks: the unit of every length and n-gram count."""
    return _WORD.findall(text.lower())


def length(r: Response) -> int:
    """Response length in words (whitespace-separated), the same for every tokenizer."""
    return len(r.response.split())


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def case(r: Response, why: str, score: float | None = None) -> dict:
    """One bad case for the export: the row, why it is bad, and an empty reviewer verdict."""
    out = {"prompt": r.prompt, "response": r.response, "why": why, "where": r.where}
    if score is not None:
        out["score"] = float(score)
    for name in ("proxy_reward", "gold_reward", "kl", "step"):
        if getattr(r, name) is not None:
            out[name] = getattr(r, name)
    return out


def skipped(detector: str, check: str, reason: str) -> Finding:
    """An `info` finding for a check that had no data to run on."""
    return Finding(detector, "info", None, None, f"{check}: skipped, {reason}", {"check": check, "skipped": True})


def verdict(detector: str, check: str, bad: bool, value: float, threshold: float, message: str,
            severity: str = "fail", **details) -> Finding:
    """`severity` when `bad`, else `info`; the message gets the value and threshold appended."""
    text = f"{check}: {message} (value {value:.4g}, threshold {threshold:.4g})"
    return Finding(detector, severity if bad else "info", float(value), float(threshold), text,
                   {"check": check, **details})


DEFAULT_SEED = 1234


def seed_of(cfg) -> int:
    """The gate's seed (the runner fills it from the spec; direct callers may leave it null)."""
    return cfg.seed if cfg.seed is not None else DEFAULT_SEED


def bootstrap_ci(values: np.ndarray, samples: int, confidence: float, seed: int) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of `values` (e.g. paired differences)."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    tail = (1 - confidence) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))
