"""Fixtures shared across test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import cli

SMOLLM = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm_dir(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct, materialized once per test session through the CLI (~30 s).

    Shared by several modules: tests must only read it (nothing may be written into it or its parent).
    """
    out = tmp_path_factory.mktemp("smollm") / "base"
    proc = cli("models", "materialize", SMOLLM, "--out", str(out), check=True)
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith(f"wrote {out} (") and "MB)" in last, proc.stdout
    return out


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """A SLURM cluster that answers `sinfo`; the local one (slurm/local/start.sh) is started if none does.

    Tests that need SLURM FAIL, never skip, when it cannot be had: a launcher untested is a launcher broken.
    """
    import shutil
    import subprocess

    from tests.helpers import REPO

    def answers() -> bool:
        if shutil.which("sinfo") is None:
            return False
        proc = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=60)
        return proc.returncode == 0 and any(s in proc.stdout for s in ("idle", "mix", "alloc"))

    if answers():
        return
    start = REPO / "slurm" / "local" / "start.sh"
    proc = subprocess.run(["bash", str(start)], capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    if proc.returncode != 0 or not answers():
        pytest.fail(f"no SLURM cluster: {start} exited {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
