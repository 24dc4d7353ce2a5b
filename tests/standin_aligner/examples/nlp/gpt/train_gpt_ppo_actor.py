"""STAND-IN for NeMo-Aligner's examples/nlp/gpt/train_gpt_ppo_actor.py (tests only; trains nothing).

Reads the critic's address from remote_critic_rm.critic.{ip,port} (the sbatch script passes the
first host of het-group 0 as `remote_critic_rm.critic.ip=...`), POSTs a request to it (retrying
while the server starts), checks the answer, and rank 0 writes the .nemo path NeMo would save
(a copy of the SFT checkpoint it starts from).
"""

import json
import os
import sys
import time
import urllib.request

from standin_common import (
    check_forced_failure,
    check_jsonl,
    check_layout,
    check_nemo,
    die,
    get,
    hold_while_listed,
    load_config,
    log,
    resolve_host,
    save_nemo,
)

NAME = "actor"
CONNECT_TIMEOUT_S = 120


def ask_critic(url: str, samples: list[str]) -> dict:
    """POST the samples; retry until the server answers or CONNECT_TIMEOUT_S passed."""
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    request = json.dumps({"samples": samples}).encode()
    while True:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, data=request, method="POST"), timeout=10) as reply:
                return json.loads(reply.read())
        except OSError as err:
            if time.monotonic() > deadline:
                die(NAME, f"no answer from the critic at {url} after {CONNECT_TIMEOUT_S} s: {err}")
            time.sleep(0.5)


if __name__ == "__main__":
    cfg = load_config(NAME, sys.argv[1:])
    check_forced_failure(NAME)
    check_layout(NAME, cfg)
    hold_while_listed(NAME)
    source = check_nemo(NAME, cfg, get(cfg, "pretrained_checkpoint.restore_from_path"))
    check_jsonl(NAME, get(cfg, "model.data.data_prefix.train")[0], ("text",))
    if get(cfg, "remote_critic_rm.combine_rm_and_critic_server") is not True:
        die(NAME, "remote_critic_rm.combine_rm_and_critic_server is not true, but the critic job serves the RM too")
    host, port = get(cfg, "remote_critic_rm.critic.ip"), get(cfg, "remote_critic_rm.critic.port")
    address = resolve_host(NAME, host)
    log(NAME, f"critic host {host} (SLURM_JOB_NODELIST_HET_GROUP_0={os.environ.get('SLURM_JOB_NODELIST_HET_GROUP_0')})"
              f" -> {address}:{port}; NCCL_ALGO={os.environ.get('NCCL_ALGO')}")
    samples = ["a rollout", "another rollout"]
    answer = ask_critic(f"http://{address}:{port}/infer", samples)
    if answer.get("port") != port or answer.get("rewards") != [float(len(s)) for s in samples]:
        die(NAME, f"unexpected answer from the critic: {answer}")
    log(NAME, f"reached the critic at {host}:{port}: {answer}")
    save_nemo(NAME, cfg, source)
