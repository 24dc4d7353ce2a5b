"""`nemo-rlhf parity config`: the spec as TRL 1.12 args and NeMo-Aligner 0.7.0 keys, semantic differences judged."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from nemo_rlhf.parity.config import CONFIGURABLE, EQUIVALENT, INCOMPARABLE, build_sides, config_parity, rendered_configs
from nemo_rlhf.spec.loader import load_spec
from tests.helpers import TINY, cli

# The tiny recipe's large-scale batches set to the small-scale ones, an untied model (our converter always
# writes a separate output layer) and temperature 1 (TRL's log-probs are tempered, NeMo-Aligner's are not):
# nothing is left to align.
ALIGNED = ["parallel.sft.global_batch_size=4", "parallel.rm.global_batch_size=4", "parallel.ppo.global_batch_size=4",
           "model.random.tie_word_embeddings=false", "ppo.temperature=1.0"]


def _write_configs(folder, spec, edit=None):
    """The rendered NeMo-Aligner configs (with an optional edit) written to `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, cfg in rendered_configs(spec).items():
        if edit and name in edit:
            for key, value in edit[name].items():
                OmegaConf.update(cfg, key, value, merge=False)
        OmegaConf.save(cfg, folder / f"{name}.yaml")
    return folder


def _by_name(result):
    return {c.name: c for c in result.checks}


@pytest.fixture(scope="module")
def aligned_spec():
    return load_spec(TINY, ALIGNED)


def test_aligned_configs_pass_and_every_key_is_side_by_side(aligned_spec, tmp_path):
    result = config_parity(aligned_spec, _write_configs(tmp_path / "configs", aligned_spec))
    assert result.passed, [c.detail for c in result.checks if not c.passed]
    rows = {(r["spec key"], r["NeMo key"]): r for r in result.tables["hyperparameters"]}
    kl = rows[("ppo.kl_coef", "ppo_actor:trainer.ppo.initial_policy_kl_penalty")]
    assert kl["TRL arg"] == "kl_coef" and kl["TRL value"] == kl["NeMo value"] == kl["spec value"] == 0.05
    est = rows[("ppo.kl_estimator", "ppo_actor:trainer.ppo.use_absolute_kl")]
    assert (est["TRL value"], est["NeMo value"]) == ("k1", False)
    steps = rows[("ppo.total_episodes", "ppo_actor:trainer.ppo.max_steps")]
    assert (steps["TRL value"], steps["NeMo value"]) == (8, 2)  # episodes vs rollouts: the table's conversion
    statuses = {r["difference"]: r["status"] for r in result.tables["semantic differences"]}
    assert statuses["ppo/kl_estimator"] == statuses["ppo/kl_coef"] == statuses["sft/adam"] == EQUIVALENT
    assert statuses["ppo/logprob_temperature"] == EQUIVALENT
    # what no setting removes is reported, not failed
    assert statuses["ppo/whitening_variance"] == statuses["ppo/missing_eos"] == INCOMPARABLE
    assert "0.05" in _by_name(result)["config/ppo/kl_coef"].detail and "0.01" in _by_name(result)[
        "config/ppo/kl_coef"].detail


def test_upstream_kl_and_whitening_defaults_are_caught_with_the_fix(aligned_spec, tmp_path):
    edit = {"ppo_actor": {"trainer.ppo.use_absolute_kl": True, "trainer.ppo.normalize_advantages": False,
                          "trainer.ppo.initial_policy_kl_penalty": 0.01}}
    result = config_parity(aligned_spec, _write_configs(tmp_path / "configs", aligned_spec, edit))
    checks = _by_name(result)
    assert not result.passed
    for name in ("config/ppo/kl_estimator", "config/ppo/advantage_whitening", "config/ppo/kl_coef"):
        assert not checks[name].passed and checks[name].extra["status"] == CONFIGURABLE, name
    assert "use_absolute_kl: false" in checks["config/ppo/kl_estimator"].extra["how"]
    # the rendered value no longer carries the spec's: the side-by-side check names key and fix
    carried = checks["config/nemo/ppo_actor/ppo.kl_coef"]
    assert not carried.passed and "initial_policy_kl_penalty: 0.05" in carried.extra["fix"]


def test_spec_values_that_one_side_cannot_express():
    spec = load_spec(TINY, [*ALIGNED, "ppo.kl_estimator=k3", "ppo.ppo_epochs=2", "sft.grad_accum=2"])
    checks = _by_name(config_parity(spec))
    assert checks["config/ppo/kl_estimator"].extra["status"] == INCOMPARABLE
    assert not checks["config/ppo/batches"].passed and "ppo_epochs=1" in checks["config/ppo/batches"].extra["how"]
    assert not checks["config/sft/batch"].passed and "global_batch_size=8" in checks["config/sft/batch"].extra["how"]
    # the spec's Adam betas reach both sides: the rendered configs no longer keep upstream's [0.9, 0.98]
    assert all(checks[f"config/{d}"].extra["status"] == EQUIVALENT for d in ("sft/adam", "rm/adam", "ppo/adam",
                                                                             "ppo/adam_critic"))
    # a tied small-scale model against the untied .nemo our converter writes
    tied = {c.name: c for c in config_parity(load_spec(TINY)).checks}["config/model/tied_embeddings"]
    assert not tied.passed and "share_embeddings_and_output_weights: True" in tied.extra["how"]


def test_cli_json_report_run_dir_and_exit_codes(aligned_spec, tmp_path):
    configs = _write_configs(tmp_path / "configs", aligned_spec)
    run = tmp_path / "run"
    run.mkdir()
    proc = cli("parity", "config", str(TINY), *ALIGNED, "--configs", str(configs), "--json", "--report",
               str(tmp_path / "report"), "--run-dir", str(run))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["passed"] is True and all({"name", "passed", "value", "tolerance"} <= set(c) for c in out["checks"])
    assert {p.name for p in (tmp_path / "report").iterdir()} >= {"config.md", "config.json"}
    manifest = json.loads((run / "parity" / "manifest.json").read_text())
    assert manifest["notes"]["parity"]["config"]["passed"] is True
    failing = cli("parity", "config", str(TINY), "--configs", str(configs))
    assert failing.returncode == 1 and "FAIL config/sft/batch" in failing.stdout
    bad = cli("parity", "config", str(TINY), "--configs", str(tmp_path / "nowhere"))
    assert bad.returncode == 2 and "--configs" in bad.stderr and "Traceback" not in bad.stderr


def test_adam_betas_from_the_spec_reach_both_sides_and_a_mismatch_is_caught(tmp_path):
    spec = load_spec(TINY, [*ALIGNED, "rm.adam_beta2=0.98", "ppo.adam_beta1=0.8"])
    sides = build_sides(spec)
    assert (sides.trl["rm"]["adam_beta2"], sides.trl["ppo"]["adam_beta1"]) == (0.98, 0.8)
    assert sides.nemo_value("rm", "model.optim.betas") == [0.9, 0.98]
    assert sides.nemo_value("ppo_actor", "model.optim.betas") == sides.nemo_value("ppo_critic", "model.optim.betas") \
        == [0.8, 0.999]
    assert config_parity(spec).passed
    # configs on disk with upstream's betas in the critic and the RM: each caught, with the fix
    edit = {"ppo_critic": {"model.optim.betas": [0.9, 0.98]}, "rm": {"model.optim.betas": [0.9, 0.999]}}
    checks = _by_name(config_parity(spec, _write_configs(tmp_path / "configs", spec, edit)))
    critic = checks["config/ppo/adam_critic"]
    assert not critic.passed and "model.optim.betas: [0.8, 0.999] in ppo_critic.yaml" in critic.extra["how"]
    assert not checks["config/rm/adam"].passed and checks["config/ppo/adam"].passed
    carried = checks["config/nemo/ppo_critic/ppo.adam_beta2"]
    assert not carried.passed and "[0.8, 0.999]" in carried.extra["fix"]


def test_tempered_logprobs_are_configurable_with_the_fix():
    result = config_parity(load_spec(TINY, [*ALIGNED, "ppo.temperature=0.7"]))
    row = {r["difference"]: r for r in result.tables["semantic differences"]}["ppo/logprob_temperature"]
    assert row["status"] == CONFIGURABLE and not result.passed
    assert "ppo.temperature=1.0" in _by_name(result)["config/ppo/logprob_temperature"].detail
