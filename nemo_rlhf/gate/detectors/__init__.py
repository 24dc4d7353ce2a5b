"""The gate's detectors: pure functions `(candidate, baseline, cfg) -> list[Finding]`.

Each module holds one detector; `DETECTORS` is the table the runner walks. Every check
emits a finding, `info` when it passed, so the report shows all measured values.
"""

from __future__ import annotations

from nemo_rlhf.gate.detectors.collapse import template_collapse
from nemo_rlhf.gate.detectors.degenerate import degenerate_responses
from nemo_rlhf.gate.detectors.hacking import reward_hacking
from nemo_rlhf.gate.detectors.kl import kl_budget
from nemo_rlhf.gate.detectors.length import length_inflation
from nemo_rlhf.gate.detectors.safety import safety_regression

DETECTORS = {
    "reward_hacking": reward_hacking,
    "length_inflation": length_inflation,
    "template_collapse": template_collapse,
    "degenerate_responses": degenerate_responses,
    "kl_budget": kl_budget,
    "safety_regression": safety_regression,
}
