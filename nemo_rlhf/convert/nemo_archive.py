"""The `.nemo` container: an uncompressed tar, or the same files as an extracted directory.

Layout we write (NeMo 2.1's own save_to layout; NeMo and NeMo-Aligner accept a directory with
the same files wherever a .nemo is accepted):

    ./model_config.yaml
    ./model_weights/{metadata.json, common.pt, .metadata, __0_0.distcp}
    ./hf_assets/{tokenizer.json, tokenizer_config.json, ..., config.json, generation_config.json}

`hf_assets/` carries the source's tokenizer and HF configs, which NeMo ignores: export uses
them to give back the same tokenizer and the config keys NeMo has no field for (token ids).
Only regular files and directories are written, with `./`-prefixed names as NeMo's tar.add
produces, into a temporary file renamed into place when complete. The large data file
(`__0_0.distcp`) is written once, straight into its place in the tar (its header completed
afterwards), not staged and copied: the tar costs no more than the directory form. It comes
first in the archive; members have no required order.

Reading extracts into a temporary directory and refuses, before writing anything, absolute
names, `..`, links, devices and FIFOs, and more bytes than the archive can hold; a truncated
or corrupt archive is a UserError naming the file.

Reading also accepts the legacy weight forms older NeMo versions (and non-distributed saves)
wrote instead of `model_weights/`: `model_weights.ckpt` (TP=PP=1), `mp_rank_XX/model_weights.ckpt`
(TP>1, PP=1) and `tp_rank_XX_pp_rank_XXX/model_weights.ckpt` (PP>1). As in NeMo, a legacy file
takes precedence over `model_weights/`. `legacy_ckpt` reads them.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterator

from nemo_rlhf.errors import UserError
from nemo_rlhf.models.materialize import atomic_dir

CONFIG_NAME = "model_config.yaml"
WEIGHTS_DIR = "model_weights"
LEGACY_FILE = "model_weights.ckpt"
# Rank directories of the legacy forms (NeMo's inject_model_parallel_rank): TP only, or TP and PP.
_MP_RANK = re.compile(r"mp_rank_(\d+)\Z")
_TP_PP_RANK = re.compile(r"tp_rank_(\d+)_pp_rank_(\d+)\Z")
HF_ASSETS = "hf_assets"
# A gzip .nemo (older NeMo) can expand far beyond its size; refuse more than this unpacked.
MAX_GZIP_BYTES = 1 << 40
_COPY_CHUNK = 1 << 24


def is_tar_target(out_path: Path) -> bool:
    """A path ending in .nemo gets the tar form; anything else the extracted-directory form."""
    return Path(out_path).suffix == ".nemo"


@dataclass(frozen=True)
class StagedOutput:
    """Where a conversion writes its files.

    Attributes:
        staging: Directory for the small files (config, checkpoint metadata, tokenizer).
        open_member: `open_member("model_weights/__0_0.distcp")` -> context manager yielding a
            binary stream for a large file: the file in `staging` for the directory form, the
            tar member itself (written in place, no second copy) for the tar form.
    """

    staging: Path
    open_member: Callable[[str], contextlib.AbstractContextManager[BinaryIO]]


@contextlib.contextmanager
def _staged_file(staging: Path, rel: str) -> Iterator[BinaryIO]:
    path = staging / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        yield f


@contextlib.contextmanager
def atomic_output(out_path: Path, overwrite: bool = False) -> Iterator[StagedOutput]:
    """Yields a StagedOutput that becomes `out_path` (a .nemo tar or a directory) on success.

    On any error nothing is left at `out_path` and the staging files are removed.
    """
    out_path = Path(out_path).absolute()
    if not is_tar_target(out_path):
        with atomic_dir(out_path, overwrite) as staging:
            yield StagedOutput(staging, functools.partial(_staged_file, staging))
        return
    if out_path.exists() and not overwrite:
        raise UserError(f"{out_path} already exists", fix="choose a new path, delete it, or pass --overwrite")
    if out_path.is_dir():
        raise UserError(f"{out_path} is a directory", fix="choose a file path ending in .nemo")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.tmp-", dir=out_path.parent))
    partial = staging.with_name(staging.name + ".tar")
    try:
        with _TarBuilder(partial) as tar:
            yield StagedOutput(staging, tar.stream)
            tar.add_tree(staging)
        os.replace(partial, out_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        partial.unlink(missing_ok=True)


class _TarBuilder:
    """Writes an uncompressed POSIX (pax) tar front to back, as NeMo's tar.add would pack the files.

    Members have `./`-prefixed names, owner root and modes 0755/0644 whoever packs them (the
    staging dir is 0700; the archive must not be). A large member can be streamed: its header
    space is reserved, the data written straight into the archive, and the header written
    into the reserved space once the size is known. That header always carries a pax `size`
    record, so it has the same length (3 blocks) whatever the size, including over 8 GiB.
    """

    _STREAMED_HEADER = 3 * tarfile.BLOCKSIZE

    def __init__(self, path: Path):
        self._file = open(path, "wb")
        self._names: set[str] = set()

    def __enter__(self) -> "_TarBuilder":
        return self

    def __exit__(self, kind, value, tb) -> None:
        try:
            if kind is None:  # end-of-archive: two zero blocks, padded to a whole record as tarfile does
                end = self._file.tell() + 2 * tarfile.BLOCKSIZE
                self._file.write(b"\0" * (2 * tarfile.BLOCKSIZE + -end % tarfile.RECORDSIZE))
        finally:
            self._file.close()

    @staticmethod
    def _header(arcname: str, size: int, mtime: float, is_dir: bool = False, pax_size: bool = False) -> bytes:
        info = tarfile.TarInfo(arcname)
        info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
        info.size, info.mtime = size, int(mtime)
        if pax_size:
            info.pax_headers = {"size": str(size)}
        return _plain_member(info).tobuf(tarfile.PAX_FORMAT)

    def _pad(self) -> None:
        self._file.write(b"\0" * (-self._file.tell() % tarfile.BLOCKSIZE))

    def _add_parents(self, rel: str) -> None:
        parts = rel.split("/")  # "model_weights/__0_0.distcp": "." and "./model_weights"
        for name in ["."] + ["./" + "/".join(parts[:depth]) for depth in range(1, len(parts))]:
            if name not in self._names:
                self._file.write(self._header(name, 0, time.time(), is_dir=True))
                self._names.add(name)

    @contextlib.contextmanager
    def stream(self, rel: str) -> Iterator[BinaryIO]:
        """Yields the archive positioned at the data of member `./<rel>`; completes its header on exit."""
        arcname = f"./{rel}"
        self._add_parents(rel)
        start = self._file.tell()
        self._file.write(b"\0" * self._STREAMED_HEADER)
        yield self._file
        end = self._file.tell()
        size = end - start - self._STREAMED_HEADER
        self._pad()
        after = self._file.tell()
        header = self._header(arcname, size, time.time(), pax_size=True)
        if len(header) != self._STREAMED_HEADER:
            raise RuntimeError(f"tar header of {arcname} is {len(header)} bytes, {self._STREAMED_HEADER} reserved")
        self._file.seek(start)
        self._file.write(header)
        self._file.seek(after)
        self._names.add(arcname)

    def add_tree(self, source: Path) -> None:
        """Adds `source` as `.` and everything under it not added yet (regular files and dirs only), sorted."""
        for path in [source, *sorted(source.rglob("*"))]:
            arcname = "." if path == source else f"./{path.relative_to(source).as_posix()}"
            if arcname in self._names:
                continue
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                raise RuntimeError(f"refusing to pack {path}: not a regular file or directory")
            stat = path.stat()
            self._file.write(self._header(arcname, 0 if path.is_dir() else stat.st_size, stat.st_mtime,
                                          is_dir=path.is_dir()))
            if path.is_file():
                with open(path, "rb") as src:
                    shutil.copyfileobj(src, self._file, _COPY_CHUNK)
                self._pad()
            self._names.add(arcname)


def _plain_member(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """Same owner and modes whoever packs it (the staging dir is 0700; the archive must not be)."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o755 if info.isdir() else 0o644
    return info


# --------------------------------------------------------------------------- reading


def _open_tar(path: Path) -> tarfile.TarFile:
    """Opens an uncompressed tar, falling back to gzip as NeMo does."""
    for mode in ("r:", "r:gz"):
        try:
            return tarfile.open(path, mode)
        except (tarfile.ReadError, EOFError, OSError):
            continue
    raise UserError(f"{path} is not a .nemo archive (not a tar file, or truncated at its start)",
                    fix="convert or copy the model again")


def _member_path(member: tarfile.TarInfo, archive: Path) -> PurePosixPath | None:
    """The safe relative path of a member, None for the root entry; UserError for anything unsafe."""
    name = PurePosixPath(member.name)
    parts = [p for p in name.parts if p not in ("", ".")]
    if name.is_absolute() or ".." in parts:
        raise UserError(f"archive member {member.name!r} points outside the archive", where=str(archive),
                        fix="this .nemo was not written by NeMo or nemo-rlhf; do not use it")
    if not (member.isreg() or member.isdir()):
        raise UserError(f"archive member {member.name!r} is a link or special file", where=str(archive),
                        fix="re-create the .nemo without links (NeMo writes only regular files)")
    return PurePosixPath(*parts) if parts else None


def _checked_members(tar: tarfile.TarFile, archive: Path) -> list[tuple[tarfile.TarInfo, PurePosixPath]]:
    """Every member validated before anything is written; total size bounded."""
    members, total = [], 0
    try:
        for member in tar:
            rel = _member_path(member, archive)
            if rel is not None:
                members.append((member, rel))
                total += member.size if member.isreg() else 0
    except (tarfile.ReadError, EOFError) as exc:
        raise UserError(f"archive is truncated or corrupt ({exc})", where=str(archive),
                        fix="convert or copy the model again") from exc
    # An uncompressed tar cannot hold more than its own size: more means a lying header.
    limit = MAX_GZIP_BYTES if _is_gzip(archive) else archive.stat().st_size
    if total > limit:
        raise UserError(f"archive members add up to {total} bytes, more than the archive can hold ({limit})",
                        where=str(archive), fix="the file is truncated or corrupt: copy it again")
    return members


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def extract_nemo(archive: Path, dest: Path) -> None:
    """Safely extracts a .nemo tar into the existing directory `dest`."""
    with _open_tar(archive) as tar:
        members = _checked_members(tar, archive)
        need = sum(m.size for m, _ in members if m.isreg())
        if shutil.disk_usage(dest).free < need:
            raise UserError(f"extracting needs {need / 2**30:.1f} GiB in {dest}", fix="free disk space or set TMPDIR")
        try:
            for member, rel in members:
                target = dest.joinpath(*rel.parts)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, _COPY_CHUNK)
                if target.stat().st_size != member.size:
                    raise EOFError(f"{member.name} is short")
        except (tarfile.ReadError, EOFError) as exc:
            raise UserError(f"archive is truncated or corrupt ({exc})", where=str(archive),
                            fix="convert or copy the model again") from exc


def read_config_text(path: Path, max_bytes: int = 1 << 24) -> str:
    """model_config.yaml of a .nemo (tar or directory) without extracting the weights.

    Lets a caller check a TP/PP layout against the config in a second, before unpacking GBs.
    """
    path = Path(path).absolute()
    if path.is_dir():
        _check_layout(path, path)
        return (path / CONFIG_NAME).read_text(encoding="utf-8")
    if not path.is_file():
        raise UserError(f"{path} does not exist", fix="pass a .nemo file or an extracted .nemo directory")
    with _open_tar(path) as tar:
        try:
            for member in tar:
                rel = _member_path(member, path)
                if rel is not None and rel.as_posix() == CONFIG_NAME and member.isreg() and member.size <= max_bytes:
                    return tar.extractfile(member).read().decode("utf-8")
        except (tarfile.ReadError, EOFError, UnicodeDecodeError) as exc:
            raise UserError(f"archive is truncated or corrupt ({exc})", where=str(path),
                            fix="convert or copy the model again") from exc
    raise UserError(f"no {CONFIG_NAME} in the model", where=str(path), fix="convert the model again")


@contextlib.contextmanager
def open_nemo(path: Path) -> Iterator[Path]:
    """Yields a directory holding the model: the path itself (directory form) or a safe extraction.

    Raises:
        UserError: Missing path, unsafe or truncated archive, no model_config.yaml.
    """
    path = Path(path).absolute()
    if path.is_dir():
        _check_layout(path, path)
        yield path
        return
    if not path.is_file():
        raise UserError(f"{path} does not exist", fix="pass a .nemo file or an extracted .nemo directory")
    with tempfile.TemporaryDirectory(prefix="nemo-rlhf-extract-") as tmp:
        extract_nemo(path, Path(tmp))
        _check_layout(Path(tmp), path)
        yield Path(tmp)


def legacy_rank_dirs(folder: Path) -> dict[tuple[int, int], Path]:
    """(tp_rank, pp_rank) -> directory of every legacy rank directory in `folder`, whether or not it holds its file.

    `model_weights.ckpt` at the top is rank (0, 0) of a TP=PP=1 model; `mp_rank_XX` is (XX, 0).
    An empty dict means the model has no legacy weights.

    Raises:
        UserError: Both rank-directory forms at once, or ranks named twice (`mp_rank_1` and `mp_rank_01`).
    """
    folder = Path(folder)
    found: dict[tuple[int, int], Path] = {}
    forms = set()
    for item in sorted(folder.iterdir()):
        if item.is_dir() and (m := _MP_RANK.match(item.name)):
            rank, form = (int(m.group(1)), 0), "mp_rank_XX"
        elif item.is_dir() and (m := _TP_PP_RANK.match(item.name)):
            rank, form = (int(m.group(1)), int(m.group(2))), "tp_rank_XX_pp_rank_XXX"
        else:
            continue
        if rank in found:
            raise UserError(f"{found[rank].name} and {item.name} name the same rank", where=str(folder),
                            fix="remove the stray copy")
        found[rank] = item
        forms.add(form)
    if (folder / LEGACY_FILE).is_file():
        forms.add(LEGACY_FILE)
        found.setdefault((0, 0), folder)
    if len(forms) > 1:
        raise UserError(f"the model holds legacy weights in several forms ({', '.join(sorted(forms))})",
                        where=str(folder), fix="keep only the form of the model-parallel layout it was saved with")
    return found


def _check_layout(folder: Path, shown: Path) -> None:
    if not (folder / CONFIG_NAME).is_file():
        raise UserError(f"no {CONFIG_NAME} in the model", where=str(shown), fix="convert the model again")
    if not (folder / WEIGHTS_DIR).is_dir() and not legacy_rank_dirs(folder):
        raise UserError(f"no {WEIGHTS_DIR}/ (nor legacy {LEGACY_FILE}) in the model", where=str(shown),
                        fix="convert the model with `nemo-rlhf convert hf-to-nemo`")
