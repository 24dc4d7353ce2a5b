"""Layer 2 of the gate: pairwise battles judged by a reward model or a chat model.

Every prompt is judged twice, candidate as A then as B, to cancel position bias: the
candidate wins (1) or loses (0) only when both orders agree, any disagreement is a tie
(0.5). The win rate is the mean outcome with a bootstrap interval over prompts.

Length-controlled win rate, after AlpacaEval-LC (Dubois et al., 2024): a logistic model of
the outcome on an intercept and the length term tanh(d / sd(d)), d = len(candidate) -
len(baseline), fitted over the prompts; the LC win rate is the model's prediction with the
length term set to zero, sigmoid(intercept). A judge that prefers longer answers then no
longer rewards a policy for writing them. (AlpacaEval also has an instruction-difficulty
term fitted across many models; a two-model gate has no data for it.)

The fit is a small penalised Newton/IRLS in numpy rather than scikit-learn, which is not a
dependency of the package and whose LogisticRegression (a) penalises the intercept too by
default and (b) rejects fractional targets such as our ties. A weak ridge on the slope
keeps the fit finite when length separates wins from losses perfectly (the judge always
prefers the longer answer), which is exactly the case LC must handle.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from nemo_rlhf.errors import UserError
from nemo_rlhf.gate.bootstrap import Interval, mean_ci, statistic_ci
from nemo_rlhf.gate.findings import Finding
from nemo_rlhf.gate.format_checks import response_length

SLOPE_RIDGE = 0.1  # penalty on the length coefficient (log-likelihood units)
INTERCEPT_RIDGE = 1e-4  # keeps an all-wins set finite; negligible otherwise


@dataclass
class Pairing:
    """Candidate and baseline responses on the prompts both files answered (first row per prompt)."""

    prompts: list[str]
    candidate: list[str]
    baseline: list[str]
    unmatched_candidate: int = 0
    unmatched_baseline: int = 0


def pair_rows(candidate_rows: Sequence[dict], baseline_rows: Sequence[dict]) -> Pairing:
    """Pairs two responses files by exact prompt text, in the candidate's order."""
    base: dict[str, str] = {}
    for row in baseline_rows:
        base.setdefault(row["prompt"], row["response"])
    pairing, seen = Pairing([], [], []), set()
    for row in candidate_rows:
        prompt = row["prompt"]
        if prompt in seen:
            continue
        seen.add(prompt)
        if prompt not in base:
            pairing.unmatched_candidate += 1
            continue
        pairing.prompts.append(prompt)
        pairing.candidate.append(row["response"])
        pairing.baseline.append(base[prompt])
    pairing.unmatched_baseline = len(set(base) - seen)
    return pairing


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -500, 500)))


def fit_length_logistic(outcomes: Sequence[float], length_term: Sequence[float], iters: int = 100) -> np.ndarray:
    """Penalised logistic regression of outcomes in [0, 1] on (1, length_term); returns (b0, b1)."""
    y = np.asarray(outcomes, dtype=float)
    X = np.column_stack([np.ones_like(y), np.asarray(length_term, dtype=float)])
    ridge = np.diag([INTERCEPT_RIDGE, SLOPE_RIDGE])
    beta = np.zeros(2)
    for _ in range(iters):
        p = _sigmoid(X @ beta)
        gradient = X.T @ (y - p) - ridge @ beta
        hessian = (X * (p * (1 - p))[:, None]).T @ X + ridge
        step = np.clip(np.linalg.solve(hessian, gradient), -5.0, 5.0)
        beta += step
        if np.max(np.abs(step)) < 1e-10:
            break
    return beta


def length_term(candidate_lengths: Sequence[float], baseline_lengths: Sequence[float]) -> np.ndarray:
    """tanh of the length difference over its standard deviation (0 when all are equal)."""
    d = np.asarray(candidate_lengths, dtype=float) - np.asarray(baseline_lengths, dtype=float)
    sd = d.std()
    return np.tanh(d / sd) if sd > 0 else np.zeros_like(d)


def lc_win_rate(outcomes: Sequence[float], term: Sequence[float]) -> tuple[float, float]:
    """(length-controlled win rate, length coefficient)."""
    b0, b1 = fit_length_logistic(outcomes, term)
    return float(_sigmoid(np.array(b0))), float(b1)


@dataclass
class BattleResult:
    """Candidate vs baseline under one judge."""

    candidate: str
    baseline: str
    judge: str
    n: int
    wins: int
    losses: int
    ties: int
    order_disagreements: int  # prompts where the two orders gave different verdicts
    unparsed: int  # judge answers that named neither response
    win_rate: Interval
    lc_win_rate: Interval
    length_coefficient: float
    length_unit: str
    outcomes: list[float] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    candidate_responses: list[str] = field(default_factory=list)
    baseline_responses: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        keys = (
            "candidate",
            "baseline",
            "judge",
            "n",
            "wins",
            "losses",
            "ties",
            "order_disagreements",
            "unparsed",
            "length_coefficient",
            "length_unit",
        )
        return {
            **{k: getattr(self, k) for k in keys},
            "win_rate": self.win_rate.to_dict(),
            "lc_win_rate": self.lc_win_rate.to_dict(),
        }


def battle(
    judge,
    prompts: Sequence[str],
    candidate: Sequence[str],
    baseline: Sequence[str],
    names: tuple[str, str] = ("candidate", "baseline"),
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    tokenizer=None,
) -> BattleResult:
    """Judges candidate vs baseline on the same prompts in both orders.

    Args:
        judge: a `judges.RewardModelJudge`, `judges.ChatJudge` or anything with `prefer`.
        prompts, candidate, baseline: aligned lists (see `pair_rows`).
        names: labels of the two sides for the report.
        n_boot, seed, alpha: the bootstrap of both win rates.
        tokenizer: measure lengths in its tokens; default words.
    """
    if not prompts:
        raise UserError(
            "no prompts shared by candidate and baseline to battle on",
            where="battles",
            fix="give both responses files the same prompts",
        )
    first = judge.prefer(prompts, candidate, baseline)  # 1.0 = candidate (A) better
    second = judge.prefer(prompts, baseline, candidate)  # 1.0 = baseline (A) better
    outcomes, disagreements, unparsed = [], 0, 0
    for p1, p2 in zip(first, second):
        unparsed += (p1 is None) + (p2 is None)
        s1 = 0.5 if p1 is None else p1
        s2 = 0.5 if p2 is None else 1.0 - p2
        disagreements += s1 != s2
        outcomes.append(s1 if s1 == s2 else 0.5)
    term = length_term(
        [response_length(t, tokenizer) for t in candidate], [response_length(t, tokenizer) for t in baseline]
    )
    y = np.asarray(outcomes)
    lc, coef = lc_win_rate(y, term)
    lc_interval = statistic_ci(len(y), lambda idx: lc_win_rate(y[idx], term[idx])[0], n_boot, seed, alpha)
    return BattleResult(
        candidate=names[0],
        baseline=names[1],
        judge=getattr(judge, "name", type(judge).__name__),
        n=len(outcomes),
        wins=int(sum(o == 1.0 for o in outcomes)),
        losses=int(sum(o == 0.0 for o in outcomes)),
        ties=int(sum(o == 0.5 for o in outcomes)),
        order_disagreements=int(disagreements),
        unparsed=int(unparsed),
        win_rate=mean_ci(outcomes, n_boot=n_boot, seed=seed, alpha=alpha),
        lc_win_rate=Interval(lc, lc_interval.low, lc_interval.high, lc_interval.level),
        length_coefficient=coef,
        length_unit="tokens" if tokenizer is not None else "words",
        outcomes=outcomes,
        prompts=list(prompts),
        candidate_responses=list(candidate),
        baseline_responses=list(baseline),
    )


def battle_rows(judge, candidate_rows: Sequence[dict], baseline_rows: Sequence[dict], **kwargs) -> BattleResult:
    """`battle` on two responses files, paired by prompt."""
    pairing = pair_rows(candidate_rows, baseline_rows)
    return battle(judge, pairing.prompts, pairing.candidate, pairing.baseline, **kwargs)


def round_robin(judge, named_rows: Mapping[str, Sequence[dict]], **kwargs) -> list[BattleResult]:
    """Every later entry against every earlier one, e.g. {base, sft, rlhf} -> sft/base, rlhf/base, rlhf/sft."""
    return [
        battle_rows(judge, named_rows[later], named_rows[earlier], names=(later, earlier), **kwargs)
        for earlier, later in itertools.combinations(list(named_rows), 2)
    ]


def preference_finding(result: BattleResult, preference_min_win_rate: float = 0.5, max_cases: int = 20):
    """The `preference` finding on the raw (both-orders) win rate.

    fail: the whole interval is below the threshold (the candidate loses); warn: the
    interval reaches down to the threshold (not shown to beat the baseline); info: beats it.
    """
    w = result.win_rate
    if w.high < preference_min_win_rate:
        severity, verdict = "fail", "loses to"
    elif w.low <= preference_min_win_rate:
        severity, verdict = "warn", "is not shown to beat"
    else:
        severity, verdict = "info", "beats"
    message = (
        f"{result.candidate} {verdict} {result.baseline}: win rate {w.estimate:.3f} "
        f"({w.level:.0%} CI [{w.low:.3f}, {w.high:.3f}], threshold {preference_min_win_rate:.2f}) over {result.n} "
        f"prompts judged by {result.judge} in both orders ({result.wins} wins, {result.losses} losses, "
        f"{result.ties} ties, {result.order_disagreements} order disagreements)"
    )
    losses = [i for i, o in enumerate(result.outcomes) if o == 0.0][:max_cases]
    return Finding(
        "preference",
        severity,
        w.estimate,
        preference_min_win_rate,
        message,
        details={**result.to_dict(), "cases": [_loss_case(result, i) for i in losses]},
    )


def _loss_case(result: BattleResult, i: int) -> dict:
    return {
        "prompt": result.prompts[i],
        "response": result.candidate_responses[i],
        "baseline_response": result.baseline_responses[i],
        "why": f"{result.judge} preferred {result.baseline} in both orders",
    }


def length_gap_finding(result: BattleResult, lc_max_gap: float = 0.1):
    """The `length_controlled_gap` finding: warn when raw - LC win rate exceeds `lc_max_gap`."""
    gap = result.win_rate.estimate - result.lc_win_rate.estimate
    message = (
        f"{result.candidate} vs {result.baseline}: raw win rate {result.win_rate.estimate:.3f}, length-controlled "
        f"{result.lc_win_rate.estimate:.3f} (CI [{result.lc_win_rate.low:.3f}, {result.lc_win_rate.high:.3f}]): "
        f"gap {gap:+.3f} (warn above {lc_max_gap:.2f}); length coefficient {result.length_coefficient:+.2f}"
    )
    if gap > lc_max_gap:
        message += ": part of the win comes from writing longer answers, not better ones"
    return Finding(
        "length_controlled_gap",
        "warn" if gap > lc_max_gap else "info",
        gap,
        lc_max_gap,
        message,
        details=result.to_dict(),
    )
