"""megatron-core on CPU: the shims it needs and the GPT model a model_config.yaml describes.

Import this module only in verification code (the certificate's worker processes and tests).
Nothing here runs on package import; `apply_cpu_shims` changes torch process-wide and is meant
for a process that does nothing else.

megatron-core assumes CUDA in four places that matter for a forward pass under gloo (each
shown necessary on this project's machines, see shared/FACTS.md):

1. RNG: its tracker forks CUDA generator states -> a tracker over CPU generator states;
2. `torch.cuda.current_device()` as a device argument (rotary tables, TP gathers, p2p) -> cpu;
3. literal `device="cuda"` in tensor factories (pipeline schedules, default causal mask) -> cpu;
4. `torch.cuda.synchronize()` in pipeline p2p communication -> no-op;
5. `tensor.cuda()` in megatron-core 0.10's pipeline schedule (a token counter) -> the tensor itself.

Apply (3) only after any Hugging Face model is loaded: with it active, HF's rotary inv_freq
buffer is left uninitialised and logits are silently wrong.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from nemo_rlhf.errors import UserError

_FACTORIES = ("zeros", "ones", "empty", "tensor", "arange", "full", "randn", "rand")
_APPLIED = False

# NeMo model_config `activation` -> (gated_linear_unit, activation_func) of megatron-core,
# as NeMo 2.1 translates them for mcore GPT.
ACTIVATIONS = {
    "fast-swiglu": (True, F.silu),
    "swiglu": (True, F.silu),
    "gelu": (False, F.gelu),
    "fast-geglu": (True, F.gelu),
    "geglu": (True, F.gelu),
}
NORMALIZATIONS = {"rmsnorm": "RMSNorm", "layernorm": "LayerNorm"}


class CpuRngTracker:
    """Drop-in for megatron's CudaRNGStatesTracker that forks CPU generator states."""

    def __init__(self):
        self.states_: dict[str, torch.Tensor] = {}

    def reset(self):
        self.states_ = {}

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self.states_ = dict(states)

    def is_initialized(self):
        return bool(self.states_)

    def add(self, name, seed):
        generator = torch.Generator().manual_seed(seed)
        self.states_[name] = generator.get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            self.add(name, hash(name) % (2**31))
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _cpu_device(device):
    if isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")) or \
            (isinstance(device, torch.device) and device.type == "cuda"):
        return torch.device("cpu")
    return device


def _factory_on_cpu(factory):
    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return factory(*args, **kwargs)

    return wrapper


def apply_cpu_shims() -> None:
    """Patches torch and megatron-core so a GPTModel runs forward on CPU under gloo (idempotent)."""
    global _APPLIED
    if _APPLIED:
        return
    from megatron.core.tensor_parallel import random as mp_random

    tracker = CpuRngTracker()
    tracker.add("model-parallel-rng", 1234)
    mp_random._CUDA_RNG_STATE_TRACKER = tracker
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    for name in _FACTORIES:
        setattr(torch, name, _factory_on_cpu(getattr(torch, name)))
    _APPLIED = True


def transformer_config(cfg: dict, tp: int, pp: int):
    """megatron-core TransformerConfig for a NeMo model_config.yaml, fp32 on CPU, for inference."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    activation = cfg.get("activation", "gelu")
    norm = str(cfg.get("normalization", "layernorm")).lower()
    if activation not in ACTIVATIONS or norm not in NORMALIZATIONS:
        raise UserError(f"activation {activation!r} / normalization {norm!r} is not supported by the verifier",
                        fix=f"supported: {sorted(ACTIVATIONS)} / {sorted(NORMALIZATIONS)}")
    gated, act = ACTIVATIONS[activation]
    heads = int(cfg["num_attention_heads"])
    return TransformerConfig(
        num_layers=int(cfg["num_layers"]), hidden_size=int(cfg["hidden_size"]), num_attention_heads=heads,
        num_query_groups=int(cfg.get("num_query_groups") or heads), ffn_hidden_size=int(cfg["ffn_hidden_size"]),
        kv_channels=int(cfg.get("kv_channels") or int(cfg["hidden_size"]) // heads),
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32 if pp > 1 else None, params_dtype=torch.float32,
        use_cpu_initialization=True, perform_initialization=False,
        normalization=NORMALIZATIONS[norm], layernorm_epsilon=float(cfg["layernorm_epsilon"]),
        gated_linear_unit=gated, activation_func=act,
        add_bias_linear=bool(cfg.get("bias", False)), add_qkv_bias=bool(cfg.get("qkv_bias", False)),
        hidden_dropout=0.0, attention_dropout=0.0, apply_query_key_layer_scaling=False,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        sequence_parallel=False,
    )


def build_gpt_model(cfg: dict, padded_vocab_size: int, tp: int, pp: int):
    """megatron-core's own GPTModel for this rank's pipeline stage.

    The layer is megatron's local GPT spec, or for a parallel-attention (Falcon-style, i.e.
    GPT-NeoX) config the parallel-residual layer built from the same modules (see
    `parallel_residual`).
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from nemo_rlhf.verify import parallel_residual
    from nemo_rlhf.verify.megatron_compat import gpt_local_spec

    config = transformer_config(cfg, tp, pp)
    if cfg.get("position_embedding_type", "rope") != "rope":
        raise UserError(f"position_embedding_type {cfg.get('position_embedding_type')!r} is not supported yet")
    if parallel_residual.is_parallel_residual(cfg):
        spec = parallel_residual.layer_spec(config.normalization)
    else:
        spec = gpt_local_spec(config.normalization)
    return GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=padded_vocab_size,
        max_sequence_length=int(cfg["encoder_seq_length"]),
        pre_process=parallel_state.is_pipeline_first_stage(), post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=bool(cfg.get("share_embeddings_and_output_weights", False)),
        position_embedding_type="rope", rotary_percent=float(cfg.get("rotary_percentage", 1.0)),
        rotary_base=cfg.get("rotary_base", 10000), rope_scaling=bool(cfg.get("scale_positional_embedding", False)),
        seq_len_interpolation_factor=cfg.get("seq_len_interpolation_factor"),
    ).eval()


def attach_reward_head(model, cfg: dict) -> None:
    """NeMo-Aligner 0.7.0's reward head, built from megatron-core itself, on the last stage.

    Aligner's `RewardModelHead` (gpt_reward_model.py) is an mcore RowParallelLinear from the
    hidden size to `regression.num_attributes` outputs, with a bias, input not parallel (TP
    splits the weight's dim 1 and all-reduces), bias added in place. Registered as the child
    `rm_head`, its weight and bias enter `sharded_state_dict` as `model.rm_head.*`, where
    Aligner's loader finds them.
    """
    from megatron.core.tensor_parallel import RowParallelLinear

    attributes = int((cfg.get("regression") or {}).get("num_attributes", 1))
    model.rm_head = RowParallelLinear(int(cfg["hidden_size"]), attributes, config=model.config,
                                      init_method=torch.nn.init.zeros_, bias=True, input_is_parallel=False,
                                      skip_bias_add=False)
