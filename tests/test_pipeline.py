"""The tiny pipeline end to end through the real CLI: real TRL, real data, real lineage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, TINY, cli

STAGES = ("base", "sft", "rm", "ppo", "eval")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    first = cli("run", str(TINY), "--out", str(run_dir), check=True)
    return run_dir, first


def manifest(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "manifest.json").read_text())


def test_every_stage_has_outputs_and_manifest(tiny_run):
    run_dir, first = tiny_run
    for stage in STAGES:
        m = manifest(run_dir, stage)
        assert m["stage"] == stage
        for key in (
            "fingerprint",
            "inputs",
            "config",
            "command",
            "packages",
            "git_commit",
            "started_at",
            "finished_at",
            "metrics",
            "outputs",
        ):
            assert key in m, (stage, key)
        assert m["packages"]["trl"] == "1.12.0"
        assert all(len(d) == 64 for d in m["inputs"]["files"].values())
        assert all(len(ref["sha256"]) == 64 for ref in m["inputs"]["parents"].values())
    for stage in ("sft", "rm", "ppo"):
        assert (run_dir / stage / "model" / "model.safetensors").is_file()
        assert (run_dir / stage / "curves.png").stat().st_size > 1000
        rows = [json.loads(line) for line in (run_dir / stage / "train_log.jsonl").read_text().splitlines()]
        assert rows, stage
    ppo_rows = [json.loads(x) for x in (run_dir / "ppo" / "train_log.jsonl").read_text().splitlines()]
    assert any("objective/kl" in r and "response_length" in r for r in ppo_rows)
    assert manifest(run_dir, "ppo")["metrics"]["updates"] == 2  # 8 episodes / 4 per rollout


def test_manifest_records_data_and_parents(tiny_run):
    run_dir, _ = tiny_run
    sft = manifest(run_dir, "sft")
    assert any(p.endswith("gsm8k/train.jsonl") for p in sft["inputs"]["files"])
    assert set(sft["inputs"]["parents"]) == {"base"}
    assert sft["notes"]["examples"] > 0 and sft["config"]["sft"]["max_steps"] == 3
    assert set(manifest(run_dir, "ppo")["inputs"]["parents"]) == {"sft", "rm"}
    assert set(manifest(run_dir, "eval")["inputs"]["parents"]) == {"base", "sft", "rm", "ppo"}
    rm = manifest(run_dir, "rm")
    assert rm["notes"]["heldout_pairs"] > 0 and "heldout_accuracy" in rm["metrics"]


def test_eval_results_side_by_side(tiny_run):
    run_dir, _ = tiny_run
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert set(results["checkpoints"]) == {"base", "sft", "ppo"}
    for row in results["checkpoints"].values():
        assert row["gsm8k_n"] == 4 and row["hh_n"] == 4
        for key in ("gsm8k_exact_match", "rm_score_mean", "response_length_mean", "kl_to_ref_mean"):
            assert isinstance(row[key], float)
    # The reference policy is SFT: its KL to itself is exactly zero.
    assert results["checkpoints"]["sft"]["kl_to_ref_mean"] == pytest.approx(0.0, abs=1e-5)
    assert len(results["samples"]) == 2 and {"base", "sft", "ppo"} <= set(results["samples"][0])
    assert (run_dir / "eval" / "summary.png").is_file() and (run_dir / "eval" / "lengths.png").is_file()
    lines = (run_dir / "eval" / "responses" / "ppo.jsonl").read_text().splitlines()
    assert len(lines) == 8 and "response" in json.loads(lines[0])


def test_lineage_show_reaches_data_and_base_model(tiny_run):
    run_dir, _ = tiny_run
    proc = cli("lineage", "show", str(run_dir / "eval"), check=True)
    out = proc.stdout
    for needle in (
        "eval",
        "<- ppo",
        "<- sft",
        "<- rm",
        "<- base",
        "gsm8k/train.jsonl",
        "gsm8k/test.jsonl",
        "harmless-base-test.jsonl.gz",
        "tokenizers/gpt2/tokenizer.json",
    ):
        assert needle in out, needle
    assert "CHANGED" not in out
    chain = json.loads(cli("lineage", "show", str(run_dir / "eval"), "--json", check=True).stdout)
    assert {p["stage"] for p in chain["parents"]} == {"base", "sft", "rm", "ppo"}


def test_rerun_skips_everything(tiny_run):
    run_dir, _ = tiny_run
    before = {s: (run_dir / s / "manifest.json").read_bytes() for s in STAGES}
    proc = cli("run", str(TINY), "--out", str(run_dir), check=True)
    for stage in STAGES:
        assert f"[{stage}] skipped" in proc.stdout
        assert (run_dir / stage / "manifest.json").read_bytes() == before[stage]


def test_config_change_reruns_that_stage_and_later_only(tiny_run):
    run_dir, _ = tiny_run
    before = {s: (run_dir / s / "manifest.json").read_bytes() for s in STAGES}
    proc = cli("run", str(TINY), "--out", str(run_dir), "rm.lr=2e-3", check=True)
    for stage in ("base", "sft"):
        assert f"[{stage}] skipped" in proc.stdout
        assert (run_dir / stage / "manifest.json").read_bytes() == before[stage]
    for stage in ("rm", "ppo", "eval"):
        assert f"[{stage}] running (config or inputs changed" in proc.stdout
        assert (run_dir / stage / "manifest.json").read_bytes() != before[stage]
    assert manifest(run_dir, "rm")["config"]["rm"]["lr"] == 2e-3
    assert "CHANGED" not in cli("lineage", "show", str(run_dir / "eval"), check=True).stdout


def test_killed_stage_leaves_nothing_finished(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # A long SFT so that the kill surely lands while it trains.
    proc = subprocess.Popen(
        [sys.executable, "-m", "nemo_rlhf", "run", str(TINY), "--out", str(run_dir), "sft.max_steps=500"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not list(run_dir.glob(".sft.tmp-*/train_log.jsonl")):  # SFT is training
            assert proc.poll() is None, "the run ended before SFT trained"
            assert time.monotonic() < deadline
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (run_dir / "base" / "manifest.json").is_file()
    assert not (run_dir / "sft").exists()
    assert list(run_dir.glob(".sft.tmp-*"))
    again = cli("run", str(TINY), "--out", str(run_dir), "--until", "sft", check=True)
    assert "removed the leftovers of an interrupted stage" in again.stdout
    assert "[base] skipped" in again.stdout and "[sft] running (no finished run yet)" in again.stdout
    assert (run_dir / "sft" / "manifest.json").is_file() and not list(run_dir.glob(".sft.tmp-*"))
