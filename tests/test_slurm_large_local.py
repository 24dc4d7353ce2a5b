"""A large-scale recipe, rendered with `cluster.runtime: host`, run as a whole DAG on the local SLURM.

recipes/smollm2-360m-cluster.yaml with the local cluster's layout (2 nodes x 2 fake GPUs, SFT on
both nodes at TP 2) and a tiny random Llama in place of SmolLM2-360M, submitted with
`nemo-rlhf slurm submit`. Our own stages are real (data files, HF -> .nemo with its certificate,
.nemo -> HF export, the evaluation, lineage manifests); NeMo-Aligner's entry points are the
stand-ins in tests/standin_aligner (`cluster.aligner_repo`), which check every config, layout and
checkpoint they are handed. PPO is the rendered heterogeneous job: the stand-in critic in het-group 0
serves HTTP on the rendered port, the stand-in actor in het-group 1 finds it through
SLURM_JOB_NODELIST_HET_GROUP_0 and talks to it.

The critic is made to fail first: the het job fails at once, `slurm status` names ppo and the
critic, export and eval stay unrun; resumed, the actor fails, and status names it; resumed once
more, the PPO job is preempted (requeued) while the actor works, runs again, and the pipeline
finishes without redoing the stages before ppo.
The run directory's name is full of shell syntax. It proves the wiring, not NeMo.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from nemo_rlhf.slurm import sbatch
from nemo_rlhf.slurm.dag import cancel_dag
from tests.helpers import REPO
from tests.test_slurm_dag import HOSTILE, wait_for_state, wait_until_settled

RECIPE = REPO / "recipes" / "smollm2-360m-cluster.yaml"
STANDIN = REPO / "tests" / "standin_aligner"
STAGES = ("data", "convert", "sft", "rm", "ppo", "export", "eval")
BEFORE_PPO = ("data", "convert", "sft", "rm")
TINY = dict(architecture="llama", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
            max_position_embeddings=512)
# The recipe on the local cluster: host runtime, 2 fake GPUs per node, a model with 512 positions.
LOCAL = [
    "model.arch.preset=null",  # the shape comes from the tiny model's config.json
    "cluster.runtime=host", "cluster.container_image=null", "cluster.mounts=[]", "cluster.account=null",
    "cluster.partition=debug", "cluster.gpus_per_node=2", f"cluster.aligner_repo={STANDIN}",
    "cluster.critic_startup_s=1", "cluster.time_limit=00:15:00",
    "parallel.sft.nodes=2", "parallel.sft.tp=2", "parallel.rm.tp=2", "parallel.critic.tp=2",
    "parallel.critic.inference_micro_batch_size=1",
    "sft.max_length=256", "rm.max_length=256", "ppo.prompt_max_length=128", "ppo.response_length=32",
    "data.sft.num_examples=16", "data.preference.num_examples=16",
    "eval.max_new_tokens=8", "eval.num_samples=1", "data.eval.gsm8k_num=2", "data.eval.hh_num=2",
]
TIMEOUT_S = 480


def free_port() -> int:
    """A port nothing listens on now (tests of other checkouts may run the same job beside this one)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nemo_rlhf", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)


def tiny_models(root: Path) -> tuple[Path, Path]:
    """A tiny random Llama (HF dir) and, from it, a reward-model .nemo (what NeMo-Aligner's RM training would save)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from nemo_rlhf.convert.convert import hf_to_nemo
    from nemo_rlhf.models.materialize import build_random_model
    from nemo_rlhf.spec.paths import data_root
    from nemo_rlhf.spec.schema import RandomModelConfig

    tokenizer_file = data_root("auto") / "tokenizers" / "gpt2" / "tokenizer.json"
    policy = build_random_model(RandomModelConfig(**TINY), tokenizer_file, "chatml", root / "tiny-llama", seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        reward = AutoModelForSequenceClassification.from_pretrained(str(policy), num_labels=1, dtype=torch.float32)
    reward.config.pad_token_id = AutoTokenizer.from_pretrained(str(policy)).pad_token_id
    reward.save_pretrained(root / "tiny-rm")
    AutoTokenizer.from_pretrained(str(policy)).save_pretrained(root / "tiny-rm")
    return policy, hf_to_nemo(root / "tiny-rm", root / "reward.nemo", kind="reward")


def status_json(env: dict, run_dir: Path) -> dict:
    proc = run_cli(env, "slurm", "status", str(run_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def manifests(run_dir: Path, stages) -> dict:
    files = {s: run_dir / s / "manifest.json" for s in stages}
    return {s: (f.read_bytes(), f.stat().st_mtime_ns) for s, f in files.items() if f.is_file()}


def preempt_ppo_once(run_dir: Path, hold_file: Path) -> str:
    """Requeue the running PPO het job (what preemption does) while its actor holds, start it again at
    once (SLURM holds a requeued job back 120 s), then let the actor go. Returns the job id."""
    import time

    job_id = wait_for_state(run_dir, "ppo", ("RUNNING",)).job_id
    actor_log = run_dir / "logs" / f"ppo-actor.{sbatch.job_info(job_id).component_ids[1]}.0.out"
    deadline = time.monotonic() + 120
    while "holding" not in (actor_log.read_text() if actor_log.is_file() else ""):
        assert time.monotonic() < deadline, f"the actor never started: {actor_log}"
        time.sleep(0.5)
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    wait_for_state(run_dir, "ppo", ("PENDING",), timeout=60)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
    wait_for_state(run_dir, "ppo", ("RUNNING", "COMPLETED", "FAILED"), timeout=120)
    hold_file.write_text("")
    return job_id


@pytest.fixture(scope="module")
def large_run(slurm_cluster, tmp_path_factory):
    """Submit the DAG with the critic set to fail, inspect the failure, let it pass, resume to the end."""
    from nemo_rlhf.spec.paths import data_root

    root = tmp_path_factory.mktemp("large local")
    policy, reward_nemo = tiny_models(root)
    run_dir, fail_file, hold_file = root / HOSTILE, root / "fail-these", root / "hold-these"  # HOSTILE: quoting
    fail_file.write_text("critic\n")
    port = free_port()
    # The jobs inherit this environment (sbatch --export=ALL): the venv's python and nemo-rlhf, as
    # an activated environment would give them, and the stand-ins' test switches.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "NEMO_RLHF_STANDIN_FAIL_FILE": str(fail_file), "NEMO_RLHF_STANDIN_HOLD_FILE": str(hold_file),
           "NEMO_RLHF_STANDIN_REWARD_NEMO": str(reward_nemo),
           "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    overrides = [*LOCAL, f"model.path={policy}", f"data.root={data_root('auto')}", f"parallel.critic.port={port}"]
    seen = {"run_dir": run_dir, "port": port}
    try:
        seen["submit"] = run_cli(env, "slurm", "submit", str(RECIPE), "--out", str(run_dir), *overrides)
        assert seen["submit"].returncode == 0, seen["submit"].stdout + seen["submit"].stderr
        seen["failed_states"] = wait_until_settled(run_dir, TIMEOUT_S)
        seen["failed_json"] = status_json(env, run_dir)
        seen["failed_text"] = run_cli(env, "slurm", "status", str(run_dir)).stdout
        seen["before_resume"] = manifests(run_dir, BEFORE_PPO)
        seen["unfinished_before_resume"] = [s for s in STAGES if not (run_dir / s / "manifest.json").exists()]
        fail_file.write_text("actor\n")  # the critic is fixed; now the actor fails
        seen["actor_resume"] = run_cli(env, "slurm", "resume", str(run_dir))
        seen["actor_failed_states"] = wait_until_settled(run_dir, TIMEOUT_S)
        seen["actor_failed_json"] = status_json(env, run_dir)
        fail_file.write_text("")  # the user fixes the actor, then resumes
        hold_file.write_text("actor\n")  # ... and the cluster preempts the PPO job while the actor works
        seen["resume"] = run_cli(env, "slurm", "resume", str(run_dir))
        seen["preempted_job"] = preempt_ppo_once(run_dir, hold_file)
        seen["states"] = wait_until_settled(run_dir, TIMEOUT_S)
        seen["ppo_restarts"] = sbatch.job_info(seen["preempted_job"]).restarts
        seen["json"] = status_json(env, run_dir)
        yield seen
    finally:
        if (run_dir / "slurm" / "jobs.json").is_file():
            cancel_dag(run_dir)


def test_failing_critic_fails_the_het_job_and_status_names_it(large_run):
    states = {s.name: s for s in large_run["failed_states"]}
    assert [states[s].state for s in BEFORE_PPO] == ["COMPLETED"] * 4, large_run["failed_text"]
    assert states["ppo"].state == "FAILED" and states["export"].blocked and states["eval"].blocked
    status = large_run["failed_json"]
    assert status["failed"] == ["ppo"]
    tail = "\n".join({row["name"]: row for row in status["stages"]}["ppo"]["log_tail"])
    assert "the critic server (het-group 0) stopped with exit status" in tail, tail
    assert "ppo-critic." in tail and "forced failure" in tail, tail  # the critic step's own stderr
    assert "failed: ppo" in large_run["failed_text"] and "forced failure" in large_run["failed_text"]
    assert large_run["unfinished_before_resume"] == ["ppo", "export", "eval"]


def test_failing_actor_fails_the_het_job_and_status_names_it(large_run):
    assert large_run["actor_resume"].returncode == 0, large_run["actor_resume"].stderr
    states = {s.name: s.state for s in large_run["actor_failed_states"]}
    assert states["ppo"] == "FAILED" and states["export"] == states["eval"] == "PENDING", states
    status = large_run["actor_failed_json"]
    assert status["failed"] == ["ppo"]
    tail = "\n".join({row["name"]: row for row in status["stages"]}["ppo"]["log_tail"])
    assert "the actor (het-group 1) exited with status 1" in tail and "ppo-actor." in tail, tail
    assert "forced failure: " in tail and "lists 'actor'" in tail, tail
    # Only this attempt: its batch stderr from its first line on, its own step logs.
    ppo = {row["name"]: row for row in status["stages"]}["ppo"]
    assert ppo["log_tail"][0].startswith(f"[nemo-rlhf] stage ppo: job {ppo['job_id']} on n"), tail
    assert "lists 'critic'" not in tail and "the critic server" not in tail, tail
    assert f"ppo-actor.{int(ppo['job_id']) + 1}.<task>.err" in tail  # het-group 1's job id names its logs


def test_resume_runs_the_het_job_and_finishes_the_pipeline(large_run):
    assert large_run["resume"].returncode == 0, large_run["resume"].stderr
    assert "resubmitted ppo, export, eval; kept finished: data, convert, sft, rm" in large_run["resume"].stdout
    assert [(s.name, s.state) for s in large_run["states"]] == [(s, "COMPLETED") for s in STAGES]
    assert large_run["json"]["failed"] == [] and all(row["finished"] for row in large_run["json"]["stages"])
    run_dir = large_run["run_dir"]
    assert manifests(run_dir, BEFORE_PPO) == large_run["before_resume"]  # not redone
    ppo = json.loads((run_dir / "ppo" / "manifest.json").read_text())
    assert ppo["stage"] == "ppo" and set(ppo["inputs"]["parents"]) == {"sft", "rm", "data"}
    assert str(run_dir / "ppo" / "actor" / "checkpoints" / "ppo_actor.nemo") in ppo["outputs"]
    # Our real export turned the stand-ins' .nemo files back into HF checkpoints; the RM is a classifier.
    architectures = {s: json.loads((run_dir / "export" / s / "model" / "config.json").read_text())["architectures"]
                     for s in ("sft", "rm", "ppo")}
    assert architectures == {"sft": ["LlamaForCausalLM"], "rm": ["LlamaForSequenceClassification"],
                             "ppo": ["LlamaForCausalLM"]}
    assert (run_dir / "eval" / "manifest.json").is_file()
    for where in (REPO, STANDIN, run_dir, run_dir.parent, Path.cwd()):  # the quoted $(...) and `...` ran nowhere
        assert not (where / "pwned").exists() and not (where / "pwned2").exists(), where


def _step_logs(run_dir: Path, step: str, final_run: bool = False) -> str:
    """The stdout of every task of `step` (<step>.<job id>.<task>.out); with `final_run`, only the lines
    the last job wrote in its last run (a requeued job appends to the same files; lines say `restart N`)."""
    files = sorted((run_dir / "logs").glob(f"{step}.*.out"))
    if not final_run:
        return "".join(f.read_text() for f in files)
    last = max(int(f.name.split(".")[-3]) for f in files)
    lines = [line for f in files if int(f.name.split(".")[-3]) == last for line in f.read_text().splitlines(True)]
    restart = max(int(m[1]) for line in lines if (m := re.search(r" restart (\d+) on ", line)))
    return "".join(line for line in lines if f" restart {restart} on " in line)


def test_critic_and_actor_met_on_the_rendered_host_and_port(large_run):
    run_dir, port = large_run["run_dir"], large_run["port"]
    # The final run's tasks (earlier ones failed or were preempted on purpose; how far the other side got is timing).
    critic, actor = (_step_logs(run_dir, step, final_run=True) for step in ("ppo-critic", "ppo-actor"))
    assert f"serving on port {port}" in critic and "answered" in critic
    assert critic.count("layout ok: 1 nodes, 2 ranks, TP 2, PP 1, DP 1") == 2
    assert critic.count(f"checkpoint {run_dir}/rm/results/checkpoints/rm.nemo") == 2
    group0 = {line.split("SLURM_JOB_NODELIST_HET_GROUP_0=")[1].split(")")[0]
              for line in actor.splitlines() if "SLURM_JOB_NODELIST_HET_GROUP_0=" in line}
    assert len(group0) == 1 and group0 <= {"n1", "n2"}, actor
    # Every actor rank reached the critic on the first host of het-group 0 at the spec's port.
    assert actor.count(f"reached the critic at {group0.pop()}:{port}") == 2, actor
    assert actor.count("layout ok: 1 nodes, 2 ranks, TP 1, PP 1, DP 2") == 2 and "NCCL_ALGO=Tree" in actor
    assert "(a copy of" in actor and (run_dir / "ppo" / "actor" / "checkpoints" / "ppo_actor.nemo").is_file()


def test_preempted_ppo_job_requeues_and_finishes(large_run):
    """Requeued while the actor worked, the het job ran again from the top (same job id, logs appended)."""
    run_dir, job_id = large_run["run_dir"], large_run["preempted_job"]
    assert large_run["ppo_restarts"] == 1
    assert {s.name: s.state for s in large_run["states"]}["ppo"] == "COMPLETED"
    assert [s["job_id"] for s in json.loads((run_dir / "slurm" / "jobs.json").read_text())["stages"]
            if s["name"] == "ppo"] == [job_id]
    batch = (run_dir / "logs" / "ppo.out").read_text()
    assert re.search(rf"stage ppo: job {job_id} on n[12], restart 0\n", batch), batch
    assert re.search(rf"stage ppo: job {job_id} on n[12], restart 1\n", batch), batch
    actor_log = (run_dir / "logs" / f"ppo-actor.{int(job_id) + 1}.0.out").read_text()
    preempted = [line for line in actor_log.splitlines() if " restart 0 on " in line]
    assert any("holding while" in line for line in preempted) and not any("reached" in line for line in preempted)
    assert "reached the critic" in _step_logs(run_dir, "ppo-actor", final_run=True)


def test_stand_ins_checked_the_rendered_configs_and_layouts(large_run):
    run_dir = large_run["run_dir"]
    sft, rm = _step_logs(run_dir, "sft"), _step_logs(run_dir, "rm")
    assert sft.count("layout ok: 2 nodes, 4 ranks, TP 2, PP 1, DP 2") == 4, sft  # SFT on both nodes
    assert sft.count("checkpoint ") == 4 and "2 layers, 4 heads, 2 query groups" in sft
    assert sft.count("train_ds: ") == 4 and sft.count("validation_ds: ") == 4
    assert rm.count("layout ok: 1 nodes, 2 ranks, TP 2, PP 1, DP 1") == 2, rm
    rm_config = yaml.safe_load((run_dir / "configs" / "rm.yaml").read_text())
    assert rm_config["pretrained_checkpoint"]["restore_from_path"] == str(run_dir / "sft/results/checkpoints/sft.nemo")
    with tarfile.open(run_dir / "rm" / "results" / "checkpoints" / "rm.nemo") as tar:
        names = {m.name.lstrip("./") for m in tar.getmembers()}
    assert "model_config.yaml" in names


RM, CRITIC, ACTOR = "train_reward_model.py", "serve_ppo_critic.py", "train_gpt_ppo_actor.py"
CONFIGS = {RM: "rm", CRITIC: "ppo_critic", ACTOR: "ppo_actor"}


@pytest.mark.parametrize("script, env_change, overrides, message", [
    (RM, {}, [], None),  # as the rendered script ran it: passes
    (RM, {"SLURM_NTASKS": "3"}, [], "config wants 1 nodes x 2 devices; SLURM gave 1 nodes, 3 tasks"),
    (RM, {"SLURM_NNODES": "2", "SLURM_NTASKS": "4"}, [],
     "config wants 1 nodes x 2 devices; SLURM gave 2 nodes, 4 tasks"),
    (RM, {"SLURM_NTASKS": "3"}, ["trainer.devices=3", "model.tensor_model_parallel_size=3"],
     "4 heads / 2 query groups / 2 layers do not split over TP 3"),
    (RM, {}, ["model.data.data_prefix=null"], "config has no key model.data.data_prefix.train"),
    (RM, {}, ["pretrained_checkpoint.restore_from_path=/nonexistent.nemo"], "/nonexistent.nemo is missing"),
    (CRITIC, {}, ["trainer.ppo.combine_rm_and_critic_server=false"], "nothing would serve the reward model"),
    (ACTOR, {}, ["remote_critic_rm.combine_rm_and_critic_server=false"], "the critic job serves the RM too"),
], ids=["as-rendered", "tasks", "nodes", "tp", "missing-key", "checkpoint", "critic-rm", "actor-rm"])
def test_stand_ins_refuse_wiring_mistakes(large_run, script, env_change, overrides, message):
    """A stand-in run as the rendered script runs it, with one thing changed: it fails, naming it.

    Non-zero rank: nothing is written. Hydra-style overrides stand for a wrongly rendered config."""
    run_dir = large_run["run_dir"]
    env = {**os.environ, "SLURM_NNODES": "1", "SLURM_NTASKS": "2", "SLURM_PROCID": "1", **env_change,
           "PYTHONPATH": str(STANDIN)}
    env.pop("NEMO_RLHF_STANDIN_REWARD_NEMO", None)
    command = [sys.executable, str(STANDIN / "examples" / "nlp" / "gpt" / script),
               f"--config-path={run_dir / 'configs'}", f"--config-name={CONFIGS[script]}", *overrides]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=STANDIN, timeout=60)
    if message is None:
        assert proc.returncode == 0 and "layout ok" in proc.stdout, proc.stderr
    else:
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
