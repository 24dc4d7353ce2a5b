"""Shared code of the NeMo-Aligner stand-ins (tests only): NOT NeMo-Aligner.

The stand-ins under examples/nlp/gpt/ have the names and the command line of NeMo-Aligner 0.7.0's
entry points, so a rendered sbatch script runs them unchanged on the local test cluster
(`cluster.runtime: host`, `cluster.aligner_repo` = this folder). They prove the wiring (arguments,
configs, paths, SLURM layout, the PPO critic/actor connection), not training: no model is trained,
a "checkpoint" is a copy of the input .nemo.

The rendered script runs them from this folder with it on PYTHONPATH (as NeMo-Aligner's docs do),
which is how they import this module.

A stand-in fails on purpose when the file named by $NEMO_RLHF_STANDIN_FAIL_FILE exists and lists
its name (one per line): how the tests make one stage of a DAG fail. It waits while the file named
by $NEMO_RLHF_STANDIN_HOLD_FILE lists its name: how a test keeps a job running to requeue it.

Each one checks what it is handed, so a wiring mistake fails the job: the config file exists and has
every key it reads, trainer.num_nodes x trainer.devices is the srun's nodes x tasks, the .nemo it
starts from is a .nemo whose heads, query groups and layers the config's TP and PP divide, and the
data files are jsonl with the keys NeMo-Aligner reads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import yaml

FAIL_FILE_ENV = "NEMO_RLHF_STANDIN_FAIL_FILE"
HOLD_FILE_ENV = "NEMO_RLHF_STANDIN_HOLD_FILE"


def log(name: str, message: str) -> None:
    """One line on stdout, tagged with the stand-in, the SLURM task (the logs are per task) and how often
    the job was requeued (a requeued job appends to the same step logs)."""
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    print(f"[stand-in {name} task {rank()} restart {restart} on {socket.gethostname()}] {message}", flush=True)


def die(name: str, message: str) -> None:
    """Fail like a crashed entry point: the message on stderr, exit status 1."""
    print(f"[stand-in {name} task {rank()}] ERROR: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def rank() -> int:
    """The global rank of this task (SLURM_PROCID; 0 outside SLURM)."""
    return int(os.environ.get("SLURM_PROCID", "0"))


def parse_hydra_args(argv: list[str]) -> tuple[Path, str, list[str]]:
    """`--config-path=DIR --config-name=NAME key=value ...` as Hydra reads them (`--flag VALUE` too)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--config-path", required=True)
    parser.add_argument("--config-name", required=True)
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad:
        raise SystemExit(f"not Hydra overrides (key=value): {bad}")
    return Path(args.config_path), args.config_name, overrides


def load_config(name: str, argv: list[str]) -> dict:
    """The rendered config with the command line's overrides applied (values parsed as YAML, like Hydra)."""
    config_path, config_name, overrides = parse_hydra_args(argv)
    file = config_path / f"{config_name}.yaml"
    if not file.is_file():
        die(name, f"no config {file}")
    cfg = yaml.safe_load(file.read_text())
    for override in overrides:
        key, _, value = override.partition("=")
        node = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value) if value else None
    log(name, f"config {file} with overrides {overrides}")
    return cfg


def get(cfg: dict, key: str):
    """A dotted key of the config; a missing key is an error (as in Hydra's strict mode)."""
    node = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"config has no key {key}")
        node = node[part]
    return node


def check_forced_failure(name: str) -> None:
    """Exit 1 when the marker file of $NEMO_RLHF_STANDIN_FAIL_FILE names this stand-in."""
    if _listed(FAIL_FILE_ENV, name):
        die(name, f"forced failure: {os.environ[FAIL_FILE_ENV]} lists {name!r}")


def _listed(env: str, name: str) -> bool:
    marker = os.environ.get(env)
    return bool(marker) and Path(marker).is_file() and name in Path(marker).read_text().split()


def hold_while_listed(name: str) -> None:
    """Wait (as a long training step would) while $NEMO_RLHF_STANDIN_HOLD_FILE lists this stand-in."""
    if _listed(HOLD_FILE_ENV, name):
        log(name, f"holding while {os.environ[HOLD_FILE_ENV]} lists {name!r}")
        while _listed(HOLD_FILE_ENV, name):
            time.sleep(0.5)
        log(name, "released")


def check_layout(name: str, cfg: dict) -> None:
    """trainer.num_nodes x trainer.devices must be this job step's nodes x tasks per node."""
    nodes, tasks = int(os.environ["SLURM_NNODES"]), int(os.environ["SLURM_NTASKS"])
    want_nodes, devices = get(cfg, "trainer.num_nodes"), get(cfg, "trainer.devices")
    if nodes != want_nodes or tasks != want_nodes * devices:
        die(name, f"config wants {want_nodes} nodes x {devices} devices; SLURM gave {nodes} nodes, {tasks} tasks")
    tp, pp = get(cfg, "model.tensor_model_parallel_size"), get(cfg, "model.pipeline_model_parallel_size")
    if tasks % (tp * pp):
        die(name, f"{tasks} ranks are not divisible by TP {tp} x PP {pp}")
    log(name, f"layout ok: {nodes} nodes, {tasks} ranks, TP {tp}, PP {pp}, DP {tasks // (tp * pp)}; "
              f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}")


def check_file(name: str, path: str, what: str) -> Path:
    """An input the config names must exist and not be empty."""
    file = Path(path)
    if not file.exists() or (file.is_file() and file.stat().st_size == 0):
        die(name, f"{what} {path} is missing or empty")
    return file


def check_jsonl(name: str, path: str, keys: tuple[str, ...]) -> int:
    """A NeMo-Aligner jsonl file: every line an object with `keys`; returns the number of rows."""
    rows = [json.loads(line) for line in check_file(name, path, "data file").read_text().splitlines() if line]
    missing = [i for i, row in enumerate(rows) if not all(k in row for k in keys)]
    if not rows or missing:
        die(name, f"{path}: {len(rows)} rows, rows {missing[:5]} lack {keys}")
    return len(rows)


def read_nemo_config(name: str, path: str) -> dict:
    """model_config.yaml of a .nemo: a tar (as our converter writes PATH.nemo) or an extracted directory."""
    file = check_file(name, path, ".nemo")
    if file.is_dir():
        config = file / "model_config.yaml"
        if not config.is_file():
            die(name, f"{path} has no model_config.yaml: not an extracted .nemo")
        return yaml.safe_load(config.read_text())
    try:
        with tarfile.open(file) as tar:
            member = next((m for m in tar.getmembers() if m.name.lstrip("./") == "model_config.yaml"), None)
            if member is None:
                die(name, f"{path} has no model_config.yaml: not a .nemo")
            return yaml.safe_load(tar.extractfile(member).read())
    except tarfile.TarError as err:
        die(name, f"{path} is not a .nemo (tar): {err}")
    return {}


def check_nemo(name: str, cfg: dict, path: str) -> Path:
    """The checkpoint a stage starts from: a .nemo whose shape the config's TP and PP divide (as Megatron insists)."""
    model = read_nemo_config(name, path)
    tp, pp = get(cfg, "model.tensor_model_parallel_size"), get(cfg, "model.pipeline_model_parallel_size")
    heads, layers = model["num_attention_heads"], model["num_layers"]
    groups = model.get("num_query_groups") or heads
    if heads % tp or groups % tp or layers % pp:
        die(name, f"{path}: {heads} heads / {groups} query groups / {layers} layers do not split over TP {tp}, PP {pp}")
    log(name, f"checkpoint {path}: {layers} layers, {heads} heads, {groups} query groups")
    return Path(path)


def save_nemo(name: str, cfg: dict, source: Path) -> Path:
    """Rank 0 'saves' the trained model where NeMo's exp_manager would: a copy of `source`, written atomically."""
    out = Path(get(cfg, "exp_manager.explicit_log_dir")) / "checkpoints" / f"{get(cfg, 'exp_manager.name')}.nemo"
    if rank() == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        shutil.copyfile(source, tmp)
        os.replace(tmp, out)
        log(name, f"wrote {out} (a copy of {source}: stand-in, nothing was trained)")
    return out


def resolve_host(name: str, host: str) -> str:
    """The address of a SLURM node name: DNS first, else the node's NodeAddr from `scontrol show node`.

    The local test cluster's nodes n1/n2 are not in DNS; a real cluster's are.
    """
    try:
        return socket.gethostbyname(host)
    except OSError:
        proc = subprocess.run(["scontrol", "show", "node", "-o", host], capture_output=True, text=True, timeout=30)
        for field in proc.stdout.split():
            if field.startswith("NodeAddr="):
                return field.removeprefix("NodeAddr=")
    die(name, f"cannot resolve the critic host {host!r}")
    return ""
