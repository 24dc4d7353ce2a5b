"""Llama HF <-> .nemo conversion and its certificate (megatron-core on CPU), on a tiny random model.

The model uses init std 0.1 and random norm weights: with HF's default 0.02 init a wrong
mapping moves logits by only ~1e-2 and could hide under a loose bound (shared/FACTS.md).
"""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from nemo_rlhf.convert import dist_ckpt, nemo_archive
from nemo_rlhf.convert.convert import hf_to_nemo, nemo_to_hf
from nemo_rlhf.convert.families import get_family
from nemo_rlhf.convert.model_config import REFERENCE_DIR, build_model_config, hf_config_updates
from nemo_rlhf.convert.param_mapping import GATED_MLP, QKV, VOCAB, Geometry
from nemo_rlhf.errors import UserError
from nemo_rlhf.models.materialize import build_random_model
from nemo_rlhf.spec.schema import RandomModelConfig
from nemo_rlhf.verify.certificate import verify_conversion
from tests.helpers import randomize_weights

REPO = Path(__file__).resolve().parents[1]
GPT2_TOKENIZER = REPO.parent / "shared" / "data" / "tokenizers" / "gpt2" / "tokenizer.json"
TINY = dict(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=128, init_std=0.1)
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


def _random_llama(out: Path, tied: bool = True, seed: int = 0) -> Path:
    """Tiny Llama with std-0.1 weights and norm weights drawn around 1 (not all ones)."""
    path = build_random_model(RandomModelConfig(**TINY, tie_word_embeddings=tied), GPT2_TOKENIZER, "chatml",
                              out, seed=seed)
    randomize_weights(path, seed, {"norm.weight": 1.0})
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return _random_llama(tmp_path_factory.mktemp("hf") / "tiny")


@pytest.fixture(scope="module")
def nemo_file(hf_dir, tmp_path_factory) -> Path:
    return hf_to_nemo(hf_dir, tmp_path_factory.mktemp("nemo") / "tiny.nemo")


# --------------------------------------------------------------------------- split/merge math


GEO = Geometry(num_heads=8, num_query_groups=4, head_dim=3, vocab_size=10, padded_vocab_size=12)


def test_qkv_is_per_group_interleaved_and_invertible():
    q, k, v = torch.randn(24, 5), torch.randn(12, 5), torch.randn(12, 5)
    fused = QKV.to_megatron([q, k, v], GEO)
    # group 1: its two q heads (rows 6..12 of q), then k head 1, then v head 1
    group1 = fused[1 * 12:2 * 12]
    assert torch.equal(group1, torch.cat([q[6:12], k[3:6], v[3:6]]))
    assert all(torch.equal(a, b) for a, b in zip(QKV.to_hf(fused, GEO), [q, k, v]))
    assert torch.equal(QKV.to_hf(QKV.to_megatron([q[:, 0], k[:, 0], v[:, 0]], GEO), GEO)[0], q[:, 0])  # biases


def test_tp_shards_follow_megatron_rules():
    q, k, v = torch.randn(24, 5), torch.randn(12, 5), torch.randn(12, 5)
    fused = QKV.to_megatron([q, k, v], GEO)
    half = Geometry(num_heads=4, num_query_groups=2, head_dim=3, vocab_size=10, padded_vocab_size=12)
    # rank 1 of TP=2 holds query groups 2 and 3 whole: the fused layout of their own q/k/v
    assert torch.equal(QKV.shard(fused, 1, 2, GEO), QKV.to_megatron([q[12:], k[6:], v[6:]], half))
    gate, up = torch.randn(8, 5), torch.randn(8, 5)
    fc1 = GATED_MLP.to_megatron([gate, up], GEO)
    assert torch.equal(GATED_MLP.shard(fc1, 1, 2, GEO), torch.cat([gate[4:], up[4:]]))
    emb = torch.randn(10, 5)
    padded = VOCAB.to_megatron([emb], GEO)
    assert padded.shape == (12, 5) and torch.equal(padded[10:], torch.zeros(2, 5))
    assert torch.equal(VOCAB.to_hf(padded, GEO)[0], emb)
    with pytest.raises(UserError, match="Cannot evenly split query groups size 4 across 3 TP ranks"):
        QKV.shard(fused, 0, 3, GEO)
    with pytest.raises(UserError, match="Cannot evenly split vocabulary"):
        VOCAB.shard(padded, 0, 5, GEO)


# --------------------------------------------------------------------------- config and files


def test_model_config_is_complete_and_round_trips(hf_dir):
    hf_cfg = json.loads((hf_dir / "config.json").read_text())
    family = get_family("LlamaForCausalLM")
    cfg = build_model_config(family, hf_cfg, layer_spec="te", dtype=torch.float32, tokenizer_type=str(hf_dir))
    reference = yaml.safe_load((REFERENCE_DIR / "megatron_llama_config.yaml").read_text())["model"]
    assert set(reference) <= set(cfg)
    assert cfg["mcore_gpt"] is True and cfg["transformer_engine"] is True
    assert cfg["share_embeddings_and_output_weights"] is False and cfg["scale_positional_embedding"] is False
    assert (cfg["num_query_groups"], cfg["kv_channels"], cfg["override_vocab_size"]) == (2, 16, hf_cfg["vocab_size"])
    assert cfg["data"]["seq_length"] == cfg["encoder_seq_length"] == hf_cfg["max_position_embeddings"]
    assert cfg["tokenizer"]["library"] == "huggingface" and cfg["tokenizer"]["model"] is None
    back = hf_config_updates(family, cfg)
    for field in family.config_fields:
        assert field.get(back) == field.get(hf_cfg), field.hf
    local = build_model_config(family, hf_cfg, layer_spec="local", dtype=torch.float32, tokenizer_type="x")
    assert local["transformer_engine"] is False


def test_nemo_tar_layout(nemo_file):
    with tarfile.open(nemo_file, "r:") as tar:  # uncompressed, as NeMo writes it
        members = tar.getmembers()
    names = {m.name for m in members}
    assert all(m.isreg() or m.isdir() for m in members) and all(n.startswith(".") for n in names)
    assert {"./model_config.yaml", "./model_weights/metadata.json", "./model_weights/common.pt",
            "./model_weights/.metadata", "./hf_assets/tokenizer.json"} <= names
    with nemo_archive.open_nemo(nemo_file) as folder:
        weights = folder / "model_weights"
        assert json.loads((weights / "metadata.json").read_text()) == dist_ckpt.METADATA_JSON
        assert torch.load(weights / "common.pt", weights_only=True) == {}
        shapes = dist_ckpt.tensor_shapes(weights)
        objects = dist_ckpt.object_keys(weights)
    assert shapes["model.decoder.layers.self_attention.linear_qkv.weight"] == (4, (2 + 2) * 2 * 16, 64)
    assert shapes["model.decoder.layers.mlp.linear_fc1.weight"] == (4, 256, 64)
    assert shapes["model.output_layer.weight"] == shapes["model.embedding.word_embeddings.weight"]
    assert "model.decoder.layers.mlp.linear_fc2._extra_state/shard_3_4" in objects
    assert "model.decoder.final_layernorm._extra_state/shard_0_1" in objects


def test_streamed_tar_member_over_8_gib_keeps_its_size(tmp_path):
    """The data file is written into the tar in place and its header completed afterwards; past
    ustar's 8 GiB field the size lives in the pax record (a sparse file: nothing like 9 GiB is written)."""
    path, size = tmp_path / "big.nemo", (9 << 30) + 8
    with nemo_archive._TarBuilder(path) as tar:
        with tar.stream("model_weights/__0_0.distcp") as f:
            f.write(b"head")
            f.seek(size - 8, io.SEEK_CUR)
            f.write(b"tail")
        (tmp_path / "staging" / "model_weights").mkdir(parents=True)
        tar.add_tree(tmp_path / "staging")
    with tarfile.open(path, "r:") as t:
        members = {m.name: m for m in t}
        big = members["./model_weights/__0_0.distcp"]
        assert big.isreg() and big.size == size and set(members) == {".", "./model_weights", big.name}
        data = t.extractfile(big)
        assert data.read(4) == b"head"
        data.seek(size - 4)
        assert data.read() == b"tail"


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_is_bit_exact(tied, hf_dir, tmp_path):
    source = hf_dir if tied else _random_llama(tmp_path / "untied", tied=False, seed=3)
    nemo_dir = hf_to_nemo(source, tmp_path / "extracted")  # directory form this time
    back = nemo_to_hf(nemo_dir, tmp_path / "back")
    before, after = load_file(source / "model.safetensors"), load_file(back / "model.safetensors")
    assert sorted(before) == sorted(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    cfg_before, cfg_after = (json.loads((d / "config.json").read_text()) for d in (source, back))
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "rms_norm_eps", "rope_theta", "tie_word_embeddings",
                "max_position_embeddings", "bos_token_id", "eos_token_id", "architectures"):
        assert cfg_after.get(key) == cfg_before.get(key), key
    assert (back / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()


def _copy(src: Path, dest: Path) -> Path:
    dest.mkdir()
    for item in src.iterdir():
        (dest / item.name).write_bytes(item.read_bytes())
    return dest


def test_unsupported_architecture_and_settings_are_user_errors(hf_dir, tmp_path):
    copy = _copy(hf_dir, tmp_path / "other")
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UserError, match="'GPT2LMHeadModel' is not supported"):
        hf_to_nemo(copy, tmp_path / "a.nemo")
    (copy / "config.json").write_text(json.dumps({**cfg, "attention_bias": True, "hidden_act": "gelu"}))
    with pytest.raises(UserError, match="hidden_act = 'gelu'.*attention_bias = True"):
        hf_to_nemo(copy, tmp_path / "b.nemo")
    assert not any(tmp_path.glob("*.nemo"))


@pytest.mark.parametrize("change,message", [
    ({"vocab_size": 50300}, "embedding has 50304 rows but the config says vocab_size=50300"),
    ({"num_key_value_heads": 4}, r"q/k/v projections have \(64, 32, 32\) rows, expected \(64, 64, 64\)"),
    ({"num_hidden_layers": 3}, "tensors beyond num_hidden_layers=3"),
    ({"num_hidden_layers": 5},
     r"9 tensors the LlamaForCausalLM table needs are missing: \[.model.layers.4.input_layernorm.weight"),
])
def test_config_that_disagrees_with_the_weights_is_an_error(change, message, hf_dir, tmp_path):
    copy = _copy(hf_dir, tmp_path / "cfg")
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(UserError, match=message) as err:
        hf_to_nemo(copy, tmp_path / "out.nemo")
    assert err.value.fix and not any(p.name.startswith((".out.nemo", "out.nemo")) for p in tmp_path.iterdir())


def test_truncated_safetensors_is_a_user_error(hf_dir, tmp_path):
    copy = _copy(hf_dir, tmp_path / "cut")
    data = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(UserError, match="truncated or corrupt") as err:
        hf_to_nemo(copy, tmp_path / "out")
    assert "model.safetensors" in str(err.value) and not (tmp_path / "out").exists()


def test_layer_shapes_that_disagree_are_an_error(hf_dir, tmp_path):
    copy = _copy(hf_dir, tmp_path / "ragged")
    weights = load_file(copy / "model.safetensors")
    weights["model.layers.2.mlp.up_proj.weight"] = torch.zeros(96, 64)
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"layers.2.mlp.up_proj.weight has shape \(96, 64\), layer 0's has \(128, 64\)"):
        hf_to_nemo(copy, tmp_path / "out.nemo")
    assert not any(tmp_path.glob("*.nemo*")) and not any(tmp_path.glob(".out.nemo*"))


def test_unmapped_tensor_is_an_error(hf_dir, tmp_path):
    copy = _copy(hf_dir, tmp_path / "extra")
    weights = load_file(copy / "model.safetensors")
    weights["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="q_norm.weight"):
        hf_to_nemo(copy, tmp_path / "out.nemo")
    assert not (tmp_path / "out.nemo").exists()


# --------------------------------------------------------------------------- bad archives


def test_truncated_nemo_is_a_user_error(nemo_file, tmp_path):
    cut = tmp_path / "cut.nemo"
    data = nemo_file.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        nemo_to_hf(cut, tmp_path / "out")
    assert not (tmp_path / "out").exists()


class _Evil:
    """Unpickling this runs code: the reader must refuse it unread."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def test_a_checkpoint_metadata_that_runs_code_is_refused(nemo_file, tmp_path):
    """`.metadata` is a pickle: it goes through an allow-list of torch.distributed.checkpoint's own classes."""
    folder = tmp_path / "evil"
    folder.mkdir()
    nemo_archive.extract_nemo(nemo_file, folder)
    marker = tmp_path / "pwned.txt"
    (folder / "model_weights" / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(UserError, match="builtins.exec is not allowed") as err:
        nemo_to_hf(folder, tmp_path / "out")
    assert ".metadata" in str(err.value) and not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("attack", ["dotdot", "absolute", "symlink", "hardlink", "chardev", "fifo"])
def test_unsafe_members_are_refused(attack, tmp_path):
    evil = tmp_path / "evil.nemo"
    special = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "chardev": tarfile.CHRTYPE,
               "fifo": tarfile.FIFOTYPE}
    with tarfile.open(evil, "w:") as tar:
        info = tarfile.TarInfo({"dotdot": "./../escaped.txt", "absolute": "/tmp/escaped.txt"}.get(
            attack, "./model_config.yaml"))
        if attack in special:
            info.type, info.linkname = special[attack], "/etc/passwd"
            tar.addfile(info)
        else:
            info.size = 3
            tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(UserError, match="outside the archive|link or special file"):
        nemo_to_hf(evil, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()


# --------------------------------------------------------------------------- the certificate


@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_certificate_passes(tp, pp, hf_dir, nemo_file):
    cert = verify_conversion(hf_dir, nemo_file, tp=tp, pp=pp)
    print(f"TP={tp} PP={pp}: max |diff| {cert.max_abs_logit_diff}, KL {cert.mean_kl}")
    assert cert.error is None and cert.passed
    assert cert.max_abs_logit_diff <= 1e-4 and cert.top1_agreement == 1.0 and cert.num_tokens > 50


def _interleave_heads(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of each head reordered from HF's rotate-half layout [x0..x(d/2-1), y0..] to the
    interleaved [x0, y0, x1, y1, ...] (Meta's original checkpoints, `rotary_interleaved: True`)."""
    rows = weight.shape[0]
    return weight.reshape(rows // head_dim, 2, head_dim // 2, -1).transpose(1, 2).reshape(weight.shape)


@pytest.mark.parametrize("wrong", ["plain_cat_qkv", "up_gate_fc1", "interleaved_rotary"])
def test_certificate_catches_a_wrong_mapping(wrong, hf_dir, tmp_path, monkeypatch):
    if wrong == "plain_cat_qkv":
        monkeypatch.setattr(type(QKV), "to_megatron", lambda self, hf, geo: torch.cat(list(hf)))
    elif wrong == "interleaved_rotary":
        # A converter that thinks one side uses interleaved rotary pairs permutes q and k rows per
        # head; q.k at position 0 is unchanged, but rotary then pairs the wrong dimensions.
        original = type(QKV).to_megatron
        head_dim = TINY["hidden_size"] // TINY["num_heads"]
        monkeypatch.setattr(type(QKV), "to_megatron", lambda self, hf, geo: original(
            self, [_interleave_heads(hf[0], head_dim), _interleave_heads(hf[1], head_dim), hf[2]], geo))
    else:
        monkeypatch.setattr(type(GATED_MLP), "to_megatron", lambda self, hf, geo: torch.cat([hf[1], hf[0]]))
    bad = hf_to_nemo(hf_dir, tmp_path / "wrong.nemo")
    monkeypatch.undo()
    if wrong == "plain_cat_qkv":  # through the CLI: a failed certificate exits 1, its JSON says why
        proc = _cli("verify", "conversion", "--hf", str(hf_dir), "--nemo", str(bad), "--json")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        report = json.loads(proc.stdout)
        assert report["passed"] is False and report["max_abs_logit_diff"] > 0.1 and report["top1_agreement"] < 1
        return
    cert = verify_conversion(hf_dir, bad, tp=1, pp=1)
    print(f"{wrong}: max |diff| {cert.max_abs_logit_diff}, agreement {cert.top1_agreement}")
    assert not cert.passed and cert.max_abs_logit_diff > 0.1


def test_small_chunks_load_in_megatron_and_round_trip(hf_dir, tmp_path, monkeypatch):
    """Every piece written in row blocks of at most 16 KiB (the embedding in ~800 chunks, padding
    rows in their own): megatron-core reads them into a TP=2 model (each rank's shard cuts across
    chunks), and export is bit-exact."""
    monkeypatch.setattr(dist_ckpt, "MAX_CHUNK_BYTES", 16 << 10)
    nemo = hf_to_nemo(hf_dir, tmp_path / "chunked")
    monkeypatch.undo()
    from torch.distributed.checkpoint import FileSystemReader

    chunks = FileSystemReader(str(nemo / "model_weights")).read_metadata().state_dict_metadata
    assert len(chunks["model.embedding.word_embeddings.weight"].chunks) > 700
    assert len(chunks["model.decoder.layers.self_attention.linear_qkv.weight"].chunks) == 4 * 2 * 3  # q_g, k_g, v_g
    assert len(chunks["model.decoder.layers.mlp.linear_fc1.weight"].chunks) == 4 * 2 * 2  # gate, up: 2 blocks each
    cert = verify_conversion(hf_dir, nemo, tp=2, pp=1)
    assert cert.error is None and cert.passed and cert.max_abs_logit_diff <= 1e-4, cert.error
    back = nemo_to_hf(nemo, tmp_path / "back")
    before, after = load_file(hf_dir / "model.safetensors"), load_file(back / "model.safetensors")
    assert sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)


def test_certificate_uses_megatrons_strict_loader(hf_dir, tmp_path, monkeypatch):
    """Without the _extra_state objects NeMo's strict load needs, megatron refuses the checkpoint."""
    import nemo_rlhf.convert.convert as convert_module

    monkeypatch.setattr(convert_module, "_extra_state_keys", lambda family, num_layers: [])
    bad = hf_to_nemo(hf_dir, tmp_path / "no_extra_state.nemo")
    cert = verify_conversion(hf_dir, bad, tp=1, pp=1)
    assert not cert.passed and "linear_qkv._extra_state" in cert.error


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nemo_rlhf", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=600)


def test_cli_convert_and_verify_json(hf_dir, tmp_path):
    out = tmp_path / "cli.nemo"
    proc = _cli("convert", "hf-to-nemo", "--hf", str(hf_dir), "--out", str(out),
                "--layer-spec", "local")
    assert proc.returncode == 0, proc.stderr
    proc = _cli("verify", "conversion", "--hf", str(hf_dir), "--nemo", str(out),
                "--tp", "2", "--pp", "2", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["passed"] is True and {"max_abs_logit_diff", "mean_kl", "top1_agreement"} <= set(report)


@pytest.mark.parametrize("flags,message", [(("--tp", "3"), "num_attention_heads=4 is not divisible by TP=3"),
                                           (("--pp", "3"), "num_layers=4 is not divisible by PP=3")])
def test_cli_refuses_impossible_layouts_with_exit_2(flags, message, hf_dir, nemo_file):
    proc = _cli("verify", "conversion", "--hf", str(hf_dir), "--nemo", str(nemo_file),
                *flags)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


# Names megatron-core's local spec uses in its module state_dict for the TE-named checkpoint keys.
_LOCAL_SPEC = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
               "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}


def test_megatron_places_each_shard_where_param_mapping_says(nemo_file, tmp_path):
    """megatron's own loader at TP2 x PP2 puts into every rank exactly `kind.shard` of our global tensor."""
    from safetensors import safe_open

    from nemo_rlhf.convert.model_config import geometry, load_model_config
    from nemo_rlhf.verify.certificate import run_megatron

    family = get_family("LlamaForCausalLM")
    with nemo_archive.open_nemo(nemo_file) as folder:
        cfg = load_model_config(folder / "model_config.yaml")
        vocab = cfg["override_vocab_size"]
        logits, tail = run_megatron(folder, torch.full((1, 4), 5), vocab, tp=2, pp=2, dump_dir=tmp_path)
        assert logits is not None, tail
        weights = folder / "model_weights"
        full = {k: dist_ckpt.read_tensor(weights, k) for k in dist_ckpt.tensor_shapes(weights)}
    geo, layers_per_stage, checked = geometry(cfg, vocab, vocab), cfg["num_layers"] // 2, set()
    for dump in sorted(tmp_path.glob("rank*.safetensors")):
        with safe_open(str(dump), "pt") as f:
            tp_rank, pp_rank = int(f.metadata()["tp_rank"]), int(f.metadata()["pp_rank"])
        local = load_file(dump)
        for entry in (e for e in family.weights if e.megatron):
            for layer in range(layers_per_stage) if entry.stacked else [None]:
                sub = entry.megatron.removeprefix("decoder.layers.")
                name = f"decoder.layers.{layer}.{_LOCAL_SPEC.get(sub, sub)}" if entry.stacked else entry.megatron
                if name not in local:
                    continue  # embedding / output layer / final norm live on one stage only
                glob = full["model." + entry.megatron]
                glob = glob[pp_rank * layers_per_stage + layer] if entry.stacked else glob
                assert torch.equal(local[name], entry.kind.shard(glob, tp_rank, 2, geo)), (dump.name, name)
                checked.add((dump.name, name))
        assert {n for d, n in checked if d == dump.name} == set(local), dump.name  # every parameter checked


def test_export_of_a_trained_checkpoint_unties_and_drops_padding(hf_dir, tmp_path):
    """After NeMo training the output layer differs from the embedding, and a NeMo-sized vocabulary
    (tokenizer length padded to 128, no override_vocab_size) has padding rows: export unties and drops them."""
    from transformers import AutoTokenizer

    folder = hf_to_nemo(hf_dir, tmp_path / "trained")
    weights = folder / "model_weights"
    tensors = {k: dist_ckpt.read_tensor(weights, k) for k in dist_ckpt.tensor_shapes(weights)}
    objects = dist_ckpt.object_keys(weights)
    vocab = len(AutoTokenizer.from_pretrained(str(hf_dir)))
    padded = -(-vocab // 128) * 128
    emb = tensors["model.embedding.word_embeddings.weight"][:vocab]
    pad = torch.zeros(padded - vocab, emb.shape[1])
    tensors["model.embedding.word_embeddings.weight"] = torch.cat([emb, pad])
    tensors["model.output_layer.weight"] = torch.cat([emb + 0.01, pad])
    lazy = {k: dist_ckpt.LazyTensor(tuple(v.shape), v.dtype, lambda v=v: v) for k, v in tensors.items()}
    for item in weights.iterdir():
        item.unlink()
    weights.rmdir()
    dist_ckpt.write_dist_checkpoint(weights, lazy, objects)
    cfg = yaml.safe_load((folder / "model_config.yaml").read_text())
    del cfg["override_vocab_size"]
    (folder / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    back = nemo_to_hf(folder, tmp_path / "back")
    out = load_file(back / "model.safetensors")
    config = json.loads((back / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["vocab_size"] == vocab
    assert torch.equal(out["lm_head.weight"], emb + 0.01) and torch.equal(out["model.embed_tokens.weight"], emb)


def test_nemo_style_converter_scripts_round_trip(hf_dir, tmp_path):
    """converters/ takes NeMo's own flags (--input_name_or_path, --output_path, --precision)."""
    nemo = tmp_path / "scripted.nemo"
    back = tmp_path / "back"
    for script, args in (("convert_hf_to_nemo.py", ["--input_name_or_path", str(hf_dir), "--output_path", str(nemo),
                                                     "--precision", "32"]),
                         ("convert_nemo_to_hf.py", ["--input_name_or_path", str(nemo), "--output_path", str(back)])):
        proc = subprocess.run([sys.executable, str(REPO / "converters" / script), *args], capture_output=True,
                              text=True, cwd=REPO, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
    original, restored = load_file(hf_dir / "model.safetensors"), load_file(back / "model.safetensors")
    assert set(original) == set(restored)
    assert all(torch.equal(original[k], restored[k]) for k in original)


# --------------------------------------------------------------------------- the convert manifest


def test_cli_convert_records_a_passing_certificate(hf_dir, tmp_path):
    """A .nemo tar gets a sidecar <out>.manifest.json (no extra tar member); a directory gets it inside."""
    from nemo_rlhf.lineage.hashing import sha256_file

    tar, folder = tmp_path / "m.nemo", tmp_path / "m_dir"
    for out, manifest in ((tar, tmp_path / "m.nemo.manifest.json"), (folder, folder / "conversion_manifest.json")):
        proc = _cli("convert", "hf-to-nemo", "--hf", str(hf_dir), "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        record = json.loads(manifest.read_text())
        assert record["passed"] is True and (record["tp"], record["pp"]) == (1, 1)
        assert record["certificate"]["max_abs_logit_diff"] <= 1e-4 and record["megatron_core"]
        assert record["source_sha256"]["model.safetensors"] == sha256_file(hf_dir / "model.safetensors")
    assert json.loads((tmp_path / "m.nemo.manifest.json").read_text())["output_sha256"] == {"m.nemo": sha256_file(tar)}
    inside = json.loads((folder / "conversion_manifest.json").read_text())["output_sha256"]
    assert inside["model_config.yaml"] == sha256_file(folder / "model_config.yaml")
    assert "conversion_manifest.json" not in inside
    with tarfile.open(tar, "r:") as t:
        assert not any("manifest" in n for n in t.getnames())


def test_cli_convert_no_verify_writes_no_manifest(hf_dir, tmp_path):
    out = tmp_path / "nv.nemo"
    stale = tmp_path / "nv.nemo.manifest.json"
    stale.write_text('{"passed": true}')  # from an earlier convert: must not vouch for the new output
    proc = _cli("convert", "hf-to-nemo", "--hf", str(hf_dir), "--out", str(out), "--no-verify", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and not stale.exists()
    folder = tmp_path / "nv_dir"
    script = subprocess.run([sys.executable, str(REPO / "converters" / "convert_hf_to_nemo.py"),
                             "--input_name_or_path", str(hf_dir), "--output_path", str(folder), "--no_verify"],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert script.returncode == 0, script.stderr[-2000:]
    assert (folder / "model_config.yaml").is_file() and not (folder / "conversion_manifest.json").exists()


def test_failed_certificate_renames_the_output(hf_dir, tmp_path, monkeypatch):
    """A wrong conversion is not left under the asked-for name: it becomes <out>.failed with passed=false."""
    from nemo_rlhf.verify.certificate import certify_conversion

    monkeypatch.setattr(type(QKV), "to_megatron", lambda self, hf, geo: torch.cat(list(hf)))
    out = hf_to_nemo(hf_dir, tmp_path / "bad.nemo")
    monkeypatch.undo()
    (tmp_path / "bad.nemo.manifest.json").write_text('{"passed": true}')  # stale sidecar
    cert, where, manifest = certify_conversion(hf_dir, out)
    assert not cert.passed
    assert not out.exists() and not (tmp_path / "bad.nemo.manifest.json").exists()
    assert where == tmp_path / "bad.nemo.failed" and where.is_file()
    assert manifest == tmp_path / "bad.nemo.failed.manifest.json"
    assert json.loads(manifest.read_text())["passed"] is False
