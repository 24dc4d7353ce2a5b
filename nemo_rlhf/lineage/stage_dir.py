"""Atomic stage directories and the run-directory lock.

A stage builds everything in `RUN_DIR/.<stage>.tmp-<pid>/` and only a complete stage is
renamed to `RUN_DIR/<stage>/`. A stage killed half-way leaves a `.tmp-` folder, which the
next run removes, and never a folder that looks finished.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from nemo_rlhf.errors import UserError

LOCK = ".nemo-rlhf.lock"


@contextmanager
def run_dir_lock(run_dir: Path):
    """Hold an exclusive lock on RUN_DIR for the whole run (two runs must not interleave)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} exists and is not a directory", fix="choose a directory path for --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / LOCK, "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError(
            f"another nemo-rlhf run is using {run_dir}", fix="wait for it to finish or choose another --out"
        ) from None
    try:
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def remove_leftovers(run_dir: Path) -> list[str]:
    """Delete temporary folders of interrupted stages (call while holding the lock)."""
    removed = []
    for child in run_dir.iterdir():
        if child.is_dir() and child.name.startswith(".") and (".tmp-" in child.name or ".old-" in child.name):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child.name)
    return removed


def new_temp_stage_dir(run_dir: Path, stage: str) -> Path:
    tmp = run_dir / f".{stage}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def promote(tmp: Path, final: Path) -> None:
    """Rename a finished temporary stage dir into place, replacing an out-of-date one."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
