"""`nemo-rlhf parity loss`: TRL's loss on real rows vs megatron-core's on the converted model (TP=2, gloo);
PPO on the models (policy log-probs, critic values of a fixed rollout) and its math alone.

Each megatron launch runs two micro-batches, the aligned one and a deliberately misaligned one, so one
torchrun shows both that the aligned batch agrees within the fp32 bound and that the misalignment fails.
"""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from nemo_rlhf.parity.config import rendered_configs
from nemo_rlhf.parity.loss import (
    fixed_batch,
    ppo_parity,
    rm_checks,
    rm_nemo_inputs,
    rm_trl_side,
    sft_checks,
    sft_nemo_inputs,
    sft_trl_side,
)
from nemo_rlhf.parity.megatron_launch import run_train_worker
from nemo_rlhf.parity.models import load_hf, stage_models
from nemo_rlhf.spec.loader import load_spec
from tests.helpers import TINY, cli

# std 0.1: with HF's 0.02 an untrained model's logits are nearly uniform and a wrong mask moves the loss by
# only ~4e-4 (FACTS.md); at 0.1 the per-token losses differ and so does the masked mean.
WIDER_INIT = "model.random.init_std=0.1"


@pytest.fixture(scope="module")
def spec():
    return load_spec(TINY, [WIDER_INIT])


def _launch(spec, stage, tmp_path_factory, misalign):
    """(TRL side, worker inputs, worker outputs) with micro-batch 0 aligned and micro-batch 1 misaligned."""
    models = stage_models(spec, stage, tmp_path_factory.mktemp(stage))
    tok = models.tokenizer
    batch = fixed_batch(spec, tok, stage, 3)
    make = sft_nemo_inputs if stage == "sft" else rm_nemo_inputs
    inputs = {**make(tok, batch.records, "mb0"), **make(tok, misalign(batch.records), "mb1")}
    run = run_train_worker(models.nemo_path, inputs, len(tok), 2, stage, "loss", {"micro-batches": 2})
    assert run.outputs is not None, run.tail
    side = sft_trl_side if stage == "sft" else rm_trl_side
    return side(load_hf(models, stage), tok, batch.trl_rows), inputs, run.outputs


def _header_in_completion(records):
    """The classic SFT mistake: the role header "assistant\\n" trained on. Same tokens, wrong mask."""
    return [{"input": r["input"].removesuffix("assistant\n"), "output": "assistant\n" + r["output"]} for r in records]


def _swapped(records):
    """Comparison lines in the wrong order: rejected first."""
    return [records[i + j] for i in range(0, len(records), 2) for j in (1, 0)]


def test_sft_loss_matches_at_tp2_and_a_wrong_mask_fails(spec, tmp_path_factory):
    trl, inputs, out = _launch(spec, "sft", tmp_path_factory, _header_in_completion)
    aligned = {c.name: c for c in sft_checks(trl, inputs, out, mb=0)}
    assert all(c.passed for c in aligned.values()), [(c.name, c.value, c.tolerance) for c in aligned.values()]
    assert aligned["sft/token_ce"].value < aligned["sft/token_ce"].tolerance / 5  # measured ~1e-6 vs 2e-5
    wrong = {c.name: c for c in sft_checks(trl, inputs, out, mb=1)}
    assert wrong["sft/token_ids"].passed  # the same tokens ...
    # ... but "assistant\n" (3 GPT-2 tokens) trained in each of the 3 examples
    assert not wrong["sft/loss_mask"].passed and wrong["sft/loss_mask"].value == 3 * 3
    assert not wrong["sft/loss"].passed and wrong["sft/loss"].value > 10 * wrong["sft/loss"].tolerance


def test_rm_loss_accuracy_margin_match_and_swapped_pairs_fail(spec, tmp_path_factory):
    trl, inputs, out = _launch(spec, "rm", tmp_path_factory, _swapped)
    aligned = {c.name: c for c in rm_checks(trl, inputs, out, mb=0)}
    assert all(c.passed for c in aligned.values()), [(c.name, c.value, c.tolerance) for c in aligned.values()]
    wrong = {c.name: c for c in rm_checks(trl, inputs, out, mb=1)}
    assert not wrong["rm/token_ids"].passed and not wrong["rm/rewards"].passed and not wrong["rm/margin"].passed


def test_cli_rm_end_to_end_and_a_layout_the_model_cannot_have(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    proc = cli("parity", "loss", str(TINY), WIDER_INIT, "--stage", "rm", "--json", "--report", str(tmp_path / "rep"),
               "--run-dir", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["passed"] and out["meta"]["tp"] == 2
    assert {c["name"] for c in out["checks"]} == {"rm/token_ids", "rm/rewards", "rm/loss", "rm/accuracy", "rm/margin"}
    assert (tmp_path / "rep" / "loss-rm.png").is_file() and (run / "parity" / "loss-rm.json").is_file()
    bad = cli("parity", "loss", str(TINY), "--stage", "sft", "--tp", "3")
    assert bad.returncode == 2 and "not divisible by TP=3" in bad.stderr and "Traceback" not in bad.stderr


# ----------------------------------------------------------------------------------------------- PPO

ALIGNED_PPO = ["ppo.missing_eos_penalty=null"]  # NeMo-Aligner has no EOS penalty


def _configs(tmp_path, spec, **actor):
    for name, cfg in rendered_configs(spec).items():
        if name == "ppo_actor":
            for key, value in actor.items():
                OmegaConf.update(cfg, f"trainer.ppo.{key}", value, merge=False)
        OmegaConf.save(cfg, tmp_path / f"{name}.yaml")
    return tmp_path


def test_ppo_aligned_configs_agree_after_structural_bridges(tmp_path):
    result = ppo_parity(load_spec(TINY, ALIGNED_PPO), math_only=True)
    assert result.passed, [(c.name, c.detail) for c in result.checks if not c.passed]
    checks = {c.name: c for c in result.checks}
    # raw differences exist and are each explained by a named structural difference
    assert checks["ppo/advantages_whitened"].extra["raw_max_diff"] > 1e-3
    assert "score_after_eos" in checks["ppo/rewards"].extra["structural"]


@pytest.mark.parametrize("edit, failing", [
    ({"normalize_advantages": False}, "advantage whitening"),  # whitening on the TRL side only
    ({"use_absolute_kl": True}, "KL estimator"),  # NeMo-Aligner's upstream default |k1| vs TRL's k1
])
def test_ppo_misaligned_configs_fail_and_name_the_difference(tmp_path, edit, failing):
    spec = load_spec(TINY, ALIGNED_PPO)
    result = ppo_parity(spec, _configs(tmp_path, spec, **edit), math_only=True)
    failed = [c for c in result.checks if not c.passed]
    assert failed and all(failing in c.detail for c in failed)
    assert "ppo/policy_loss" in {c.name for c in failed}


def test_ppo_cli_on_a_rollout_file(tmp_path):
    from dataclasses import asdict

    from safetensors.torch import save_file

    from nemo_rlhf.parity.ppo_math import synthetic_rollout

    rollout = {k: v.contiguous() for k, v in asdict(synthetic_rollout(batch=6, response_length=20, seed=3)).items()}
    save_file(rollout, tmp_path / "rollout.safetensors")
    proc = cli("parity", "loss", str(TINY), *ALIGNED_PPO, "--stage", "ppo", "--math-only", "--rollouts",
               str(tmp_path / "rollout.safetensors"), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["meta"]["batch"] == [6, 20] and out["meta"]["rollouts"].endswith("rollout.safetensors")
    del rollout["values"]
    save_file(rollout, tmp_path / "partial.safetensors")
    bad = cli("parity", "loss", str(TINY), "--stage", "ppo", "--math-only", "--rollouts",
              str(tmp_path / "partial.safetensors"))
    assert bad.returncode == 2 and "lacks values" in bad.stderr


def test_ppo_missing_eos_penalty_and_k3_fail():
    for override in ("ppo.missing_eos_penalty=1.0", "ppo.kl_estimator=k3"):
        result = ppo_parity(load_spec(TINY, [*ALIGNED_PPO, override]), math_only=True)
        assert not result.passed, override


# ----------------------------------------------------------------------------------------------- PPO on the models

# NeMo-Aligner's log-probs are of the raw logits, TRL's of logits / temperature: aligned at temperature 1
MODEL_PPO = [WIDER_INIT, *ALIGNED_PPO, "ppo.temperature=1.0"]


def test_ppo_models_agree_at_tp2_and_the_rollout_is_saved(tmp_path):
    rollout = tmp_path / "rollout.safetensors"
    result = ppo_parity(load_spec(TINY, MODEL_PPO), save_rollout=rollout)
    assert result.passed, [(c.name, c.value, c.tolerance, c.detail[:300]) for c in result.checks if not c.passed]
    checks = {c.name: c for c in result.checks}
    # the models' numbers: fp32 summation order only (measured ~2e-6 log-prob, ~3e-7 value), far under the bound
    assert checks["ppo/policy_logprobs"].value < 1e-4 and checks["ppo/critic_values"].value < 1e-4
    # both sides computed losses from their own numbers; the structural differences are still there and named
    assert checks["ppo/policy_loss"].extra["raw_max_diff"] > 1e-3
    assert result.meta["tp"] == 2 and result.meta["responses_without_eos"] == 1 and result.meta["response_tokens"] > 8

    # the saved rollout is what was used (test_ppo_replays_the_trl_runs_own_rollout reads one back through the CLI)
    from safetensors.torch import load_file, save_file

    tensors = load_file(rollout)
    assert int(tensors["lengths"].sum()) == result.meta["response_tokens"] and "new_logprobs" in tensors
    del tensors["prompt_ids"]
    save_file(tensors, tmp_path / "no-tokens.safetensors")
    bad = cli("parity", "loss", str(TINY), "--stage", "ppo", "--rollouts", str(tmp_path / "no-tokens.safetensors"))
    assert bad.returncode == 2 and "lacks prompt_ids" in bad.stderr and "--math-only" in bad.stderr
    bad = cli("parity", "loss", str(TINY), "--stage", "ppo", "--math-only", "--save-rollout", str(tmp_path / "x"))
    assert bad.returncode == 2 and "--save-rollout" in bad.stderr


def test_ppo_models_fail_on_tempered_logprobs_and_another_critic(tmp_path):
    spec = load_spec(TINY, [WIDER_INIT, *ALIGNED_PPO])  # temperature 0.7, the small-scale default
    other = stage_models(load_spec(TINY, [WIDER_INIT, "seed=7"]), "rm", tmp_path / "other")  # another critic
    result = ppo_parity(spec, critic_nemo=other.nemo_path)
    failed = {c.name: c for c in result.checks if not c.passed}
    assert {"ppo/logprob_temperature", "ppo/critic_values", "ppo/policy_loss", "ppo/value_loss"} <= set(failed)
    assert "ppo.temperature=1.0" in failed["ppo/logprob_temperature"].detail
    assert "ppo/policy_logprobs" not in failed  # the policy itself is the same model on both sides


def test_ppo_replays_the_trl_runs_own_rollout(tmp_path):
    """The PPO stage keeps its last TRL rollout and the value model that trained on it; parity replays them."""
    run = tmp_path / "run"
    cli("run", str(TINY), "--out", str(run), "--until", "ppo", *MODEL_PPO, check=True)
    notes = json.loads((run / "ppo" / "manifest.json").read_text())["notes"]["parity_rollout"]
    assert notes["written"] and notes["responses"] == 4 and notes["response_length"] == 16
    # the captured tensors are TRL's, aligned: its reference log-probs are the SFT model's of those tokens
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from nemo_rlhf.parity.ppo_models import hf_current
    from nemo_rlhf.parity.rollout_file import read_token_rollout

    tokens, rollout = read_token_rollout(run / "ppo" / "rollout.safetensors")
    reference = AutoModelForCausalLM.from_pretrained(run / "sft" / "model")
    critic = AutoModelForSequenceClassification.from_pretrained(run / "ppo" / "value_model")
    pad = reference.config.pad_token_id
    assert pad is not None and not (tokens.prompt_ids[:, -1] == pad).any()  # left-padded prompts
    ours = hf_current(reference, critic, tokens, pad, 1.0)["logprobs"]
    assert (ours - rollout.ref_logprobs).abs()[rollout.token_mask].max() < 1e-4

    proc = cli("parity", "loss", str(TINY), *MODEL_PPO, "--stage", "ppo", "--run-dir", str(run), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    meta = out["meta"]
    assert meta["rollouts"] == str(run / "ppo" / "rollout.safetensors")
    assert meta["policy"] == str(run / "ppo" / "model") and meta["critic"] == str(run / "ppo" / "value_model")
    assert meta["responses_without_eos"] == notes["without_eos"]
    assert (run / "parity" / "loss-ppo.json").is_file()

    (tmp_path / "cut.safetensors").write_bytes((run / "ppo" / "rollout.safetensors").read_bytes()[:200])
    bad = cli("parity", "loss", str(TINY), "--stage", "ppo", "--run-dir", str(run), "--rollouts",
              str(tmp_path / "cut.safetensors"))
    assert bad.returncode == 2 and "cannot read" in bad.stderr and "Traceback" not in bad.stderr
