"""What the gate reports: one `Finding` per check, and the verdict over all of them.

Severity decides the verdict: any `fail` fails the gate; `warn` is shown but does not fail
it; `info` records a measurement that passed (or a check that had no data), so the report
always shows every number the gate looked at.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

SEVERITIES = ("fail", "warn", "info")


@dataclass
class Finding:
    """One check's outcome.

    Attributes:
        detector: the detector's name, e.g. `length_inflation`.
        severity: `fail`, `warn` or `info`.
        value: the measured number (None when the check could not run).
        threshold: the number it was compared with (None when there is none).
        message: one sentence stating the value, the threshold and what they mean.
        details: anything else worth keeping (`check` names the sub-check; `cases` lists
            the worst examples, used for the bad-case export).
    """

    detector: str
    severity: str
    value: float | None
    threshold: float | None
    message: str
    details: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")

    @property
    def check(self) -> str:
        """The sub-check's name (the detector's name when it has only one)."""
        return self.details.get("check", self.detector)

    def to_json(self, with_cases: bool = False) -> dict:
        """A JSON-safe dict; the bulky `cases` stay out unless asked for."""
        details = {k: v for k, v in self.details.items() if with_cases or k != "cases"}
        return {
            "detector": self.detector,
            "check": self.check,
            "severity": self.severity,
            "value": _json_number(self.value),
            "threshold": _json_number(self.threshold),
            "message": self.message,
            "details": _json_safe(details),
        }


@dataclass
class GateResult:
    """The verdict: passed unless some finding has severity `fail`."""

    findings: list[Finding]

    @property
    def passed(self) -> bool:
        return not any(f.severity == "fail" for f in self.findings)

    @property
    def failed_detectors(self) -> list[str]:
        return sorted({f.detector for f in self.findings if f.severity == "fail"})

    def to_json(self) -> dict:
        return {
            "passed": self.passed,
            "failed_detectors": self.failed_detectors,
            "findings": [f.to_json() for f in self.findings],
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), ensure_ascii=False)


def _json_number(value):
    """NaN and infinities are not JSON; they become null."""
    if value is None or isinstance(value, bool):
        return value
    value = float(value)
    return value if math.isfinite(value) else None


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (str, bool)) or obj is None:
        return obj
    if isinstance(obj, int):
        return obj
    try:
        return _json_number(obj)  # floats and numpy scalars
    except (TypeError, ValueError):
        return str(obj)
