"""Per-stage seconds and final metrics of the GPU runs, from their lineage manifests.

    python bench/gpu/summarize.py RUNS_DIR OUT_PREFIX   # writes OUT_PREFIX.json and OUT_PREFIX.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main(runs: Path, prefix: Path) -> int:
    report = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "runs": {},
    }
    lines = [f"# Small-scale pipeline on {report['device']} (torch {report['torch']})", "",
             "| run | stage | seconds | key metrics |", "|---|---|---|---|"]
    for run in sorted(p for p in runs.iterdir() if p.is_dir()):
        stages = {}
        for manifest in sorted(run.glob("*/manifest.json"), key=lambda p: p.stat().st_mtime):
            data = json.loads(manifest.read_text())
            metrics = {k: v for k, v in (data.get("metrics") or {}).items() if isinstance(v, (int, float))}
            stages[manifest.parent.name] = {"seconds": data.get("duration_s"), "metrics": metrics}
            shown = ", ".join(f"{k}={v:.4g}" for k, v in list(metrics.items())[:4])
            lines.append(f"| {run.name} | {manifest.parent.name} | {data.get('duration_s')} | {shown} |")
        report["runs"][run.name] = stages
    prefix.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    prefix.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
