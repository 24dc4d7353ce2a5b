"""Shared test helpers: run the real CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny-cpu.yaml"


def cli(*args: str, timeout: int = 600, check: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m nemo_rlhf ARGS` and capture its output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "nemo_rlhf", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def randomize_weights(model_dir: Path, seed: int, centers: dict[str, float]) -> None:
    """Redraw the tensors whose names end with a key of `centers` as center + 0.5 * N(0, 1).

    HF initialises norm weights to 1 and biases to 0; converter tests randomise them so a wrong
    mapping of those tensors moves the outputs well beyond the certificate's tolerance.
    """
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(model_dir / "model.safetensors")
    gen = torch.Generator().manual_seed(seed + 1)
    for key in weights:
        center = next((c for suffix, c in centers.items() if key.endswith(suffix)), None)
        if center is not None:
            weights[key] = center + 0.5 * torch.randn(weights[key].shape, generator=gen)
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
