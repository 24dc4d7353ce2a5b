"""degenerate_responses: output no one can use, whatever a reward model says of it.

Absolute rates in the candidate (a degenerate baseline does not excuse a degenerate candidate):
- `empty`: empty or whitespace-only responses;
- `loops`: a non-trivial line repeated 3+ times, or a response whose word 4-grams are mostly
  repeats (a generation loop);
- `leaked_tokens`: special or template tokens in the text (<|im_start|>, <|endoftext|>, </s>,
  [INST], ...) or a dialogue role marker starting a line (the model writing the next turn);
  the table is `nemo_rlhf.gate.format_checks.TEMPLATE_LEAKS`, shared with format_compliance.
"""

from __future__ import annotations

from collections import Counter

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
        rate = len(bad) / len(rows)
        findings.append(verdict(
            NAME, check, rate > threshold, rate, threshold, f"{len(bad)} of {len(rows)} responses",
            count=len(bad), cases=[case(r, why) for r, why in bad[: cfg.max_cases]] if rate > threshold else [],
        ))
    return findings


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
