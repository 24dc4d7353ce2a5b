"""Manifests for stages that run outside the small-scale runner (SLURM jobs, the data stage).

`record_stage` is what every rendered large-scale sbatch script runs last, after its training
step succeeded: it writes RUN_DIR/<stage>/manifest.json (the file `nemo-rlhf slurm resume`
and `lineage show` read) with the hashes of the stage's config files, inputs and outputs, its
parent stages' manifests, the SLURM job id and the times. The file is written to a temporary
name in the same folder, synced and renamed: a reader sees no manifest or a whole one.

Large artifacts (a 70B .nemo is ~140 GB) are hashed only up to `hash_limit_bytes`; above it the
entry keeps size and modification time and says why it has no hash.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Sequence

from nemo_rlhf.atomic_file import write_text_atomic
from nemo_rlhf.errors import UserError
from nemo_rlhf.lineage.hashing import sha256_file, sha256_json
from nemo_rlhf.lineage.manifest import MANIFEST, StageInputs, build_manifest, now_iso

DEFAULT_HASH_LIMIT = 20 * 10**9  # bytes: hashing more would add minutes to the end of a job
STARTED_ENV = "NEMO_RLHF_STAGE_STARTED_AT"  # exported by the sbatch scripts when the job starts
SLURM_ENV = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_RESTART_COUNT", "SLURM_JOB_NODELIST", "SLURM_CLUSTER_NAME")


def describe_path(path: Path, hash_limit: int = DEFAULT_HASH_LIMIT) -> dict:
    """A file or folder as lineage records it: sha256 (per file for a folder) when small enough.

    Raises:
        UserError: the path does not exist.
    """
    path = Path(path)
    if path.is_file():
        size = path.stat().st_size
        entry = {"type": "file", "bytes": size, "mtime": path.stat().st_mtime}
        if size <= hash_limit:
            return {**entry, "sha256": sha256_file(path)}
        return {**entry, "sha256": None, "unhashed": f"larger than the hash limit ({hash_limit} bytes)"}
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        size = sum(p.stat().st_size for p in files)
        entry = {"type": "dir", "files": len(files), "bytes": size}
        if size <= hash_limit:
            return {**entry, "sha256": {p.relative_to(path).as_posix(): sha256_file(p) for p in files}}
        return {**entry, "sha256": None, "unhashed": f"larger than the hash limit ({hash_limit} bytes)"}
    raise UserError(f"{path} does not exist", where=str(path),
                    fix="the stage did not write what it should: check its log before recording it")


def write_json_atomic(path: Path, data: dict) -> Path:
    """Write JSON to `path` through a synced temporary file in the same folder and a rename."""
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def parent_refs(run_dir: Path, parents: Sequence[str]) -> dict[str, dict]:
    """How a stage records its parents: each parent manifest's path (relative to RUN_DIR) and sha256;
    sha256 is None when that manifest is missing (the stage's work is still recorded)."""
    refs = {}
    for name in parents:
        manifest = Path(run_dir) / name / MANIFEST
        refs[name] = {"manifest": f"{name}/{MANIFEST}",
                      "sha256": sha256_file(manifest) if manifest.is_file() else None}
    return refs


def slurm_context(environ: dict | None = None) -> dict:
    """The SLURM job this runs in (empty outside SLURM)."""
    environ = os.environ if environ is None else environ
    return {key.lower(): environ[key] for key in SLURM_ENV if environ.get(key)}


def record_stage(run_dir: Path, stage: str, *, configs: Sequence[Path] = (), inputs: Sequence[Path] = (),
                 outputs: Sequence[Path] = (), parents: Sequence[str] = (), started_at: str | None = None,
                 hash_limit: int = DEFAULT_HASH_LIMIT, metrics: dict | None = None) -> Path:
    """Write RUN_DIR/<stage>/manifest.json for a stage that has finished.

    Args:
        run_dir: the run directory (stage folders live in it).
        stage: the stage name; its folder RUN_DIR/<stage> is created if needed.
        configs: config files the stage ran with (always hashed: they are small).
        inputs: files or folders it read (data files, the checkpoint it started from).
        outputs: what it wrote; each must exist.
        parents: names of the stages whose outputs it used (their manifests are referenced).
        started_at: ISO time the job started ($NEMO_RLHF_STAGE_STARTED_AT by default).
        hash_limit: files and folders larger than this many bytes are recorded without a hash.
        metrics: anything measured, kept as is.

    Returns:
        The manifest's path.

    Raises:
        UserError: an output or config file is missing (the stage is then not marked finished).
    """
    run_dir, stage_dir = Path(run_dir), Path(run_dir) / stage
    started_at = started_at or os.environ.get(STARTED_ENV) or now_iso()
    config_files = {str(p): describe_path(Path(p), hash_limit=1 << 62)["sha256"] for p in configs}
    described_inputs = {str(p): describe_path(Path(p), hash_limit) for p in inputs}
    described_outputs = {str(p): describe_path(Path(p), hash_limit) for p in outputs}
    # One digest per input for the fingerprint: a folder's is the digest of its per-file hashes, an
    # unhashed file's that of its size and mtime.
    files = {path: d["sha256"] if isinstance(d["sha256"], str) else sha256_json(d)
             for path, d in described_inputs.items()}
    stage_inputs = StageInputs(stage=stage, config={"config_files": config_files}, files=files,
                               parents=parent_refs(run_dir, parents))
    manifest = build_manifest(stage_inputs, started_at, _seconds_since(started_at), metrics or {},
                              described_outputs, {"slurm": slurm_context(), "inputs": described_inputs})
    return write_json_atomic(stage_dir / MANIFEST, manifest)


def _seconds_since(iso: str) -> float:
    from datetime import datetime

    try:
        return max(time.time() - datetime.fromisoformat(iso).timestamp(), 0.0)
    except ValueError:
        return 0.0
