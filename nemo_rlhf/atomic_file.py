"""Write a file so that it is either complete or untouched: the one place for temp-file + rename.

Every output a later step or a reader may pick up (jsonl data, manifests, reports, job records)
goes through `atomic_open`: the bytes go to a temporary file in the destination's folder (same
filesystem, so `os.replace` is atomic), are synced, get ordinary permissions (mkstemp makes files
0600, which hides reports and manifests from other users of a shared cluster filesystem), and
are renamed into place only when the block finished without an exception.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def _default_mode() -> int:
    """0666 minus the process umask: what `open(path, "w")` would have given."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
    """Open a temporary file for writing that replaces `path` when the block ends without error.

    Args:
        path: the destination; its folder is created if needed.
        mode: "w" (text, with `encoding`) or "wb" (bytes).

    Yields:
        The open file object.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns the path."""
    with atomic_open(path) as handle:
        handle.write(text)
    return Path(path)
