"""The tiny pipeline as a SLURM job DAG on the real local cluster (slurm/local/): no mocked sbatch.

Two DAGs run side by side (the cluster has two fake nodes): one in a run directory whose name
is full of shell syntax runs straight to completion; in the other the `rm` stage fails because
its data file is corrupted after submission, which leaves `ppo` and `eval` unrun until `resume`
(after the file is repaired) finishes the pipeline without redoing `base` and `sft`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nemo_rlhf.slurm.dag import cancel_dag, dag_status, resume_dag, submit_dag
from nemo_rlhf.slurm.stages import RenderedStage
from tests.helpers import REPO, TINY, cli

STAGES = ("base", "sft", "rm", "ppo", "eval")
# The tiny recipe made smaller still: each stage is one SLURM job that imports torch and TRL.
FAST = [
    "sft.max_steps=1",
    "rm.max_steps=1",
    "rm.eval_pairs=4",
    "ppo.total_episodes=4",
    "eval.max_new_tokens=8",
    "eval.num_samples=1",
    "data.eval.gsm8k_num=2",
    "data.eval.hh_num=2",
]
HOSTILE = "run 'q' \"dq\" $(touch pwned) `touch pwned2`; x & y"
TIMEOUT_S = 420


def wait_until_settled(run_dir: Path, timeout: float = TIMEOUT_S) -> list:
    """Poll the DAG until no stage is queued or running, except stages blocked behind a failure."""
    deadline = time.monotonic() + timeout
    while True:
        statuses = dag_status(run_dir, tail=0)
        if all(s.state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") or s.blocked for s in statuses):
            return statuses
        if time.monotonic() > deadline:
            pytest.fail(f"DAG in {run_dir} not settled after {timeout} s: {[(s.name, s.state) for s in statuses]}")
        time.sleep(2)


def status_json(run_dir: Path) -> dict:
    return json.loads(cli("slurm", "status", str(run_dir), "--json", check=True).stdout)


def manifests(run_dir: Path, stages) -> dict:
    """Each finished stage's manifest bytes and mtime: a stage that ran again changes both."""
    files = {s: run_dir / s / "manifest.json" for s in stages}
    return {s: (f.read_bytes(), f.stat().st_mtime_ns) for s, f in files.items() if f.is_file()}


@pytest.fixture(scope="module")
def dags(slurm_cluster, tmp_path_factory):
    """Run both DAGs side by side; the failing one is inspected and resumed as soon as it fails.

    The tests below assert on what this records; whatever is still queued at the end is cancelled.
    """
    from nemo_rlhf.spec.loader import load_spec
    from nemo_rlhf.spec.paths import data_path, data_root

    root = tmp_path_factory.mktemp("slurm dag")
    good, bad = root / HOSTILE, root / "failing"
    preference = root / "data" / "pref.jsonl.gz"
    preference.parent.mkdir()
    spec = load_spec(TINY)
    original = data_path(data_root(spec.data.root), spec.data.preference.path)
    shutil.copy(original, preference)
    start = time.monotonic()
    seen: dict = {"root": root, "good": good, "bad": bad}
    try:
        cli("slurm", "submit", str(TINY), "--out", str(good), *FAST, check=True)
        cli("slurm", "submit", str(TINY), "--out", str(bad), *FAST, f"data.preference.path={preference}", check=True)
        # Corrupted after submission (the spec was valid): only rm, ppo and eval read this file.
        preference.write_bytes(b"this is not gzip\n")
        seen["failed_states"] = wait_until_settled(bad)
        seen["failed_json"] = status_json(bad)
        seen["failed_text"] = cli("slurm", "status", str(bad), check=True).stdout
        seen["before_resume"] = manifests(bad, ("base", "sft"))
        seen["files_before_resume"] = {p.name for p in [*bad.iterdir(), *(bad / "slurm" / "logs").iterdir()]}
        shutil.copy(original, preference)  # the user repairs the data file, then resumes
        seen["resume"] = cli("slurm", "resume", str(bad))
        seen["good_states"] = wait_until_settled(good)
        seen["resumed_states"] = wait_until_settled(bad)
        print(f"both DAGs (and the resume) settled in {time.monotonic() - start:.0f} s")
        yield seen
    finally:
        for run_dir in (good, bad):
            if (run_dir / "slurm" / "jobs.json").is_file():
                cancel_dag(run_dir)


def test_dag_runs_to_completion_in_a_hostile_run_dir(dags):
    good = dags["good"]
    assert [(s.name, s.state) for s in dags["good_states"]] == [(s, "COMPLETED") for s in STAGES]
    for stage in STAGES:
        assert (good / stage / "manifest.json").is_file(), stage
        assert f"stage {stage}: job" in (good / "slurm" / "logs" / f"{stage}.out").read_text()
    jobs = json.loads((good / "slurm" / "jobs.json").read_text())
    assert [s["name"] for s in jobs["stages"]] == list(STAGES)
    assert [s["after"] for s in jobs["stages"]] == [[], ["base"], ["sft"], ["rm"], ["ppo"]]
    assert all(s["stdout"] == str(good / "slurm" / "logs" / f"{s['name']}.out") for s in jobs["stages"])
    # The quoted $(...) and backticks ran nowhere: not in the job's working dir, not beside the run dir.
    for where in (REPO, dags["root"], good, good / "slurm", Path.cwd()):
        assert not (where / "pwned").exists() and not (where / "pwned2").exists(), where
    status = status_json(good)
    assert status["failed"] == []
    assert all(row["state"] == "COMPLETED" and row["finished"] for row in status["stages"])
    assert all(row["elapsed"] and row["stdout"].endswith(".out") for row in status["stages"])


def test_failed_stage_leaves_successors_unrun_and_status_says_why(dags):
    states = {s.name: s for s in dags["failed_states"]}
    assert [states[s].state for s in ("base", "sft", "rm")] == ["COMPLETED", "COMPLETED", "FAILED"]
    assert states["ppo"].blocked and states["eval"].blocked
    status = dags["failed_json"]
    assert status["failed"] == ["rm"]
    rows = {row["name"]: row for row in status["stages"]}
    assert rows["rm"]["state"] == "FAILED" and rows["rm"]["failed"] and not rows["rm"]["finished"]
    tail = "\n".join(rows["rm"]["log_tail"])
    assert "pref.jsonl.gz" in tail and "malformed" in tail, tail
    assert rows["ppo"]["state"] == "PENDING" and rows["ppo"]["reason"] == "DependencyNeverSatisfied"
    assert rows["eval"]["state"] == "PENDING" and rows["eval"]["reason"] == "Dependency"  # SLURM marks only children
    for stage in ("ppo", "eval"):  # unrun: no output, no log
        assert rows[stage]["blocked"] and not rows[stage]["finished"] and not rows[stage]["log_tail"]
        assert not {stage, f"{stage}.out", f"{stage}.err"} & dags["files_before_resume"]
    assert {"base", "sft", "rm.err"} <= dags["files_before_resume"] and "rm" not in dags["files_before_resume"]
    assert "failed: rm" in dags["failed_text"] and "slurm resume" in dags["failed_text"]


def test_resume_finishes_without_redoing_finished_stages(dags):
    bad = dags["bad"]
    assert dags["resume"].returncode == 0, dags["resume"].stderr
    assert "resubmitted rm, ppo, eval; kept finished: base, sft" in dags["resume"].stdout
    assert [(s.name, s.state) for s in dags["resumed_states"]] == [(s, "COMPLETED") for s in STAGES]
    assert set(dags["before_resume"]) == {"base", "sft"}
    assert manifests(bad, ("base", "sft")) == dags["before_resume"]  # same bytes, same mtimes
    old_ids = {s.name: s.job_id for s in dags["failed_states"]}
    jobs = {s["name"]: s for s in json.loads((bad / "slurm" / "jobs.json").read_text())["stages"]}
    assert jobs["base"]["job_id"] == old_ids["base"] and jobs["sft"]["job_id"] == old_ids["sft"]
    for stage in ("rm", "ppo", "eval"):
        assert jobs[stage]["job_id"] != old_ids[stage] and jobs[stage]["earlier_jobs"] == [old_ids[stage]]
        assert (bad / stage / "manifest.json").is_file()
    # The resubmitted rm job appended to the failed attempt's log (--open-mode=append).
    assert (bad / "slurm" / "logs" / "rm.out").read_text().count("stage rm: job") == 2
    assert "every stage has finished" in cli("slurm", "resume", str(bad), check=True).stdout
    # The jobs left blocked behind the failure were cancelled, not left pending forever.
    for stage in ("ppo", "eval"):
        proc = subprocess.run(["scontrol", "show", "job", "-o", old_ids[stage]], capture_output=True, text=True)
        assert "JobState=CANCELLED" in proc.stdout, proc.stdout


def test_stages_the_spec_turns_off_get_no_job(tmp_path):
    """gold_rm and gate run only when enabled: a job for a disabled stage would leave no manifest, and
    `resume` would then redo it and everything after it."""
    from nemo_rlhf.slurm.small_scale import render_small_scale
    from nemo_rlhf.spec.loader import load_spec

    off = render_small_scale(load_spec(TINY), TINY, [], tmp_path / "off", tmp_path / "off")
    assert [(s.name, s.after) for s in off] == [("base", ()), ("sft", ("base",)), ("rm", ("sft",)), ("ppo", ("rm",)),
                                                ("eval", ("ppo",))]
    on = render_small_scale(load_spec(TINY, ["gold_rm.enabled=true"]), TINY, ["gold_rm.enabled=true"],
                            tmp_path / "on", tmp_path / "on")
    assert [s.name for s in on] == ["base", "sft", "rm", "gold_rm", "ppo", "eval"] and on[4].after == ("gold_rm",)
    assert "gold_rm.enabled=true" in (tmp_path / "on" / "gold_rm.sbatch").read_text()


@pytest.mark.parametrize("name", ["new\nline", "tab\there", "bell\x07"])
def test_control_characters_in_paths_are_refused(tmp_path, name):
    proc = cli("slurm", "render", str(TINY), "--out", str(tmp_path / name))
    assert proc.returncode == 2, proc.stderr
    assert "newline or control character" in proc.stderr and "fix:" in proc.stderr
    assert not (tmp_path / name).exists()


def test_render_quotes_hostile_paths_for_sbatch(slurm_cluster, tmp_path):
    out = tmp_path / HOSTILE
    cli("slurm", "render", str(TINY), "--out", str(out), "ppo.kl_coef=0.02", check=True)
    for stage in STAGES:
        script = out / f"{stage}.sbatch"
        subprocess.run(["bash", "-n", str(script)], check=True)
        proc = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True)
        assert "to start at" in proc.stderr, proc.stderr
        assert "--requeue" in script.read_text() and "--open-mode=append" in script.read_text()
    assert not (tmp_path / "pwned").exists() and not (REPO / "pwned").exists()


def test_percent_in_run_dir_is_refused(tmp_path):
    proc = cli("slurm", "render", str(TINY), "--out", str(tmp_path / "run%j"))
    assert proc.returncode == 2 and "'%'" in proc.stderr, proc.stderr


def test_clear_errors_without_sbatch_or_without_jobs(tmp_path):
    proc = cli("slurm", "status", str(tmp_path))
    assert proc.returncode == 2 and "no SLURM jobs recorded" in proc.stderr
    env_path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "sbatch").exists())
    proc = subprocess.run(
        [sys.executable, "-m", "nemo_rlhf", "slurm", "submit", str(TINY), "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": env_path},
        cwd=REPO,
    )
    assert proc.returncode == 2, proc.stderr
    assert "`sbatch` is not on PATH" in proc.stderr and "slurm/local/start.sh" in proc.stderr


def wait_for_state(run_dir: Path, stage: str, states: tuple[str, ...], timeout: float = 180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = {s.name: s for s in dag_status(run_dir, tail=0)}[stage]
        if status.state in states:
            return status
        time.sleep(1)
    pytest.fail(f"{stage} in {run_dir} not in {states} after {timeout} s (last: {status.state})")


def test_requeued_stage_continues_and_running_dags_are_protected(slurm_cluster, tmp_path):
    """A preempted (requeued) stage runs again, appending to its logs; submit/resume refuse a running DAG."""
    run_dir = tmp_path / "run"
    cli("slurm", "submit", str(TINY), "--out", str(run_dir), *FAST, check=True)
    try:
        base = wait_for_state(run_dir, "base", ("RUNNING",))
        subprocess.run(["scontrol", "requeue", base.job_id], check=True)
        # SLURM holds a requeued job back for two minutes (Reason=BeginTime); let it start again now.
        wait_for_state(run_dir, "base", ("PENDING",), timeout=60)
        subprocess.run(["scontrol", "update", f"JobId={base.job_id}", "StartTime=now"], check=True)
        again = cli("slurm", "submit", str(TINY), "--out", str(run_dir), *FAST)
        assert again.returncode == 2 and "already has queued or running stages" in again.stderr, again.stderr
        early = cli("slurm", "resume", str(run_dir))
        assert early.returncode == 2 and "still going" in early.stderr, early.stderr
        assert wait_for_state(run_dir, "base", ("COMPLETED", "FAILED")).state == "COMPLETED"
        log = (run_dir / "slurm" / "logs" / "base.out").read_text()
        assert log.count("stage base: job") == 2 and "restart 1" in log, log
        assert (run_dir / "base" / "manifest.json").is_file()
    finally:
        out = cli("slurm", "cancel", str(run_dir), check=True).stdout
    assert "ppo (job" in out and "eval (job" in out, out
    deadline = time.monotonic() + 60
    while any(s.state not in ("CANCELLED", "COMPLETED") for s in dag_status(run_dir)) and time.monotonic() < deadline:
        time.sleep(1)
    states = {s.name: s.state for s in dag_status(run_dir)}
    assert states["ppo"] == states["eval"] == "CANCELLED", states
    assert all(state == "CANCELLED" or (run_dir / name / "manifest.json").is_file() for name, state in states.items())
    assert "nothing was queued or running" in cli("slurm", "cancel", str(run_dir), check=True).stdout


def _stage_script(path: Path, run_dir: Path, name: str, body: str) -> RenderedStage:
    """A minimal stage: `body`, then its manifest (the contract every rendered stage keeps)."""
    path.write_text(f"""#!/bin/bash
#SBATCH --output={run_dir}/{name}.out
#SBATCH --ntasks=1
set -e
rm -f {run_dir}/{name}/manifest.json
{body}
mkdir -p {run_dir}/{name} && echo '{{}}' > {run_dir}/{name}/manifest.json
""")
    return path


def test_resume_drops_the_old_manifests_of_stages_it_reruns(slurm_cluster, tmp_path):
    """A stage after the failed one that had finished in an earlier run is stale until it runs again."""
    run_dir, flag = tmp_path / "run", tmp_path / "fixed"
    run_dir.mkdir()
    stages = [RenderedStage("a", _stage_script(tmp_path / "a.sbatch", run_dir, "a", f"sleep 2; test -e {flag}")),
              RenderedStage("b", _stage_script(tmp_path / "b.sbatch", run_dir, "b", "true"), after=("a",))]
    (run_dir / "b").mkdir()
    (run_dir / "b" / "manifest.json").write_text("{}")  # from an earlier run
    try:
        submit_dag(stages, run_dir, {})
        settled = {s.name: s for s in wait_until_settled(run_dir, 60)}
        assert settled["a"].state == "FAILED" and settled["b"].blocked
        flag.touch()
        assert resume_dag(run_dir) == ["a", "b"]
        assert not (run_dir / "b" / "manifest.json").exists()  # at once, before b could start
        assert not {s.name: s for s in dag_status(run_dir)}["b"].finished
        final = wait_until_settled(run_dir, 60)
        assert [(s.name, s.state, s.finished) for s in final] == [("a", "COMPLETED", True), ("b", "COMPLETED", True)]
    finally:
        cancel_dag(run_dir)
