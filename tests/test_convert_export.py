"""Streaming NeMo -> HF export: HF's sharded safetensors layout, written shard by shard.

A tiny `max_shard_size` forces many shards, so the embedding is flushed long before the output
layer arrives: tying must still be decided right. The output must load in transformers with
the source's tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nemo_rlhf.convert import dist_ckpt
from nemo_rlhf.convert.convert import INDEX_FILE, SINGLE_FILE, hf_to_nemo, nemo_to_hf
from nemo_rlhf.errors import UserError
from tests.test_convert_llama import _random_llama

SHARD = 100_000  # bytes: the tiny Llama's 12.9 MB embedding gets a shard of its own, layers share a few


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return _random_llama(tmp_path_factory.mktemp("hf") / "tiny")


def _sharded_tensors(out: Path) -> dict[str, torch.Tensor]:
    index = json.loads((out / INDEX_FILE).read_text())
    tensors = {}
    for name in sorted(set(index["weight_map"].values())):
        shard = load_file(out / name)
        assert {k for k, v in index["weight_map"].items() if v == name} == set(shard), name
        tensors.update(shard)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    return tensors


def test_multi_shard_export_loads_in_transformers(hf_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = nemo_to_hf(hf_to_nemo(hf_dir, tmp_path / "tiny"), tmp_path / "back", max_shard_size=SHARD)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    count = len(shards)
    assert count > 3 and shards == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert not (out / SINGLE_FILE).exists() and not list(out.glob(".shard-*"))
    source = load_file(hf_dir / "model.safetensors")
    exported = _sharded_tensors(out)
    assert sorted(exported) == sorted(source) and all(torch.equal(source[k], exported[k]) for k in source)
    for path in out.glob("model-*.safetensors"):  # flushed as they fill: none (bar a lone big tensor) over the limit
        tensors = load_file(path)
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors.values()) <= SHARD
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).state_dict()
    original = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).state_dict()
    assert sorted(loaded) == sorted(original) and all(torch.equal(loaded[k], original[k]) for k in original)


def test_trained_output_layer_is_untied_after_the_embedding_was_flushed(hf_dir, tmp_path):
    folder = hf_to_nemo(hf_dir, tmp_path / "trained")
    weights = folder / "model_weights"
    tensors = {k: dist_ckpt.read_tensor(weights, k) for k in dist_ckpt.tensor_shapes(weights)}
    objects = dist_ckpt.object_keys(weights)
    tensors["model.output_layer.weight"] = tensors["model.output_layer.weight"] + 0.01
    lazy = {k: dist_ckpt.LazyTensor(tuple(v.shape), v.dtype, lambda v=v: v) for k, v in tensors.items()}
    for item in weights.iterdir():
        item.unlink()
    weights.rmdir()
    dist_ckpt.write_dist_checkpoint(weights, lazy, objects)
    out = nemo_to_hf(folder, tmp_path / "back", max_shard_size=SHARD)
    exported = _sharded_tensors(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert torch.equal(exported["lm_head.weight"], exported["model.embed_tokens.weight"] + 0.01)


def test_one_shard_is_a_single_model_safetensors(hf_dir, tmp_path):
    out = nemo_to_hf(hf_to_nemo(hf_dir, tmp_path / "tiny"), tmp_path / "back")
    assert sorted(p.name for p in out.glob("*.safetensors")) == [SINGLE_FILE] and not (out / INDEX_FILE).exists()
    with pytest.raises(UserError, match="max_shard_size is 0"):
        nemo_to_hf(tmp_path / "tiny", tmp_path / "bad", max_shard_size=0)
    assert not (tmp_path / "bad").exists()
