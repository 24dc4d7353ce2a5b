"""Run the small-scale pipeline: each stage once, in order, reusing finished stages.

A stage is reused when its directory holds a manifest whose fingerprint matches what the
stage would be run with now (its config section, the hashes of its input files and the
hashes of its parents' manifests). A re-run parent gets a new manifest, so everything
after it re-runs too; a reused parent keeps its manifest, so nothing after it re-runs
unless its own config changed.
"""

from __future__ import annotations

import gc
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from nemo_rlhf.lineage.hashing import sha256_file, sha256_tree
from nemo_rlhf.lineage.manifest import (
    MANIFEST,
    StageInputs,
    build_manifest,
    now_iso,
    parent_ref,
    read_manifest,
    write_manifest,
)
from nemo_rlhf.lineage.stage_dir import (
    new_temp_stage_dir,
    promote,
    remove_leftovers,
    run_dir_lock,
)
from nemo_rlhf.pipeline.stage import StageContext
from nemo_rlhf.pipeline.stages import STAGES, stage_enabled
from nemo_rlhf.spec.loader import spec_to_dict
from nemo_rlhf.spec.paths import data_root
from nemo_rlhf.spec.schema import PipelineSpec


@dataclass
class StageOutcome:
    stage: str
    status: str  # "ran" | "skipped"
    seconds: float
    reason: str


def stage_inputs(stage, spec: PipelineSpec, run_dir: Path, root: Path) -> StageInputs:
    """What `stage` would run with now; parents must already be finished."""
    files = {str(p): sha256_file(p) for p in stage.input_files(spec, root)}
    parents = {name: parent_ref(run_dir / name) for name in stage.parents(spec)}
    return StageInputs(stage=stage.name, config=stage.config(spec), files=files, parents=parents)


def run_pipeline(
    spec: PipelineSpec, run_dir: Path, log: Callable[[str], None] = print, until: str | None = None
) -> list[StageOutcome]:
    """Run every stage of `spec` into `run_dir` (or up to and including `until`)."""
    run_dir = Path(run_dir)
    root = data_root(spec.data.root)
    outcomes = []
    with run_dir_lock(run_dir):
        for name in remove_leftovers(run_dir):
            log(f"removed the leftovers of an interrupted stage: {name}")
        for stage in STAGES:
            if stage_enabled(stage, spec):
                outcomes.append(_run_one(stage, spec, run_dir, root, log))
            else:
                log(f"[{stage.name}] off ({getattr(stage, 'off_reason', f'{stage.name}.enabled is false')})")
            if stage.name == until:
                break
    return outcomes


def _run_one(stage, spec: PipelineSpec, run_dir: Path, root: Path, log) -> StageOutcome:
    inputs = stage_inputs(stage, spec, run_dir, root)
    final = run_dir / stage.name
    existing = read_manifest(final)
    if existing is not None and existing.get("fingerprint") == inputs.fingerprint():
        log(f"[{stage.name}] skipped: finished earlier with the same config and inputs ({final / MANIFEST})")
        return StageOutcome(stage.name, "skipped", 0.0, "up to date")
    reason = "config or inputs changed since the last run" if existing else "no finished run yet"
    log(f"[{stage.name}] running ({reason})")
    start, started_at = time.monotonic(), now_iso()
    tmp = new_temp_stage_dir(run_dir, stage.name)
    ctx = StageContext(
        spec=spec,
        spec_dict=spec_to_dict(spec),
        out=tmp,
        run_dir=run_dir,
        data_root=root,
        parents={p: run_dir / p for p in stage.parents(spec)},
        log=log,
    )
    try:
        metrics = stage.run(ctx)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed stage leaves nothing half-written
        raise
    for child in tmp.iterdir():  # trainers create output dirs they may leave empty
        if child.is_dir() and not any(child.iterdir()):
            child.rmdir()
    outputs = {k: v for k, v in sha256_tree(tmp).items() if k != MANIFEST}
    seconds = time.monotonic() - start
    write_manifest(tmp, build_manifest(inputs, started_at, seconds, metrics, outputs, ctx.notes))
    promote(tmp, final)
    gc.collect()
    log(f"[{stage.name}] done in {seconds:.1f} s -> {final}")
    return StageOutcome(stage.name, "ran", seconds, reason)
