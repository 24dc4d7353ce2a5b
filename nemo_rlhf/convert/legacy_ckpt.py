"""Legacy `.nemo` weights: one `torch.save`d state dict per model-parallel rank, read as global tensors.

NeMo writes these instead of a distributed checkpoint for models without a sharded state dict
(or under FSDP), and older NeMo versions wrote them always (nemo_archive has the file names).
Each file is `model.state_dict()` of one rank of a megatron-core GPTModel, so it holds that
rank's TP shard of every tensor, per layer, with layer numbers local to its pipeline stage:

    model.embedding.word_embeddings.weight                   (first stage; rows V/TP)
    model.decoder.layers.<local i>.self_attention.linear_qkv.weight    (whole query groups of rank r)
    model.decoder.layers.<local i>.mlp.linear_fc1.weight               (cat(gate_r, up_r))
    model.decoder.final_layernorm.weight, model.output_layer.weight    (last stage)
    ...<module>._extra_state                                  (TransformerEngine state: no weights)

`LegacyCheckpoint` presents them as the distributed checkpoint does (`dist_ckpt.DistCheckpoint`):
a global tensor per key, layers stacked on a leading axis, TP pieces merged with the inverse
(`Kind.unshard`) of the split megatron-core applies, so export is the same code for both.

Safety: files are read with `torch.load(weights_only=True)` only (memory-mapped when the file
is in torch's zip format). TransformerEngine 1.x stores its `_extra_state` as an `io.BytesIO`,
which weights_only refuses; `io.BytesIO` (a byte buffer, nothing that runs code) is allowed for
these loads alone through `torch.serialization.safe_globals`, and its bytes are never
unpickled: extra state carries no weights and is dropped. Any other object is refused.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from pathlib import Path

import torch

from nemo_rlhf.convert import nemo_archive
from nemo_rlhf.convert.param_mapping import REPLICATED, Geometry, Kind
from nemo_rlhf.errors import UserError

PREFIX = "model."
_LAYER_KEY = re.compile(r"model\.decoder\.layers\.(\d+)\.(.+)\Z")
_VIRTUAL_PIPELINE = re.compile(r"model\d+\.")
# megatron-core's local spec keeps the norms as modules of their own; its sharded_state_dict
# (so every distributed checkpoint, and our tables) names them as the TE spec's fused norms.
LOCAL_SPEC_NAMES = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}


def rank_file_name(tp_rank: int, pp_rank: int, tp: int, pp: int) -> str:
    """Where NeMo puts a rank's file (its inject_model_parallel_rank), relative to the model folder."""
    if pp > 1:
        return f"tp_rank_{tp_rank:02d}_pp_rank_{pp_rank:03d}/{nemo_archive.LEGACY_FILE}"
    if tp > 1:
        return f"mp_rank_{tp_rank:02d}/{nemo_archive.LEGACY_FILE}"
    return nemo_archive.LEGACY_FILE


def load_rank_file(path: Path) -> dict:
    """One rank's state dict, weights only (memory-mapped where the format allows).

    Raises:
        UserError: A pickle that needs anything but tensors, containers and byte buffers
            (it is refused unread), or a truncated/corrupt file.
    """
    try:
        with torch.serialization.safe_globals([io.BytesIO]):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):  # torch's pre-1.6 format cannot be mapped: read it whole
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if "Unsupported" in line), "")
        raise UserError(f"refusing to unpickle it: it holds Python objects other than tensors ({detail})",
                        where=str(path), fix="only weights are read from a .nemo (torch.load weights_only); "
                        "re-save the state dict with plain tensors, or save the model in NeMo's distributed "
                        "checkpoint format") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as exc:
        raise UserError(f"cannot read it ({str(exc).splitlines()[0][:200]})", where=str(path),
                        fix="the file is truncated or corrupt: copy the model again") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a Lightning-style checkpoint: the weights are one level down
    if not isinstance(state, dict):
        raise UserError(f"holds a {type(state).__name__}, not a state dict", where=str(path),
                        fix="pass a .nemo whose weight files are torch.save(model.state_dict())")
    return state


def _global_name(key: str, where: str) -> str:
    """The megatron-core name with the `model.` prefix; refuses layouts other than mcore GPT."""
    if not isinstance(key, str):
        raise UserError(f"state dict key {key!r} is not a string", where=where)
    if key.startswith("model.module."):  # a Float16Module (megatron_amp_O2) that kept its wrapper name
        key = PREFIX + key[len("model.module."):]
    if key.startswith("model.language_model."):
        raise UserError(f"this is a pre-megatron-core NeMo checkpoint ({key}): mcore_gpt: False names are not "
                        "supported", where=where,
                        fix="convert it to megatron-core names first with NeMo's scripts/checkpoint_converters/"
                            "convert_gpt_nemo_to_mcore.py, then export the result")
    if _VIRTUAL_PIPELINE.match(key):
        raise UserError(f"key {key} comes from a virtual-pipeline-parallel model", where=where,
                        fix="re-save the model without virtual_pipeline_model_parallel_size, or in NeMo's "
                            "distributed checkpoint format")
    if not key.startswith(PREFIX):
        raise UserError(f"key {key} is not under `model.`", where=where,
                        fix="pass a .nemo saved by NeMo's MegatronGPTModel (mcore_gpt: True)")
    return key


class LegacyCheckpoint:
    """Global tensors by key over the per-rank legacy files of one model.

    Args:
        folder: The extracted model (holds `model_weights.ckpt` or the rank directories).
        kinds: Global checkpoint key -> mapping kind (the family's table); it says how TP pieces
            merge. Keys it does not know are treated as replicated (the exporter reports them).
        geo: The model geometry the kinds need.
        tp, pp: The model-parallel sizes model_config.yaml records; a rank directory beyond them
            widens the layout, a missing one is an error naming its file.
    """

    def __init__(self, folder: Path, kinds: dict[str, Kind], geo: Geometry, tp: int = 1, pp: int = 1):
        self.folder = Path(folder)
        self._kinds = kinds
        self._geo = geo
        dirs = nemo_archive.legacy_rank_dirs(self.folder)
        if not dirs:
            raise UserError(f"no legacy {nemo_archive.LEGACY_FILE} in the model", where=str(self.folder))
        top_file = dirs.get((0, 0)) == self.folder
        self.tp = 1 if top_file else max([tp] + [t + 1 for t, _ in dirs])
        self.pp = 1 if top_file else max([pp] + [p + 1 for _, p in dirs])

        def has_file(rank: tuple[int, int]) -> bool:
            return rank in dirs and (dirs[rank] / nemo_archive.LEGACY_FILE).is_file()

        missing = [rank_file_name(t, p, self.tp, self.pp) for p in range(self.pp) for t in range(self.tp)
                   if not has_file((t, p))]
        if missing:
            raise UserError(f"legacy checkpoint of TP={self.tp} x PP={self.pp} lacks {', '.join(missing)}",
                            where=str(self.folder), fix="copy the complete model (every rank's file)")
        # key -> layer (None: not stacked) -> TP pieces in rank order
        self._pieces: dict[str, dict[int | None, list[torch.Tensor | None]]] = {}
        self.num_layers = 0
        for pp_rank in range(self.pp):
            stage_layers = 0
            for tp_rank in range(self.tp):
                path = dirs[(tp_rank, pp_rank)] / nemo_archive.LEGACY_FILE
                local = self._add_rank(load_rank_file(path), tp_rank, self.num_layers, str(path))
                stage_layers = max(stage_layers, local)
            self.num_layers += stage_layers
        self._check_complete()

    def _stacked_name(self, rest: str) -> str:
        """`model.decoder.layers.<rest>`, with the local spec's norm names as the table knows them."""
        name = f"{PREFIX}decoder.layers.{rest}"
        for local, fused in LOCAL_SPEC_NAMES.items():
            renamed = f"{PREFIX}decoder.layers.{fused}{rest[len(local):]}"
            if rest.startswith(local) and name not in self._kinds and renamed in self._kinds:
                return renamed
        return name

    def _add_rank(self, state: dict, tp_rank: int, offset: int, where: str) -> int:
        """Files one rank's tensors under their global keys; returns the stage's layer count."""
        layers = 0
        for key, value in state.items():
            key = _global_name(key, where)
            if key.endswith("._extra_state"):
                continue  # TransformerEngine runtime state (fp8 scales), no weights
            if not isinstance(value, torch.Tensor):
                raise UserError(f"{key} holds a {type(value).__name__}, not a tensor", where=where,
                                fix="pass a .nemo whose weight files are torch.save(model.state_dict())")
            layer = None
            if m := _LAYER_KEY.match(key):
                layers = max(layers, int(m.group(1)) + 1)
                layer, key = offset + int(m.group(1)), self._stacked_name(m.group(2))
            pieces = self._pieces.setdefault(key, {}).setdefault(layer, [None] * self.tp)
            if pieces[tp_rank] is None:  # a tensor outside the layers is kept from the first stage holding it
                pieces[tp_rank] = value
        return layers

    def _check_complete(self) -> None:
        """Every stacked key has every layer, and every piece has every TP rank."""
        for key, by_layer in self._pieces.items():
            stacked = None not in by_layer
            if stacked and sorted(by_layer) != list(range(self.num_layers)):
                absent = sorted(set(range(self.num_layers)) - set(by_layer))
                raise UserError(f"{key} is missing for layers {absent[:8]} of {self.num_layers}",
                                where=str(self.folder), fix="the rank files do not come from one model")
            for layer, pieces in by_layer.items():
                if None in pieces:
                    rank = pieces.index(None)
                    raise UserError(f"TP rank {rank} has no {key}" + (f" for layer {layer}" if stacked else ""),
                                    where=str(self.folder), fix="the rank files do not come from one model")

    def _merged(self, key: str, pieces: list[torch.Tensor]) -> torch.Tensor:
        return self._kinds.get(key, REPLICATED).unshard(pieces, self._geo)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Global shape of every tensor (stacked layers lead), computed without reading data."""
        shapes = {}
        for key, by_layer in self._pieces.items():
            pieces = next(iter(by_layer.values()))
            shape = tuple(self._merged(key, [torch.empty(p.shape, device="meta") for p in pieces]).shape)
            shapes[key] = shape if None in by_layer else (self.num_layers, *shape)
        return shapes

    def read_tensor(self, key: str) -> torch.Tensor:
        """One global tensor: TP pieces merged, layers stacked (one stacked tensor in memory)."""
        if key not in self._pieces:
            raise UserError(f"tensor {key!r} is not in the checkpoint", where=str(self.folder))
        by_layer = self._pieces[key]
        if None in by_layer:
            return self._merged(key, by_layer[None])
        first = self._merged(key, by_layer[0])
        out = torch.empty((self.num_layers, *first.shape), dtype=first.dtype)
        out[0] = first
        for layer in range(1, self.num_layers):
            out[layer] = self._merged(key, by_layer[layer])
        return out
