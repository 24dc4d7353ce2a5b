"""Where the spec's relative paths point."""

from __future__ import annotations

import os
from pathlib import Path

from nemo_rlhf.errors import UserError

DATA_ROOT_ENV = "NEMO_RLHF_DATA_ROOT"


def data_root(root: str) -> Path:
    """Resolve `data.root`: an explicit folder, or `auto`.

    `auto` tries $NEMO_RLHF_DATA_ROOT, then `../shared/data` beside the repository (the
    layout CI and the project machines have), then `../shared/data` from the current
    directory.
    """
    if root != "auto":
        return Path(root).expanduser()
    if os.environ.get(DATA_ROOT_ENV):
        return Path(os.environ[DATA_ROOT_ENV]).expanduser()
    candidates = [Path(__file__).resolve().parents[2].parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise UserError(
        "data.root is auto but no data folder was found (tried $NEMO_RLHF_DATA_ROOT and "
        + ", ".join(str(c) for c in candidates)
        + ")",
        fix=f"set data.root=/path/to/data or export {DATA_ROOT_ENV}=/path/to/data",
    )


def data_path(root: Path, path: str) -> Path:
    """A data path from the spec: absolute as given, relative under the data root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else root / p
