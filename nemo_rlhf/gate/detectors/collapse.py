"""template_collapse: responses that stop depending on the prompt.

Checks against the baseline (each a candidate-vs-baseline comparison, so a task whose
answers are naturally alike does not fire):
- `distinct_n`: distinct-1 and distinct-2 on fixed-size windows of the concatenated responses
  (mean segmental type-token ratio), so longer outputs are not penalised for length alone;
- `self_bleu`: within-prompt self-BLEU (sacrebleu sentence BLEU of each response against the
  other responses to its prompt), when prompts have several responses;
- `cross_prompt_ngram` / `cross_prompt_embedding`: mean similarity of responses to different
  prompts (word-bigram Jaccard; cosine of all-MiniLM-L6-v2 embeddings);
- `prompt_dependence`: share of responses whose nearest prompt (by embedding) is their own;
- `same_opening`: share of responses opening with the most common first words.
"""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import sacrebleu

from nemo_rlhf.gate.detectors import embeddings
from nemo_rlhf.gate.detectors.common import case, ngrams, seed_of, skipped, verdict, words
from nemo_rlhf.gate.findings import Finding
from nemo_rlhf.gate.responses import Response, ResponseSet, group_by_prompt

NAME = "template_collapse"
WINDOW = 100  # words per distinct-n window
MAX_PAIRWISE = 300  # responses compared pairwise (seeded subset beyond this)
MAX_BLEU_GROUPS = 200


def template_collapse(candidate: ResponseSet, baseline: ResponseSet, cfg) -> list[Finding]:
    """All collapse checks of the candidate's final step against the baseline."""
    cand, t = candidate.final(), cfg.thresholds
    firsts_c, firsts_b = _one_per_prompt(cand.rows, seed_of(cfg)), _one_per_prompt(baseline.rows, seed_of(cfg))
    findings = [
        _distinct(cand, baseline, t),
        _self_bleu(cand, baseline, t),
        _cross_ngram(firsts_c, firsts_b, t, cfg.max_cases),
        *_embedding_checks(firsts_c, firsts_b, cfg),
        _same_opening(cand, baseline, t, cfg.max_cases),
    ]
    return findings


def _one_per_prompt(rows: list[Response], seed: int) -> list[Response]:
    """The first response to each prompt, at most MAX_PAIRWISE of them (seeded choice), sorted by prompt."""
    firsts = sorted((group[0] for group in group_by_prompt(rows).values()), key=lambda r: r.prompt)
    if len(firsts) > MAX_PAIRWISE:
        keep = np.random.default_rng(seed).choice(len(firsts), MAX_PAIRWISE, replace=False)
        firsts = [firsts[i] for i in sorted(keep)]
    return firsts


def distinct_n(rows: list[Response], n: int, window: int) -> float:
    """Mean over non-overlapping `window`-word windows of unique n-grams / n-grams."""
    tokens = [w for r in sorted(rows, key=lambda r: r.prompt) for w in words(r.response)]
    if len(tokens) < n:
        return 0.0
    window = max(min(window, len(tokens)), n)
    scores = []
    for start in range(0, len(tokens) - window + 1, window):
        grams = ngrams(tokens[start : start + window], n)
        scores.append(len(set(grams)) / len(grams))
    return float(np.mean(scores))


def _distinct(cand: ResponseSet, base: ResponseSet, t) -> Finding:
    # One window size for both sides, or the ratio would measure the window, not the text.
    total = min(sum(len(words(r.response)) for r in s.rows) for s in (cand, base))
    window = min(WINDOW, total)
    if window < 2:
        return skipped(NAME, "distinct_n", "responses have fewer than 2 words in all")
    ratios, values = [], {}
    for n in (1, 2):
        c, b = distinct_n(cand.rows, n, window), distinct_n(base.rows, n, window)
        values[f"distinct_{n}"], values[f"distinct_{n}_baseline"] = c, b
        ratios.append(c / b if b > 0 else 1.0)
    ratio = min(ratios)
    return verdict(NAME, "distinct_n", ratio < t.distinct_min_ratio, ratio, t.distinct_min_ratio,
                   f"distinct-1 {values['distinct_1']:.3f} (baseline {values['distinct_1_baseline']:.3f}), distinct-2 "
                   f"{values['distinct_2']:.3f} (baseline {values['distinct_2_baseline']:.3f}) on {window}-word "
                   "windows; value = the lower candidate/baseline ratio", window=window, **values)


def self_bleu(rows: list[Response]) -> float | None:
    """Mean BLEU (0..1) of each response against the other responses to its prompt; None without such prompts."""
    groups = [g for g in group_by_prompt(rows).values() if len(g) >= 2][:MAX_BLEU_GROUPS]
    scores = [
        sacrebleu.sentence_bleu(r.response, [o.response for j, o in enumerate(g) if j != i]).score / 100
        for g in groups
        for i, r in enumerate(g)
    ]
    return float(np.mean(scores)) if scores else None


def _self_bleu(cand: ResponseSet, base: ResponseSet, t) -> Finding:
    c, b = self_bleu(cand.rows), self_bleu(base.rows)
    if c is None or b is None:
        return skipped(NAME, "self_bleu", "candidate or baseline has one response per prompt")
    rise = c - b
    return verdict(NAME, "self_bleu", rise > t.self_bleu_max_increase, rise, t.self_bleu_max_increase,
                   f"within-prompt self-BLEU {c:.3f} vs baseline {b:.3f}", candidate=c, baseline=b)


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def cross_prompt_ngram(rows: list[Response]) -> np.ndarray:
    """Per response: mean bigram Jaccard similarity with the responses to the other prompts."""
    sets = [set(ngrams(words(r.response), 2)) for r in rows]
    sims = np.zeros((len(rows), len(rows)))
    for i, j in itertools.combinations(range(len(rows)), 2):
        sims[i, j] = sims[j, i] = _jaccard(sets[i], sets[j])
    return sims.sum(axis=1) / max(len(rows) - 1, 1)


def _cross_ngram(cand: list[Response], base: list[Response], t, max_cases: int) -> Finding:
    if len(cand) < 2 or len(base) < 2:
        return skipped(NAME, "cross_prompt_ngram", "fewer than 2 prompts")
    per_c = cross_prompt_ngram(cand)
    c, b = float(per_c.mean()), float(cross_prompt_ngram(base).mean())
    rise, bad = c - b, c - b > t.cross_prompt_max_increase
    return verdict(NAME, "cross_prompt_ngram", bad, rise, t.cross_prompt_max_increase,
                   f"mean bigram Jaccard between responses to different prompts {c:.3f} vs baseline {b:.3f}",
                   candidate=c, baseline=b, cases=_most_alike(cand, per_c, max_cases) if bad else [])


def _most_alike(rows: list[Response], per_row: np.ndarray, max_cases: int) -> list[dict]:
    order = np.argsort(-per_row)[:max_cases]
    return [case(rows[i], f"mean similarity {per_row[i]:.2f} to responses for other prompts", per_row[i])
            for i in order]


def _embedding_checks(cand: list[Response], base: list[Response], cfg) -> list[Finding]:
    checks = ("cross_prompt_embedding", "prompt_dependence")
    if not cfg.embeddings:
        return [skipped(NAME, c, "gate.embeddings is off") for c in checks]
    if len(cand) < 2 or len(base) < 2:
        return [skipped(NAME, c, "fewer than 2 prompts") for c in checks]
    try:
        sides = [_embedding_stats(rows) for rows in (cand, base)]
    except embeddings.EmbeddingsUnavailable as exc:
        return [skipped(NAME, c, f"no embedding model: {exc}") for c in checks]
    (sim_c, per_c, dep_c), (sim_b, _, dep_b) = sides
    t = cfg.thresholds
    rise, drop = sim_c - sim_b, dep_b - dep_c
    bad_sim, bad_dep = rise > t.cross_prompt_max_increase, drop > t.prompt_dependence_max_drop
    return [
        verdict(NAME, "cross_prompt_embedding", bad_sim, rise, t.cross_prompt_max_increase,
                f"mean embedding cosine between responses to different prompts {sim_c:.3f} vs baseline {sim_b:.3f}",
                candidate=sim_c, baseline=sim_b, cases=_most_alike(cand, per_c, cfg.max_cases) if bad_sim else []),
        verdict(NAME, "prompt_dependence", bad_dep, drop, t.prompt_dependence_max_drop,
                f"{dep_c:.0%} of responses are nearest (by embedding) to their own prompt vs baseline {dep_b:.0%} "
                f"(chance {1 / len(cand):.0%}); value = the drop", candidate=dep_c, baseline=dep_b),
    ]


def _embedding_stats(rows: list[Response]) -> tuple[float, np.ndarray, float]:
    """(mean cross-response cosine, per-response mean cosine, share of responses nearest to their own prompt)."""
    resp = embeddings.embed([r.response for r in rows])
    prompts = embeddings.embed([r.prompt for r in rows])
    sims = resp @ resp.T
    n = len(rows)
    per_row = (sims.sum(axis=1) - np.diag(sims)) / (n - 1)
    own = float(np.mean(np.argmax(resp @ prompts.T, axis=1) == np.arange(n)))
    return float(per_row.mean()), per_row, own


def _opening(text: str, n: int) -> str:
    return " ".join(text.lower().split()[:n])


def _same_opening(cand: ResponseSet, base: ResponseSet, t, max_cases: int) -> Finding:
    n = t.opening_words

    def share(rows):
        counts = Counter(_opening(r.response, n) for r in rows)
        top, count = counts.most_common(1)[0]
        return count / len(rows), top

    (c, top), (b, _) = share(cand.rows), share(base.rows)
    rise, bad = c - b, c - b > t.opening_max_increase
    cases = [case(r, f"opens with {top!r}") for r in cand.rows if _opening(r.response, n) == top][:max_cases]
    return verdict(NAME, "same_opening", bad, rise, t.opening_max_increase,
                   f"{c:.0%} of responses open with the same {n} words ({top!r}) vs baseline {b:.0%}",
                   candidate=c, baseline=b, opening=top, cases=cases if bad else [])
