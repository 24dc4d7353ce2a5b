"""The pipeline as a SLURM job DAG: submit, status, cancel, resume.

`submit_dag` queues rendered stages with `--dependency=afterok:` on the stages they come
after and records every job in RUN_DIR/slurm/jobs.json (rewritten atomically after each
change). A stage is finished when RUN_DIR/<stage>/manifest.json exists: stages write it
last and rename their directory into place, as the small-scale runner does. `resume`
resubmits the stages that are not finished and everything that comes after them.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from nemo_rlhf.atomic_file import write_text_atomic
from nemo_rlhf.errors import UserError
from nemo_rlhf.lineage.manifest import MANIFEST, now_iso
from nemo_rlhf.slurm import sbatch
from nemo_rlhf.slurm.stages import RenderedStage

JOBS_FILE = Path("slurm") / "jobs.json"
FORMAT = 1
TAIL_LINES = 20
# Why a pending job will never start: one of the stages it waits for failed.
NEVER = "DependencyNeverSatisfied"
# A job step's own log beside the batch logs: <step>.<job id>.<task>.{out,err} (the large-scale
# scripts' srun --output/--error patterns <step>.%j.%t.out): a program's error is there, not in <stage>.err.
STEP_LOG = re.compile(r"^(?P<step>.+)\.(?P<job>\d+)\.(?P<task>\d+)\.(?P<stream>out|err)$")
# The first line of every attempt in a stage's batch logs (both renderers' scripts write it): the
# logs are appended to across requeues and resumes, and a failure's tail starts at its own attempt.
ATTEMPT_MARK = "[nemo-rlhf] stage "
MAX_STEP_LOGS = 4  # a failed stage's tail shows at most this many step logs (each task has its own)


@dataclass
class StageJob:
    """One stage's job as recorded in jobs.json; `earlier_jobs` holds the ids of jobs resume replaced."""

    name: str
    script: str
    after: list[str]
    job_id: str
    stdout: str
    stderr: str
    submitted_at: str
    earlier_jobs: list[str] = field(default_factory=list)


@dataclass
class StageStatus:
    """What `status` reports for one stage."""

    name: str
    job_id: str
    state: str  # SLURM's JobState; UNKNOWN when SLURM forgot the job and no manifest says it finished
    reason: str
    elapsed: str
    finished: bool  # RUN_DIR/<stage>/manifest.json exists
    stdout: str
    stderr: str
    blocked: bool = False  # pending forever: a stage it waits for (directly or not) failed
    log_tail: list[str] = field(default_factory=list)  # last lines of a failed stage's logs

    @property
    def failed(self) -> bool:
        return self.state in sbatch.TERMINAL_STATES and self.state != "COMPLETED" and not self.finished


def jobs_path(run_dir: Path) -> Path:
    return Path(run_dir) / JOBS_FILE


def read_jobs(run_dir: Path) -> dict:
    """The recorded DAG of RUN_DIR, or a UserError when nothing was submitted there."""
    path = jobs_path(run_dir)
    if not path.is_file():
        raise UserError(
            f"no SLURM jobs recorded in {run_dir} ({JOBS_FILE} is missing)",
            where=str(run_dir),
            fix="pass the RUN_DIR given to `nemo-rlhf slurm submit SPEC --out RUN_DIR`",
        )
    record = json.loads(path.read_text())
    record["stages"] = [StageJob(**s) for s in record["stages"]]
    return record


def write_jobs(run_dir: Path, record: dict) -> None:
    """Write jobs.json atomically (temporary file + rename): readers never see half a file."""
    data = {**record, "stages": [asdict(s) for s in record["stages"]]}
    write_text_atomic(jobs_path(run_dir), json.dumps(data, indent=2) + "\n")


def stage_finished(run_dir: Path, name: str) -> bool:
    """A stage has finished when its lineage manifest is in place."""
    return (Path(run_dir) / name / MANIFEST).is_file()


def submit_dag(stages: Sequence[RenderedStage], run_dir: Path, meta: dict) -> dict:
    """Submit `stages` in order, each after the stages it names, and record the jobs in RUN_DIR.

    Args:
        stages: from a renderer; every `after` name must be an earlier stage.
        run_dir: the run directory; jobs.json goes to RUN_DIR/slurm/.
        meta: what to record beside the jobs (spec path, overrides, scale).

    Returns:
        The record written to jobs.json.

    Raises:
        UserError: when RUN_DIR already has jobs queued or running, or sbatch refuses a script
            (the jobs already queued by this call are then cancelled).
    """
    if jobs_path(run_dir).is_file():
        active = [s for s in dag_status(run_dir) if s.state not in sbatch.TERMINAL_STATES and s.state != "UNKNOWN"]
        if active:
            raise UserError(
                f"{run_dir} already has queued or running stages: "
                + ", ".join(f"{s.name} (job {s.job_id}, {s.state})" for s in active),
                where=str(run_dir),
                fix=f"watch it with `nemo-rlhf slurm status {run_dir}`, or cancel it first",
            )
    record = {"format": FORMAT, "run_dir": str(Path(run_dir).resolve()), **meta, "stages": []}
    _submit(stages, record, run_dir, already_finished=set())
    return record


def _submit(stages: Sequence[RenderedStage], record: dict, run_dir: Path, already_finished: set[str]) -> None:
    """Queue `stages`; dependencies on `already_finished` stages are dropped (they cannot fail any more)."""
    ids = {s.name: s.job_id for s in record["stages"]}
    submitted: list[str] = []
    for stage in stages:
        unknown = [a for a in stage.after if a not in ids and a not in already_finished]
        if unknown:
            raise ValueError(f"stage {stage.name} comes after {unknown}, which are not earlier stages")
        try:
            job_id = sbatch.submit(stage.script, [ids[a] for a in stage.after if a not in already_finished])
        except UserError:
            sbatch.cancel(submitted)  # nothing half-queued stays behind
            raise
        submitted.append(job_id)
        ids[stage.name] = job_id
        stdout, stderr = sbatch.job_log_paths(job_id)
        job = StageJob(stage.name, str(stage.script), list(stage.after), job_id, stdout, stderr, now_iso())
        _replace_stage(record, job)
        write_jobs(run_dir, record)


def _replace_stage(record: dict, job: StageJob) -> None:
    for i, old in enumerate(record["stages"]):
        if old.name == job.name:
            job.earlier_jobs = [*old.earlier_jobs, old.job_id]
            record["stages"][i] = job
            return
    record["stages"].append(job)


def dag_status(run_dir: Path, tail: int = TAIL_LINES) -> list[StageStatus]:
    """Each recorded stage's state from SLURM, with the log tail of stages that failed."""
    statuses: dict[str, StageStatus] = {}
    for job in read_jobs(run_dir)["stages"]:
        info = sbatch.job_info(job.job_id)
        finished = stage_finished(run_dir, job.name)
        if info is None:  # SLURM forgot the job (MinJobAge passed, or the cluster restarted)
            state, reason, elapsed = ("COMPLETED" if finished else "UNKNOWN"), "job no longer known to SLURM", ""
        else:
            state, reason, elapsed = info.state, info.reason, info.run_time
        status = StageStatus(job.name, job.job_id, state, reason, elapsed, finished, job.stdout, job.stderr)
        if status.failed:
            ids = set(info.component_ids if info and info.component_ids else (job.job_id,))
            status.log_tail = failure_tail(job, ids, tail)
        # SLURM says DependencyNeverSatisfied only for the direct children of a failed job; their
        # own children just wait on "Dependency", forever.
        waits_on_dead = any(statuses[a].failed or statuses[a].blocked for a in job.after if a in statuses)
        status.blocked = state == "PENDING" and (reason == NEVER or waits_on_dead)
        statuses[job.name] = status
    return list(statuses.values())


def failure_tail(job: StageJob, job_ids: set[str], lines: int) -> list[str]:
    """The batch log's last lines, then those of the job's step logs that hold errors.

    The batch stderr says which step failed (srun's and the script's own messages); the step's
    stderr says why (the program's traceback). Only this attempt's steps (`job_ids`: the job's
    component ids) are read: a resubmitted stage appends to the same batch logs, not to the old steps'.
    """
    tail = log_tail(job.stderr, lines, last_attempt=True)
    if all(line.startswith(ATTEMPT_MARK) for line in tail):  # nothing on stderr but the attempt's first line
        tail = log_tail(job.stdout, lines, last_attempt=True)
    shown = 0
    for path in step_logs(Path(job.stderr).parent, job_ids, "err"):
        step_tail = log_tail(str(path), lines)
        if step_tail and shown < MAX_STEP_LOGS:
            tail += [f"==> {path} <==", *step_tail]
            shown += 1
    return tail


def step_logs(log_dir: Path, job_ids: set[str], stream: str) -> list[Path]:
    """The step logs (<step>.<job id>.<task>.<stream>) in `log_dir` of the given jobs, by name."""
    try:
        names = sorted(os.listdir(log_dir))
    except OSError:
        return []
    found = []
    for name in names:
        match = STEP_LOG.match(name)
        if match and match["job"] in job_ids and match["stream"] == stream:
            found.append(log_dir / name)
    return found


def log_tail(path: str, lines: int, last_attempt: bool = False) -> list[str]:
    """The last `lines` lines of a log file ([] when it does not exist, or for lines <= 0);
    with `last_attempt`, none from before the file's last ATTEMPT_MARK line."""
    if lines <= 0:  # [-0:] would be the whole file
        return []
    try:
        with open(path, errors="replace") as handle:
            text = handle.read().splitlines()
    except OSError:
        return []
    starts = [i for i, line in enumerate(text) if line.startswith(ATTEMPT_MARK)] if last_attempt else []
    return text[starts[-1] if starts else 0:][-lines:]


def cancel_dag(run_dir: Path) -> list[StageStatus]:
    """Cancel every stage that is still queued or running; returns those stages."""
    pending = [s for s in dag_status(run_dir) if s.state not in sbatch.TERMINAL_STATES and s.state != "UNKNOWN"]
    sbatch.cancel([s.job_id for s in pending])
    return pending


def resume_dag(run_dir: Path) -> list[str]:
    """Resubmit the stages that did not finish and every stage after them.

    Finished stages (their lineage manifest exists) are kept as they are. Stages left pending
    forever behind a failed stage are cancelled and queued again. A stage that runs again loses
    its old manifest first (its script would remove it anyway, once it starts).

    Returns:
        The names of the stages submitted again ([] when every stage had finished).

    Raises:
        UserError: when a stage is still running or waiting on a stage that may yet succeed.
    """
    record = read_jobs(run_dir)
    statuses = dag_status(run_dir, tail=0)
    busy = [s for s in statuses if s.state not in sbatch.TERMINAL_STATES and s.state != "UNKNOWN" and not s.blocked]
    if busy:
        raise UserError(
            "the pipeline is still going: " + ", ".join(f"{s.name} (job {s.job_id}, {s.state})" for s in busy),
            where=str(run_dir),
            fix=f"wait until `nemo-rlhf slurm status {run_dir}` shows a failed stage, or run `nemo-rlhf slurm cancel` "
            "first",
        )
    sbatch.cancel([s.job_id for s in statuses if s.blocked])
    jobs = {j.name: j for j in record["stages"]}
    redo: list[str] = []
    for job in record["stages"]:  # in submission order, so parents are decided before children
        if not stage_finished(run_dir, job.name) or any(a in redo for a in job.after):
            redo.append(job.name)
    finished = {name for name in jobs if name not in redo}
    for name in redo:  # an earlier success of a stage that runs again is stale: status must not call it finished
        (Path(run_dir) / name / MANIFEST).unlink(missing_ok=True)
    stages = [RenderedStage(n, Path(jobs[n].script), tuple(jobs[n].after)) for n in redo]
    _submit(stages, record, run_dir, already_finished=finished)
    return redo
