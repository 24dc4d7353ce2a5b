"""Reading and writing JSON-lines files, plain or gzip-compressed.

Every problem in an input file is reported as a `UserError` that points at `file:line`, so
a user can open the file at the right place instead of reading a traceback.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from nemo_rlhf.atomic_file import atomic_open
from nemo_rlhf.errors import UserError

# gzip streams start with these two bytes; sniffing them (instead of trusting the suffix)
# means a compressed file without ".gz" in its name still reads.
_GZIP_MAGIC = b"\x1f\x8b"

_TYPE_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "list", dict: "object"}


def _open_binary(path: Path):
    """Opens `path` for binary reading, decompressing gzip transparently."""
    if not path.exists():
        raise UserError(
            f"data file not found: {path}",
            where=str(path),
            fix="check the path in the spec (relative paths are resolved under data.root)",
        )
    if not path.is_file():
        raise UserError(f"not a file: {path}", where=str(path), fix="point the spec at a .jsonl or .jsonl.gz file")
    try:
        with open(path, "rb") as probe:
            compressed = probe.read(2) == _GZIP_MAGIC
        return gzip.open(path, "rb") if compressed else open(path, "rb")
    except OSError as exc:
        raise UserError(
            f"cannot open data file: {exc.strerror}", where=str(path), fix="check the file's permissions"
        ) from exc


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yields the rows of a JSON-lines file with their 1-based line numbers.

    Blank lines are skipped (a trailing newline or an empty last line is common and
    harmless); their numbers still count so that reported lines match an editor.

    Args:
        path: a `.jsonl` file, optionally gzip-compressed (detected from its content).

    Yields:
        `(lineno, row)` for every non-blank line.

    Raises:
        UserError: the file is missing, a line is not valid UTF-8 or JSON, a row is not a
            JSON object, or the gzip stream is corrupt; `where` is `file:line`.
    """
    path = Path(path)
    lineno = 0
    with _open_binary(path) as handle:
        try:
            for lineno, raw in enumerate(handle, start=1):
                row = _parse_line(raw, path, lineno)
                if row is not None:
                    yield lineno, row
        except (OSError, EOFError) as exc:
            # gzip raises these mid-iteration for a truncated or corrupt stream.
            raise UserError(
                f"cannot read data: {exc}", where=f"{path}:{lineno + 1}", fix="re-download or re-create the file"
            ) from exc


def _parse_line(raw: bytes, path: Path, lineno: int) -> dict | None:
    """Decodes one line; returns None for a blank line."""
    where = f"{path}:{lineno}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"line is not valid UTF-8 ({exc})", where=where, fix="re-encode the file as UTF-8") from exc
    if not text.strip():
        return None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"malformed JSON: {exc.msg} (column {exc.colno})",
            where=where,
            fix="each line must be one complete JSON object; check for a truncated or split line",
        ) from exc
    if not isinstance(row, dict):
        raise UserError(
            f"row is a JSON {type(row).__name__}, expected an object",
            where=where,
            fix='each line must be a JSON object such as {"question": ..., "answer": ...}',
        )
    return row


def require_fields(
    row: Mapping, fields: Mapping[str, type | tuple[type, ...]], path: str | os.PathLike, lineno: int
) -> None:
    """Checks that `row` has every field in `fields` with the right type.

    All problems in the row are reported in one error, so a user fixes them in one pass.

    Args:
        row: one parsed JSON object.
        fields: field name -> expected type (or tuple of types).
        path: the file the row came from (for the error location).
        lineno: the row's line number.

    Raises:
        UserError: with `where=file:line`, naming each missing or wrong-typed field.
    """
    problems = []
    for name, expected in fields.items():
        if name not in row:
            problems.append(f"missing field {name!r}")
            continue
        value = row[name]
        # bool is a subclass of int; a JSON `true` must not pass as an integer field.
        wrong_bool = isinstance(value, bool) and bool not in _as_tuple(expected)
        if wrong_bool or not isinstance(value, expected):
            problems.append(f"field {name!r} is {_json_type(value)}, expected {_expected_name(expected)}")
    if problems:
        present = ", ".join(sorted(map(str, row))) or "none"
        raise UserError(
            "; ".join(problems) + f" (fields present: {present})",
            where=f"{path}:{lineno}",
            fix=f"every row needs: {', '.join(f'{n} ({_expected_name(t)})' for n, t in fields.items())}",
        )


def _as_tuple(expected: type | tuple[type, ...]) -> tuple[type, ...]:
    return expected if isinstance(expected, tuple) else (expected,)


def _expected_name(expected: type | tuple[type, ...]) -> str:
    return " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in _as_tuple(expected))


def _json_type(value: object) -> str:
    return "null" if value is None else _TYPE_NAMES.get(type(value), type(value).__name__)


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[Mapping]) -> int:
    """Writes `rows` as JSON lines so that `path` is either complete or untouched.

    The rows go to a temporary file in the same directory (same filesystem, so the final
    `os.replace` is atomic); an interrupted write leaves no half-written file that a later
    stage could mistake for finished output. A path ending in `.gz` is gzip-compressed.

    Args:
        path: destination file; its directory is created if needed.
        rows: JSON-serialisable mappings.

    Returns:
        The number of rows written.
    """
    count = 0
    with atomic_open(path, "wb") as raw:
        # mtime=0 keeps the gzip bytes a pure function of the rows (stable content hashes).
        sink = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) if Path(path).suffix == ".gz" else raw
        for row in rows:
            sink.write(json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n")
            count += 1
        if sink is not raw:
            sink.close()
    return count
