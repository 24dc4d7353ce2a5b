"""Preflight: one test per rule, the memory model against known figures, and the CLI's exit code."""

from __future__ import annotations

from pathlib import Path

import pytest

from nemo_rlhf.errors import UserError
from nemo_rlhf.slurm import memory
from nemo_rlhf.slurm.preflight import run_preflight
from nemo_rlhf.spec.architectures import PRESETS
from nemo_rlhf.spec.loader import load_spec
from tests.helpers import cli

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SMALL = RECIPES / "smollm2-360m-cluster.yaml"  # 32 layers, 15 heads / 5 groups; 1 node x 8 GPUs at TP 1
LARGE = sorted(RECIPES.glob("*-cluster.yaml"))


def refused(overrides: list[str], recipe: Path = SMALL) -> str:
    with pytest.raises(UserError) as err:
        run_preflight(load_spec(recipe, overrides))
    return err.value.render()


@pytest.mark.parametrize("recipe", LARGE, ids=lambda p: p.stem)
def test_every_cluster_recipe_passes_schema_and_preflight(recipe):
    report = run_preflight(load_spec(recipe))
    assert set(report.layouts) == {"sft", "rm", "ppo", "critic"}
    assert not report.warnings, report.render()


def test_world_size_must_be_tp_x_pp_x_dp():
    text = refused(["parallel.sft.tp=5", "model.arch.num_attention_heads=15"])
    assert "parallel.sft: 1 node(s) x 8 GPUs = 8 is not TP 5 x PP 1 x DP" in text


def test_dp_below_one_refused():
    text = refused(["parallel.rm.pp=16"])
    assert "parallel.rm: TP 1 x PP 16 = 16 GPUs per model copy" in text and "DP < 1" in text
    assert "raise parallel.rm.nodes to at least 2" in text


def test_real_smollm2_135m_at_tp2_refused(smollm_dir):
    """The real SmolLM2-135M config.json (9 heads, 3 query groups): TP=2 divides neither."""
    text = refused(["model.arch.preset=null", f"model.path={smollm_dir}", "parallel.sft.tp=2"])
    assert "parallel.sft.tp: the model's 9 attention heads and 3 query groups are not divisible by TP 2" in text
    assert "(and the stage's 8 GPUs): 1\n" in text  # TP 3 divides 9 and 3, but not 8 GPUs
    assert "parallel.rm" not in text


def test_query_groups_alone_not_divisible():
    text = refused(["model.arch.preset=llama3-8b", "parallel.sft.tp=8", "model.arch.num_query_groups=4"])
    assert "4 query groups are not divisible by TP 8" in text and "attention heads and" not in text


def test_layers_not_divisible_by_pp():
    text = refused(["model.arch.num_layers=30", "parallel.sft.pp=4"])
    assert "parallel.sft.pp: the model's 30 layers are not divisible by PP 4" in text


def test_layers_not_divisible_by_virtual_pp():
    text = refused(["parallel.sft.pp=2", "parallel.sft.virtual_pp=3"])
    assert "parallel.sft.virtual_pp: 32 layers are not divisible by PP 2 x VPP 3" in text
    assert "interleaving needs pipeline parallelism" in refused(["parallel.rm.virtual_pp=2"])


def test_global_batch_not_divisible_by_micro_batch_x_dp():
    text = refused(["parallel.sft.global_batch_size=100"])
    assert "parallel.sft.global_batch_size: 100 is not divisible by micro batch 2 x DP 8 = 16" in text


def test_critic_inference_micro_batch_x_dp_over_rollout_micro_batch():
    text = refused(["parallel.critic.inference_micro_batch_size=2"])
    assert "parallel.critic.inference_micro_batch_size: 2 x critic DP 8 = 16 exceeds" in text
    assert "rollout_micro_batch_size 8" in text


def test_rollout_samples_not_divisible():
    text = refused(["ppo.rollout_batch_size=96", "ppo.total_episodes=960"])
    assert "ppo.rollout_batch_size: 96 rollout samples are not divisible by rollout micro batch 8 x actor DP 8" in text
    assert "parallel.ppo.global_batch_size: 64 is not ppo.rollout_batch_size 96 / ppo.num_mini_batches 2 = 48" in text


def test_prompt_plus_response_longer_than_model():
    text = refused(["ppo.prompt_max_length=1500"], RECIPES / "pythia-410m-cluster.yaml")
    assert "ppo.prompt_max_length + ppo.response_length: 1500 + 1024 = 2524 exceeds the model's sequence length 2048" \
        in text


def test_training_length_longer_than_model():
    assert "sft.max_length: 4096 exceeds the model's sequence length 2048" in refused(
        ["sft.max_length=4096"], RECIPES / "pythia-410m-cluster.yaml")


def test_ppo_semantics_nemo_aligner_cannot_express():
    text = refused(["ppo.ppo_epochs=2", "ppo.kl_estimator=k3", "ppo.whiten_rewards=true"])
    assert "ppo.ppo_epochs" in text and "ppo.kl_estimator" in text and "ppo.whiten_rewards" in text
    assert "3 problems" in text


def test_memory_over_gpu_refused_with_parts():
    text = refused(["parallel.sft.tp=1"], RECIPES / "llama3-8b-cluster.yaml")
    assert "parallel.sft: estimated 85.7 GB per GPU exceeds cluster.gpu_memory_gb 80" in text
    for part in ("weights 16.06", "gradients 32.12", "optimizer (distributed) 12.05", "activations", "logits"):
        assert part in text


def test_memory_fits_on_bigger_gpu():
    report = run_preflight(load_spec(RECIPES / "llama3-8b-cluster.yaml", ["parallel.sft.tp=1",
                                                                          "cluster.gpu_memory_gb=141"]))
    assert any(e.stage == "sft" and 85e9 < e.total < 86e9 for e in report.estimates)


def test_pipeline_parallel_on_a_model_that_fits_warns():
    report = run_preflight(load_spec(SMALL, ["parallel.sft.pp=2"]))
    assert [w.key for w in report.warnings] == ["parallel.sft.pp"]
    assert "fits at TP 1 without pipeline parallelism" in report.render()


def test_recomputation_a_stage_does_not_need_warns():
    report = run_preflight(load_spec(SMALL, ["parallel.rm.activations_checkpoint=full"]))
    assert [w.key for w in report.warnings] == ["parallel.rm.activations_checkpoint"]
    assert "full recomputation is not needed" in report.render()
    # Where the memory is needed, recomputation is no waste: Llama-3-8B SFT at TP 1 fits only with it.
    tight = run_preflight(load_spec(RECIPES / "llama3-8b-cluster.yaml", [
        "parallel.sft.tp=1", "parallel.sft.sequence_parallel=false", "parallel.sft.activations_checkpoint=full"]))
    assert not [w for w in tight.warnings if w.key == "parallel.sft.activations_checkpoint"], tight.render()


def test_sequence_parallel_at_tp1_warns():
    report = run_preflight(load_spec(SMALL, ["parallel.critic.sequence_parallel=true"]))
    assert [w.key for w in report.warnings] == ["parallel.critic.sequence_parallel"]
    assert "does nothing at tp=1" in report.render()


def test_tempered_logprobs_warn():
    report = run_preflight(load_spec(SMALL, ["ppo.temperature=0.7"]))
    assert [w.key for w in report.warnings] == ["ppo.temperature"]
    assert "raw logits" in report.render() and "ppo.temperature=1.0" in report.render()


def test_tensor_parallel_across_nodes_warns():
    report = run_preflight(load_spec(SMALL, ["cluster.gpus_per_node=2", "parallel.sft.nodes=4", "parallel.sft.tp=4",
                                             "model.arch.num_attention_heads=16", "model.arch.num_query_groups=4"]))
    assert [w.key for w in report.warnings] == ["parallel.sft.tp"], report.render()
    assert "TP 4 spans nodes (2 GPUs per node)" in report.render()


def test_cli_prints_warnings_and_still_passes():
    proc = cli("preflight", str(SMALL), "parallel.sft.pp=2")
    assert proc.returncode == 0 and "warning: parallel.sft.pp:" in proc.stdout and "1 warning(s)" in proc.stdout


def test_memory_model_matches_known_figures():
    """Llama-3-8B has 8.03 B parameters; Megatron's documented 18 bytes/param without the distributed
    optimizer and 6 + 12/DP with it (docs/source/distrib_optimizer.md)."""
    dims = PRESETS["llama3-8b"]
    assert abs(dims.total_params() - 8.030e9) < 1e7
    assert abs(PRESETS["llama3-70b"].total_params() - 70.55e9) < 1e8
    par = memory.Parallelism(tp=1, pp=1, dp=8)
    for dist, per_param in ((False, 18), (True, 6 + 12 / 8)):
        parts = memory.training_parts(dims, par, 128, 1, 8, "bf16", dist)
        states = sum(p.bytes for p in parts[:3])
        assert states == pytest.approx(per_param * dims.total_params())


def test_small_scale_spec_has_nothing_to_check():
    assert run_preflight(load_spec(RECIPES / "tiny-cpu.yaml")).layouts == {}


def test_cli_exit_2_without_traceback():
    proc = cli("preflight", str(SMALL), "parallel.sft.tp=2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "parallel.sft.tp: the model's 15 attention heads and 5 query groups are not divisible by TP 2" in proc.stderr
    ok = cli("preflight", str(SMALL))
    assert ok.returncode == 0 and "passed preflight" in ok.stdout and "sft (train):" in ok.stdout
