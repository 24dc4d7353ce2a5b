"""Megatron distributed checkpoints (torch_dist backend) as NeMo 2.1 stores them in `model_weights/`.

On disk (what megatron-core's `dist_checkpointing.save` writes, and what its `load` reads):

* `metadata.json`: exactly the four keys of megatron's CheckpointingConfig (an extra key
  breaks megatron-core 0.10's loader, the one inside NeMo-Aligner 0.7.0's container);
* `common.pt`: `torch.save({})`; NeMo keeps nothing but weights there;
* `.metadata` + `__0_0.distcp`: a torch.distributed.checkpoint holding every tensor with its
  GLOBAL shape (stacked layers: one [num_layers, ...] tensor per weight, stored as one chunk
  per layer, as megatron writes it when each pipeline stage holds one layer), so any TP/PP
  layout can load it, plus the `_extra_state` objects as `<key>/shard_<offset>_<shape>` byte items
  whose content is `torch.save([None])`, exactly what megatron writes for a ShardedObject whose
  data is None.

Writing goes through plain `torch.distributed.checkpoint.save` with no process group (its
FileSystemWriter, one file, no fsync, torch.save records without CRC32: see `_no_crc32`).
Tensors are produced lazily: the planner sees shape-only (meta) tensors, and each chunk (a
block of rows of one layer, or of an unstacked tensor) is produced only when the writer asks
for it, so about one chunk is in memory at a time (bench/bench_convert.py measures it). The
data file can be streamed into any binary stream (`open_data`): a .nemo tar receives it in
place, with no second copy.

Reading never unpickles arbitrary objects: `.metadata` goes through an allow-list unpickler,
tensors through torch.load(weights_only=True) (DCP's own tensor path), and byte items
(`_extra_state`, pickled) are never read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import WriteItem, WriteItemType

from nemo_rlhf.errors import UserError

DATA_SUFFIX = ".distcp"  # torch.distributed.checkpoint's data files: __{rank}_{i}.distcp
METADATA_JSON = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}

# What a pickled DCP `.metadata` may reference: DCP's own dataclasses and enums, torch sizes,
# dtypes, layouts and memory formats, the checkpoint id (a path) and a few containers. Anything
# else means the file was not written by torch.distributed.checkpoint and is refused unread.
_SAFE_MODULE_PREFIXES = ("torch.distributed.checkpoint.",)
_SAFE_GLOBALS = {
    ("torch", "Size"), ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
    ("builtins", "slice"), ("torch", "device"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "Path"),
}


# Largest chunk a producer should hand the writer (`hf_to_nemo` splits bigger blocks of rows):
# a vocabulary-sized embedding is then never in memory, nor mapped, whole. Any chunking is
# valid: megatron's loader reads whatever stored chunks overlap each rank's shard.
MAX_CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class Chunk:
    """One stored piece of a tensor: `make()` returns the block at `offsets` of shape `sizes`."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    make: Callable[[], torch.Tensor]


@dataclass(frozen=True)
class LazyTensor:
    """A tensor to write, known by shape and dtype, produced only when the writer needs it.

    Attributes:
        shape: Global shape (stacked weights: [num_layers, ...]).
        dtype: Stored dtype (a produced tensor of another dtype is cast on the way).
        produce: `produce()` returns the whole tensor (used when `chunks` is empty).
        chunks: The pieces the tensor is stored in, which together tile it exactly once;
            each is produced only when the writer gets to it.

    The writer is serial: a produced tensor has been written before the next one is asked for.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor] | None = None
    chunks: tuple[Chunk, ...] = ()

    def write_chunks(self) -> tuple[Chunk, ...]:
        return self.chunks or (Chunk((0,) * len(self.shape), tuple(self.shape), self.produce),)


@contextlib.contextmanager
def _single_process():
    """Silences DCP's notice that no process group exists: one process is what we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


@contextlib.contextmanager
def _no_crc32():
    """torch.save without the CRC32 of each zip record (a third of the write time, measured).

    torch's zip reader is built without CRC checks (MINIZ_DISABLE_ZIP_READER_CRC32_CHECKS, in
    every torch release since 1.6), so torch.load, DCP's reader and megatron's loader read these
    records unchanged; only a generic unzip tool would complain. The setting is global: it is
    restored on exit.
    """
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(previous)


def extra_state_key(key: str, offset: int, num: int) -> str:
    """The DCP key megatron gives a ShardedObject of global shape (num,) at offset (offset,)."""
    return f"{key}/shard_{offset}_{num}"


class _LazySavePlanner(DefaultSavePlanner):
    """Plans on shape-only tensors, one write item per chunk, and asks the producers at write time.

    Several chunks per tensor (one per layer, or finer) is what megatron itself writes when each
    rank saves its own slice, so any loader reads it; it lets the converter hold one chunk in
    memory instead of the whole tensor.
    """

    def __init__(self, lazy: dict[str, LazyTensor], release: Callable[[], None] | None):
        super().__init__()
        self._lazy = lazy
        self._chunks = {(fqn, tuple(c.offsets)): c for fqn, spec in lazy.items() for c in spec.write_chunks()}
        self._release = release or (lambda: None)
        self._cast_buffers: dict[tuple, torch.Tensor] = {}

    def create_local_plan(self):
        plan = super().create_local_plan()
        items = []
        for item in plan.items:
            spec = self._lazy.get(item.index.fqn)
            items += _chunk_items(item, spec.write_chunks()) if spec is not None else [item]
        self.plan = dataclasses.replace(plan, items=items)
        return self.plan

    def resolve_data(self, write_item):
        self._release()  # the writer is done with the previous item
        fqn = write_item.index.fqn
        if fqn not in self._lazy:
            return super().resolve_data(write_item)
        spec, chunk = self._lazy[fqn], write_item.tensor_data.chunk
        tensor = self._chunks[(fqn, tuple(chunk.offsets))].make()
        if tuple(tensor.shape) != tuple(chunk.sizes):
            raise RuntimeError(f"{fqn}: produced shape {tuple(tensor.shape)}, planned {tuple(chunk.sizes)}")
        if tensor.dtype != spec.dtype:  # into a buffer reused for every chunk of this shape
            key = (tuple(tensor.shape), spec.dtype)
            if key not in self._cast_buffers:
                self._cast_buffers[key] = torch.empty(key[0], dtype=spec.dtype)
            tensor = self._cast_buffers[key].copy_(tensor)
        return tensor.contiguous()


def _chunk_items(item: WriteItem, chunks: tuple[Chunk, ...]) -> list[WriteItem]:
    """The write item of a whole tensor, or one shard item per chunk."""
    if len(chunks) == 1 and tuple(chunks[0].sizes) == tuple(item.tensor_data.size):
        return [item]
    return [WriteItem(index=MetadataIndex(item.index.fqn, torch.Size(c.offsets)), type=WriteItemType.SHARD,
                      tensor_data=dataclasses.replace(item.tensor_data, chunk=ChunkStorageMetadata(
                          offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes))))
            for c in chunks]


class _MemberStream(io.RawIOBase):
    """Writes to `raw` from its current position; tell() counts from there (DCP records offsets in its file)."""

    def __init__(self, raw):
        super().__init__()
        self._raw, self._base = raw, raw.tell()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        return self._raw.write(data)

    def tell(self) -> int:
        return self._raw.tell() - self._base

    def flush(self) -> None:
        self._raw.flush()


class _RedirectedFileSystem(FileSystem):
    """DCP's file system, except that data files (`*.distcp`) go to the streams `open_data` gives."""

    def __init__(self, open_data: Callable[[str], contextlib.AbstractContextManager]):
        super().__init__()
        self._open_data = open_data

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        if mode != "wb" or not str(path).endswith(DATA_SUFFIX):
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with self._open_data(Path(path).name) as raw:
            yield _MemberStream(raw)


def write_dist_checkpoint(out_dir: Path, tensors: dict[str, LazyTensor], objects: list[str],
                          release: Callable[[], None] | None = None,
                          open_data: Callable[[str], contextlib.AbstractContextManager] | None = None) -> None:
    """Writes a torch_dist Megatron checkpoint.

    Args:
        out_dir: The `model_weights` directory to create (must not exist yet).
        tensors: Checkpoint key (with the `model.` prefix) -> lazily produced global tensor.
        objects: DCP keys of None-valued sharded objects (see `extra_state_key`).
        release: Called whenever the writer has finished with the last produced tensor (a
            producer frees or unmaps what it read for it).
        open_data: `open_data(name)` -> context manager yielding the binary stream the data
            file `name` (e.g. `__0_0.distcp`) is written to, from its current position;
            default: the file in `out_dir`. Lets a .nemo tar receive the data directly.
    """
    for key, spec in tensors.items():
        covered = sum(torch.Size(c.sizes).numel() for c in spec.write_chunks())
        if covered != torch.Size(spec.shape).numel():  # a producer bug: the chunks must tile the tensor
            raise RuntimeError(f"{key}: chunks hold {covered} elements, the tensor {torch.Size(spec.shape).numel()}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True)
    state: dict[str, object] = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in tensors.items()}
    for key in objects:
        state[key] = [None]  # DCP torch.saves it: the same bytes megatron writes for data=None
    writer = dcp.FileSystemWriter(str(out_dir), single_file_per_rank=True, thread_count=1, sync_files=False)
    if open_data is not None:
        writer.fs = _RedirectedFileSystem(open_data)
    planner = _LazySavePlanner(tensors, release)
    with _single_process(), _no_crc32():
        dcp.save(state, storage_writer=writer, planner=planner, no_dist=True)
    if release is not None:
        release()
    (out_dir / "metadata.json").write_text(json.dumps(METADATA_JSON), encoding="utf-8")
    torch.save({}, out_dir / "common.pt")


# --------------------------------------------------------------------------- reading


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module.startswith(_SAFE_MODULE_PREFIXES) or (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's .metadata")


class _SafeReader(dcp.FileSystemReader):
    """FileSystemReader whose `.metadata` is unpickled through the allow-list."""

    def read_metadata(self, *args, **kwargs):
        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as f:
                metadata = _AllowListUnpickler(f).load()
        except FileNotFoundError:
            raise UserError(f"{path} is missing", fix="the checkpoint is incomplete: copy it again") from None
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as exc:
            raise UserError(f"cannot read {path}: {exc}", fix="the checkpoint is corrupt or not a "
                            "torch.distributed.checkpoint: re-create it") from exc
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def check_dist_checkpoint(weights_dir: Path) -> None:
    """Checks the files megatron's loader needs before it is asked to read them.

    Raises:
        UserError: A missing file or a backend other than torch_dist.
    """
    weights_dir = Path(weights_dir)
    for name in ("metadata.json", "common.pt", ".metadata"):
        if not (weights_dir / name).is_file():
            raise UserError(f"{name} is missing", where=str(weights_dir),
                            fix="the checkpoint is incomplete: convert or copy it again")
    try:
        meta = json.loads((weights_dir / "metadata.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"metadata.json is not JSON ({exc})", where=str(weights_dir)) from exc
    if meta.get("sharded_backend") != "torch_dist":
        raise UserError(f"sharded backend {meta.get('sharded_backend')!r} is not supported",
                        where=str(weights_dir / "metadata.json"),
                        fix="re-save the model with NeMo's default torch_dist checkpoint format")


def tensor_shapes(weights_dir: Path) -> dict[str, tuple[int, ...]]:
    """Global shape of every tensor in the checkpoint (byte items such as _extra_state left out)."""
    metadata = _SafeReader(str(weights_dir)).read_metadata()
    return {k: tuple(v.size) for k, v in metadata.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


def object_keys(weights_dir: Path) -> list[str]:
    """DCP keys of the byte items (megatron ShardedObjects); their content is not read."""
    metadata = _SafeReader(str(weights_dir)).read_metadata()
    return [k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]


def read_tensor(weights_dir: Path, key: str) -> torch.Tensor:
    """Loads one global tensor (weights only) from a torch_dist checkpoint."""
    metadata = _SafeReader(str(weights_dir)).read_metadata()
    entry = metadata.state_dict_metadata.get(key)
    if not isinstance(entry, TensorStorageMetadata):
        raise UserError(f"tensor {key!r} is not in the checkpoint", where=str(weights_dir))
    target = {key: torch.empty(tuple(entry.size), dtype=entry.properties.dtype)}
    try:
        with _single_process():
            dcp.load(target, storage_reader=_SafeReader(str(weights_dir)), no_dist=True)
    except UserError:
        raise
    except Exception as exc:  # DCP wraps read errors of any kind (truncated .distcp files)
        raise UserError(f"cannot read {key!r}: {str(exc).splitlines()[0][:300]}", where=str(weights_dir),
                        fix="the checkpoint is truncated or corrupt: convert or copy it again") from exc
    return target[key]


class DistCheckpoint:
    """Global tensors by key over a torch_dist checkpoint (the interface `legacy_ckpt.LegacyCheckpoint` shares).

    Raises:
        UserError: From `check_dist_checkpoint`, on construction.
    """

    def __init__(self, weights_dir: Path):
        self.weights_dir = Path(weights_dir)
        check_dist_checkpoint(self.weights_dir)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return tensor_shapes(self.weights_dir)

    def read_tensor(self, key: str) -> torch.Tensor:
        return read_tensor(self.weights_dir, key)


def iter_tensors(weights_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (key, global tensor) one at a time, so export holds one stacked tensor at a time."""
    for key in sorted(tensor_shapes(weights_dir)):
        yield key, read_tensor(weights_dir, key)
