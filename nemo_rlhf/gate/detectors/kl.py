"""kl_budget: how far the candidate moved from the reference policy.

`kl` per response is the sequence KL estimate sum_t log pi(y_t) - log pi_ref(y_t) (nats), as
the eval stage and NeMo-Aligner's rollouts log it; single k1 estimates can be negative, their
mean is unbiased. The mean fails the gate above its budget; the largest single value warns.
"""

from __future__ import annotations

import numpy as np

from nemo_rlhf.gate.detectors.common import case, skipped, verdict
from nemo_rlhf.gate.findings import Finding
from nemo_rlhf.gate.responses import ResponseSet

NAME = "kl_budget"


def kl_budget(candidate: ResponseSet, baseline: ResponseSet, cfg) -> list[Finding]:
    """Mean and max KL of the candidate's final step against the budget."""
    rows, t = candidate.final().with_attr("kl"), cfg.thresholds
    if not rows:
        return [skipped(NAME, "kl_mean", "the candidate has no `kl` field")]
    kls = np.array([r.kl for r in rows])
    mean, top = float(kls.mean()), int(np.argmax(kls))
    highest = sorted(rows, key=lambda r: r.kl, reverse=True)[: cfg.max_cases]
    return [
        verdict(NAME, "kl_mean", mean > t.kl_max_mean, mean, t.kl_max_mean,
                f"mean KL to the reference {mean:.3g} nats over {len(rows)} responses",
                cases=[case(r, f"KL {r.kl:.3g} nats", r.kl) for r in highest] if mean > t.kl_max_mean else []),
        verdict(NAME, "kl_max", kls[top] > t.kl_max_single, float(kls[top]), t.kl_max_single,
                f"largest single-response KL {kls[top]:.3g} nats", severity="warn"),
    ]
