"""Result types shared by every parity check, and where their results go.

A parity command produces one `ParityResult`: a list of `Check`s (each a measured value
against a tolerance, or a yes/no with `value` None), plus free-form tables (the config
side-by-side, the semantic differences). The same object is

- printed as text (`format_text`),
- written as JSON (`to_dict`, `--json`),
- written as a markdown table / PNG into a report folder (`write_report`, `--report DIR`),
- recorded into a run's lineage (`record_in_run`, `--run-dir RUN`): RUN/parity/<name>.json
  plus a line in RUN/parity/manifest.json, both written atomically.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemo_rlhf.lineage.hashing import sha256_file
from nemo_rlhf.lineage.manifest import MANIFEST, now_iso, package_versions
from nemo_rlhf.lineage.record import write_json_atomic

PARITY_DIR = "parity"


@dataclass
class Check:
    """One comparison between the small-scale and the large-scale side.

    Attributes:
        name: short stable id, e.g. "ppo/advantages" or "data/sft/token_ids".
        passed: whether the check holds.
        value: the measured number (e.g. max |difference|); None for yes/no checks.
        tolerance: the largest `value` that passes; None for yes/no checks.
        detail: a sentence saying what was compared and, on failure, why it differs.
        extra: anything else worth keeping (decoded token sequences, both sides' values).
    """

    name: str
    passed: bool
    value: float | None = None
    tolerance: float | None = None
    detail: str = ""
    extra: dict = field(default_factory=dict)

    @classmethod
    def within(cls, name: str, value: float, tolerance: float, detail: str = "", **extra) -> "Check":
        """A numeric check that passes when `value <= tolerance` (NaN never passes)."""
        value = float(value)
        passed = not math.isnan(value) and value <= tolerance
        return cls(name, passed, value, float(tolerance), detail, dict(extra))

    def to_dict(self) -> dict:
        return {"name": self.name, "passed": self.passed, "value": _json_number(self.value),
                "tolerance": self.tolerance, "detail": self.detail, **({"extra": self.extra} if self.extra else {})}


@dataclass
class ParityResult:
    """All checks of one parity command.

    Attributes:
        kind: "config", "data", "loss", "curves", ...
        checks: the individual checks; the result passes when all of them do.
        tables: named lists of row dicts shown alongside (config side-by-side, differences).
        meta: what was compared (spec path, stage, seed, tolerances' reasons, ...).
    """

    kind: str
    checks: list[Check] = field(default_factory=list)
    tables: dict[str, list[dict]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def name(self) -> str:
        """File-name id of this result: the kind plus the stage when there is one."""
        stage = self.meta.get("stage")
        return f"{self.kind}-{stage}" if stage else self.kind

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        return check

    def to_dict(self) -> dict:
        return {"kind": self.kind, "passed": self.passed, "checks": [c.to_dict() for c in self.checks],
                "tables": self.tables, "meta": self.meta}


def _json_number(value: float | None) -> float | str | None:
    """JSON has no NaN/inf: write them as strings so the file stays valid JSON."""
    if value is None or math.isfinite(value):
        return value
    return str(value)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    text = "" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict]) -> str:
    """A list of row dicts as a markdown table (columns in first-seen order)."""
    if not rows:
        return "(empty)\n"
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def checks_rows(result: ParityResult) -> list[dict]:
    return [{"check": c.name, "passed": "yes" if c.passed else "NO", "value": c.value, "tolerance": c.tolerance,
             "detail": c.detail} for c in result.checks]


def format_text(result: ParityResult) -> str:
    """The human-readable summary printed by the CLI."""
    lines = []
    for c in result.checks:
        mark = "ok  " if c.passed else "FAIL"
        number = "" if c.value is None else f"  {c.value:.3g} (tol {c.tolerance:.3g})"
        lines.append(f"{mark} {c.name}{number}  {c.detail}".rstrip())
    verdict = "PASSED" if result.passed else "FAILED"
    lines.append(f"parity {result.name}: {verdict} ({sum(c.passed for c in result.checks)}/{len(result.checks)} "
                 "checks)")
    return "\n".join(lines)


def write_report(result: ParityResult, report_dir: Path) -> list[Path]:
    """Write `<name>.md` (checks + tables) and, for numeric checks, `<name>.png` into report_dir."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    parts = [f"# parity {result.name}: {'PASSED' if result.passed else 'FAILED'}\n", "## checks\n",
             markdown_table(checks_rows(result))]
    for title, rows in result.tables.items():
        parts += [f"\n## {title}\n", markdown_table(rows)]
    md = report_dir / f"{result.name}.md"
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    tmp.replace(md)
    written = [md]
    png = _plot_checks(result, report_dir / f"{result.name}.png")
    if png:
        written.append(png)
    return written


def _plot_checks(result: ParityResult, path: Path) -> Path | None:
    """Bar chart of measured value vs tolerance (log scale) for the numeric checks."""
    numeric = [c for c in result.checks if c.value is not None and c.tolerance is not None]
    if not numeric:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 1e-12  # log axis: an exact 0 difference is drawn at the floor
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(numeric) + 1.5))
    names = [c.name for c in numeric]
    values = [max(c.value, floor) if math.isfinite(c.value) else 1e12 for c in numeric]
    ax.barh(names, values, color=["tab:green" if c.passed else "tab:red" for c in numeric])
    ax.scatter([max(c.tolerance, floor) for c in numeric], names, marker="|", s=200, color="black",
               label="tolerance")
    ax.set_xscale("log")
    ax.set_xlabel("measured value (max |difference|)")
    ax.set_title(f"parity {result.name}: {'passed' if result.passed else 'FAILED'}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def record_in_run(result: ParityResult, run_dir: Path) -> Path:
    """Put the result into a run's lineage: RUN/parity/<name>.json and an entry in RUN/parity/manifest.json.

    The parity folder's manifest lists every recorded check result with its sha256, time and
    verdict, and references the run's stage manifests that existed at that time (what was
    checked). Both files are written atomically.

    Returns:
        The path of the written result JSON.
    """
    run_dir = Path(run_dir)
    folder = run_dir / PARITY_DIR
    payload = {**result.to_dict(), "recorded_at": now_iso(), "packages": package_versions()}
    path = write_json_atomic(folder / f"{result.name}.json", payload)
    manifest_path = folder / MANIFEST
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else {}
    manifest.setdefault("stage", PARITY_DIR)
    manifest.setdefault("notes", {}).setdefault("parity", {})[result.name] = {
        "path": path.name,
        "sha256": sha256_file(path),
        "passed": result.passed,
        "checks": len(result.checks),
        "failed": [c.name for c in result.checks if not c.passed],
        "recorded_at": payload["recorded_at"],
    }
    manifest["inputs"] = {"parents": {
        p.parent.name: {"manifest": f"{p.parent.name}/{MANIFEST}", "sha256": sha256_file(p)}
        for p in sorted(run_dir.glob(f"*/{MANIFEST}")) if p.parent.name != PARITY_DIR}}
    write_json_atomic(manifest_path, manifest)
    return path
