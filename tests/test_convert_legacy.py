"""Legacy .nemo weights (`model_weights.ckpt`, `mp_rank_XX/`, `tp_rank_XX_pp_rank_XXX/`) exported to HF.

The legacy files are written by real megatron-core (tests/legacy_writer.py, one torchrun of 4
gloo CPU processes): its GPTModel at TP1, TP2 and TP2xPP2 loads our distributed checkpoint
with megatron's own `dist_checkpointing.load`, and each rank torch.saves its state dict where
NeMo would. Export must then give back the source HF tensors bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from nemo_rlhf.convert import dist_ckpt, legacy_ckpt
from nemo_rlhf.convert.convert import hf_to_nemo, nemo_to_hf
from nemo_rlhf.convert.families import get_family
from nemo_rlhf.convert.param_mapping import KINDS, REPLICATED, Geometry
from nemo_rlhf.errors import UserError
from tests.helpers import cli
from tests.test_convert_llama import _random_llama

REPO = Path(__file__).resolve().parents[1]
# layout directory written by legacy_writer -> (tp, pp); "te" has TE norm names and BytesIO extra states
LAYOUTS = {"1x1-local": (1, 1), "2x1-te": (2, 1), "2x2-local": (2, 2)}


# --------------------------------------------------------------------------- unshard math


GEO = Geometry(num_heads=8, num_query_groups=4, head_dim=3, vocab_size=10, padded_vocab_size=12)


@pytest.mark.parametrize("kind", list(KINDS.values()), ids=lambda k: k.name)
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_unshard_inverts_shard(kind, tp):
    rows = 12 if kind.name == "vocab" else 48  # qkv: 4 groups x (2 q + k + v) heads x 3
    for tensor in (torch.randn(rows, 8), torch.randn(rows)):  # weights and biases
        if kind.name == "row" and tensor.dim() == 1:
            continue
        parts = [kind.shard(tensor, rank, tp, GEO) for rank in range(tp)]
        assert torch.equal(kind.unshard(parts, GEO), tensor), (kind.name, tp)


def test_unshard_refuses_replicated_copies_that_differ():
    x = torch.randn(4)
    with pytest.raises(UserError, match="TP rank 1 holds a different copy"):
        REPLICATED.unshard([x, x + 1], GEO)


# --------------------------------------------------------------------------- files from megatron-core


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return _random_llama(tmp_path_factory.mktemp("hf") / "tiny")


@pytest.fixture(scope="module")
def nemo_dir(hf_dir, tmp_path_factory) -> Path:
    return hf_to_nemo(hf_dir, tmp_path_factory.mktemp("nemo") / "tiny")


@pytest.fixture(scope="module")
def legacy_root(hf_dir, nemo_dir, tmp_path_factory) -> Path:
    """Every layout's rank files, written by megatron-core in one torchrun."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("legacy")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
           str(REPO / "tests" / "legacy_writer.py"), "--config", str(nemo_dir / "model_config.yaml"),
           "--weights", str(nemo_dir / "model_weights"), "--tokenizer-len",
           str(len(AutoTokenizer.from_pretrained(str(hf_dir)))), "--out", str(out)]
    for layout in LAYOUTS:
        cmd += ["--layout", layout.replace("-", ":")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return out


def _legacy_nemo(nemo_dir: Path, legacy_root: Path, layout: str, dest: Path, tar: bool = False) -> Path:
    """A legacy .nemo as NeMo saves one: its config (with the TP/PP it was saved at), assets, rank files."""
    tp, pp = LAYOUTS[layout]
    folder = dest.with_suffix("") if tar else dest
    shutil.copytree(legacy_root / layout, folder)
    shutil.copytree(nemo_dir / "hf_assets", folder / "hf_assets")
    cfg = yaml.safe_load((nemo_dir / "model_config.yaml").read_text())
    cfg.update(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    (folder / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    if not tar:
        return folder
    with tarfile.open(dest, "w:") as archive:
        for path in sorted(folder.rglob("*")):
            archive.add(path, arcname=f"./{path.relative_to(folder).as_posix()}", recursive=False)
    shutil.rmtree(folder)
    return dest


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_legacy_export_is_bit_exact(layout, hf_dir, nemo_dir, legacy_root, tmp_path):
    nemo = _legacy_nemo(nemo_dir, legacy_root, layout, tmp_path / "legacy.nemo", tar=layout == "2x2-local")
    back = nemo_to_hf(nemo, tmp_path / "back")
    before, after = load_file(hf_dir / "model.safetensors"), load_file(back / "model.safetensors")
    assert sorted(before) == sorted(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    config = json.loads((back / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert config["vocab_size"] == before["model.embed_tokens.weight"].shape[0]


@pytest.mark.parametrize("layout", ["2x1-te", "2x2-local"])
def test_legacy_reader_gives_the_dist_checkpoints_global_tensors(layout, nemo_dir, legacy_root, tmp_path):
    """Same keys, same global shapes and tensors as the distributed checkpoint."""
    table = get_family("LlamaForCausalLM").weights
    kinds = {"model." + e.megatron: e.kind for e in table if e.megatron}
    geo = Geometry(num_heads=4, num_query_groups=2, head_dim=16, vocab_size=0, padded_vocab_size=0)
    folder = _legacy_nemo(nemo_dir, legacy_root, layout, tmp_path / "legacy")
    legacy = legacy_ckpt.LegacyCheckpoint(folder, kinds, geo, *LAYOUTS[layout])
    dist = dist_ckpt.DistCheckpoint(nemo_dir / "model_weights")
    assert set(legacy.tensor_shapes()) == set(dist.tensor_shapes())
    for key, shape in dist.tensor_shapes().items():
        got, want = legacy.read_tensor(key), dist.read_tensor(key)
        assert legacy.tensor_shapes()[key] == shape and torch.equal(got, want), key


def test_converter_script_reads_a_legacy_tar(hf_dir, nemo_dir, legacy_root, tmp_path):
    nemo = _legacy_nemo(nemo_dir, legacy_root, "2x1-te", tmp_path / "legacy.nemo", tar=True)
    proc = subprocess.run([sys.executable, str(REPO / "converters" / "convert_nemo_to_hf.py"),
                           "--input_name_or_path", str(nemo), "--output_path", str(tmp_path / "back")],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, after = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)


# --------------------------------------------------------------------------- bad input


class _Evil:
    """Unpickling this runs code: the reader must refuse it unread."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def test_a_pickle_that_runs_code_is_refused(nemo_dir, legacy_root, tmp_path):
    folder = _legacy_nemo(nemo_dir, legacy_root, "1x1-local", tmp_path / "legacy")
    marker = tmp_path / "pwned.txt"
    state = torch.load(folder / "model_weights.ckpt", weights_only=True)
    state["model.decoder.final_layernorm._extra_state"] = _Evil(marker)
    torch.save(state, folder / "model_weights.ckpt")
    with pytest.raises(UserError, match="refusing to unpickle.*exec") as err:
        nemo_to_hf(folder, tmp_path / "out")
    assert "model_weights.ckpt" in str(err.value) and err.value.fix
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_missing_rank_file_is_named(nemo_dir, legacy_root, tmp_path):
    folder = _legacy_nemo(nemo_dir, legacy_root, "2x2-local", tmp_path / "legacy")
    (folder / "tp_rank_01_pp_rank_001" / "model_weights.ckpt").unlink()
    with pytest.raises(UserError, match=r"TP=2 x PP=2 lacks tp_rank_01_pp_rank_001/model_weights\.ckpt"):
        nemo_to_hf(folder, tmp_path / "out")
    shutil.rmtree(folder / "tp_rank_01_pp_rank_001")  # the whole directory gone: still named
    with pytest.raises(UserError, match=r"lacks tp_rank_01_pp_rank_001/model_weights\.ckpt"):
        nemo_to_hf(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pre_mcore_names_are_refused_with_the_fix(nemo_dir, legacy_root, tmp_path):
    folder = _legacy_nemo(nemo_dir, legacy_root, "1x1-local", tmp_path / "legacy")
    torch.save({"model.language_model.encoder.layers.0.self_attention.query_key_value.weight": torch.zeros(4, 4)},
               folder / "model_weights.ckpt")
    with pytest.raises(UserError, match="pre-megatron-core") as err:
        nemo_to_hf(folder, tmp_path / "out")
    assert "convert_gpt_nemo_to_mcore.py" in err.value.fix


def test_cli_refuses_to_certify_legacy_weights_and_exports_them_in_shards(hf_dir, nemo_dir, legacy_root, tmp_path):
    """The certificate reads only what megatron's dist_checkpointing reads; export still works, sharded."""
    folder = _legacy_nemo(nemo_dir, legacy_root, "2x1-te", tmp_path / "legacy")
    proc = cli("verify", "conversion", "--hf", str(hf_dir), "--nemo", str(folder))
    assert proc.returncode == 2 and "legacy weights" in proc.stderr and "hf-to-nemo" in proc.stderr
    cli("convert", "nemo-to-hf", "--nemo", str(folder), "--out", str(tmp_path / "back"), "--max-shard-size", "100kB",
        check=True)
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    proc = cli("convert", "nemo-to-hf", "--nemo", str(folder), "--out", str(tmp_path / "x"), "--max-shard-size", "lots")
    assert proc.returncode == 2 and "not a size" in proc.stderr
