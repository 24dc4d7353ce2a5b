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
