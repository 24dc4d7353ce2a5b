"""The `.nemo` container: an uncompressed tar, or the same files as an extracted directory.

Layout we write (NeMo 2.1's own save_to layout; NeMo and NeMo-Aligner accept a directory with
the same files wherever a .nemo is accepted):

    ./model_config.yaml
    ./model_weights/{metadata.json, common.pt, .metadata, __0_0.distcp}
    ./hf_assets/{tokenizer.json, tokenizer_config.json, ..., config.json, generation_config.json}

`hf_assets/` carries the source's tokenizer and HF configs, which NeMo ignores: export uses
them to give back the same tokenizer and the config keys NeMo has no field for (token ids).
Only regular files and directories are written, with `./`-prefixed names as NeMo's tar.add
produces, into a temporary file renamed into place when complete.

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
import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Iterator

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


@contextlib.contextmanager
def atomic_output(out_path: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields a staging directory that becomes `out_path` (a .nemo tar or a directory) on success.

    On any error nothing is left at `out_path` and the staging files are removed.
    """
    out_path = Path(out_path).absolute()
    if not is_tar_target(out_path):
        with atomic_dir(out_path, overwrite) as staging:
            yield staging
        return
    if out_path.exists() and not overwrite:
        raise UserError(f"{out_path} already exists", fix="choose a new path, delete it, or pass --overwrite")
    if out_path.is_dir():
        raise UserError(f"{out_path} is a directory", fix="choose a file path ending in .nemo")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.tmp-", dir=out_path.parent))
    partial = staging.with_name(staging.name + ".tar")
    try:
        yield staging
        _write_tar(staging, partial)
        os.replace(partial, out_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        partial.unlink(missing_ok=True)


def _plain_member(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """Same owner and modes whoever packs it (the staging dir is 0700; the archive must not be)."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o755 if info.isdir() else 0o644
    return info


def _write_tar(source: Path, tar_path: Path) -> None:
    """Uncompressed tar of `source` with './'-prefixed members, regular files and dirs only."""
    with tarfile.open(tar_path, "w:", format=tarfile.PAX_FORMAT, copybufsize=16 << 20) as tar:
        tar.add(source, arcname=".", recursive=False, filter=_plain_member)
        for path in sorted(source.rglob("*")):
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                raise RuntimeError(f"refusing to pack {path}: not a regular file or directory")
            tar.add(path, arcname=f"./{path.relative_to(source).as_posix()}", recursive=False,
                    filter=_plain_member)


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
