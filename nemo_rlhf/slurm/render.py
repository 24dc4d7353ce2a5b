"""Render a `scale: large` spec: NeMo-Aligner configs and one sbatch script per stage.

    [data] + convert -> sft -> rm -> ppo -> export -> eval

`data` (a CPU-only job) is there when the spec gives no `cluster.data.*` files: it writes the
NeMo-Aligner jsonl files from the small-scale rows (`nemo-rlhf data prepare-aligner`) into
RUN_DIR/data/, and the configs read them from there.

`render_pipeline(spec, out_dir)` writes into `out_dir` (the run directory; it must be on the
cluster's shared filesystem and is mounted into the container at the same path):

    <stage>.sbatch                 one per stage (ppo: one heterogeneous job)
    configs/{sft,rm,ppo_actor,ppo_critic}.yaml   full NeMo-Aligner configs (nemo_rlhf.slurm.aligner_config)
    data/                          the NeMo-Aligner data files (when the spec names none)
    spec.yaml                      the resolved spec (the eval stage reads it)
    logs/                          sbatch and srun output, one pair of files per stage / component
    convert/ sft/ rm/ ppo/ export/ eval/   what each stage writes, and its manifest.json

Every script exports NEMO_RLHF_STAGE_STARTED_AT, removes its stage's old manifest, runs its steps
and, when they all succeeded, `nemo-rlhf lineage record-stage` (in the container, one task), which
writes RUN_DIR/<stage>/manifest.json: how `slurm resume` knows the stage has finished. The data
stage's own command writes that manifest.

It runs preflight first (nothing is written for a spec that would fail on the cluster). Every value
reaching a script is quoted by the templates' filters (`q` for shell words, `sq` for #SBATCH lines);
strings with a control character are refused up front, with the spec key that holds them.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

import jinja2
import yaml

from nemo_rlhf.errors import UserError
from nemo_rlhf.lineage.manifest import MANIFEST
from nemo_rlhf.lineage.record import STARTED_ENV
from nemo_rlhf.slurm import aligner_config
from nemo_rlhf.slurm.aligner_config import StagePaths
from nemo_rlhf.slurm.preflight import StageLayout, run_preflight
from nemo_rlhf.slurm.quoting import control_chars, sbatch_quote, shell_quote
from nemo_rlhf.slurm.stages import RenderedStage
from nemo_rlhf.spec.architectures import model_dims
from nemo_rlhf.spec.loader import spec_to_dict
from nemo_rlhf.spec.schema import PipelineSpec

TEMPLATES = Path(__file__).parent / "templates"
STAGES = ("convert", "sft", "rm", "ppo", "export", "eval")
AFTER = {"convert": (), "sft": ("convert",), "rm": ("sft",), "ppo": ("rm",), "export": ("ppo",), "eval": ("export",)}
DATA_FILES = ("sft_train", "sft_val", "rm_train", "rm_val", "ppo_train", "ppo_val")  # = aligner_format.FILES
SCRIPTS = {  # NeMo-Aligner entry points, relative to cluster.aligner_repo
    "sft": "examples/nlp/gpt/train_gpt_sft.py",
    "rm": "examples/nlp/gpt/train_reward_model.py",
    "ppo_critic": "examples/nlp/gpt/serve_ppo_critic.py",
    "ppo_actor": "examples/nlp/gpt/train_gpt_ppo_actor.py",
}
# Run a NeMo-Aligner script as its docs do: from the repo, on PYTHONPATH, full Hydra errors. The
# repo and the command come in as arguments ($1, then "$@"), never pasted into this string.
ALIGNER_LAUNCH = 'cd "$1" && export PYTHONPATH="$1${PYTHONPATH:+:$PYTHONPATH}" HYDRA_FULL_ERROR=1 && shift && exec "$@"'
MODEL_DIR = "model"  # an exported HF checkpoint: <run>/export/<stage>/model (as the small-scale stages write)


@dataclass(frozen=True)
class RunPaths:
    """Every path of a rendered run (as both the host and the container see them)."""

    root: Path

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def configs(self) -> Path:
        return self.root / "configs"

    @property
    def base_nemo(self) -> Path:
        return self.root / "convert" / "base.nemo"

    def results(self, config: str) -> Path:
        """exp_manager.explicit_log_dir of a NeMo-Aligner config."""
        return {"sft": self.root / "sft" / "results", "rm": self.root / "rm" / "results",
                "ppo_actor": self.root / "ppo" / "actor", "ppo_critic": self.root / "ppo" / "critic"}[config]

    def nemo(self, config: str) -> Path:
        """The .nemo a NeMo-Aligner stage saves at the end (exp_manager.name is the config name)."""
        return self.results(config) / "checkpoints" / f"{config}.nemo"

    def exported(self, stage: str) -> Path:
        return self.root / "export" / stage / MODEL_DIR

    @property
    def data(self) -> Path:
        """Where the data stage writes the NeMo-Aligner jsonl files."""
        return self.root / "data"


@dataclass
class Job:
    """The #SBATCH settings of one job or het-group."""

    name: str
    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    time: str
    account: str | None
    partition: str | None
    exclusive: bool
    output: str = ""
    error: str = ""


@dataclass
class Step:
    comment: str
    argv: list[str]
    output: str
    error: str
    srun_options: tuple[str, ...] = ()  # e.g. one task for a step that is not the training program


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                             autoescape=False, keep_trailing_newline=True, trim_blocks=False)
    env.filters["q"] = shell_quote
    env.filters["sq"] = sbatch_quote
    return env


def _script_values(spec: PipelineSpec, out_dir: Path) -> dict[str, str]:
    """Every spec string that reaches a script, by key (checked once, reported together)."""
    c = spec.cluster
    values = {"name": spec.name, "--out": str(out_dir), "model.path": spec.model.path or "",
              "data.root": spec.data.root, "cluster.container_image": c.container_image or "",
              "cluster.aligner_repo": c.aligner_repo, "cluster.nemo_rlhf_command": c.nemo_rlhf_command,
              "cluster.account": c.account or "", "cluster.partition": c.partition or "",
              "cluster.time_limit": c.time_limit}
    values.update({f"cluster.mounts[{i}]": str(m) for i, m in enumerate(c.mounts)})
    values.update({f"cluster.data.{k}": v or "" for k, v in vars(c.data).items()})
    return values


def check_script_values(spec: PipelineSpec, out_dir: Path) -> None:
    """Refuse (all at once) strings no quoting can carry: control characters anywhere; in paths
    that SLURM or pyxis parse, '%' and backslashes (log file patterns) and ',' (mount lists)."""
    problems = [f"{key}: contains a newline or control character ({', '.join(bad)}): {value!r}"
                for key, value in _script_values(spec, out_dir).items() if (bad := control_chars(value))]
    for char, why in (("%", "SLURM expands %j... in log file names"), ("\\", "SLURM rewrites it in log names"),
                      (",", "pyxis splits --container-mounts at commas"), (":", "pyxis splits a mount at ':'")):
        if char in str(out_dir):
            problems.append(f"--out: {str(out_dir)!r} contains {char!r} ({why})")
    for i, mount in enumerate(spec.cluster.mounts):
        if "," in str(mount):
            problems.append(f"cluster.mounts[{i}]: {mount!r} contains ',' (pyxis splits --container-mounts there)")
    if problems:
        raise UserError("values that cannot be put into an sbatch script safely:\n" +
                        "\n".join(f"  - {p}" for p in problems), where=spec.name,
                        fix="use names and paths without control characters (and without '%', '\\', ',', ':' in "
                            "the run directory)")


def has_data_stage(spec: PipelineSpec) -> bool:
    """True when the spec names no NeMo-Aligner data files (a data stage writes them).

    Raises:
        UserError: some `cluster.data.*` files are given and others not.
    """
    given = vars(spec.cluster.data)
    named = [k for k, v in given.items() if v]
    if named and len(named) != len(given):
        missing = [f"cluster.data.{k}" for k, v in given.items() if not v]
        raise UserError(f"cluster.data names {len(named)} of its {len(given)} files; missing: {', '.join(missing)}",
                        where="cluster.data",
                        fix="give all six NeMo-Aligner files, or none: then a `data` stage writes them from the "
                            "spec's data.* rows (the ones the small-scale run trains on)")
    return not named


def data_files(spec: PipelineSpec, paths: RunPaths) -> dict[str, str]:
    """The six NeMo-Aligner data files the configs read (container paths), by name (sft_train, ...)."""
    if has_data_stage(spec):
        return {name: str(paths.data / f"{name}.jsonl") for name in DATA_FILES}
    return {name: getattr(spec.cluster.data, name) for name in DATA_FILES}


def stage_order(spec: PipelineSpec) -> list[tuple[str, tuple[str, ...]]]:
    """(stage, the stages it waits for) in submission order."""
    if not has_data_stage(spec):
        return [(stage, AFTER[stage]) for stage in STAGES]
    return [("data", ()), *((stage, (*AFTER[stage], "data") if stage == "sft" else AFTER[stage]) for stage in STAGES)]


def _job(spec: PipelineSpec, stage: str, layout: StageLayout | None, paths: RunPaths, suffix: str = "") -> Job:
    c = spec.cluster
    if stage == "data":  # CPU only: tokenizing and writing jsonl files
        return Job(name=f"{spec.name}-data", nodes=1, tasks_per_node=1, gpus_per_node=0, time=c.time_limit,
                   account=c.account, partition=c.partition, exclusive=False,
                   output=str(paths.logs / "data.out"), error=str(paths.logs / "data.err"))
    if layout is None:  # a one-GPU tool stage: convert, export, eval
        nodes, tasks, gpus, time = 1, 1, 1, c.time_limit
    else:
        nodes, tasks, gpus = layout.nodes, c.gpus_per_node, c.gpus_per_node
        time = getattr(spec.parallel, layout.stage).time_limit or c.time_limit
    return Job(name=f"{spec.name}-{stage}{suffix}", nodes=nodes, tasks_per_node=tasks, gpus_per_node=gpus,
               time=time, account=c.account, partition=c.partition, exclusive=c.exclusive,
               output=str(paths.logs / f"{stage}.out"), error=str(paths.logs / f"{stage}.err"))


def _aligner_argv(spec: PipelineSpec, config: str, paths: RunPaths) -> list[str]:
    repo = spec.cluster.aligner_repo
    return ["bash", "-c", ALIGNER_LAUNCH, "nemo-aligner", repo, "python", "-u", f"{repo.rstrip('/')}/{SCRIPTS[config]}",
            f"--config-path={paths.configs}", f"--config-name={config}"]


def _tool_argv(spec: PipelineSpec, *args: str) -> list[str]:
    return [*shlex.split(spec.cluster.nemo_rlhf_command), *args]


def _step(comment: str, argv: list[str], paths: RunPaths, log: str) -> Step:
    return Step(comment, argv, str(paths.logs / f"{log}.%j.%t.out"), str(paths.logs / f"{log}.%j.%t.err"))


def _tool_steps(spec: PipelineSpec, stage: str, paths: RunPaths) -> list[Step]:
    if stage == "data":
        return [_step("the NeMo-Aligner data files from the small-scale rows, checked token for token against "
                      "the TRL formatting (writes data/manifest.json last)",
                      _tool_argv(spec, "data", "prepare-aligner", str(paths.root / "spec.yaml"), "--out",
                                 str(paths.data)), paths, "data")]
    if stage == "convert":
        return [_step("HF -> .nemo with the conversion certificate (nemo-rlhf convert)", _tool_argv(
            spec, "convert", "hf-to-nemo", "--hf", spec.model.path, "--out", str(paths.base_nemo), "--overwrite"),
            paths, "convert")]
    if stage == "export":
        return [_step(f"{name} .nemo -> HF", _tool_argv(spec, "convert", "nemo-to-hf", "--nemo", str(paths.nemo(cfg)),
                                                         "--out", str(paths.exported(name)), "--overwrite"),
                      paths, f"export-{name}")
                for name, cfg in (("sft", "sft"), ("rm", "rm"), ("ppo", "ppo_actor"))]
    return [_step("the small-scale evaluation on the exported HF checkpoints (one GPU)",
                  _tool_argv(spec, "slurm", "eval-exported", str(paths.root / "spec.yaml"), str(paths.root)),
                  paths, "eval")]


def render_pipeline(spec: PipelineSpec, out_dir: Path) -> list[RenderedStage]:
    """Write every stage's sbatch script and NeMo-Aligner configs into `out_dir`.

    Returns:
        The stages in submission order, each with the stages it must wait for.

    Raises:
        UserError: the spec is not large scale, fails preflight, or holds a value no script can carry.
    """
    if spec.scale != "large":
        raise UserError(f"scale is {spec.scale!r}: this renderer writes NeMo-Aligner jobs for large-scale specs",
                        where="scale", fix="set scale=large (small-scale specs go through the small-scale launcher)")
    out_dir = Path(out_dir).absolute()
    check_script_values(spec, out_dir)
    report = run_preflight(spec)
    dims, paths = model_dims(spec), RunPaths(out_dir)
    paths.configs.mkdir(parents=True, exist_ok=True)
    paths.logs.mkdir(parents=True, exist_ok=True)
    (out_dir / "spec.yaml").write_text(yaml.safe_dump(spec_to_dict(spec), sort_keys=False), encoding="utf-8")
    _write_configs(spec, report.layouts, dims, paths)
    env = _environment()
    common = {"name": spec.name, "container": container_flags(spec, out_dir), "runtime": spec.cluster.runtime}
    rendered = []
    files = data_files(spec, paths)
    for stage, after in stage_order(spec):
        record = _record_step(spec, stage, paths, files, after)
        manifest = str(paths.root / stage / MANIFEST)
        if stage == "ppo":
            text = env.get_template("ppo.sbatch.j2").render(
                **common, critic_job=_job(spec, "ppo", report.layouts["critic"], paths, "-critic"),
                actor_job=_job(spec, "ppo", report.layouts["ppo"], paths, "-actor"),
                port=spec.parallel.critic.port, nccl_algo=spec.cluster.nccl_algo,
                critic_startup_s=spec.cluster.critic_startup_s,
                mkdirs=[str(paths.logs), str(paths.results("ppo_critic")), str(paths.results("ppo_actor"))],
                critic=_step("critic", _aligner_argv(spec, "ppo_critic", paths), paths, "ppo-critic"),
                actor=_step("actor", _aligner_argv(spec, "ppo_actor", paths), paths, "ppo-actor"),
                record=record, manifest=manifest, started_env=STARTED_ENV)
        else:
            layout = report.layouts.get(stage) if stage in ("sft", "rm") else None
            if layout is not None:
                steps = [_step(f"NeMo-Aligner {SCRIPTS[stage]}", _aligner_argv(spec, stage, paths), paths, stage)]
                mkdirs = [str(paths.logs), str(paths.results(stage))]
            else:
                steps = _tool_steps(spec, stage, paths)
                mkdirs = [str(paths.logs), str(out_dir / stage)]
            text = env.get_template("stage.sbatch.j2").render(
                **common, job=_job(spec, stage, layout, paths), stage=stage, what=_WHAT[stage],
                steps=steps + ([record] if record else []), mkdirs=mkdirs, manifest=manifest,
                started_env=STARTED_ENV, resume=_RESUME["aligner" if layout else stage if stage == "data" else "tool"])
        script = out_dir / f"{stage}.sbatch"
        script.write_text(text, encoding="utf-8")
        rendered.append(RenderedStage(name=stage, script=script, after=after))
    return rendered


def container_flags(spec: PipelineSpec, out_dir: Path) -> list[str]:
    """The pyxis flags of every srun (each one shell word, quoted by the templates); none in host mode.

    `cluster.runtime: host` runs the same commands on the nodes themselves: for clusters without
    pyxis, and for the local test cluster (slurm/local/), where stand-in programs replace NeMo-Aligner.
    """
    if spec.cluster.runtime == "host":
        return []
    mounts = ",".join([*map(str, spec.cluster.mounts), f"{out_dir}:{out_dir}"])
    return ["--no-container-mount-home", f"--container-image={spec.cluster.container_image}",
            f"--container-mounts={mounts}"]


def _record_step(spec: PipelineSpec, stage: str, paths: RunPaths, files: dict[str, str],
                 after: tuple[str, ...]) -> Step | None:
    """`nemo-rlhf lineage record-stage` for a stage (None for `data`, whose command writes its manifest)."""
    configs, inputs, outputs, parents = [], [], [], list(after)
    if stage == "data":
        return None
    if stage == "convert":
        inputs, outputs = [spec.model.path], [paths.base_nemo]
    elif stage in ("sft", "rm"):
        configs, outputs = [paths.configs / f"{stage}.yaml"], [paths.nemo(stage)]
        inputs = [files[f"{stage}_train"], files[f"{stage}_val"]]
    elif stage == "ppo":  # the critic is stopped, not finished: only the actor saves its .nemo
        configs = [paths.configs / "ppo_actor.yaml", paths.configs / "ppo_critic.yaml"]
        inputs, outputs, parents = [files["ppo_train"], files["ppo_val"]], [paths.nemo("ppo_actor")], ["sft", "rm"]
    elif stage == "export":
        outputs, parents = [paths.exported(s) for s in ("sft", "rm", "ppo")], ["sft", "rm", "ppo"]
    else:  # eval
        outputs = [paths.root / "eval"]
    if stage == "rm" and spec.rm.init_from != "sft":
        parents = ["convert"]
    if has_data_stage(spec) and stage in ("sft", "rm", "ppo") and "data" not in parents:
        parents.append("data")
    argv = ["lineage", "record-stage", str(paths.root), stage]
    for flag, values in (("--config", configs), ("--input", inputs), ("--output", outputs), ("--parent", parents)):
        for value in values:
            argv += [flag, str(value)]
    step = _step(f"lineage: RUN_DIR/{stage}/manifest.json marks the stage finished (slurm resume skips it)",
                 _tool_argv(spec, *argv), paths, f"{stage}-record")
    step.srun_options = ("--nodes=1", "--ntasks=1")
    return step


_RESUME = {"aligner": "NeMo resumes from its last checkpoint (exp_manager.resume_if_exists).",
           "tool": "the step starts over (--overwrite replaces a partial output).",
           "data": "the files are written again (each one atomically, the manifest last)."}
_WHAT = {"data": "NeMo-Aligner data files", "convert": "HF -> .nemo", "sft": "supervised fine-tuning",
         "rm": "reward model",
         "export": ".nemo -> HF", "eval": "evaluation"}


def _write_configs(spec: PipelineSpec, layouts: dict[str, StageLayout], dims, paths: RunPaths) -> None:
    d = data_files(spec, paths)
    rm_start = paths.nemo("sft") if spec.rm.init_from == "sft" else paths.base_nemo
    stage_paths = {
        "sft": StagePaths(str(paths.results("sft")), str(paths.base_nemo), d["sft_train"], d["sft_val"]),
        "rm": StagePaths(str(paths.results("rm")), str(rm_start), d["rm_train"], d["rm_val"]),
        "ppo_actor": StagePaths(str(paths.results("ppo_actor")), str(paths.nemo("sft")), d["ppo_train"],
                                d["ppo_val"]),
        "ppo_critic": StagePaths(str(paths.results("ppo_critic")), str(paths.nemo("rm"))),
    }
    for config, layout_name in aligner_config.CONFIG_LAYOUT.items():
        cfg = aligner_config.build_config(spec, config, layouts[layout_name], dims, stage_paths[config])
        aligner_config.write_config(cfg, paths.configs / f"{config}.yaml")
