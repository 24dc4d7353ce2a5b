"""Qwen2 HF <-> .nemo conversion and its certificate (megatron-core on CPU), on a tiny random model.

Qwen2.5-0.5B's shape at toy size: GQA, tied embeddings, a non-default rope theta, and biases on
q/k/v only. Weights use init std 0.1, norm weights and q/k/v biases are random (HF initialises
biases to zero, which would hide a wrong bias layout).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from nemo_rlhf.convert import dist_ckpt, nemo_archive
from nemo_rlhf.convert.convert import hf_to_nemo, nemo_to_hf
from nemo_rlhf.convert.families import family_for_nemo, get_family
from nemo_rlhf.convert.model_config import REFERENCE_DIR, build_model_config, hf_config_updates
from nemo_rlhf.convert.param_mapping import QKV
from nemo_rlhf.errors import UserError
from nemo_rlhf.verify.certificate import verify_conversion
from tests.helpers import randomize_weights

REPO = Path(__file__).resolve().parents[1]
GPT2_TOKENIZER = REPO.parent / "shared" / "data" / "tokenizers" / "gpt2" / "tokenizer.json"
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
ROPE_THETA = 1_000_000.0  # Qwen2.5's, not HF's default 10000: a dropped rotary_base would show


def _random_qwen2(out: Path, seed: int = 0) -> Path:
    """Tiny tied Qwen2 with std-0.1 weights, norm weights around 1 and random q/k/v biases."""
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tok = PreTrainedTokenizerFast(tokenizer_file=str(GPT2_TOKENIZER), eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    config = Qwen2Config(
        vocab_size=-(-len(tok) // 64) * 64, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1,
        rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, dtype="float32")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    randomize_weights(out, seed, {"norm.weight": 1.0, "_proj.bias": 0.0})
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return _random_qwen2(tmp_path_factory.mktemp("hf") / "tiny-qwen2")


@pytest.fixture(scope="module")
def nemo_file(hf_dir, tmp_path_factory) -> Path:
    return hf_to_nemo(hf_dir, tmp_path_factory.mktemp("nemo") / "tiny-qwen2.nemo")


def test_source_model_has_the_qwen2_features(hf_dir):
    weights = load_file(hf_dir / "model.safetensors")
    assert "lm_head.weight" not in weights  # tied
    assert {"q_proj", "k_proj", "v_proj"} == {k.split(".")[-2] for k in weights if k.endswith(".bias")}
    assert all(weights[k].abs().min() > 0 for k in weights if k.endswith(".bias"))


def test_model_config_starts_from_qwen2_reference_and_round_trips(hf_dir):
    hf_cfg = json.loads((hf_dir / "config.json").read_text())
    family = get_family("Qwen2ForCausalLM")
    cfg = build_model_config(family, hf_cfg, layer_spec="te", dtype=torch.float32, tokenizer_type=str(hf_dir))
    reference = yaml.safe_load((REFERENCE_DIR / "megatron_qwen2_config.yaml").read_text())["model"]
    assert set(reference) <= set(cfg)
    assert cfg["qkv_bias"] is True and cfg["bias"] is False and cfg["rotary_base"] == ROPE_THETA
    assert (cfg["num_query_groups"], cfg["kv_channels"], cfg["override_vocab_size"]) == (2, 16, hf_cfg["vocab_size"])
    assert cfg["share_embeddings_and_output_weights"] is False
    assert family_for_nemo(cfg, "test") is family and family_for_nemo({**cfg, "qkv_bias": False}, "t") is not family
    back = hf_config_updates(family, cfg)
    for field in family.config_fields:
        assert field.get(back) == field.get(hf_cfg), field.hf


def test_qkv_bias_is_interleaved_per_query_group(nemo_file, hf_dir):
    """Bias rows follow the weight's layout: per group g, its q heads, then k_g, then v_g."""
    hf = load_file(hf_dir / "model.safetensors")
    with nemo_archive.open_nemo(nemo_file) as folder:
        bias = dist_ckpt.read_tensor(folder / "model_weights", "model.decoder.layers.self_attention.linear_qkv.bias")
    assert bias.shape == (4, (4 + 2 * 2) * 16)
    q, k, v = (hf[f"model.layers.2.self_attn.{n}_proj.bias"] for n in "qkv")
    group1 = bias[2, 64:128]  # group 1: q heads 2-3, k head 1, v head 1
    assert torch.equal(group1, torch.cat([q[32:64], k[16:32], v[16:32]]))


def test_round_trip_is_bit_exact(hf_dir, tmp_path):
    back = nemo_to_hf(hf_to_nemo(hf_dir, tmp_path / "extracted"), tmp_path / "back")
    before, after = load_file(hf_dir / "model.safetensors"), load_file(back / "model.safetensors")
    assert sorted(before) == sorted(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    cfg_before, cfg_after = (json.loads((d / "config.json").read_text()) for d in (hf_dir, back))
    for key in ("architectures", "model_type", "num_hidden_layers", "hidden_size", "intermediate_size",
                "num_attention_heads", "num_key_value_heads", "vocab_size", "rms_norm_eps", "tie_word_embeddings",
                "max_position_embeddings", "use_sliding_window", "eos_token_id", "pad_token_id"):
        assert cfg_after.get(key) == cfg_before.get(key), key
    assert cfg_after["rope_parameters"]["rope_theta"] == ROPE_THETA


def test_sliding_window_is_refused(hf_dir, tmp_path):
    copy = tmp_path / "sliding"
    copy.mkdir()
    for item in hf_dir.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, "use_sliding_window": True}))
    with pytest.raises(UserError, match="use_sliding_window = True"):
        hf_to_nemo(copy, tmp_path / "out.nemo")
    assert not (tmp_path / "out.nemo").exists()


@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_certificate_passes(tp, pp, hf_dir, nemo_file):
    cert = verify_conversion(hf_dir, nemo_file, tp=tp, pp=pp)
    print(f"Qwen2 TP={tp} PP={pp}: max |diff| {cert.max_abs_logit_diff}, KL {cert.mean_kl}")
    assert cert.error is None and cert.passed
    assert cert.max_abs_logit_diff <= 1e-4 and cert.top1_agreement == 1.0 and cert.num_tokens > 50


def test_certificate_catches_a_wrong_bias_layout(hf_dir, tmp_path, monkeypatch):
    """Weights right, biases as a plain cat(q, k, v): megatron must not agree with HF."""
    right = type(QKV).to_megatron

    def plain_cat_for_biases(self, hf, geo):
        return torch.cat(list(hf)) if hf[0].dim() == 1 else right(self, hf, geo)

    monkeypatch.setattr(type(QKV), "to_megatron", plain_cat_for_biases)
    bad = hf_to_nemo(hf_dir, tmp_path / "wrong-bias.nemo")
    monkeypatch.undo()
    cert = verify_conversion(hf_dir, bad, tp=1, pp=1)
    print(f"wrong bias layout: max |diff| {cert.max_abs_logit_diff}, agreement {cert.top1_agreement}")
    assert not cert.passed and cert.max_abs_logit_diff > 0.1
