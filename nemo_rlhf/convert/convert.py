"""HF causal LM or reward model <-> .nemo (NeMo 2.1 megatron_gpt / NeMo-Aligner 0.7.0 reward model).

Both directions are driven by the family's tables (plus `reward_head`'s row for a reward model).

HF -> NeMo plans every Megatron tensor (all layers of one weight, stacked) from the headers,
as chunks that are each a block of rows of one source tensor (the kind's `pieces`), and maps
each chunk's rows of the safetensors file only when the checkpoint writer asks for it: the
bytes go from the source's pages to the output with no copy in between, and about one chunk
is mapped at a time (bench/bench_convert.py: the I/O floor's time, a fraction of its memory).
NeMo -> HF reads one
stacked tensor at a time through the same table backwards and drops padded vocabulary rows.
Both check completeness: an HF tensor the table does not know, a Megatron tensor the table
does not know, or a source tensor left unused is an error, never a silent skip.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import save_file

from nemo_rlhf.convert import dist_ckpt, legacy_ckpt, model_config, nemo_archive, reward_head, safetensors_mmap
from nemo_rlhf.convert.families import FamilySpec, WeightEntry, family_for_nemo, get_family
from nemo_rlhf.convert.param_mapping import Geometry, Kind
from nemo_rlhf.errors import UserError
from nemo_rlhf.models.materialize import atomic_dir, check_hf_dir, make_portable

PREFIX = "model."
# Files of an HF directory that travel in the archive's hf_assets/ (tokenizer and configs).
ASSET_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
               "chat_template.jinja")


class _HfWeights:
    """Name -> tensor over an HF directory's safetensors files, read zero-copy, tracking use.

    Shapes and dtypes come from the headers. Every read maps just that tensor's bytes
    (`safetensors_mmap`); `release()` drops the pages read so far, which the checkpoint writer
    calls once it has written them, so RSS holds about one chunk of the source, never the model.
    """

    def __init__(self, hf_dir: Path):
        index = hf_dir / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
            else ["model.safetensors"]
        self._files = [safetensors_mmap.SafetensorsFile(hf_dir / f) for f in files]
        self._where = {k: f for f in self._files for k in f.keys()}
        self.used: set[str] = set()

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self._where[key].dtype(key)

    def get(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor `key` (or rows [start, stop) of it) as a view of the file's pages."""
        self.used.add(key)
        return self._where[key].read(key, rows)

    def release(self) -> None:
        for f in self._files:
            f.release()

    def close(self) -> None:
        for f in self._files:
            f.close()


@dataclass
class _Match:
    entry: WeightEntry
    layer: int | None


def _match_keys(family: FamilySpec, rows: tuple[WeightEntry, ...], keys: list[str], num_layers: int,
                where: str) -> dict[str, _Match]:
    """Assigns every HF tensor to a table row; lists every unmapped or out-of-range name at once."""
    compiled = [(entry, rx) for entry in rows for rx in entry.regexes()]
    matched, unknown, bad_layer = {}, [], []
    for key in keys:
        hit = next(((e, m) for e, rx in compiled if (m := rx.match(key))), None)
        if hit is None:
            unknown.append(key)
            continue
        entry, m = hit
        layer = int(m.group(1)) if entry.stacked else None
        if layer is not None and layer >= num_layers:
            bad_layer.append(key)
        matched[key] = _Match(entry, layer)
    if unknown:
        raise UserError(f"{len(unknown)} tensors are not in the {family.name} mapping table: {unknown[:8]}",
                        where=where, fix="this checkpoint has parts the converter does not know; "
                        "check the architecture in config.json")
    if bad_layer:
        raise UserError(f"tensors beyond num_hidden_layers={num_layers}: {bad_layer[:8]}", where=where,
                        fix="config.json disagrees with the weights: fix num_hidden_layers")
    return matched


def _sources(entry: WeightEntry, layer: int | None, weights: _HfWeights, tied: bool) -> list[str]:
    names = [entry.hf_name(i, layer) for i in range(len(entry.hf))]
    if entry.tied_to and tied and names[0] not in weights:
        return [entry.tied_to]
    return names


def _plan_tensors(family: FamilySpec, rows: tuple[WeightEntry, ...], weights: _HfWeights, geo: Geometry,
                  num_layers: int, tied: bool, dtype: torch.dtype, where: str) -> dict[str, dist_ckpt.LazyTensor]:
    """Megatron key -> lazily built global tensor, for every mapped row of the table."""
    plan, missing = {}, []
    for entry in rows:
        if entry.megatron is None:
            continue
        layers = list(range(num_layers)) if entry.stacked else [None]
        per_layer = [_sources(entry, layer, weights, tied) for layer in layers]
        absent = [n for names in per_layer for n in names if n not in weights]
        if absent:
            missing += absent
            continue
        shapes = [weights.shape(n) for n in per_layer[0]]
        _check_same_shapes(per_layer, shapes, weights, where)
        shape = entry.kind.megatron_shape(shapes, geo)
        full = (num_layers, *shape) if entry.stacked else shape
        chunks = [c for layer, names in enumerate(per_layer)
                  for c in _layer_chunks(entry, names, weights, geo, shape, layer if entry.stacked else None)]
        plan[PREFIX + entry.megatron] = dist_ckpt.LazyTensor(full, dtype, chunks=tuple(chunks))
    if missing:
        raise UserError(f"{len(missing)} tensors the {family.name} table needs are missing: {missing[:8]}",
                        where=where, fix="the checkpoint is incomplete or config.json disagrees with it")
    return plan


def _check_same_shapes(per_layer: list[list[str]], shapes: list[tuple[int, ...]], weights: _HfWeights,
                       where: str) -> None:
    """Every layer's tensors must have layer 0's shapes (the stacked Megatron tensor has one layer shape)."""
    for names in per_layer[1:]:
        for name, want in zip(names, shapes):
            if weights.shape(name) != want:
                raise UserError(f"{name} has shape {weights.shape(name)}, layer 0's has {want}", where=where,
                                fix="the checkpoint is corrupt or config.json disagrees with it")


def _layer_chunks(entry: WeightEntry, names: list[str], weights: _HfWeights, geo: Geometry,
                  shape: tuple[int, ...], layer: int | None) -> list[dist_ckpt.Chunk]:
    """The stored chunks of one layer (or of an unstacked tensor), produced straight from the source.

    A kind that only moves rows (`Kind.pieces`, assembled by the base `to_megatron`) is written
    piece by piece, each piece in blocks of at most MAX_CHUNK_BYTES: every chunk is then a view
    of the source file's pages (no copy, no allocation) or zeros (vocabulary padding). A kind
    that computes values (its own `to_megatron`) is written one whole layer at a time.
    """
    lead = (layer,) if layer is not None else ()
    if type(entry.kind).to_megatron is not Kind.to_megatron or not shape:
        make = functools.partial(_whole_layer, entry, names, weights, geo, layer is not None)
        return [dist_ckpt.Chunk((*lead, *[0] * len(shape)), (*[1] * len(lead), *shape), make)]
    rest = tuple(shape[1:])
    row_bytes = max(1, torch.Size(rest).numel() * weights.dtype(names[0]).itemsize)
    step = max(1, dist_ckpt.MAX_CHUNK_BYTES // row_bytes)
    chunks = []
    for piece in entry.kind.pieces([weights.shape(n) for n in names], geo):
        source = names[piece.source] if piece.source is not None else None
        for start in range(piece.start, piece.stop, step):
            stop = min(start + step, piece.stop)
            first = piece.src_start + start - piece.start
            make = functools.partial(_source_rows, weights, source, first, stop - start, rest,
                                     weights.dtype(names[0]), bool(lead))
            chunks.append(dist_ckpt.Chunk((*lead, start, *[0] * len(rest)), (*[1] * len(lead), stop - start, *rest),
                                          make))
    return chunks


def _whole_layer(entry: WeightEntry, names: list[str], weights: _HfWeights, geo: Geometry,
                 stacked: bool) -> torch.Tensor:
    tensor = entry.kind.to_megatron([weights.get(n) for n in names], geo)
    return tensor.unsqueeze(0) if stacked else tensor


def _source_rows(weights: _HfWeights, name: str | None, start: int, count: int, rest: tuple[int, ...],
                 dtype: torch.dtype, stacked: bool) -> torch.Tensor:
    """Rows [start, start + count) of source tensor `name` as a view of its pages; zeros when name is None."""
    rows = torch.zeros((count, *rest), dtype=dtype) if name is None else weights.get(name, (start, start + count))
    return rows.unsqueeze(0) if stacked else rows


def _extra_state_keys(family: FamilySpec, num_layers: int) -> list[str]:
    """None-valued `_extra_state` objects NeMo's TE model requests (stacked: one per layer)."""
    keys = []
    for module in family.extra_state:
        key = f"{PREFIX}{module}._extra_state"
        if module.startswith("decoder.layers."):
            keys += [dist_ckpt.extra_state_key(key, layer, num_layers) for layer in range(num_layers)]
        else:
            keys.append(dist_ckpt.extra_state_key(key, 0, 1))
    return keys


def _add_reward_head(plan: dict[str, dist_ckpt.LazyTensor], hf_cfg: dict, where: str) -> None:
    """The rm_head tensors NeMo-Aligner loads: score.weight in the head dtype, and a zero bias."""
    key = PREFIX + reward_head.SCORE.megatron
    reward_head.check_num_labels(hf_cfg, plan[key].shape, where)
    plan[key] = dataclasses.replace(plan[key], dtype=reward_head.HEAD_DTYPE)
    plan[reward_head.BIAS_KEY] = dist_ckpt.LazyTensor((1,), reward_head.HEAD_DTYPE, reward_head.zero_bias)


def hf_to_nemo(hf_dir: Path, out_path: Path, layer_spec: str = "te", dtype: torch.dtype | None = None,
               tokenizer_type: str | None = None, overwrite: bool = False, kind: str | None = None) -> Path:
    """Converts an HF causal LM or reward model into a .nemo (tar if `out_path` ends in .nemo, else a directory).

    The kind comes from config.json's architecture: `*ForCausalLM` gives a policy .nemo,
    `*ForSequenceClassification` (one label) a NeMo-Aligner reward-model .nemo.

    Args:
        hf_dir: Directory written by save_pretrained (config.json, safetensors, tokenizer).
        out_path: The .nemo file or extracted-.nemo directory to create.
        layer_spec: "te" (TransformerEngine names, the cluster default) or "local".
        dtype: Dtype of the stored weights; None keeps the source dtype.
        tokenizer_type: `tokenizer.type` for NeMo (hub id or directory on the cluster); None
            writes the absolute `hf_dir`, as NeMo's own converter does.
        overwrite: Replace an existing output.
        kind: "policy" or "reward" to insist on one (an error if config.json says otherwise);
            None takes what config.json says.

    Returns:
        The absolute output path.
    """
    hf_dir = check_hf_dir(hf_dir)
    where = str(hf_dir / "config.json")
    hf_cfg = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    architecture, detected = reward_head.split_architecture((hf_cfg.get("architectures") or ["<none>"])[0])
    kind = reward_head.check_kind(detected, kind, where)
    family = get_family(architecture, where)
    family.check_hf_config(hf_cfg, where)
    rows = reward_head.weight_rows(family.weights, kind)
    weights = _HfWeights(hf_dir)
    try:
        geo = model_config.geometry_from_hf(family, hf_cfg)
        num_layers = int(hf_cfg["num_hidden_layers"])
        matched = _match_keys(family, rows, weights.keys(), num_layers, str(hf_dir))
        dtype = dtype or weights.dtype(family.weights[0].hf[0])
        # A reward model has no lm_head, tied or not; Aligner still requests an output layer.
        tied = kind == reward_head.REWARD or bool(hf_cfg.get("tie_word_embeddings", False))
        plan = _plan_tensors(family, rows, weights, geo, num_layers, tied, dtype, str(hf_dir))
        cfg = model_config.build_model_config(family, hf_cfg, layer_spec=layer_spec, dtype=dtype,
                                              tokenizer_type=tokenizer_type or str(hf_dir))
        if kind == reward_head.REWARD:
            _add_reward_head(plan, hf_cfg, where)
            cfg.update(reward_head.NEMO_CONFIG, target=reward_head.NEMO_TARGET)
        with nemo_archive.atomic_output(out_path, overwrite) as out:
            (out.staging / nemo_archive.CONFIG_NAME).write_text(model_config.dump_model_config(cfg),
                                                                encoding="utf-8")
            dist_ckpt.write_dist_checkpoint(
                out.staging / nemo_archive.WEIGHTS_DIR, plan, _extra_state_keys(family, num_layers),
                release=weights.release, open_data=lambda name: out.open_member(f"{nemo_archive.WEIGHTS_DIR}/{name}"))
            _copy_assets(hf_dir, out.staging / nemo_archive.HF_ASSETS)
            _check_all_used(weights, matched)
    finally:
        weights.close()
    return Path(out_path).absolute()


def _check_all_used(weights: _HfWeights, matched: dict[str, _Match]) -> None:
    dropped = {k for k, m in matched.items() if m.entry.megatron is None}
    unused = set(weights.keys()) - weights.used - dropped
    if unused:  # the table maps them, yet no tensor was built from them: a table bug
        raise RuntimeError(f"source tensors left unused: {sorted(unused)[:8]}")


def _copy_assets(hf_dir: Path, dest: Path) -> None:
    dest.mkdir()
    for name in ASSET_FILES:
        if (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, dest / name)


# --------------------------------------------------------------------------- NeMo -> HF

# Bytes per safetensors shard on export, counted as HF counts "2GB" (10**9 per GB).
DEFAULT_MAX_SHARD_SIZE = 2 * 10**9
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _is_ignorable(key: str) -> bool:
    """Checkpoint tensors that carry no weights of the HF model (recomputed or runtime state)."""
    return key.endswith("._extra_state") or "_extra_state/" in key or key.endswith("rotary_pos_emb.inv_freq")


def _open_weights(folder: Path, cfg: dict, table: tuple[WeightEntry, ...], geo: Geometry):
    """The model's weights as global tensors by key: legacy per-rank files if any (NeMo prefers them
    too), else the distributed checkpoint in model_weights/."""
    if not nemo_archive.legacy_rank_dirs(folder):
        return dist_ckpt.DistCheckpoint(folder / nemo_archive.WEIGHTS_DIR)
    kinds = {PREFIX + e.megatron: e.kind for e in table if e.megatron is not None}
    return legacy_ckpt.LegacyCheckpoint(folder, kinds, geo, tp=int(cfg.get("tensor_model_parallel_size") or 1),
                                        pp=int(cfg.get("pipeline_model_parallel_size") or 1))


def _export_plan(family: FamilySpec, table: tuple[WeightEntry, ...], shapes: dict[str, tuple[int, ...]],
                 where: str, skip: frozenset[str] = frozenset()) -> dict[str, WeightEntry]:
    """Checkpoint key -> table row for every tensor to export; unknown or missing tensors are errors.

    `skip` holds checkpoint keys that are known but have no HF counterpart (a reward model's
    output layer and rm_head bias); they are neither exported nor reported as unknown.
    """
    rows = {PREFIX + e.megatron: e for e in table if e.megatron is not None and PREFIX + e.megatron not in skip}
    unknown = [k for k in shapes if k not in rows and k not in skip and not _is_ignorable(k)]
    if unknown:
        raise UserError(f"{len(unknown)} checkpoint tensors are not in the {family.name} table: {unknown[:8]}",
                        where=where, fix="this .nemo holds parts the exporter does not know (e.g. a reward head)")
    missing = [k for k, e in rows.items() if k not in shapes and not e.tied_to]
    if missing:
        raise UserError(f"checkpoint lacks {missing}", where=where, fix="the .nemo is incomplete: convert it again")
    # An output layer NeMo shares with the embedding is absent: the HF model is tied.
    return {k: e for k, e in rows.items() if k in shapes}


def _hf_tensors_of(source, key: str, entry: WeightEntry, geo: Geometry, num_layers: int,
                   where: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Reads one Megatron tensor and splits it into HF tensors through the table backwards."""
    tensor = source.read_tensor(key)
    if entry.stacked and tensor.shape[0] != num_layers:
        raise UserError(f"{key} stacks {tensor.shape[0]} layers, the config says {num_layers}", where=where)
    for layer in range(num_layers) if entry.stacked else [None]:
        parts = entry.kind.to_hf(tensor[layer] if layer is not None else tensor, geo)
        for i, part in enumerate(parts):
            yield entry.hf_name(i, layer), _owned(part)


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor if it is all of its storage, else a copy: a view would keep the whole stacked
    tensor alive while its shard waits, and safetensors refuses tensors that share storage."""
    whole = tensor.storage_offset() == 0 and tensor.is_contiguous() and \
        tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    return tensor if whole else tensor.clone()


def _reader_of(source, plan: dict[str, WeightEntry], hf_name: str, geo: Geometry, num_layers: int,
               where: str) -> Callable[[], torch.Tensor]:
    """Reads the (unstacked, single) HF tensor `hf_name` again from the checkpoint, when called."""
    key, entry = next((k, e) for k, e in plan.items() if e.hf[0] == hf_name)
    return lambda: next(_hf_tensors_of(source, key, entry, geo, num_layers, where))[1]


def _tie_or_untie(lm_head: torch.Tensor, embedding: Callable[[], torch.Tensor], hf_cfg: dict) -> bool:
    """Keeps the HF model tied only while the output layer still equals the embedding; True: write lm_head.

    NeMo trains the output layer separately from the embedding; once they differ the exported
    model must carry its own lm_head (tie_word_embeddings false), or HF would silently reuse
    the embedding. `embedding` reads the embedding again (it has been written already, and
    holding it back would keep a vocabulary-sized tensor in memory for the whole export).
    """
    if hf_cfg.get("tie_word_embeddings") and torch.equal(lm_head, embedding()):
        return False
    hf_cfg["tie_word_embeddings"] = False
    return True


class _ShardWriter:
    """HF's sharded safetensors layout, written as it fills: at most one shard of tensors in memory.

    Tensors are added in order; a shard is flushed (safetensors' save_file) when the next tensor
    would take it past `max_shard_size` bytes, and a tensor larger than that gets a shard of its
    own, as save_pretrained splits. Shards carry temporary names until their count is known:
    `finish` names them `model-0000i-of-0000N.safetensors` and writes `model.safetensors.index.json`,
    or, when everything fit in one shard, names it `model.safetensors` with no index.
    """

    def __init__(self, out_dir: Path, max_shard_size: int):
        if max_shard_size < 1:
            raise UserError(f"max_shard_size is {max_shard_size}", fix="pass a positive number of bytes")
        self._dir, self._max = Path(out_dir), max_shard_size
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []  # tensor names of each flushed shard
        self.total_size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in shard for shard in self._shards):
            raise RuntimeError(f"{name} exported twice")  # a table bug, not bad input
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self._max:
            self._flush()
        self._pending[name] = tensor
        self._pending_bytes += size
        self.total_size += size

    def _temp_name(self, index: int) -> Path:
        return self._dir / f".shard-{index:05d}.safetensors.partial"

    def _flush(self) -> None:
        save_file(self._pending, str(self._temp_name(len(self._shards))), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Writes the last shard, names the shards and writes the index; returns the shard file names."""
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        if count == 1:
            os.replace(self._temp_name(0), self._dir / SINGLE_FILE)
            return [SINGLE_FILE]
        names, weight_map = [], {}
        for i, tensors in enumerate(self._shards):
            names.append(f"model-{i + 1:05d}-of-{count:05d}.safetensors")
            os.replace(self._temp_name(i), self._dir / names[-1])
            weight_map.update(dict.fromkeys(tensors, names[-1]))
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (self._dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return names


def _tokenizer_len(assets: Path) -> int | None:
    if not (assets / "tokenizer.json").is_file() and not (assets / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(assets)))


def _write_hf_weights(writer: _ShardWriter, source, plan: dict[str, WeightEntry], family: FamilySpec, kind: str,
                      geo: Geometry, num_layers: int, hf_cfg: dict, where: str) -> torch.dtype:
    """Streams every exported tensor into `writer`; settles tying and the reward head on the way.

    Returns the model's dtype (the embedding's; the table lists the embedding first).
    """
    embedding_name = family.weights[0].hf[0]
    dtype = None
    for key, entry in plan.items():
        for name, tensor in _hf_tensors_of(source, key, entry, geo, num_layers, where):
            if dtype is None and name == embedding_name:
                dtype = tensor.dtype
            if entry.tied_to and kind != reward_head.REWARD:
                embedding = _reader_of(source, plan, entry.tied_to, geo, num_layers, where)
                if not _tie_or_untie(tensor, embedding, hf_cfg):
                    continue
            if entry is reward_head.SCORE:
                if dtype is None:
                    raise RuntimeError("the table must list the embedding before the reward head")
                head = {name: tensor}
                reward_head.finish_hf(head, hf_cfg, dtype)
                tensor = head[name]
            writer.add(name, tensor)
    tied_rows = [e for e in family.weights if e.tied_to]
    if kind != reward_head.REWARD and tied_rows and not any(e in plan.values() for e in tied_rows):
        hf_cfg["tie_word_embeddings"] = True  # NeMo shares the output layer with the embedding
    return dtype


def nemo_to_hf(nemo_path: Path, out_dir: Path, overwrite: bool = False,
               max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Exports a .nemo (tar or extracted directory) to an HF directory (safetensors + config + tokenizer).

    The weights may be a distributed checkpoint (`model_weights/`) or the legacy per-rank
    `model_weights.ckpt` files. They are streamed: one Megatron tensor is read at a time and its
    HF tensors go into safetensors shards flushed as they fill (HF's sharded layout with an
    index, or one `model.safetensors` when everything fits into one shard), so memory holds
    about one shard plus one stacked tensor, never the whole model.

    Args:
        nemo_path: The .nemo file or extracted directory.
        out_dir: Directory to create.
        overwrite: Replace a non-empty `out_dir`.
        max_shard_size: Bytes per safetensors shard (default 2 GB, as save_pretrained's "2GB").

    Returns:
        The absolute output directory.
    """
    with nemo_archive.open_nemo(nemo_path) as folder:
        where = str(nemo_path)
        cfg = model_config.load_model_config(folder / nemo_archive.CONFIG_NAME)
        assets = folder / nemo_archive.HF_ASSETS
        base = json.loads((assets / "config.json").read_text()) if (assets / "config.json").is_file() else {}
        kind = reward_head.kind_of_nemo(cfg)
        family = get_family(reward_head.split_architecture(base["architectures"][0])[0], where) \
            if base.get("architectures") else family_for_nemo(cfg, where)
        vocab, padded = model_config.vocab_sizes(cfg, None if cfg.get("override_vocab_size") else
                                                 _tokenizer_len(assets))
        geo = model_config.geometry(cfg, vocab, padded)
        table, skip = reward_head.export_rows(family.weights, kind, PREFIX)
        source = _open_weights(folder, cfg, table, geo)
        plan = _export_plan(family, table, source.tensor_shapes(), where, skip)
        if kind == reward_head.REWARD:  # before writing anything: fail fast
            reward_head.check_exportable_bias(source.read_tensor(reward_head.BIAS_KEY), where)
        hf_cfg = {"model_type": family.model_type, **base,
                  "architectures": [reward_head.hf_architecture(family.name, kind)]}
        hf_cfg.update(model_config.hf_config_updates(family, cfg))
        hf_cfg["vocab_size"] = vocab
        with atomic_dir(Path(out_dir), overwrite) as tmp:
            writer = _ShardWriter(tmp, max_shard_size)
            dtype = _write_hf_weights(writer, source, plan, family, kind, geo, int(cfg["num_layers"]), hf_cfg,
                                      where)
            writer.finish()
            hf_cfg["dtype"] = hf_cfg["torch_dtype"] = str(dtype).replace("torch.", "")
            if assets.is_dir():
                for item in assets.iterdir():
                    if item.is_file() and item.name != "config.json":
                        shutil.copyfile(item, tmp / item.name)
            (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n", encoding="utf-8")
            make_portable(tmp)
    return Path(out_dir).absolute()
