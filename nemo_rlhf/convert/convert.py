"""HF causal LM or reward model <-> .nemo (NeMo 2.1 megatron_gpt / NeMo-Aligner 0.7.0 reward model).

Both directions are driven by the family's tables (plus `reward_head`'s row for a reward model).

HF -> NeMo reads the safetensors memory-mapped and produces each Megatron tensor (all layers
of one weight, stacked) only when the checkpoint writer asks for it. NeMo -> HF reads one
stacked tensor at a time through the same table backwards and drops padded vocabulary rows.
Both check completeness: an HF tensor the table does not know, a Megatron tensor the table
does not know, or a source tensor left unused is an error, never a silent skip.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nemo_rlhf.convert import dist_ckpt, model_config, nemo_archive, reward_head
from nemo_rlhf.convert.families import FamilySpec, WeightEntry, family_for_nemo, get_family
from nemo_rlhf.convert.param_mapping import Geometry
from nemo_rlhf.errors import UserError
from nemo_rlhf.models.materialize import atomic_dir, check_hf_dir, make_portable

PREFIX = "model."
# Files of an HF directory that travel in the archive's hf_assets/ (tokenizer and configs).
ASSET_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
               "chat_template.jinja")
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class _HfWeights:
    """Name -> tensor view over an HF directory's safetensors files (memory-mapped), tracking use."""

    def __init__(self, hf_dir: Path):
        index = hf_dir / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
            else ["model.safetensors"]
        self._handles = [safe_open(str(hf_dir / f), "pt") for f in files]
        self._where = {k: h for h in self._handles for k in h.keys()}
        self.used: set[str] = set()

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._where[key].get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        name = self._where[key].get_slice(key).get_dtype()
        if name not in _DTYPES:
            raise UserError(f"tensor {key} has dtype {name}", fix="convert floating-point checkpoints only")
        return _DTYPES[name]

    def get(self, key: str) -> torch.Tensor:
        self.used.add(key)
        return self._where[key].get_tensor(key)


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
        shape = entry.kind.megatron_shape([weights.shape(n) for n in per_layer[0]], geo)
        full = (num_layers, *shape) if entry.stacked else shape

        def produce(entry=entry, per_layer=per_layer):
            parts = [entry.kind.to_megatron([weights.get(n) for n in names], geo) for names in per_layer]
            return torch.stack(parts) if entry.stacked else parts[0]

        plan[PREFIX + entry.megatron] = dist_ckpt.LazyTensor(full, dtype, produce)
    if missing:
        raise UserError(f"{len(missing)} tensors the {family.name} table needs are missing: {missing[:8]}",
                        where=where, fix="the checkpoint is incomplete or config.json disagrees with it")
    return plan


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
    with nemo_archive.atomic_output(out_path, overwrite) as staging:
        (staging / nemo_archive.CONFIG_NAME).write_text(model_config.dump_model_config(cfg), encoding="utf-8")
        dist_ckpt.write_dist_checkpoint(staging / nemo_archive.WEIGHTS_DIR, plan,
                                        _extra_state_keys(family, num_layers))
        _copy_assets(hf_dir, staging / nemo_archive.HF_ASSETS)
        dropped = {k for k, m in matched.items() if m.entry.megatron is None}
        unused = set(weights.keys()) - weights.used - dropped
        if unused:  # the table maps them, yet no tensor was built from them: a table bug
            raise RuntimeError(f"source tensors left unused: {sorted(unused)[:8]}")
    return Path(out_path).absolute()


def _copy_assets(hf_dir: Path, dest: Path) -> None:
    dest.mkdir()
    for name in ASSET_FILES:
        if (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, dest / name)


# --------------------------------------------------------------------------- NeMo -> HF


def _is_ignorable(key: str) -> bool:
    """Checkpoint tensors that carry no weights of the HF model (recomputed or runtime state)."""
    return key.endswith("._extra_state") or "_extra_state/" in key or key.endswith("rotary_pos_emb.inv_freq")


def _hf_tensors_from(family: FamilySpec, table: tuple[WeightEntry, ...], weights_dir: Path, geo: Geometry,
                     num_layers: int, where: str, skip: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Reads each Megatron tensor once and splits it into HF tensors through the table backwards.

    `skip` holds checkpoint keys that are known but have no HF counterpart (a reward model's
    output layer and rm_head bias); they are neither exported nor reported as unknown.
    """
    shapes = dist_ckpt.tensor_shapes(weights_dir)
    rows = {PREFIX + e.megatron: e for e in table if e.megatron is not None and PREFIX + e.megatron not in skip}
    unknown = [k for k in shapes if k not in rows and k not in skip and not _is_ignorable(k)]
    if unknown:
        raise UserError(f"{len(unknown)} checkpoint tensors are not in the {family.name} table: {unknown[:8]}",
                        where=where, fix="this .nemo holds parts the exporter does not know (e.g. a reward head)")
    missing = [k for k, e in rows.items() if k not in shapes and not e.tied_to]
    if missing:
        raise UserError(f"checkpoint lacks {missing}", where=where, fix="the .nemo is incomplete: convert it again")
    out: dict[str, torch.Tensor] = {}
    for key, entry in rows.items():
        if key not in shapes:
            continue  # an output layer NeMo shares with the embedding: the HF model is tied
        tensor = dist_ckpt.read_tensor(weights_dir, key)
        if entry.stacked and tensor.shape[0] != num_layers:
            raise UserError(f"{key} stacks {tensor.shape[0]} layers, the config says {num_layers}", where=where)
        for layer in range(num_layers) if entry.stacked else [None]:
            parts = entry.kind.to_hf(tensor[layer] if layer is not None else tensor, geo)
            for i, part in enumerate(parts):
                out[entry.hf_name(i, layer)] = part.clone()  # own storage: safetensors refuses shared views
    return out


def _tie_or_untie(family: FamilySpec, tensors: dict[str, torch.Tensor], hf_cfg: dict) -> None:
    """Keeps the HF model tied only while the output layer still equals the embedding.

    NeMo trains the output layer separately from the embedding; once they differ the exported
    model must carry its own lm_head (tie_word_embeddings false), or HF would silently reuse
    the embedding.
    """
    for entry in family.weights:
        if not entry.tied_to:
            continue
        own, shared = entry.hf[0], entry.tied_to
        if own not in tensors:
            hf_cfg["tie_word_embeddings"] = True
        elif hf_cfg.get("tie_word_embeddings") and torch.equal(tensors[own], tensors[shared]):
            del tensors[own]
        else:
            hf_cfg["tie_word_embeddings"] = False


def _tokenizer_len(assets: Path) -> int | None:
    if not (assets / "tokenizer.json").is_file() and not (assets / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(assets)))


def nemo_to_hf(nemo_path: Path, out_dir: Path, overwrite: bool = False) -> Path:
    """Exports a .nemo (tar or extracted directory) to an HF directory (safetensors + config + tokenizer).

    Args:
        nemo_path: The .nemo file or extracted directory.
        out_dir: Directory to create.
        overwrite: Replace a non-empty `out_dir`.

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
        weights_dir = folder / nemo_archive.WEIGHTS_DIR
        dist_ckpt.check_dist_checkpoint(weights_dir)
        if kind == reward_head.REWARD:  # before reading the weights: fail fast, write nothing
            reward_head.check_exportable_bias(dist_ckpt.read_tensor(weights_dir, reward_head.BIAS_KEY), where)
        table, skip = reward_head.export_rows(family.weights, kind, PREFIX)
        tensors = _hf_tensors_from(family, table, weights_dir, geo, int(cfg["num_layers"]), where, skip)
        hf_cfg = {"model_type": family.model_type, **base,
                  "architectures": [reward_head.hf_architecture(family.name, kind)]}
        hf_cfg.update(model_config.hf_config_updates(family, cfg))
        hf_cfg["vocab_size"] = vocab
        dtype = tensors[family.weights[0].hf[0]].dtype  # the embedding's: the model's own dtype
        hf_cfg["dtype"] = hf_cfg["torch_dtype"] = str(dtype).replace("torch.", "")
        if kind == reward_head.REWARD:
            reward_head.finish_hf(tensors, hf_cfg, dtype)
        else:
            _tie_or_untie(family, tensors, hf_cfg)
        with atomic_dir(Path(out_dir), overwrite) as tmp:
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            if assets.is_dir():
                for item in assets.iterdir():
                    if item.is_file() and item.name != "config.json":
                        shutil.copyfile(item, tmp / item.name)
            (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n", encoding="utf-8")
            make_portable(tmp)
    return Path(out_dir).absolute()
