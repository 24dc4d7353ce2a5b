"""Preflight: refuse a large-scale spec that would fail (or not fit) only after hours in a queue.

`run_preflight(spec)` resolves each stage's layout (nodes x GPUs = TP x PP x DP), runs every rule
in `RULES` and raises ONE UserError listing every problem with its key and fix; legal but wasteful
choices come back as warnings in the `PreflightReport`, with the memory estimate's parts
(`nemo_rlhf.slurm.memory`). Each rule is a small function over the resolved layouts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from nemo_rlhf.errors import UserError
from nemo_rlhf.slurm import memory
from nemo_rlhf.spec.architectures import ModelDims, model_dims
from nemo_rlhf.spec.schema import PipelineSpec

STAGES = ("sft", "rm", "ppo", "critic")
WASTE_HEADROOM = 0.9  # "fits without PP" means within 90% of the GPU memory
STAGE_TITLES = {"sft": "SFT", "rm": "reward model", "ppo": "PPO actor", "critic": "PPO critic + RM server"}


@dataclass(frozen=True)
class StageLayout:
    """One training stage as it will run: GPUs, parallel sizes, batch and sequence length."""

    stage: str
    nodes: int
    gpus: int
    tp: int
    pp: int
    vpp: int | None
    sequence_parallel: bool
    recompute: str | None
    micro_batch: int
    global_batch: int
    seq: int

    @property
    def dp(self) -> int:
        """Data-parallel size (0 when TP x PP does not fit the GPUs; a rule reports that)."""
        return self.gpus // (self.tp * self.pp) if self.gpus % (self.tp * self.pp) == 0 else 0

    @property
    def key(self) -> str:
        return f"parallel.{self.stage}"

    def parallelism(self, **changes) -> memory.Parallelism:
        par = memory.Parallelism(self.tp, self.pp, max(self.dp, 1), self.vpp or 1, self.sequence_parallel,
                                 self.recompute, lm_head=self.stage in ("sft", "ppo"))
        return replace(par, **changes)

    def describe(self) -> str:
        vpp = f" (VPP {self.vpp})" if self.vpp else ""
        return (f"{self.stage}: {self.nodes} node(s) x {self.gpus // self.nodes} GPUs = TP {self.tp} x PP {self.pp}"
                f"{vpp} x DP {self.dp}; micro batch {self.micro_batch}, global batch {self.global_batch}, "
                f"sequence {self.seq}")


@dataclass(frozen=True)
class Finding:
    key: str
    message: str
    fix: str

    def render(self) -> str:
        return f"{self.key}: {self.message}\n      fix: {self.fix}"


@dataclass
class PreflightReport:
    """What preflight saw: layouts, memory estimates (every phase) and warnings."""

    layouts: dict[str, StageLayout] = field(default_factory=dict)
    estimates: list[memory.MemoryEstimate] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)

    def render(self) -> str:
        lines = [layout.describe() for layout in self.layouts.values()]
        lines += [e.describe() for e in self.estimates]
        lines += [f"warning: {w.render()}" for w in self.warnings]
        return "\n".join(lines)


@dataclass
class Context:
    spec: PipelineSpec
    dims: ModelDims
    layouts: dict[str, StageLayout]
    errors: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    estimates: list[memory.MemoryEstimate] = field(default_factory=list)

    def error(self, key: str, message: str, fix: str) -> None:
        self.errors.append(Finding(key, message, fix))

    def warn(self, key: str, message: str, fix: str) -> None:
        self.warnings.append(Finding(key, message, fix))


def stage_layouts(spec: PipelineSpec) -> dict[str, StageLayout]:
    """Each NeMo-Aligner stage's layout, with sequence lengths from the canonical hyperparameters."""
    ppo_seq = spec.ppo.prompt_max_length + spec.ppo.response_length
    seqs = {"sft": spec.sft.max_length, "rm": spec.rm.max_length, "ppo": ppo_seq, "critic": ppo_seq}
    layouts = {}
    for stage in STAGES:
        p = getattr(spec.parallel, stage)
        nodes = p.nodes or spec.cluster.nodes
        layouts[stage] = StageLayout(
            stage=stage, nodes=nodes, gpus=nodes * spec.cluster.gpus_per_node, tp=p.tp, pp=p.pp, vpp=p.virtual_pp,
            sequence_parallel=p.sequence_parallel, recompute=p.activations_checkpoint,
            micro_batch=p.micro_batch_size, global_batch=p.global_batch_size, seq=seqs[stage],
        )
    return layouts


# ---------------------------------------------------------------------------------------------- rules


def check_world_size(ctx: Context) -> None:
    for lay in ctx.layouts.values():
        if lay.tp * lay.pp > lay.gpus:
            ctx.error(lay.key, f"TP {lay.tp} x PP {lay.pp} = {lay.tp * lay.pp} GPUs per model copy, but the stage has "
                      f"only {lay.nodes} node(s) x {lay.gpus // lay.nodes} GPUs = {lay.gpus} (DP < 1)",
                      f"raise {lay.key}.nodes to at least {-(-lay.tp * lay.pp // (lay.gpus // lay.nodes))} "
                      f"or lower tp/pp")
        elif lay.gpus % (lay.tp * lay.pp):
            ctx.error(lay.key, f"{lay.nodes} node(s) x {lay.gpus // lay.nodes} GPUs = {lay.gpus} is not TP {lay.tp} x "
                      f"PP {lay.pp} x DP for any whole DP", f"choose tp and pp whose product divides {lay.gpus}")


def check_heads(ctx: Context) -> None:
    d = ctx.dims
    for lay in ctx.layouts.values():
        bad = [f"{n} {name}" for name, n in (("attention heads", d.num_attention_heads),
                                             ("query groups", d.num_query_groups)) if n % lay.tp]
        if bad:
            ok = [t for t in range(1, lay.gpus + 1) if d.num_attention_heads % t == 0 and d.num_query_groups % t == 0
                  and lay.gpus % t == 0]
            ctx.error(f"{lay.key}.tp", f"the model's {' and '.join(bad)} are not divisible by TP {lay.tp}",
                      f"use a tp dividing both {d.num_attention_heads} heads and {d.num_query_groups} query groups "
                      f"(and the stage's {lay.gpus} GPUs): {', '.join(map(str, ok))}")


def check_layers(ctx: Context) -> None:
    layers = ctx.dims.num_layers
    for lay in ctx.layouts.values():
        if layers % lay.pp:
            ctx.error(f"{lay.key}.pp", f"the model's {layers} layers are not divisible by PP {lay.pp}",
                      f"use a pp dividing {layers}")
        if lay.vpp:
            if lay.pp < 2:
                ctx.error(f"{lay.key}.virtual_pp", "interleaving needs pipeline parallelism (pp >= 2)",
                          f"set {lay.key}.virtual_pp=null or raise pp")
            elif layers % (lay.pp * lay.vpp):
                ctx.error(f"{lay.key}.virtual_pp", f"{layers} layers are not divisible by PP {lay.pp} x VPP "
                          f"{lay.vpp} = {lay.pp * lay.vpp} model chunks", f"use a virtual_pp with pp*virtual_pp "
                          f"dividing {layers}")
        if lay.sequence_parallel and lay.tp == 1:
            ctx.warn(f"{lay.key}.sequence_parallel", "sequence parallelism does nothing at tp=1 (NeMo turns it off)",
                     f"set {lay.key}.sequence_parallel=false")


def check_batches(ctx: Context) -> None:
    for lay in ctx.layouts.values():
        if lay.dp and lay.global_batch % (lay.micro_batch * lay.dp):
            ctx.error(f"{lay.key}.global_batch_size", f"{lay.global_batch} is not divisible by micro batch "
                      f"{lay.micro_batch} x DP {lay.dp} = {lay.micro_batch * lay.dp}",
                      f"use a multiple of {lay.micro_batch * lay.dp}")


def check_ppo(ctx: Context) -> None:
    spec, actor, critic = ctx.spec, ctx.layouts["ppo"], ctx.layouts["critic"]
    p, par = spec.ppo, spec.parallel
    inference = par.critic.inference_micro_batch_size
    if critic.dp and inference * critic.dp > par.ppo.rollout_micro_batch_size:
        ctx.error("parallel.critic.inference_micro_batch_size",
                  f"{inference} x critic DP {critic.dp} = {inference * critic.dp} exceeds "
                  f"parallel.ppo.rollout_micro_batch_size {par.ppo.rollout_micro_batch_size} (NeMo-Aligner requires "
                  "trainer.ppo.inference_micro_batch_size * DP <= model.ppo.rollout_micro_batch_size)",
                  f"set inference_micro_batch_size <= {par.ppo.rollout_micro_batch_size // critic.dp} or raise "
                  "rollout_micro_batch_size")
    step = par.ppo.rollout_micro_batch_size * actor.dp
    if actor.dp and p.rollout_batch_size % step:
        ctx.error("ppo.rollout_batch_size", f"{p.rollout_batch_size} rollout samples are not divisible by rollout "
                  f"micro batch {par.ppo.rollout_micro_batch_size} x actor DP {actor.dp} = {step} (NeMo-Aligner's "
                  "rollout dataloader: num_rollout_samples is its global batch)", f"use a multiple of {step}")
    if p.rollout_batch_size % p.num_mini_batches == 0:
        mini = p.rollout_batch_size // p.num_mini_batches
        if par.ppo.global_batch_size != mini:
            ctx.error("parallel.ppo.global_batch_size", f"{par.ppo.global_batch_size} is not ppo.rollout_batch_size "
                      f"{p.rollout_batch_size} / ppo.num_mini_batches {p.num_mini_batches} = {mini} (the PPO mini "
                      "batch: samples per actor optimizer step)", f"set parallel.ppo.global_batch_size={mini}")
    if p.prompt_max_length + p.response_length > ctx.dims.seq_length:
        ctx.error("ppo.prompt_max_length + ppo.response_length", f"{p.prompt_max_length} + {p.response_length} = "
                  f"{p.prompt_max_length + p.response_length} exceeds the model's sequence length "
                  f"{ctx.dims.seq_length}", "shorten prompts or responses")
    if p.ppo_epochs != 1:
        ctx.error("ppo.ppo_epochs", f"{p.ppo_epochs}: NeMo-Aligner makes exactly one pass over each rollout",
                  "set ppo.ppo_epochs=1 (use more mini batches per rollout instead)")
    if p.kl_estimator != "k1":
        ctx.error("ppo.kl_estimator", f"{p.kl_estimator!r}: NeMo-Aligner only has the log-ratio (k1) estimator",
                  "set ppo.kl_estimator=k1")
    if p.whiten_rewards:
        ctx.error("ppo.whiten_rewards", "NeMo-Aligner cannot whiten rewards per batch",
                  "set ppo.whiten_rewards=false")
    if p.missing_eos_penalty is not None:
        ctx.warn("ppo.missing_eos_penalty", "NeMo-Aligner has no missing-EOS penalty: it is ignored at large scale",
                 "set ppo.missing_eos_penalty=null to say so, or compare scales knowing this differs")
    if p.temperature != 1.0:
        ctx.warn("ppo.temperature", f"{p.temperature}: NeMo-Aligner samples at it but computes log-probs (KL, PPO "
                 "ratios) from the raw logits, TRL from logits / temperature: the two scales optimise different "
                 "objectives", "set ppo.temperature=1.0 (see `nemo-rlhf parity config`)")


def check_lengths(ctx: Context) -> None:
    for key in ("sft.max_length", "rm.max_length"):
        stage = key.split(".")[0]
        length = getattr(ctx.spec, stage).max_length
        if length > ctx.dims.seq_length:
            ctx.error(key, f"{length} exceeds the model's sequence length {ctx.dims.seq_length}",
                      f"set {key} <= {ctx.dims.seq_length}")


def _estimates(ctx: Context, lay: StageLayout, par: memory.Parallelism) -> list[memory.MemoryEstimate]:
    """Every memory phase of one stage at layout `par`."""
    spec, dims = ctx.spec, ctx.dims
    precision, dist = spec.cluster.precision, spec.cluster.distributed_optimizer
    batch = lay.micro_batch * (2 if lay.stage == "rm" else 1)  # an RM micro batch of pairs runs 2 sequences each
    train = memory.training_parts(dims, par, lay.seq, batch, lay.global_batch * (batch // lay.micro_batch),
                                  precision, dist)
    if lay.stage == "ppo":
        host = (memory.swapped_model_part("reference policy", dims, par, precision),)
        rollout = spec.parallel.ppo.rollout_micro_batch_size
        return [memory.MemoryEstimate(lay.stage, "train", tuple(train), host),
                memory.MemoryEstimate(lay.stage, "generate", tuple(memory.generation_parts(
                    dims, par, lay.seq, rollout, precision)), host)]
    host = (memory.swapped_model_part("reward model", dims, par, precision),) if lay.stage == "critic" else ()
    return [memory.MemoryEstimate(lay.stage, "train", tuple(train), host)]


def check_memory(ctx: Context) -> None:
    limit = ctx.spec.cluster.gpu_memory_gb * memory.GB
    for lay in ctx.layouts.values():
        if not lay.dp:
            continue  # the layout itself is wrong; already reported
        estimates = _estimates(ctx, lay, lay.parallelism())
        ctx.estimates += estimates
        for est in estimates:
            if est.total > limit:
                ctx.error(lay.key, f"estimated {est.total / memory.GB:.1f} GB per GPU exceeds cluster.gpu_memory_gb "
                          f"{ctx.spec.cluster.gpu_memory_gb:g} ({est.describe()})",
                          "raise tp/pp or nodes, use the distributed optimizer, lower micro_batch_size, or set "
                          "activations_checkpoint=full")


def _fits_comfortably(ctx: Context, lay: StageLayout, **changes) -> bool:
    """Every phase of `lay` changed by `changes` fits within WASTE_HEADROOM of the GPU: an estimate
    within 10% of the limit is no reason to give up a memory saving."""
    limit = WASTE_HEADROOM * ctx.spec.cluster.gpu_memory_gb * memory.GB
    return all(e.total <= limit for e in _estimates(ctx, lay, lay.parallelism(**changes)))


def check_waste(ctx: Context) -> None:
    """Warnings (never errors) for legal layouts that cost speed for memory the stage does not need."""
    for lay in ctx.layouts.values():
        if not lay.dp:
            continue  # the layout itself is wrong; already reported
        if lay.tp > lay.gpus // lay.nodes:
            ctx.warn(f"{lay.key}.tp", f"TP {lay.tp} spans nodes ({lay.gpus // lay.nodes} GPUs per node): tensor "
                     "parallel all-reduces then cross the network", "keep tp <= cluster.gpus_per_node; use pp")
        if not _fits_comfortably(ctx, lay):
            continue  # tight already: every memory saving is earning its cost
        if lay.pp > 1 and _fits_comfortably(ctx, lay, pp=1, vpp=1, dp=lay.dp * lay.pp):
            ctx.warn(f"{lay.key}.pp", f"the model fits at TP {lay.tp} without pipeline parallelism "
                     f"(PP 1, DP {lay.dp * lay.pp}); PP {lay.pp} only adds pipeline bubbles",
                     f"set {lay.key}.pp=1")
        if lay.recompute and _fits_comfortably(ctx, lay, recompute=None):
            ctx.warn(f"{lay.key}.activations_checkpoint", f"{lay.recompute} recomputation is not needed: the stage "
                     "fits with every activation kept, and recomputing them costs compute (full: up to a third more)",
                     f"set {lay.key}.activations_checkpoint=null")


RULES = (check_world_size, check_heads, check_layers, check_batches, check_ppo, check_lengths, check_memory,
         check_waste)


def run_preflight(spec: PipelineSpec) -> PreflightReport:
    """Check a large-scale spec's layouts, batches and memory.

    Returns:
        The report (layouts, memory estimates, warnings); a small-scale spec gets an empty one.

    Raises:
        UserError: listing every problem found, each with its key and fix (exit code 2).
    """
    if spec.scale != "large":
        return PreflightReport()
    ctx = Context(spec, model_dims(spec), stage_layouts(spec))
    for rule in RULES:
        rule(ctx)
    if ctx.errors:
        noun = "problem" if len(ctx.errors) == 1 else "problems"
        lines = "\n".join(f"  - {e.render()}" for e in ctx.errors)
        raise UserError(f"preflight found {len(ctx.errors)} {noun}:\n{lines}", where=spec.name,
                        fix="change the keys above (each line says how), then run `nemo-rlhf preflight` again")
    return PreflightReport(ctx.layouts, ctx.estimates, ctx.warnings)
