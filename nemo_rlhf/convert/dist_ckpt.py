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

Writing goes through plain `torch.distributed.checkpoint.save` with no process group. Tensors
are produced lazily: the planner sees shape-only (meta) tensors, and each chunk (one layer of a
stacked weight, or a whole unstacked tensor) is built only when the writer asks for it, so
about one layer is in memory at a time (bench/bench_convert.py measures it).

Reading never unpickles arbitrary objects: `.metadata` goes through an allow-list unpickler,
tensors through torch.load(weights_only=True) (DCP's own tensor path), and byte items
(`_extra_state`, pickled) are never read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import WriteItem, WriteItemType

from nemo_rlhf.errors import UserError

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


@dataclass(frozen=True)
class LazyTensor:
    """A tensor to write, known by shape and dtype, produced only when the writer needs it.

    Attributes:
        shape: Global shape (stacked weights: [num_layers, ...]).
        dtype: Stored dtype.
        produce: `produce()` returns the whole tensor; for a stacked tensor `produce(layer)`
            returns one layer (shape[1:]).
        stacked: The first axis is the layer axis; each layer is written as its own chunk.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[..., torch.Tensor]
    stacked: bool = False


@contextlib.contextmanager
def _single_process():
    """Silences DCP's notice that no process group exists: one process is what we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def extra_state_key(key: str, offset: int, num: int) -> str:
    """The DCP key megatron gives a ShardedObject of global shape (num,) at offset (offset,)."""
    return f"{key}/shard_{offset}_{num}"


class _LazySavePlanner(DefaultSavePlanner):
    """Plans on shape-only tensors, one chunk per layer of a stacked tensor, and asks the producers at write time.

    One chunk per layer is the layout megatron itself writes when each pipeline stage holds one
    layer (every rank saves its own slice of the stacked tensor), so any loader reads it; it
    lets the converter hold one layer in memory instead of the whole stack.
    """

    def __init__(self, lazy: dict[str, LazyTensor]):
        super().__init__()
        self._lazy = lazy
        self._previous: torch.Tensor | None = None

    def create_local_plan(self):
        plan = super().create_local_plan()
        items = []
        for item in plan.items:
            spec = self._lazy.get(item.index.fqn)
            items += _layer_items(item, spec.shape[0]) if spec is not None and spec.stacked else [item]
        self.plan = dataclasses.replace(plan, items=items)
        return self.plan

    def release_previous(self) -> None:
        """Frees the storage of the tensor handed out last, which the writer has finished with.

        torch's serial writer asks for item N+1 from inside `for tensor, item in loader` while
        its loop variable still holds item N; without this two neighbouring items would be in
        memory together.
        """
        if self._previous is not None and self._previous.untyped_storage().resizable():
            self._previous.untyped_storage().resize_(0)  # storages of safetensors' buffers are not resizable
        self._previous = None

    def resolve_data(self, write_item):
        self.release_previous()
        fqn = write_item.index.fqn
        if fqn not in self._lazy:
            return super().resolve_data(write_item)
        spec = self._lazy[fqn]
        if spec.stacked:
            tensor = spec.produce(write_item.index.offset[0]).to(spec.dtype).unsqueeze(0)
        else:
            tensor = spec.produce().to(spec.dtype)
        tensor = tensor.contiguous()
        if tuple(tensor.shape) != tuple(write_item.tensor_data.chunk.sizes):
            raise RuntimeError(f"{fqn}: produced shape {tuple(tensor.shape)}, "
                               f"planned {tuple(write_item.tensor_data.chunk.sizes)}")
        self._previous = tensor
        return tensor


def _layer_items(item: WriteItem, num_layers: int) -> list[WriteItem]:
    """Splits the write item of a whole stacked tensor into one shard item per layer."""
    size = item.tensor_data.size
    items = []
    for layer in range(num_layers):
        offsets = torch.Size([layer] + [0] * (len(size) - 1))
        chunk = ChunkStorageMetadata(offsets=offsets, sizes=torch.Size([1, *size[1:]]))
        items.append(WriteItem(index=MetadataIndex(item.index.fqn, offsets), type=WriteItemType.SHARD,
                               tensor_data=dataclasses.replace(item.tensor_data, chunk=chunk)))
    return items


def write_dist_checkpoint(out_dir: Path, tensors: dict[str, LazyTensor], objects: list[str]) -> None:
    """Writes a torch_dist Megatron checkpoint.

    Args:
        out_dir: The `model_weights` directory to create (must not exist yet).
        tensors: Checkpoint key (with the `model.` prefix) -> lazily produced global tensor.
        objects: DCP keys of None-valued sharded objects (see `extra_state_key`).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True)
    state: dict[str, object] = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in tensors.items()}
    for key in objects:
        state[key] = [None]  # DCP torch.saves it: the same bytes megatron writes for data=None
    writer = dcp.FileSystemWriter(str(out_dir), single_file_per_rank=True, thread_count=1, sync_files=False)
    planner = _LazySavePlanner(tensors)
    with _single_process():
        dcp.save(state, storage_writer=writer, planner=planner, no_dist=True)
    planner.release_previous()
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
