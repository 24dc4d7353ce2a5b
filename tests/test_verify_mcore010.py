"""The conversion certificate with megatron-core 0.10.0, the version inside NeMo-Aligner 0.7.0's container.

scripts/install.sh installs it beside the venv's 0.16.1 (`pip install --no-deps --target
<venv>/mcore-0.10.0`); the certificate's workers import it first when given that directory
(`NEMO_RLHF_MEGATRON_PATH`, or `megatron_dir=`), so the loader the cluster runs reads our files.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from nemo_rlhf.convert import dist_ckpt
from nemo_rlhf.convert.convert import hf_to_nemo
from nemo_rlhf.errors import UserError
from nemo_rlhf.verify.certificate import MEGATRON_PATH_ENV, verify_conversion
from tests.test_convert_gpt_neox import _random_neox
from tests.test_convert_llama import _random_llama

MCORE_010 = Path(os.environ.get("NEMO_RLHF_MCORE_010", Path(sys.prefix) / "mcore-0.10.0"))

pytestmark = pytest.mark.skipif(not (MCORE_010 / "megatron" / "core").is_dir(),
                                reason=f"megatron-core 0.10.0 not at {MCORE_010}: run scripts/install.sh")


@pytest.mark.parametrize("family,tp,pp,dtype", [("llama", 2, 1, None), ("gpt_neox", 1, 2, torch.bfloat16)])
def test_certificate_passes_with_megatron_core_0_10(family, tp, pp, dtype, tmp_path, monkeypatch):
    """Llama (GQA, RMSNorm, SwiGLU) at TP=2, written in small chunks (every q/k/v group and gate/up
    half its own chunk, and those in row blocks of at most 16 KiB); GPT-NeoX (parallel residual,
    LayerNorm, 25% rotary) at PP=2 in the default chunks, stored in bfloat16 as cluster checkpoints
    are: megatron upcasts it on load, the HF reference runs on its weights rounded to bfloat16,
    and the default (float32-noise) bound holds."""
    make = {"llama": _random_llama, "gpt_neox": _random_neox}[family]
    hf_dir = make(tmp_path / "hf")
    if family == "llama":
        monkeypatch.setattr(dist_ckpt, "MAX_CHUNK_BYTES", 16 << 10)
    nemo = hf_to_nemo(hf_dir, tmp_path / "model.nemo", dtype=dtype)
    monkeypatch.undo()
    cert = verify_conversion(hf_dir, nemo, tp=tp, pp=pp, megatron_dir=MCORE_010)
    print(f"{family} TP={tp} PP={pp} {cert.stored_dtype} megatron-core {cert.megatron_core}: "
          f"max |diff| {cert.max_abs_logit_diff} (tolerance {cert.tolerance}), storage {cert.storage_max_abs_diff}")
    assert cert.megatron_core == "0.10.0"
    assert cert.error is None and cert.passed, cert.error
    assert cert.top1_agreement == 1.0 and cert.num_tokens > 50
    if dtype == torch.bfloat16:
        # Rounding to bf16 alone moves HF's logits far beyond the bound: a certificate that
        # compared with unrounded HF would have to accept mapping-sized errors.
        assert cert.stored_dtype == "bfloat16" and cert.storage_max_abs_diff > 100 * cert.tolerance


def test_the_environment_variable_selects_the_version_and_a_bad_path_is_a_user_error(tmp_path, monkeypatch):
    from nemo_rlhf.verify.certificate import megatron_path

    monkeypatch.setenv(MEGATRON_PATH_ENV, str(MCORE_010))
    assert megatron_path() == str(MCORE_010)
    monkeypatch.setenv(MEGATRON_PATH_ENV, str(tmp_path))
    with pytest.raises(UserError, match="holds no megatron/core package"):
        megatron_path()
