"""Reward models: HF *ForSequenceClassification <-> NeMo-Aligner 0.7.0 reward-model .nemo, and the reward certificate.

The model is the pipeline's RM stage format at toy size: AutoModelForSequenceClassification
(num_labels=1) loaded from a tiny Llama policy, as nemo_rlhf.stages.rm does before TRL's
RewardTrainer, so it saves `model.*` and `score.weight` and no lm_head. Weights use init std 0.1
and random norm weights, so a wrong mapping moves rewards well beyond the 1e-4 tolerance.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from nemo_rlhf.convert import dist_ckpt, nemo_archive, reward_head
from nemo_rlhf.convert.convert import hf_to_nemo, nemo_to_hf
from nemo_rlhf.convert.families import WeightEntry
from nemo_rlhf.convert.param_mapping import Row
from nemo_rlhf.errors import UserError
from nemo_rlhf.models.materialize import build_random_model
from nemo_rlhf.spec.schema import RandomModelConfig
from nemo_rlhf.verify.certificate import reward_tokens, verify_conversion
from tests.helpers import randomize_weights

REPO = Path(__file__).resolve().parents[1]
GPT2_TOKENIZER = REPO.parent / "shared" / "data" / "tokenizers" / "gpt2" / "tokenizer.json"
TRAINING_RM = REPO.parent / "shared" / "reference" / "nemo-aligner-v0.7.0" / "conf" / "training_rm.yaml"
TINY = dict(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=128, init_std=0.1)
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


def _random_reward_model(out: Path, seed: int = 0) -> Path:
    """A tied tiny Llama policy turned into a one-label classifier (score init std 0.1), norm weights random."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    policy = build_random_model(RandomModelConfig(**TINY, tie_word_embeddings=True), GPT2_TOKENIZER, "chatml",
                                out.with_name(out.name + "-policy"), seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(str(policy))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(str(policy), num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id  # as the RM stage sets it
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    randomize_weights(out, seed, {"norm.weight": 1.0})
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return _random_reward_model(tmp_path_factory.mktemp("hf") / "tiny-rm")


@pytest.fixture(scope="module")
def nemo_file(hf_dir, tmp_path_factory) -> Path:
    return hf_to_nemo(hf_dir, tmp_path_factory.mktemp("nemo") / "tiny-rm.nemo")


def _nemo_config(nemo: Path) -> dict:
    return yaml.safe_load(nemo_archive.read_config_text(nemo))


def test_source_is_the_rm_stage_format(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    weights = load_file(hf_dir / "model.safetensors")
    assert cfg["architectures"] == ["LlamaForSequenceClassification"]
    assert weights["score.weight"].shape == (1, 64) and "lm_head.weight" not in weights
    assert "score.bias" not in weights


def test_reward_config_fields_exist_upstream(nemo_file):
    cfg = _nemo_config(nemo_file)
    upstream = yaml.safe_load(TRAINING_RM.read_text())["model"]
    assert {k: cfg[k] for k in reward_head.NEMO_CONFIG} == reward_head.NEMO_CONFIG
    assert set(reward_head.NEMO_CONFIG) <= set(upstream)
    assert set(cfg["regression"]) == set(upstream["regression"])
    assert cfg["reward_model_type"] == "binary_ranking" and cfg["regression"]["num_attributes"] == 1
    assert cfg["share_embeddings_and_output_weights"] is False and cfg["target"] == reward_head.NEMO_TARGET


def test_checkpoint_holds_aligner_head_and_output_layer(nemo_file, hf_dir):
    hf = load_file(hf_dir / "model.safetensors")
    with nemo_archive.open_nemo(nemo_file) as folder:
        weights = folder / "model_weights"
        shapes = dist_ckpt.tensor_shapes(weights)
        head = dist_ckpt.read_tensor(weights, "model.rm_head.weight")
        bias = dist_ckpt.read_tensor(weights, "model.rm_head.bias")
        output = dist_ckpt.read_tensor(weights, "model.output_layer.weight")
    assert head.dtype == bias.dtype == torch.float32 and bias.shape == (1,) and torch.equal(bias, torch.zeros(1))
    assert torch.equal(head, hf["score.weight"])
    assert torch.equal(output, hf["model.embed_tokens.weight"])  # Aligner requests it; a copy of the embedding
    assert shapes["model.rm_head.weight"] == (1, 64)


def test_round_trip_is_bit_exact_and_the_same_architecture(hf_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    back = nemo_to_hf(hf_to_nemo(hf_dir, tmp_path / "extracted"), tmp_path / "back")
    before, after = load_file(hf_dir / "model.safetensors"), load_file(back / "model.safetensors")
    assert sorted(before) == sorted(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    cfg = json.loads((back / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and len(cfg["id2label"]) == 1
    model = AutoModelForSequenceClassification.from_pretrained(back)
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None


def test_kind_must_agree_with_config(hf_dir, tmp_path):
    with pytest.raises(UserError, match="--kind policy but config.json describes a reward model"):
        hf_to_nemo(hf_dir, tmp_path / "a.nemo", kind="policy")
    policy = hf_dir.with_name(hf_dir.name + "-policy")
    with pytest.raises(UserError, match="AutoModelForSequenceClassification"):
        hf_to_nemo(policy, tmp_path / "b.nemo", kind="reward")
    assert not any(tmp_path.glob("*.nemo"))


def _set_head_bias(folder: Path, value: float) -> None:
    """Rewrites the checkpoint with a trained (non-zero) rm_head bias, as Aligner training leaves it."""
    weights = folder / "model_weights"
    tensors = {k: dist_ckpt.read_tensor(weights, k) for k in dist_ckpt.tensor_shapes(weights)}
    objects = dist_ckpt.object_keys(weights)
    tensors[reward_head.BIAS_KEY] = torch.full((1,), value)
    for item in weights.iterdir():
        item.unlink()
    weights.rmdir()
    lazy = {k: dist_ckpt.LazyTensor(tuple(v.shape), v.dtype, lambda v=v: v) for k, v in tensors.items()}
    dist_ckpt.write_dist_checkpoint(weights, lazy, objects)


def test_export_refuses_a_nonzero_head_bias(hf_dir, tmp_path):
    folder = hf_to_nemo(hf_dir, tmp_path / "trained")
    _set_head_bias(folder, 0.25)
    with pytest.raises(UserError, match=r"rm_head.bias is \[0.25\], but HF's score layer has no bias"):
        nemo_to_hf(folder, tmp_path / "back")
    assert not (tmp_path / "back").exists()


def test_prompts_with_the_pad_token_are_refused():
    tokens, lengths = torch.tensor([[5, 7, 9], [5, 0, 0]]), torch.tensor([3, 1])
    assert torch.equal(reward_tokens(tokens, lengths, pad_id=3), torch.tensor([[5, 7, 9], [5, 3, 3]]))
    with pytest.raises(UserError, match="contains the pad token"):
        reward_tokens(tokens, lengths, pad_id=7)


@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_reward_certificate_passes(tp, pp, hf_dir, nemo_file):
    cert = verify_conversion(hf_dir, nemo_file, tp=tp, pp=pp)
    print(f"RM TP={tp} PP={pp}: max |reward diff| {cert.max_abs_reward_diff}, mean {cert.mean_abs_reward_diff}")
    assert cert.error is None and cert.kind == "reward" and cert.passed
    assert cert.max_abs_reward_diff <= 1e-4 and cert.num_prompts == 4 and "lengths-1" in cert.reward_position


class _ReversedRow(Row):
    """A plausible head bug: the hidden features in the wrong order."""

    def to_megatron(self, hf, geo):
        return hf[0].flip(-1)


@pytest.mark.parametrize("wrong", ["reversed_score", "nonzero_bias"])
def test_reward_certificate_catches_a_wrong_head(wrong, hf_dir, tmp_path, monkeypatch):
    if wrong == "reversed_score":
        monkeypatch.setattr(reward_head, "SCORE", WeightEntry(("score.weight",), "rm_head.weight", _ReversedRow()))
    bad = hf_to_nemo(hf_dir, tmp_path / "wrong")
    monkeypatch.undo()
    if wrong == "nonzero_bias":  # a shift HF cannot represent
        _set_head_bias(bad, 0.5)
    cert = verify_conversion(hf_dir, bad, tp=1, pp=1)
    print(f"{wrong}: max |reward diff| {cert.max_abs_reward_diff}")
    assert cert.error is None and not cert.passed and cert.max_abs_reward_diff > 0.1


def test_cli_converts_and_verifies_a_reward_model(hf_dir, tmp_path):
    out = tmp_path / "cli.nemo"
    run = lambda *a: subprocess.run([sys.executable, "-m", "nemo_rlhf", *a], capture_output=True, text=True,  # noqa: E731
                                    cwd=REPO, timeout=600)
    proc = run("convert", "hf-to-nemo", "--hf", str(hf_dir), "--out", str(out), "--kind", "reward")
    assert proc.returncode == 0, proc.stderr
    proc = run("verify", "conversion", "--hf", str(hf_dir), "--nemo", str(out), "--tp", "2", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["passed"] is True and report["kind"] == "reward" and report["max_abs_reward_diff"] <= 1e-4
