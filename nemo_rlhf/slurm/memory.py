"""Per-GPU memory estimate of a Megatron training stage (what preflight compares with the GPU).

The model, stated once:

* parameters on one GPU: the largest pipeline stage (its layers, plus the embedding on the first
  stage and the output layer on the last), divided by TP;
* bytes per parameter, bf16 mixed precision as Megatron documents it (docs/source/distrib_optimizer.md:
  "6 + 12/d" with the distributed optimizer, 18 without): bf16 weights 2, fp32 main gradients 4,
  fp32 master weights + Adam m + v 12, the last sharded over DP by the distributed optimizer;
* activations per layer and token (Korthikanti et al. 2022, "Reducing Activation Recomputation",
  written for a gated or plain MLP of any width, with flash attention, so no s^2 attention term):
  replicated LayerNorm / QKV / FC1 inputs and dropout masks 10h (split by TP only with sequence
  parallelism), TP-split Q/K/V 2(h + 2gd), projection input 2h and MLP 6f (SwiGLU) or 4f;
  full recomputation keeps only each layer's input (2h). Under 1F1B the first stage holds
  min(PP, micro batches) micro batches of its layers (x (1 + (PP-1)/(PP*VPP)) interleaved);
* the logits of one micro batch on the last stage: s * b * V / TP * 6 bytes (bf16 + fp32 loss copy);
  a reward model or critic has a scalar head instead (no output layer, no logits);
* a fixed runtime reserve (CUDA context, NCCL buffers, cuBLAS workspace, allocator fragmentation).

PPO adds two phases. The actor generates with Adam states offloaded (NeMo-Aligner's
model.ppo.offload_adam_states, default True) and a KV cache for one rollout micro batch; its
reference policy and the critic job's reward model are held in host memory and swapped in
(NeMo-Aligner's CPU weight swap), so they count against the host, not the GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nemo_rlhf.spec.architectures import ModelDims

GB = 1e9
RUNTIME_RESERVE_BYTES = 3 * GB  # measured CUDA context + NCCL + workspace is typically 1.5-3 GB per GPU
BYTES_WEIGHT = {"bf16": 2, "16": 2, "32": 4}
BYTES_MAIN_GRAD = 4
BYTES_OPTIMIZER = {"bf16": 12, "16": 12, "32": 8}  # fp32 master copy + m + v; fp32 training needs no master copy


@dataclass(frozen=True)
class Parallelism:
    """A stage's layout as the memory model needs it."""

    tp: int
    pp: int
    dp: int
    vpp: int = 1
    sequence_parallel: bool = False
    recompute: str | None = None  # None, "selective" or "full"
    lm_head: bool = True  # False: a reward model or critic (NeMo-Aligner's rm_head, hidden -> 1; no vocab logits)


@dataclass(frozen=True)
class MemoryPart:
    name: str
    bytes: float


@dataclass(frozen=True)
class MemoryEstimate:
    """One phase of one stage: its parts per GPU, and what lives in host memory per GPU."""

    stage: str
    phase: str
    parts: tuple[MemoryPart, ...]
    host_parts: tuple[MemoryPart, ...] = ()

    @property
    def total(self) -> float:
        return sum(p.bytes for p in self.parts)

    def describe(self) -> str:
        """One line: the total and each part in GB."""
        parts = ", ".join(f"{p.name} {p.bytes / GB:.2f}" for p in self.parts)
        host = ", ".join(f"{p.name} {p.bytes / GB:.2f}" for p in self.host_parts)
        text = f"{self.stage} ({self.phase}): {self.total / GB:.2f} GB per GPU = {parts}"
        return text + (f"; host memory per GPU: {host}" if host else "")


def params_per_gpu(dims: ModelDims, par: Parallelism) -> float:
    """Parameters held by the most loaded GPU: the larger of the first and last pipeline stage, / TP."""
    layers = math.ceil(dims.num_layers / par.pp) * dims.layer_params()
    embed = dims.vocab_size * dims.hidden_size
    output = embed if par.lm_head else dims.hidden_size
    if par.pp == 1:
        outside = embed + (0 if dims.tie_word_embeddings and par.lm_head else output) + dims.hidden_size
    else:  # a tied output layer is a copy of the embedding on the last stage
        outside = max(embed, output)
    return (layers + outside) / par.tp


def activation_bytes_per_layer(dims: ModelDims, par: Parallelism, seq: int, micro_batch: int) -> float:
    """Activations one layer keeps for backward, for one micro batch."""
    h, f, d, g = dims.hidden_size, dims.ffn_hidden_size, dims.head_dim, dims.num_query_groups
    tokens = seq * micro_batch
    if par.recompute == "full":
        return tokens * 2 * h / (par.tp if par.sequence_parallel else 1)
    replicated = 10 * h
    split = 2 * (h + 2 * g * d) + 2 * h + (6 if dims.gated_mlp else 4) * f
    if par.sequence_parallel:
        return tokens * (replicated + split) / par.tp
    return tokens * (replicated + split / par.tp)


def training_parts(
    dims: ModelDims,
    par: Parallelism,
    seq: int,
    micro_batch: int,
    global_batch: int,
    precision: str,
    distributed_optimizer: bool,
) -> list[MemoryPart]:
    """Weights, gradients, optimizer states, activations and logits of a training step, per GPU."""
    params = params_per_gpu(dims, par)
    optimizer = params * BYTES_OPTIMIZER[precision] / (par.dp if distributed_optimizer else 1)
    micro_batches = max(1, global_batch // (micro_batch * par.dp))
    in_flight = math.ceil(dims.num_layers / par.pp) * min(par.pp, micro_batches)
    interleave = 1 + (par.pp - 1) / (par.pp * par.vpp) if par.vpp > 1 else 1
    activations = activation_bytes_per_layer(dims, par, seq, micro_batch) * in_flight * interleave
    return [
        MemoryPart("weights", params * BYTES_WEIGHT[precision]),
        MemoryPart("gradients", params * BYTES_MAIN_GRAD),
        MemoryPart("optimizer" + (" (distributed)" if distributed_optimizer else ""), optimizer),
        MemoryPart(f"activations (mbs {micro_batch} x {seq})", activations),
        MemoryPart("logits", seq * micro_batch * dims.vocab_size / par.tp * 6 if par.lm_head else 0.0),
        MemoryPart("runtime reserve", RUNTIME_RESERVE_BYTES),
    ]


def kv_cache_bytes(dims: ModelDims, par: Parallelism, seq: int, batch: int, precision: str) -> float:
    """K and V of every layer on one pipeline stage for `batch` sequences of `seq` tokens, per GPU."""
    groups_per_gpu = max(1, dims.num_query_groups // par.tp)
    layers = math.ceil(dims.num_layers / par.pp)
    return 2 * layers * groups_per_gpu * dims.head_dim * seq * batch * BYTES_WEIGHT[precision]


def generation_parts(
    dims: ModelDims, par: Parallelism, seq: int, rollout_micro_batch: int, precision: str
) -> list[MemoryPart]:
    """PPO actor during rollouts: weights, the gradient buffer, a KV cache; Adam states offloaded to host."""
    params = params_per_gpu(dims, par)
    return [
        MemoryPart("weights", params * BYTES_WEIGHT[precision]),
        MemoryPart("gradients (buffer kept)", params * BYTES_MAIN_GRAD),
        MemoryPart(f"KV cache (rollout mbs {rollout_micro_batch} x {seq})",
                   kv_cache_bytes(dims, par, seq, rollout_micro_batch, precision)),
        MemoryPart("runtime reserve", RUNTIME_RESERVE_BYTES),
    ]


def swapped_model_part(name: str, dims: ModelDims, par: Parallelism, precision: str) -> MemoryPart:
    """A frozen model kept in host memory and swapped in (reference policy, reward model), per GPU."""
    return MemoryPart(name, params_per_gpu(dims, par) * BYTES_WEIGHT[precision])
