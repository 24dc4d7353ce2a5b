"""Thin wrappers over SLURM's command-line tools: sbatch, scontrol, scancel.

Every call runs the real tool through `subprocess` with an argument list (never a shell), so
paths reach SLURM unchanged. There is no accounting database on the clusters we test with
(no `sacct`): job states come from `scontrol show job`, which knows a job until MinJobAge
seconds after it ended.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from nemo_rlhf.errors import UserError

TIMEOUT_S = 60

# States after which a job will not run again (unless requeued by hand).
TERMINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
)
# How a heterogeneous job's state is summarised from its components' states: the first one found wins.
_STATE_PRECEDENCE = (
    "FAILED",
    "OUT_OF_MEMORY",
    "TIMEOUT",
    "NODE_FAIL",
    "BOOT_FAIL",
    "DEADLINE",
    "CANCELLED",
    "RUNNING",
    "COMPLETING",
    "CONFIGURING",
    "REQUEUED",
    "PENDING",
    "COMPLETED",
)
# A space followed by `Key=` starts a new field in `scontrol show job -o` (keys look like
# JobState, AllocNode:Sid, CPUs/Task). Values may hold spaces (JobName, StdOut, WorkDir).
_FIELD_START = re.compile(r" (?=[A-Z][A-Za-z0-9_:/]*=)")


@dataclass(frozen=True)
class JobInfo:
    """What `scontrol show job` says about one job (all components of a heterogeneous job).

    Attributes:
        job_id: the id sbatch printed.
        state: JobState, e.g. PENDING, RUNNING, COMPLETED, FAILED, CANCELLED.
        reason: why it is pending or why it ended, e.g. Dependency, DependencyNeverSatisfied,
            NonZeroExitCode; "None" when there is none.
        run_time: elapsed time as SLURM prints it ([D-]HH:MM:SS).
        exit_code: "status:signal" of the batch script.
        restarts: how often the job was requeued.
        component_ids: the JobId of each component (a heterogeneous job's groups get ids of their
            own, job_id + offset; SLURM expands %j in a step's log name to its component's id).
    """

    job_id: str
    state: str
    reason: str
    run_time: str
    exit_code: str
    restarts: int
    component_ids: tuple[str, ...] = ()

    @property
    def active(self) -> bool:
        """True while the job is queued, running or requeued."""
        return self.state not in TERMINAL_STATES


def tool(name: str) -> str:
    """The path of SLURM command `name`, or a UserError saying how to get it."""
    path = shutil.which(name)
    if path is None:
        raise UserError(
            f"`{name}` is not on PATH: SLURM's client commands are needed to submit and watch jobs",
            fix="run this on a SLURM login node, or start the local test cluster: slurm/local/start.sh "
            "(installs Debian's slurm-wlm)",
        )
    return path


def _run(args: list[str], what: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise UserError(
            f"{what}: `{Path(args[0]).name}` did not answer within {TIMEOUT_S} s",
            fix="check that slurmctld is up (`sinfo`; for the local test cluster: slurm/local/status.sh)",
        ) from None


def submit(script: Path, after: Sequence[str] = ()) -> str:
    """Submit `script` with `sbatch --parsable`, to start only after the jobs `after` completed.

    Returns:
        The job id (for a heterogeneous job, the id of its first component).

    Raises:
        UserError: with sbatch's own message when it refuses the script.
    """
    args = [tool("sbatch"), "--parsable"]
    if after:
        args.append("--dependency=afterok:" + ":".join(after))
    args.append(str(script))
    proc = _run(args, f"submitting {script}")
    job_id = proc.stdout.strip().split(";")[0]  # --parsable prints "id" or "id;cluster"
    if proc.returncode != 0 or not job_id.isdigit():
        raise UserError(
            f"sbatch refused the script: {proc.stderr.strip() or proc.stdout.strip()}",
            where=str(script),
            fix="fix the #SBATCH options named above (check them alone with `sbatch --test-only SCRIPT`)",
        )
    return job_id


def parse_job_line(line: str) -> dict[str, str]:
    """Split one line of `scontrol show job -o` into its `Key=value` fields."""
    fields = {}
    for item in _FIELD_START.split(line.strip()):
        key, _, value = item.partition("=")
        fields.setdefault(key, value)  # the first occurrence: later keys may repeat inside values
    return fields


def combine_states(states: Sequence[str]) -> str:
    """One state for a heterogeneous job: a failed component fails the job, a running one runs it."""
    for state in _STATE_PRECEDENCE:
        if state in states:
            return state
    return states[0]


def job_info(job_id: str) -> JobInfo | None:
    """The job's state from `scontrol show job -o`, or None when the controller no longer knows it."""
    proc = _run([tool("scontrol"), "show", "job", "-o", job_id], f"asking for job {job_id}")
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:
            return None  # purged (older than MinJobAge) or from a cluster that was restarted since
        raise UserError(f"scontrol show job {job_id} failed: {proc.stderr.strip()}", fix="check `sinfo`")
    parts = [parse_job_line(line) for line in proc.stdout.splitlines() if line.startswith("JobId=")]
    if not parts:
        return None
    states = [p.get("JobState", "UNKNOWN") for p in parts]
    state = combine_states(states)
    lead = next((p for p in parts if p.get("JobState") == state), parts[0])
    return JobInfo(
        job_id=job_id,
        state=state,
        reason=lead.get("Reason", "None"),
        run_time=lead.get("RunTime", ""),
        exit_code=lead.get("ExitCode", ""),
        restarts=int(lead.get("Restarts", "0") or 0),
        component_ids=tuple(p["JobId"] for p in parts if p.get("JobId")),
    )


def job_log_paths(job_id: str) -> tuple[str, str]:
    """The batch script's stdout and stderr files, with SLURM's %-patterns already expanded.

    Read from the multi-line `scontrol show job` form, where StdOut= and StdErr= each have a
    line of their own, so paths with spaces or `=` come back whole.
    """
    proc = _run([tool("scontrol"), "show", "job", job_id], f"asking for job {job_id}")
    paths: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        key, _, value = line.strip().partition("=")
        if key in ("StdOut", "StdErr"):
            paths.setdefault(key, value)  # a heterogeneous job lists its first component first
    return paths.get("StdOut", ""), paths.get("StdErr", "")


def cancel(job_ids: Sequence[str]) -> None:
    """`scancel` the given jobs (ids of jobs that already ended are ignored by SLURM)."""
    if not job_ids:
        return
    proc = _run([tool("scancel"), *job_ids], f"cancelling jobs {', '.join(job_ids)}")
    if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
        raise UserError(f"scancel failed: {proc.stderr.strip()}", fix="check the jobs with `squeue`")
