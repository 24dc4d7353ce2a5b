"""Small-scale specs on SLURM: one CPU job per stage, each running `nemo-rlhf run --until <stage>`.

The jobs form a chain (base -> sft -> rm [-> gold_rm] -> ppo [-> gate] -> eval; the bracketed stages
only when the spec enables them): the small-scale runner locks the run
directory and runs stages in order, so two of them must never run at once. Each job runs the
same command a user would type, so a job skips whatever finished before (lineage manifests),
and a requeued job (`--requeue`, logs opened with `--open-mode=append`) simply carries on.

Every value that reaches a script is quoted (`shlex.quote`); a value with a newline or another
control character cannot be quoted for `#SBATCH` lines and is refused.
"""

from __future__ import annotations

import shlex
import string
import sys
from pathlib import Path
from typing import Sequence

from nemo_rlhf.errors import UserError
from nemo_rlhf.slurm.quoting import refuse_control_chars, sbatch_quote
from nemo_rlhf.slurm.stages import RenderedStage
from nemo_rlhf.spec.schema import PipelineSpec

LOG_DIR = Path("slurm") / "logs"  # under the run directory

SCRIPT = string.Template(
    """#!/bin/bash
# Stage `${stage}` of the small-scale pipeline `${name}` (TRL on CPU), written by nemo-rlhf.
# `nemo-rlhf slurm submit` queues the stages in order, each with --dependency=afterok on the one before.
#SBATCH --job-name=${job_name}
#SBATCH --output=${stdout}
#SBATCH --error=${stderr}
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --time=${time_limit}
${cluster_directives}
# A requeued job appends to the same logs and `nemo-rlhf run` skips the stages already finished.
set -euo pipefail
attempt="[nemo-rlhf] stage ${stage}: job $${SLURM_JOB_ID:-?} on $${SLURMD_NODENAME:-?}"
attempt="$$attempt, restart $${SLURM_RESTART_COUNT:-0}"
echo "$$attempt"; echo "$$attempt" >&2  # both logs: `slurm status` shows a failure's stderr from here on
cd -- ${workdir}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec ${python} -m nemo_rlhf run ${spec}${overrides} --out ${run_dir} --until ${stage}
"""
)


def refuse_log_path_patterns(path: Path) -> Path:
    """Return `path`, or raise a UserError when SLURM would rewrite it as a log file name.

    sbatch expands `%j`, `%x`... in --output/--error and treats a backslash there specially;
    `scontrol` then shows such paths differently from the file actually written.
    """
    bad = sorted({c for c in str(path) if c in "%\\"})
    if bad:
        raise UserError(
            f"the run directory {str(path)!r} contains {' and '.join(repr(c) for c in bad)}, which SLURM "
            "rewrites in log file names (%j is the job id)",
            where="--out",
            fix="choose a run directory without '%' or backslashes",
        )
    return path


def render_small_scale(
    spec: PipelineSpec,
    spec_path: Path,
    overrides: Sequence[str],
    run_dir: Path,
    script_dir: Path,
    python: str | None = None,
    workdir: Path | None = None,
) -> list[RenderedStage]:
    """Write one sbatch script per small-scale stage into `script_dir`.

    Args:
        spec: the loaded spec (already validated); `cluster.partition`, `cluster.account` and
            `cluster.time_limit` become #SBATCH options when set.
        spec_path: the spec file the jobs load (with `overrides`) when they run.
        overrides: the dotted overrides given on the command line, passed on unchanged.
        run_dir: the run directory the stages write into (RUN_DIR/<stage>/); logs go to RUN_DIR/slurm/logs/.
        script_dir: where the `<stage>.sbatch` files are written.
        python: the interpreter the jobs run; default: this one (the venv nemo-rlhf is installed in).
        workdir: the directory jobs start in (relative paths in overrides are relative to it); default: cwd.

    Returns:
        The stages in order, each after the one before.

    Raises:
        UserError: when a name, path or override holds a newline or control character, or the
            run directory a `%` or backslash.
    """
    values = {
        "spec": str(Path(spec_path).resolve()),
        "run_dir": str(Path(run_dir).resolve()),
        "python": python or sys.executable,
        "workdir": str((workdir or Path.cwd()).resolve()),
    }
    for key, value in values.items():
        refuse_control_chars(value, key)
    for override in overrides:
        refuse_control_chars(override, "override")
    refuse_log_path_patterns(Path(values["run_dir"]))
    directives = _cluster_directives(spec)
    from nemo_rlhf.pipeline.stages import STAGES, stage_enabled  # imports torch and TRL (~5 s): past the checks

    # A stage the spec turns off (gold_rm, gate) gets no job: the runner passes over it and writes no
    # manifest, so `resume` would take it for unfinished and run it, and what follows it, again.
    names = [s.name for s in STAGES if stage_enabled(s, spec)]
    run_dir, script_dir = Path(values["run_dir"]), Path(script_dir)
    (run_dir / LOG_DIR).mkdir(parents=True, exist_ok=True)
    script_dir.mkdir(parents=True, exist_ok=True)
    stages = []
    for i, stage in enumerate(names):
        text = SCRIPT.substitute(
            stage=stage,
            name=spec.name,
            job_name=sbatch_quote(refuse_control_chars(f"{spec.name}-{stage}", "name")),
            stdout=sbatch_quote(str(run_dir / LOG_DIR / f"{stage}.out")),
            stderr=sbatch_quote(str(run_dir / LOG_DIR / f"{stage}.err")),
            time_limit=sbatch_quote(refuse_control_chars(spec.cluster.time_limit, "cluster.time_limit")),
            cluster_directives=directives,
            workdir=shlex.quote(values["workdir"]),
            python=shlex.quote(values["python"]),
            spec=shlex.quote(values["spec"]),
            overrides="".join(" " + shlex.quote(o) for o in overrides),
            run_dir=shlex.quote(values["run_dir"]),
        )
        script = script_dir / f"{stage}.sbatch"
        script.write_text(text)
        stages.append(RenderedStage(name=stage, script=script, after=(names[i - 1],) if i else ()))
    return stages


def _cluster_directives(spec: PipelineSpec) -> str:
    """#SBATCH lines for the optional `cluster:` settings that apply to CPU jobs."""
    options = {"partition": spec.cluster.partition, "account": spec.cluster.account}
    lines = [
        f"#SBATCH --{key}={sbatch_quote(refuse_control_chars(value, f'cluster.{key}'))}"
        for key, value in options.items()
        if value
    ]
    return "\n".join(lines)
