"""The per-stage `manifest.json`: what went in, what ran, what came out.

A stage directory is finished if and only if it holds a manifest; manifests are written
last, inside a temporary directory that is renamed into place (see `stage_dir`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from nemo_rlhf.errors import UserError
from nemo_rlhf.lineage.hashing import sha256_file, sha256_json

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
TRACKED_PACKAGES = (
    "nemo-rlhf",
    "torch",
    "transformers",
    "trl",
    "datasets",
    "accelerate",
    "safetensors",
    "omegaconf",
    "gguf",
)


@dataclass
class StageInputs:
    """What a stage depends on; its fingerprint decides whether a finished stage is reused."""

    stage: str
    config: dict
    files: dict[str, str] = field(default_factory=dict)  # path -> sha256
    parents: dict[str, dict] = field(default_factory=dict)  # stage -> {"manifest": path, "sha256": ...}

    def fingerprint(self) -> str:
        return sha256_json(
            {
                "stage": self.stage,
                "config": self.config,
                "files": sorted(self.files.values()),
                "parents": {k: v["sha256"] for k, v in self.parents.items()},
            }
        )


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit() -> str | None:
    """The commit of the nemo-rlhf checkout that ran (dirty marked), or None outside git."""
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return commit.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def build_manifest(
    inputs: StageInputs, started_at: str, duration_s: float, metrics: dict, outputs: dict, notes: dict
) -> dict:
    """The manifest dict of a finished stage."""
    return {
        "schema_version": SCHEMA_VERSION,
        "stage": inputs.stage,
        "fingerprint": inputs.fingerprint(),
        "inputs": {"files": inputs.files, "parents": inputs.parents},
        "config": inputs.config,
        "command": sys.argv,
        "cwd": os.getcwd(),
        "packages": package_versions(),
        "git_commit": git_commit(),
        "started_at": started_at,
        "finished_at": now_iso(),
        "duration_s": round(duration_s, 3),
        "metrics": metrics,
        "outputs": outputs,
        "notes": notes,
    }


def write_manifest(stage_dir: Path, manifest: dict) -> Path:
    path = stage_dir / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_manifest(stage_dir: Path) -> dict | None:
    """The manifest of a finished stage, None when the stage is not finished."""
    path = stage_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(
            f"corrupt manifest: {err}", where=str(path), fix=f"delete {stage_dir} to re-run that stage"
        ) from None


def parent_ref(stage_dir: Path) -> dict:
    """How a child records a parent: the manifest's path (relative to the run dir, so a
    moved run keeps its lineage) and sha256."""
    path = stage_dir / MANIFEST
    return {"manifest": f"{stage_dir.name}/{MANIFEST}", "sha256": sha256_file(path)}
