"""The differences between the megatron-core versions the verifier runs with, in one place.

The workers run megatron-core 0.16.1 (the installed one) or, in the test suite, 0.10.0 (the
version inside NeMo-Aligner 0.7.0's container; see certificate.MEGATRON_PATH_ENV). Where their
APIs differ, the verifier calls these helpers instead of megatron directly:

| what | 0.16.1 | 0.10.0 |
|---|---|---|
| `get_gpt_layer_local_spec` | takes `normalization` | no such argument (the norm reads `config.normalization`) |
| pipeline schedule, forward only | a step may return no loss function | always calls it: the worker returns one |
| package version | `megatron.core.package_info` | the same (read in the worker, which may import either) |

The RNG tracker needs no helper: `megatron_cpu` installs a CPU tracker the same way in both
(0.10's `model_parallel_cuda_manual_seed` has no `inference_rng_tracker`, so it is not called).
"""

from __future__ import annotations

import inspect


def megatron_version() -> str:
    """Version of the megatron-core this process imported."""
    from megatron.core import package_info

    return package_info.__version__


def gpt_local_spec(normalization: str):
    """megatron-core's local GPT layer spec for `normalization` ("RMSNorm" or "LayerNorm")."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    if "normalization" in inspect.signature(get_gpt_layer_local_spec).parameters:
        return get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=False)
    return get_gpt_layer_local_spec(qk_layernorm=False)
