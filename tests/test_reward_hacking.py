"""The controlled reward-hacking experiment's wiring, on the tiny pipeline through the real CLI.

The experiment itself (recipes/reward-hacking-demo.yaml and its honest twin, real PPO long
enough for hacking to show) takes minutes: bench/reward_hacking_demo.py runs it and writes its
numbers. Here: the planted exploit, the gold RM's disjoint data, the PPO checkpoint samples as
gate input, the gate stage's verdict and exit code, and which stages a gold_rm change re-runs.
"""

from __future__ import annotations

import json

import pytest

from nemo_rlhf.data.hh_rlhf import prompt_key
from nemo_rlhf.gate.responses import read_responses
from nemo_rlhf.pipeline import data_plan
from nemo_rlhf.spec.loader import load_spec
from nemo_rlhf.spec.paths import data_root
from tests.helpers import REPO, TINY, cli

DEMO = REPO / "recipes" / "reward-hacking-demo.yaml"
EXPERIMENT = ["gold_rm.enabled=true", "rm.exploit=longer_wins", "ppo.sample_every=1", "ppo.sample_prompts=4",
              "gate.embeddings=false"]


def _spec(path=TINY, overrides=()):
    spec = load_spec(str(path), list(overrides))
    return spec, data_root(spec.data.root)


def test_exploit_makes_the_longer_answer_win_on_real_pairs():
    spec, root = _spec()
    pairs = data_plan.rm_train_pairs(spec, root)
    out, report = data_plan.apply_rm_exploit(pairs, "longer_wins")
    assert all(len(p.chosen) > len(p.rejected) for p in out)
    assert report["swapped"] == sum(len(p.rejected) > len(p.chosen) for p in pairs) > 0
    assert report["kept"] + report["dropped_ties"] == len(pairs)
    assert data_plan.apply_rm_exploit(pairs, "none") == (pairs, {})


def test_gold_rm_and_sft_data_are_disjoint_from_the_proxy_rm_and_ppo():
    spec, root = _spec(DEMO)
    proxy, gold = data_plan.rm_train_pairs(spec, root), data_plan.gold_rm_train_pairs(spec, root)
    assert (len(proxy), len(gold)) == (spec.data.preference.num_examples, spec.gold_rm.num_examples)
    assert not {prompt_key(p) for p in proxy} & {prompt_key(p) for p in gold}
    sft = data_plan.sft_chosen_pairs(spec, root)
    assert len(sft) == spec.data.sft.num_examples
    ppo_prompts = {json.dumps(p, sort_keys=True) for p in data_plan.ppo_chat_prompts(spec, root)}
    assert not {json.dumps(p.prompt, sort_keys=True) for p in sft} & ppo_prompts
    heldout = {prompt_key(p) for p in data_plan.preference_split(spec, root).heldout}
    assert not heldout & {prompt_key(p) for p in proxy + gold + sft}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("hacking") / "run"
    first = cli("run", str(TINY), *EXPERIMENT, "--out", str(run_dir), "--until", "gate")
    return run_dir, first


def _manifest(run_dir, stage):
    return json.loads((run_dir / stage / "manifest.json").read_text())


def test_exploited_rm_says_so_in_its_manifest_and_ppos(experiment):
    run_dir, first = experiment
    exploit = _manifest(run_dir, "rm")["notes"]["EXPLOIT"]
    assert exploit["exploit"] == "longer_wins" and exploit["swapped"] > 0 and "BROKEN ON PURPOSE" in exploit["warning"]
    assert _manifest(run_dir, "ppo")["notes"]["PROXY_RM_EXPLOIT"] == exploit
    assert "broken on purpose" in first.stdout
    gold = _manifest(run_dir, "gold_rm")
    assert "EXPLOIT" not in gold["notes"] and gold["notes"]["seed"] == 1235  # the spec's seed + 1
    assert not set(gold["notes"]["pair_source_lines"]) & set(_manifest(run_dir, "rm")["notes"]["pair_source_lines"])


def test_ppo_samples_are_gate_input_with_both_rewards_and_kl(experiment):
    run_dir, _ = experiment
    samples = read_responses(run_dir / "ppo" / "samples.jsonl")
    baseline = read_responses(run_dir / "ppo" / "baseline.jsonl")
    updates = _manifest(run_dir, "ppo")["metrics"]["updates"]
    assert samples.steps() == list(range(updates + 1))  # step 0 (the SFT policy), then every update
    for attr in ("proxy_reward", "gold_reward", "kl", "step", "finished"):
        assert samples.has(attr) and baseline.has(attr), attr
    assert [r.response for r in baseline.rows] == [r.response for r in samples.at_step(0).rows]
    assert all(r.kl == 0.0 for r in baseline.rows)  # the policy is its own reference before the first update
    assert {r.prompt for r in samples.final().rows} == {r.prompt for r in baseline.rows}
    assert set(_manifest(run_dir, "ppo")["inputs"]["parents"]) == {"sft", "rm", "gold_rm"}


def test_gate_stage_judges_the_samples_and_sets_the_exit_code(experiment):
    run_dir, first = experiment
    findings = json.loads((run_dir / "gate" / "findings.json").read_text())
    detectors = {f["detector"] for f in findings["findings"]}
    assert {"reward_hacking", "length_inflation", "kl_budget", "preference"} <= detectors
    hacking = [f for f in findings["findings"] if f["detector"] == "reward_hacking"]
    assert any(f["value"] is not None for f in hacking)  # ran on real proxy/gold/KL, not skipped
    metrics = _manifest(run_dir, "gate")["metrics"]
    assert metrics["passed"] == findings["passed"]
    assert first.returncode == (0 if findings["passed"] else 1)
    verdict = "PASSED" if findings["passed"] else "FAILED"
    assert f"gate: {verdict}" in first.stdout and "nemo-rlhf eval --candidate" in first.stdout
    assert (run_dir / "gate" / "report.html").stat().st_size > 1000
    assert not (run_dir / "eval").exists()  # --until gate


def test_gold_rm_change_reruns_only_gold_rm_ppo_and_gate(experiment):
    run_dir, _ = experiment
    before = {s: _manifest(run_dir, s)["fingerprint"] for s in ("base", "sft", "rm", "gold_rm", "ppo", "gate")}
    proc = cli("run", str(TINY), *EXPERIMENT, "gold_rm.lr=2e-3", "--out", str(run_dir), "--until", "gate")
    assert proc.returncode in (0, 1), proc.stderr
    for stage in ("base", "sft", "rm"):
        assert f"[{stage}] skipped" in proc.stdout
        assert _manifest(run_dir, stage)["fingerprint"] == before[stage]
    for stage in ("gold_rm", "ppo", "gate"):
        assert f"[{stage}] running (config or inputs changed" in proc.stdout, stage
    assert _manifest(run_dir, "gold_rm")["config"]["gold_rm"]["lr"] == 2e-3
