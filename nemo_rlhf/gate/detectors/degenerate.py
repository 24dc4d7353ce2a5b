"""degenerate_responses: output no one can use, whatever a reward model says of it.

Absolute rates in the candidate (a degenerate baseline does not excuse a degenerate candidate):
- `empty`: empty or whitespace-only responses;
- `loops`: a non-trivial line repeated 3+ times, or a response whose word 4-grams are mostly
  repeats (a generation loop);
- `leaked_tokens`: special or template tokens in the text (<|im_start|>, <|endoftext|>, </s>,
  [INST], ...) or a dialogue role marker starting a line (the model writing the next turn);
  the table is `nemo_rlhf.gate.format_checks.TEMPLATE_LEAKS`, shared with format_compliance.

Each rate is a sample of n responses, so a check fails only when the observed rate is above
its threshold AND an exact one-sided binomial test rejects "the true rate is at most the
threshold" at level 1 - `gate.confidence`. Without the test, a 2% threshold on 64 samples
fails a policy on 2 empty answers, which a policy whose true rate IS 2% produces 37% of the
time; with it, 64 samples need 4 empties (p = 0.04), 200 samples need 8 (p = 0.049).
"""

from __future__ import annotations

from collections import Counter

from scipy import stats

from nemo_rlhf.gate.detectors.common import case, ngrams, verdict, words
from nemo_rlhf.gate.findings import Finding
from nemo_rlhf.gate.format_checks import template_leaks
from nemo_rlhf.gate.responses import Response, ResponseSet

NAME = "degenerate_responses"
LINE_REPEATS = 3  # a line seen this often is a loop
MIN_LINE_CHARS = 4  # shorter lines ("", "-", "```") repeat legitimately
MIN_4GRAMS = 12  # below this a response is too short to call its repeats a loop
MAX_REPEATED_4GRAM_SHARE = 0.5


def degenerate_responses(candidate: ResponseSet, baseline: ResponseSet, cfg) -> list[Finding]:
    """Empty, looping and leaking responses in the candidate's final step."""
    rows, t = candidate.final().rows, cfg.thresholds
    checks = [
        ("empty", lambda r: "empty response" if not r.response.strip() else None, t.empty_max_rate),
        ("loops", loop_reason, t.loop_max_rate),
        ("leaked_tokens", leak_reason, t.leak_max_rate),
    ]
    findings = []
    for check, reason_of, threshold in checks:
        bad = [(r, why) for r in rows if (why := reason_of(r))]
        rate, p = len(bad) / len(rows), rate_p_value(len(bad), len(rows), threshold)
        fails = rate > threshold and p < 1 - cfg.confidence
        findings.append(verdict(
            NAME, check, fails, rate, threshold,
            f"{len(bad)} of {len(rows)} responses; fails when the rate exceeds the threshold and a one-sided "
            f"exact binomial test of 'true rate <= threshold' gives p < {1 - cfg.confidence:.2g} (p={p:.2g})",
            count=len(bad), p_value=p, cases=[case(r, why) for r, why in bad[: cfg.max_cases]] if fails else [],
        ))
    return findings


def rate_p_value(count: int, n: int, threshold: float) -> float:
    """One-sided exact binomial p-value of `count` of `n` under a true rate of `threshold`."""
    if threshold <= 0:  # a zero-tolerance threshold: any occurrence is certain evidence
        return 0.0 if count else 1.0
    return float(stats.binomtest(count, n, min(threshold, 1.0), alternative="greater").pvalue)


def loop_reason(r: Response) -> str | None:
    """Why `r` is a generation loop, or None."""
    lines = Counter(line.strip() for line in r.response.splitlines() if len(line.strip()) >= MIN_LINE_CHARS)
    if lines:
        line, count = lines.most_common(1)[0]
        if count >= LINE_REPEATS:
            return f"line repeated {count} times: {line[:60]!r}"
    grams = ngrams(words(r.response), 4)
    if len(grams) >= MIN_4GRAMS:
        repeated = 1 - len(set(grams)) / len(grams)
        if repeated > MAX_REPEATED_4GRAM_SHARE:
            return f"{repeated:.0%} of its word 4-grams are repeats"
    return None


def leak_reason(r: Response) -> str | None:
    """Which special/template token `r` leaks, or None."""
    leaks = template_leaks(r.response)  # one table of template tokens, shared with format_compliance
    return f"leaks {', '.join(map(repr, leaks))}" if leaks else None
