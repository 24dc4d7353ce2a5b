"""The conversion certificate: megatron-core's reading of a .nemo against HF transformers, on real prompts.

1. The layout is checked before any process starts (TP must divide heads, query groups, the
   MLP and the vocabulary; PP must divide the layers): torchrun would turn our exit code 2
   into 1, and a user error deserves its own message.
2. The prompts (GSM8K questions) are tokenized with the HF tokenizer; HF transformers gives
   the reference logits in this process, in float32.
3. `torchrun` starts TP*PP gloo processes (`megatron_worker`), in which megatron-core builds
   its GPTModel from model_config.yaml and loads the weights with its own dist_checkpointing.
   They report the megatron-core version that ran and the dtype the checkpoint stores.
4. When that dtype is narrower than float32, the HF reference is recomputed from its weights
   rounded to it, so both sides compute in float32 from the same values (see
   RELATIVE_TOLERANCE); how much the rounding itself moved the model is reported apart.
5. Logits are compared on every real (unpadded) position over the HF vocabulary: max and mean
   |difference|, mean KL(HF || NeMo), greedy next-token agreement. For a GPT-NeoX model the
   distance of NeMo 2.1's own Falcon layer from HF is reported too (see parallel_residual).

A reward model (model_config.yaml with `reward_model_type`) is compared on its rewards
instead: HF's `*ForSequenceClassification` against megatron-core's GPTModel with NeMo-Aligner's
rm_head, one reward per prompt. Aligner reads the reward at position lengths-1 (right
padding); HF reads the rightmost token that is not `pad_token_id`. The prompts are right-padded
with that pad id and contain no pad token themselves (checked), so both read the same position.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from nemo_rlhf.convert import model_config, nemo_archive, reward_head
from nemo_rlhf.errors import UserError
from nemo_rlhf.models.materialize import check_hf_dir, hf_progress_bars
from nemo_rlhf.spec.paths import DATA_ROOT_ENV, data_root

GSM8K_TEST = "gsm8k/test.jsonl"  # under the data root (spec.paths.data_root)
FP32_TOLERANCE = 1e-4  # a fixed bound for callers that pass one (the CLI's --tolerance default)
STORED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The default bound, relative to the largest |reference output|, whatever dtype the .nemo stores.
#
# What the certificate proves is that the mapping is right, not how lossy a storage dtype is.
# So both sides compute in float32 from the SAME values: megatron upcasts the stored weights on
# load, and the HF reference runs on its weights rounded to the stored dtype (`round_weights`).
# What is left is float32 summation order (fused vs separate GEMMs, attention kernels, TP
# partial sums), an error proportional to the magnitudes summed. Measured (megatron-core
# 0.16.1, 4 GSM8K prompts; docs/nemo-format-notes.md), as max |logit diff| / max |logit|:
#   tiny Llama (4 layers)   fp32 4.7e-6 / 4.9 = 9.5e-7, bf16 4.7e-6, fp16 5.1e-6
#   tiny GPT-NeoX (4)       fp32 2.2e-6 / 4.8 = 4.5e-7, bf16 1.9e-6
#   SmolLM2-135M (30)       fp32 5.3e-5 / 40.7 = 1.3e-6, bf16 4.6e-5
# The stored dtype does not change these (same values on both sides), so one bound serves all:
# 1e-5 of the largest |logit| (~84 float32 ulps of it) leaves a 7x margin on SmolLM2 (whose
# 5.3e-5 sat at half the old fixed 1e-4) and 10x on the tiny models. A wrong mapping moves
# logits by > 0.1, and rounding weights to bf16 alone by 0.09-0.2 (`storage_max_abs_diff`):
# comparing against unrounded fp32 HF would need a bound that hides mapping errors.
# Greedy next-token agreement must be 100% for every stored dtype (measured: 100%).
RELATIVE_TOLERANCE = 1e-5


def default_tolerance(reference: torch.Tensor) -> float:
    """The default bound on |HF - megatron|: RELATIVE_TOLERANCE x the largest |reference output| (at least 1)."""
    return RELATIVE_TOLERANCE * max(1.0, reference.abs().max().item())
WORKER = "nemo_rlhf.verify.megatron_worker"
# A directory holding another megatron-core (`pip install --no-deps --target DIR megatron-core==0.10.0`,
# as scripts/install.sh does): the workers import megatron from there, so that version shadows the
# installed one inside them only. The test suite uses it to check our files with NeMo-Aligner 0.7.0's
# megatron-core 0.10.0 as well as 0.16.1.
MEGATRON_PATH_ENV = "NEMO_RLHF_MEGATRON_PATH"


@dataclass
class Certificate:
    """What the check measured, and whether it passed."""

    tp: int
    pp: int
    passed: bool
    max_abs_logit_diff: float | None = None
    mean_abs_logit_diff: float | None = None
    mean_kl: float | None = None
    top1_agreement: float | None = None
    num_prompts: int = 0
    num_tokens: int = 0
    tolerance: float = FP32_TOLERANCE
    megatron_core: str = ""
    error: str | None = None
    kind: str = reward_head.POLICY
    max_abs_reward_diff: float | None = None
    mean_abs_reward_diff: float | None = None
    reward_position: str | None = None
    # The dtype the checkpoint stores; how far rounding HF's weights to it moved HF's own outputs
    # (None when it changed nothing); for a parallel-residual model, how far NeMo 2.1's Falcon
    # layer (which drops the linear_proj / linear_fc2 biases) is from HF. Information, not judged.
    stored_dtype: str = "float32"
    storage_max_abs_diff: float | None = None
    nemo21_falcon_max_abs_diff: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


REWARD_POSITION = ("lengths-1 (NeMo-Aligner, right padding) = HF's last token that is not pad_token_id "
                   "(the prompts contain no pad token)")


def check_layout(cfg: dict, padded_vocab: int, tp: int, pp: int, reward: bool = False) -> None:
    """Raises one UserError listing every reason the TP/PP layout cannot hold this model.

    A reward model's head also splits the hidden size (its input features) across TP.
    """
    if tp < 1 or pp < 1:
        raise UserError(f"TP={tp}, PP={pp}: both must be >= 1", fix="pass --tp N --pp M with N, M >= 1")
    heads = int(cfg["num_attention_heads"])
    rules = [
        ("num_attention_heads", heads, tp, "TP"),
        ("num_query_groups", int(cfg.get("num_query_groups") or heads), tp, "TP"),
        ("ffn_hidden_size", int(cfg["ffn_hidden_size"]), tp, "TP"),
        ("padded vocabulary", padded_vocab, tp, "TP"),
        ("num_layers", int(cfg["num_layers"]), pp, "PP"),
    ] + ([("hidden_size", int(cfg["hidden_size"]), tp, "TP")] if reward else [])
    problems = [f"{name}={value} is not divisible by {axis}={size}" for name, value, size, axis in rules
                if value % size]
    if problems:
        tp_ok = [t for t in range(1, heads + 1) if all(v % t == 0 for n, v, _, a in rules if a == "TP")]
        pp_ok = [p for p in range(1, int(cfg["num_layers"]) + 1) if int(cfg["num_layers"]) % p == 0]
        raise UserError("; ".join(problems), where=f"--tp {tp} --pp {pp}",
                        fix=f"TP sizes that fit this model: {tp_ok}; PP sizes: {pp_ok}")


def pad_id(tokenizer) -> int:
    """The id prompts are right-padded with: the tokenizer's pad token, else its EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0


def prompt_tokens(tokenizer, num_prompts: int = 4, max_tokens: int = 48,
                  source: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GSM8K questions as right-padded ids [B, S] and their real lengths [B]."""
    source = source or data_root("auto") / GSM8K_TEST
    if not source.is_file():
        raise UserError(f"prompt file {source} not found", fix=f"put GSM8K's test.jsonl there or set {DATA_ROOT_ENV}")
    with open(source, encoding="utf-8") as f:
        questions = [json.loads(line)["question"] for _, line in zip(range(num_prompts), f)]
    ids = [tokenizer(q, add_special_tokens=True)["input_ids"][:max_tokens] for q in questions]
    seq = max(len(i) for i in ids)
    pad = pad_id(tokenizer)
    tokens = torch.full((len(ids), seq), pad, dtype=torch.long)
    for row, i in enumerate(ids):
        tokens[row, :len(i)] = torch.tensor(i)
    return tokens, torch.tensor([len(i) for i in ids])


def load_hf_model(hf_dir: Path, kind: str):
    """The HF model in fp32 (a causal LM, or a *ForSequenceClassification reward model), in eval mode."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if kind == reward_head.REWARD else AutoModelForCausalLM
    with hf_progress_bars(False):
        return auto.from_pretrained(str(hf_dir), dtype=torch.float32).eval()


def hf_outputs(model, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reference logits [B, S, V_hf] (or rewards [B, A] of a reward model) in fp32."""
    mask = (torch.arange(tokens.shape[1])[None] < lengths[:, None]).long()
    with torch.no_grad():
        return model(input_ids=tokens, attention_mask=mask).logits.float()


def round_weights(model, dtype: torch.dtype) -> bool:
    """Rounds the HF model's weights to `dtype` (kept in fp32); True when that changed any of them.

    The reward head is left alone: NeMo-Aligner stores it in float32 (force_head_dtype), from
    the source's values, whatever the dtype of the other weights.
    """
    changed = False
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("score."):
                continue
            rounded = param.to(dtype).float()
            changed = changed or not torch.equal(rounded, param)
            param.copy_(rounded)
    return changed


def reward_tokens(tokens: torch.Tensor, lengths: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Right-pads with HF's pad_token_id; refuses prompts that contain it (HF would read an earlier token)."""
    real = torch.arange(tokens.shape[1])[None] < lengths[:, None]
    if bool((tokens[real] == pad_id).any()):
        raise UserError(f"a prompt contains the pad token (id {pad_id}): HF's classifier would read the reward "
                        "before it, NeMo-Aligner at the prompt's end", fix="use prompts without the pad token")
    return torch.where(real, tokens, torch.full_like(tokens, pad_id))


def compare_rewards(reference: torch.Tensor, candidate: torch.Tensor, tolerance: float) -> dict:
    """Max and mean |reward difference| over the prompts."""
    if reference.shape != candidate.shape:
        raise RuntimeError(f"megatron produced rewards of shape {tuple(candidate.shape)}, HF {tuple(reference.shape)}")
    diff = (reference.double() - candidate.double()).abs()
    return {"max_abs_reward_diff": diff.max().item(), "mean_abs_reward_diff": diff.mean().item(),
            "passed": bool(diff.max().item() <= tolerance), "reward_position": REWARD_POSITION}


def compare(reference: torch.Tensor, candidate: torch.Tensor, lengths: torch.Tensor, tolerance: float) -> dict:
    """Metrics over real positions; the candidate's extra (padded) vocabulary columns are left out."""
    vocab = reference.shape[-1]
    if candidate.shape[-1] < vocab:
        raise RuntimeError(f"megatron produced {candidate.shape[-1]} vocabulary columns, HF {vocab}")
    real = torch.arange(reference.shape[1])[None] < lengths[:, None]
    # float64: the KL of two nearly equal distributions is below float32's resolution.
    ref, cand = reference[real].double(), candidate[..., :vocab][real].double()
    diff = (ref - cand).abs()
    log_p, log_q = ref.log_softmax(-1), cand.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    agree = (ref.argmax(-1) == cand.argmax(-1)).float().mean().item()
    max_diff = diff.max().item()
    return {"max_abs_logit_diff": max_diff, "mean_abs_logit_diff": diff.mean().item(),
            "mean_kl": kl.mean().item(), "top1_agreement": agree, "num_tokens": int(real.sum()),
            "passed": bool(max_diff <= tolerance and agree == 1.0)}


def megatron_path(explicit: str | Path | None = None) -> str | None:
    """The megatron-core directory the workers import first: `explicit`, else $NEMO_RLHF_MEGATRON_PATH."""
    path = str(explicit) if explicit else os.environ.get(MEGATRON_PATH_ENV) or None
    if path and not (Path(path) / "megatron" / "core").is_dir():
        raise UserError(f"{path} holds no megatron/core package", where=MEGATRON_PATH_ENV if not explicit else None,
                        fix="pip install --no-deps --target DIR megatron-core==0.10.0, then point at DIR")
    return path


def installed_megatron_version(megatron_dir: str | None = None) -> str:
    """The megatron-core version the workers import (from package metadata, without importing it)."""
    from importlib.metadata import PackageNotFoundError, distributions, version

    if megatron_dir:
        found = [d.version for d in distributions(path=[megatron_dir]) if d.metadata["Name"] == "megatron-core"]
        return found[0] if found else ""
    try:
        return version("megatron-core")
    except PackageNotFoundError:
        return ""


def run_megatron(folder: Path, tokens: torch.Tensor, padded_vocab: int, tp: int, pp: int,
                 timeout: int = 900, dump_dir: Path | None = None,
                 lengths: torch.Tensor | None = None) -> tuple[torch.Tensor | None, str]:
    """Runs the worker under torchrun; returns (logits or None, the tail of its output).

    With `lengths` the model is run as a reward model and the result is its rewards [B, A].
    `dump_dir` also gets each rank's loaded parameters (rank<N>.safetensors), for layout tests.
    """
    outputs, tail, _ = run_workers(folder, tokens, padded_vocab, tp, pp, timeout, dump_dir, lengths)
    return (outputs["rewards" if lengths is not None else "logits"] if outputs else None), tail


def run_workers(folder: Path, tokens: torch.Tensor, padded_vocab: int, tp: int, pp: int, timeout: int = 900,
                dump_dir: Path | None = None, lengths: torch.Tensor | None = None,
                megatron_dir: str | None = None) -> tuple[dict[str, torch.Tensor] | None, str, dict[str, str]]:
    """`run_megatron`, returning all the worker wrote: (outputs or None, output tail, metadata).

    The outputs are `logits` or `rewards`, plus `nemo21_falcon` for a parallel-residual model;
    the metadata says which megatron-core ran (`megatron_core`) and the checkpoint's
    `stored_dtype`. `megatron_dir` (see `megatron_path`) is put first on the workers' PYTHONPATH.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="nemo-rlhf-verify-") as tmp:
        inputs = {"input_ids": tokens.contiguous()}
        if lengths is not None:
            inputs["lengths"] = lengths.contiguous()
        save_file(inputs, f"{tmp}/tokens.safetensors")
        out = Path(tmp) / "logits.safetensors"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tp * pp}",
               "-m", WORKER, "--config", str(folder / nemo_archive.CONFIG_NAME),
               "--weights", str(folder / nemo_archive.WEIGHTS_DIR), "--tokens", f"{tmp}/tokens.safetensors",
               "--out", str(out), "--tp", str(tp), "--pp", str(pp), "--vocab", str(padded_vocab)]
        if dump_dir is not None:
            cmd += ["--dump-dir", str(dump_dir)]
        if lengths is not None:
            cmd.append("--reward")
        package_root = str(Path(__file__).resolve().parents[2])
        path = [megatron_dir, package_root, os.environ.get("PYTHONPATH")]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": os.pathsep.join(filter(None, path))}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        errors = sorted(Path(tmp).glob("logits.safetensors.rank*.error"))
        tail = errors[0].read_text(encoding="utf-8") if errors else (proc.stdout + proc.stderr)[-3000:]
        if proc.returncode != 0 or not out.is_file():
            return None, tail, {"megatron_core": installed_megatron_version(megatron_dir)}
        with safe_open(str(out), "pt") as f:  # the version the workers really imported, and the outputs
            return {k: f.get_tensor(k) for k in f.keys()}, tail, dict(f.metadata() or {})


def verify_conversion(hf_dir: Path, nemo_path: Path, tp: int = 1, pp: int = 1, tolerance: float | None = None,
                      num_prompts: int = 4, megatron_dir: str | Path | None = None) -> Certificate:
    """Checks that megatron-core reads `nemo_path` as the same model as `hf_dir`, at TP x PP.

    Args:
        tolerance: Largest allowed |logit| (or |reward|) difference; None: `default_tolerance`
            of the reference outputs.
        megatron_dir: Another megatron-core for the workers (see `megatron_path`); None:
            $NEMO_RLHF_MEGATRON_PATH, else the installed one.

    Returns:
        The certificate; `passed` is False (with `error`) when megatron could not load or run it.

    Raises:
        UserError: Bad paths or a TP/PP layout the model cannot have (before any process starts).
    """
    from transformers import AutoTokenizer

    hf_dir = check_hf_dir(hf_dir)
    megatron_dir = megatron_path(megatron_dir)
    # Layout first, from the config alone: a wrong --tp fails in a second, not after unpacking.
    cfg = model_config.parse_model_config(nemo_archive.read_config_text(nemo_path), str(nemo_path))
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    _, padded = model_config.vocab_sizes(cfg, len(tokenizer), tp)
    kind = reward_head.kind_of_nemo(cfg)
    reward = kind == reward_head.REWARD
    check_layout(cfg, padded, tp, pp, reward=reward)
    tokens, lengths = prompt_tokens(tokenizer, num_prompts)
    hf_model = load_hf_model(hf_dir, kind)
    if reward:
        if hf_model.config.pad_token_id is None:  # HF refuses batches without one
            hf_model.config.pad_token_id = pad_id(tokenizer)
        tokens = reward_tokens(tokens, lengths, int(hf_model.config.pad_token_id))
    source = hf_outputs(hf_model, tokens, lengths)
    with nemo_archive.open_nemo(nemo_path) as folder:
        if nemo_archive.legacy_rank_dirs(folder):
            raise UserError("the model holds legacy weights (model_weights.ckpt, mp_rank_XX/ or "
                            "tp_rank_XX_pp_rank_XXX/); the certificate loads only the distributed checkpoint "
                            "(model_weights/) that megatron's dist_checkpointing reads", where=str(nemo_path),
                            fix="upgrade it: `nemo-rlhf convert nemo-to-hf`, then `nemo-rlhf convert hf-to-nemo` "
                                "(which certifies the new .nemo)")
        outputs, tail, meta = run_workers(folder, tokens, padded, tp, pp, lengths=lengths if reward else None,
                                          megatron_dir=megatron_dir)
    cert = Certificate(tp=tp, pp=pp, passed=False, num_prompts=len(tokens), megatron_core=meta.get("megatron_core", ""),
                       kind=kind, num_tokens=int(lengths.sum()))
    if outputs is None:
        cert.tolerance = FP32_TOLERANCE if tolerance is None else tolerance
        cert.error = f"megatron-core could not load or run the checkpoint:\n{tail}"
        return cert
    # Both sides compute in fp32 from the same values: HF's weights rounded to the dtype the
    # checkpoint stores (what megatron loaded and upcast), so the check is about the mapping.
    stored = STORED_DTYPES.get(meta.get("stored_dtype", "float32"), torch.float32)
    reference = hf_outputs(hf_model, tokens, lengths) if round_weights(hf_model, stored) else source
    cert.stored_dtype = str(stored).removeprefix("torch.")
    cert.tolerance = default_tolerance(reference) if tolerance is None else tolerance
    main = outputs["rewards" if reward else "logits"]
    metrics = compare_rewards(reference, main, cert.tolerance) if reward \
        else compare(reference, main, lengths, cert.tolerance)
    for key, value in metrics.items():
        setattr(cert, key, value)
    if reference is not source:  # what storing in that dtype did to the model (information, not judged)
        cert.storage_max_abs_diff = _max_abs_diff(source, reference, lengths, reward)
    if "nemo21_falcon" in outputs:
        cert.nemo21_falcon_max_abs_diff = _max_abs_diff(reference, outputs["nemo21_falcon"], lengths, reward)
    return cert


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor, lengths: torch.Tensor, reward: bool) -> float:
    """Max |a - b| over real positions (and the HF vocabulary), or over the rewards."""
    if reward:
        return (a.double() - b.double()).abs().max().item()
    real = torch.arange(a.shape[1])[None] < lengths[:, None]
    vocab = min(a.shape[-1], b.shape[-1])
    return (a[..., :vocab][real].double() - b[..., :vocab][real].double()).abs().max().item()


# --------------------------------------------------------------------------- the convert manifest

MANIFEST_NAME = "conversion_manifest.json"
FAILED_SUFFIX = ".failed"


def manifest_path(out_path: Path) -> Path:
    """Where a conversion's manifest lives: inside an extracted directory, beside a .nemo tar.

    A .nemo tar gets a sidecar `<out>.manifest.json` instead of a new member: NeMo's restore
    extracts every member it finds, and an unknown member is not something we have verified it ignores.
    """
    out_path = Path(out_path)
    return out_path / MANIFEST_NAME if out_path.is_dir() else out_path.with_name(out_path.name + ".manifest.json")


def build_manifest(hf_dir: Path, out_path: Path, cert: Certificate) -> dict:
    """The certificate's fields plus sha256 of every source HF file and of the output."""
    from nemo_rlhf.lineage.hashing import sha256_file, sha256_tree

    out_path = Path(out_path)
    if out_path.is_dir():
        output = {k: v for k, v in sha256_tree(out_path).items() if k != MANIFEST_NAME}
    else:
        output = {out_path.name: sha256_file(out_path)}
    return {"certificate": cert.to_dict(), "tp": cert.tp, "pp": cert.pp, "megatron_core": cert.megatron_core,
            "passed": cert.passed, "source_hf_dir": str(Path(hf_dir).absolute()),
            "source_sha256": sha256_tree(Path(hf_dir)), "output": str(out_path.absolute()),
            "output_sha256": output}


def certify_conversion(hf_dir: Path, out_path: Path) -> tuple[Certificate, Path, Path]:
    """Runs the certificate at TP=PP=1 on a fresh conversion and records it in the manifest.

    On failure the output is kept for inspection but renamed to `<out>.failed` (its manifest,
    passed=false, inside it or beside it as `<out>.failed.manifest.json`), so nothing downstream
    picks up a checkpoint under the name the user asked for.

    Returns:
        (certificate, where the output now is, manifest path).
    """
    import shutil

    out_path = Path(out_path).absolute()
    cert = verify_conversion(hf_dir, out_path, tp=1, pp=1)
    if not cert.passed:
        failed = out_path.with_name(out_path.name + FAILED_SUFFIX)
        for stale in (failed, manifest_path(failed)):
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink(missing_ok=True)
        os.replace(out_path, failed)
        manifest_path(out_path).unlink(missing_ok=True)  # a stale sidecar must not vouch for nothing
        out_path = failed
    target = manifest_path(out_path)
    target.write_text(json.dumps(build_manifest(hf_dir, out_path, cert), indent=2) + "\n", encoding="utf-8")
    return cert, out_path, target
