"""length_inflation: the candidate says more without saying better.

Four checks against the baseline:
- `length_shift`: median length ratio, failing only when the shift is also significant
  (two-sided Mann-Whitney U; the KS statistic is reported beside it);
- `truncation_rate`: the rise in responses that ran out of tokens (`finished` false);
- `reward_length_corr`: Spearman correlation of proxy reward with length (warns: a reward
  model that pays for length is the usual cause of inflation);
- `length_controlled_gain`: the share of the proxy-reward gain that length explains, from
  the regression reward ~ a + b * length + g * is_candidate fitted on both sets (g is the
  gain at equal length; the within-set slope b is not fooled by the candidate being longer).
  It fails only when the candidate is also longer on average: a gain bought by SHORTER answers
  (a reward model that pays for brevity) is not inflation, so it is reported as `info` with
  its share and direction.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from nemo_rlhf.gate.detectors.common import case, length, skipped, verdict
from nemo_rlhf.gate.findings import Finding
from nemo_rlhf.gate.responses import ResponseSet

NAME = "length_inflation"


def length_inflation(candidate: ResponseSet, baseline: ResponseSet, cfg) -> list[Finding]:
    """All four length checks of the candidate's final step against the baseline."""
    cand, t = candidate.final(), cfg.thresholds
    return [
        _length_shift(cand, baseline, t, cfg.max_cases),
        _truncation(cand, baseline, t),
        _reward_length_corr(cand, t),
        _length_controlled_gain(cand, baseline, t, cfg.max_cases),
    ]


def _length_shift(cand: ResponseSet, base: ResponseSet, t, max_cases: int) -> Finding:
    a = np.array([length(r) for r in cand.rows], float)
    b = np.array([length(r) for r in base.rows], float)
    ratio = np.median(a) / max(np.median(b), 1.0)
    p = float(stats.mannwhitneyu(a, b, alternative="two-sided").pvalue) if len(set(a) | set(b)) > 1 else 1.0
    ks = float(stats.ks_2samp(a, b).statistic)
    bad = ratio > t.length_max_ratio and p < t.length_p_value
    worst = sorted(cand.rows, key=length, reverse=True)[:max_cases]
    return verdict(
        NAME, "length_shift", bad, ratio, t.length_max_ratio,
        f"median length {np.median(a):.0f} vs baseline {np.median(b):.0f} words "
        f"(Mann-Whitney p={p:.2g} vs {t.length_p_value:g}, KS D={ks:.2f})",
        median_candidate=float(np.median(a)), median_baseline=float(np.median(b)), mean_candidate=float(a.mean()),
        mean_baseline=float(b.mean()), p_value=p, ks_statistic=ks,
        cases=[case(r, f"{length(r)} words", length(r)) for r in worst] if bad else [],
    )


def _truncation(cand: ResponseSet, base: ResponseSet, t) -> Finding:
    if not cand.has("finished") or not base.has("finished"):
        return skipped(NAME, "truncation_rate", "the files have no `finished` field")
    rate_c = float(np.mean([not r.finished for r in cand.rows]))
    rate_b = float(np.mean([not r.finished for r in base.rows]))
    rise = rate_c - rate_b
    return verdict(NAME, "truncation_rate", rise > t.truncation_max_increase, rise, t.truncation_max_increase,
                   f"{rate_c:.1%} of responses truncated vs baseline {rate_b:.1%}",
                   candidate_rate=rate_c, baseline_rate=rate_b)


def _reward_length_corr(cand: ResponseSet, t) -> Finding:
    rows = cand.with_attr("proxy_reward")
    if len(rows) < 3:
        return skipped(NAME, "reward_length_corr", "fewer than 3 responses have `proxy_reward`")
    lengths, rewards = [length(r) for r in rows], [r.proxy_reward for r in rows]
    # A constant side has no correlation (scipy would warn and return NaN).
    rho = 0.0 if len(set(lengths)) < 2 or len(set(rewards)) < 2 else float(stats.spearmanr(lengths, rewards).statistic)
    return verdict(NAME, "reward_length_corr", rho > t.reward_length_max_corr, rho, t.reward_length_max_corr,
                   "Spearman correlation of proxy reward with length", severity="warn")


def _length_controlled_gain(cand: ResponseSet, base: ResponseSet, t, max_cases: int) -> Finding:
    rc, rb = cand.with_attr("proxy_reward"), base.with_attr("proxy_reward")
    if len(rc) < 3 or len(rb) < 3:
        return skipped(NAME, "length_controlled_gain", "candidate or baseline has fewer than 3 `proxy_reward`s")
    y = np.array([r.proxy_reward for r in rc + rb])
    lengths = np.array([length(r) for r in rc + rb], float)
    group = np.array([1.0] * len(rc) + [0.0] * len(rb))
    design = np.column_stack([np.ones_like(y), lengths, group])
    (_, slope, controlled), *_ = np.linalg.lstsq(design, y, rcond=None)
    raw = float(y[group == 1].mean() - y[group == 0].mean())
    if raw <= 0:
        return Finding(NAME, "info", 0.0, t.length_explained_max_share,
                       f"length_controlled_gain: no proxy-reward gain to explain (raw gain {raw:.4g}; "
                       f"value 0, threshold {t.length_explained_max_share:.4g})",
                       {"check": "length_controlled_gain", "raw_gain": raw, "controlled_gain": float(controlled)})
    share = float(np.clip(1 - controlled / raw, 0.0, 1.0))
    mean_c, mean_b = float(lengths[group == 1].mean()), float(lengths[group == 0].mean())
    longer = mean_c > mean_b
    bad = share > t.length_explained_max_share and longer
    direction = "longer" if longer else "SHORTER (not inflation: reported, never failed here)"
    # The candidate's highest proxy rewards are the cases most likely bought with length.
    worst = sorted(rc, key=lambda r: r.proxy_reward, reverse=True)[:max_cases]
    return verdict(
        NAME, "length_controlled_gain", bad, share, t.length_explained_max_share,
        f"length explains {share:.0%} of the proxy-reward gain (raw gain {raw:.3g}, at equal length {controlled:.3g}, "
        f"{slope:.3g} reward per word); candidate answers are {direction}: mean {mean_c:.1f} vs {mean_b:.1f} words",
        raw_gain=raw, controlled_gain=float(controlled), reward_per_word=float(slope), candidate_longer=longer,
        mean_length_candidate=mean_c, mean_length_baseline=mean_b,
        cases=[case(r, f"proxy reward {r.proxy_reward:.3g} at {length(r)} words", r.proxy_reward)
               for r in worst] if bad else [],
    )
