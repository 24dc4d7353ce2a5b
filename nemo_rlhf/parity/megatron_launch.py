"""Start `megatron_train_worker` under torchrun (CPU, gloo) for a converted model, as the certificate starts
its workers.

The layout is checked first (torchrun turns a worker's exit code 2 into 1, so a TP the model cannot
have must fail here, with its own message); the workers get the same PYTHONPATH (an alternative
megatron-core first, see certificate.megatron_path) and thread settings as the certificate's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from nemo_rlhf.convert import model_config, nemo_archive, reward_head

WORKER = "nemo_rlhf.parity.megatron_train_worker"


@dataclass
class WorkerRun:
    """What the workers wrote (None when they failed), the tail of their output, their metadata."""

    outputs: dict[str, torch.Tensor] | None
    tail: str
    meta: dict[str, str]


def padded_vocab(folder_or_nemo: Path, tokenizer_len: int, tp: int, pp: int = 1) -> tuple[dict, int]:
    """(model config, padded vocabulary at TP), with the layout checked for a model of that kind."""
    from nemo_rlhf.verify.certificate import check_layout

    cfg = model_config.parse_model_config(nemo_archive.read_config_text(folder_or_nemo), str(folder_or_nemo))
    _, padded = model_config.vocab_sizes(cfg, tokenizer_len, tp)
    check_layout(cfg, padded, tp, pp, reward=reward_head.kind_of_nemo(cfg) == reward_head.REWARD)
    return cfg, padded


def run_train_worker(nemo_path: Path, inputs: dict[str, torch.Tensor], tokenizer_len: int, tp: int, stage: str,
                     mode: str, options: dict | None = None, timeout: int = 900, pp: int = 1) -> WorkerRun:
    """One torchrun of TP x PP workers over `inputs` (see the worker's module doc for the keys).

    Args:
        options: further worker flags, e.g. {"steps": 3, "micro-batches": 1, "lr": 1e-3}.

    Raises:
        UserError: the model cannot be laid out at this TP (before any process starts).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    from nemo_rlhf.verify.certificate import megatron_path

    _, padded = padded_vocab(nemo_path, tokenizer_len, tp, pp)
    megatron_dir = megatron_path(None)
    with nemo_archive.open_nemo(nemo_path) as folder, tempfile.TemporaryDirectory(prefix="nemo-rlhf-parity-") as tmp:
        save_file({k: v.contiguous() for k, v in inputs.items()}, f"{tmp}/inputs.safetensors")
        out = Path(tmp) / "out.safetensors"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tp * pp}",
               "-m", WORKER,
               "--config", str(folder / nemo_archive.CONFIG_NAME), "--weights", str(folder / nemo_archive.WEIGHTS_DIR),
               "--inputs", f"{tmp}/inputs.safetensors", "--out", str(out), "--tp", str(tp), "--pp", str(pp),
               "--vocab", str(padded),
               "--stage", stage, "--mode", mode]
        for key, value in (options or {}).items():
            cmd += [f"--{key}", str(value)]
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": os.pathsep.join(filter(None, [megatron_dir, package_root, os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        errors = sorted(Path(tmp).glob("out.safetensors.rank*.error"))
        tail = errors[0].read_text(encoding="utf-8") if errors else (proc.stdout + proc.stderr)[-3000:]
        if proc.returncode != 0 or not out.is_file():
            return WorkerRun(None, tail, {})
        with safe_open(str(out), "pt") as f:
            return WorkerRun({k: f.get_tensor(k) for k in f.keys()}, tail, dict(f.metadata() or {}))
