"""Walk a stage's manifest back through its parents to the data files and the base model."""

from __future__ import annotations

from pathlib import Path

from nemo_rlhf.errors import UserError
from nemo_rlhf.lineage.hashing import sha256_file
from nemo_rlhf.lineage.manifest import MANIFEST, read_manifest


def lineage_chain(stage_dir: Path) -> dict:
    """The lineage tree of `stage_dir`: its manifest summary and its parents' trees.

    Each parent entry says whether the parent's manifest still has the hash the child
    recorded (`intact`); a re-run parent without a re-run child shows up as not intact.
    """
    stage_dir = Path(stage_dir)
    manifest = read_manifest(stage_dir)
    if manifest is None:
        raise UserError(
            f"no {MANIFEST} in {stage_dir}: not a finished stage",
            fix="pass a stage directory of a run, e.g. RUN_DIR/eval (run the pipeline first)",
        )
    node = {
        "stage": manifest["stage"],
        "dir": str(stage_dir),
        "fingerprint": manifest["fingerprint"],
        "started_at": manifest["started_at"],
        "finished_at": manifest["finished_at"],
        "git_commit": manifest.get("git_commit"),
        "files": manifest["inputs"]["files"],
        "metrics": manifest.get("metrics", {}),
        "parents": [],
    }
    for name, ref in manifest["inputs"]["parents"].items():
        parent_dir = stage_dir.parent / Path(ref["manifest"]).parent
        if not (parent_dir / MANIFEST).is_file():
            node["parents"].append({"stage": name, "dir": str(parent_dir), "missing": True, "parents": []})
            continue
        child = lineage_chain(parent_dir)
        child["intact"] = sha256_file(parent_dir / MANIFEST) == ref["sha256"]
        node["parents"].append(child)
    return node


def render_chain(node: dict, indent: int = 0, shown: set | None = None) -> list[str]:
    """Text lines of a lineage tree, newest stage first; a stage reached twice (the chain
    is a DAG) is printed in full once and referred to after that."""
    shown = set() if shown is None else shown
    pad = "  " * indent
    arrow = "<- " if indent else ""
    if node.get("missing"):
        return [f"{pad}<- {node['stage']}: MISSING ({node['dir']})"]
    mark = "" if node.get("intact", True) else "  [CHANGED since this child ran: re-run to refresh]"
    if node["dir"] in shown:
        return [f"{pad}{arrow}{node['stage']}  (shown above){mark}"]
    shown.add(node["dir"])
    lines = [
        f"{pad}{arrow}{node['stage']}  {node['dir']}  fingerprint {node['fingerprint'][:12]}  "
        f"{node['started_at']} .. {node['finished_at']}{mark}"
    ]
    for path, digest in node["files"].items():
        lines.append(f"{pad}     file {path}  sha256 {digest[:12]}")
    metrics = dict(list(node["metrics"].items())[:6])
    if metrics:
        lines.append(f"{pad}     metrics " + ", ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()))
    for parent in node["parents"]:
        lines += render_chain(parent, indent + 1, shown)
    return lines


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
