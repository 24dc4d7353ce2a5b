"""Spec loading: typed, strict, every problem reported with its key and file, exit 2."""

from __future__ import annotations

import pytest

from nemo_rlhf.cli.spec import _explain
from nemo_rlhf.errors import UserError
from nemo_rlhf.spec.hyperparams import TABLE, trl_kwargs
from nemo_rlhf.spec.loader import default_recipe_path, load_spec
from nemo_rlhf.spec.schema import PipelineSpec
from tests.helpers import TINY, cli


def test_recipes_load():
    tiny = load_spec(TINY)
    assert tiny.model.source == "random" and tiny.scale == "small"
    default = load_spec(None)
    assert default_recipe_path().name == "smollm2-135m-cpu.yaml"
    assert default.model.name == "smollm2-135m-instruct"


def test_overrides_are_typed():
    spec = load_spec(TINY, ["ppo.kl_coef=0.02", "ppo.whiten_rewards=true", "rm.init_from=base"])
    assert spec.ppo.kl_coef == 0.02 and spec.ppo.whiten_rewards is True and spec.rm.init_from == "base"


def test_all_problems_reported_at_once(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text() + "\nextra_section: {a: 1}\n")
    with pytest.raises(UserError) as err:
        load_spec(bad, ["ppo.kl_coeff=1", "sft.max_stepz=3"])
    text = err.value.render()
    assert str(bad) in text
    assert "extra_section: unknown key" in text
    assert "ppo.kl_coeff: unknown key (did you mean ppo.kl_coef?)" in text
    assert "sft.max_stepz" in text and "3 problems" in text


def test_impossible_values_named():
    with pytest.raises(UserError) as err:
        load_spec(TINY, ["ppo.num_mini_batches=3", "model.random.num_kv_heads=3", "ppo.gamma=1.5", "name=a b"])
    text = err.value.render()
    for key in ("ppo.num_mini_batches", "model.random.num_kv_heads", "ppo.gamma", "name:"):
        assert key in text


def test_trl_mapping_covers_every_canonical_field():
    spec = PipelineSpec()
    for stage in ("sft", "rm", "ppo"):
        kwargs = trl_kwargs(spec, stage)
        mapped = {m.canonical for m in TABLE if m.stage == stage}
        assert set(kwargs) == {m.trl for m in TABLE if m.stage == stage}
        section_fields = set(vars(getattr(spec, stage)))
        unmapped = section_fields - mapped - {"init_from", "eval_pairs", "prompt_max_length", "exploit", "sample_every",
                                             "sample_prompts"}
        assert not unmapped, f"{stage} fields with no TRL mapping: {unmapped}"


def test_adam_betas_are_canonical_validated_and_explained():
    spec = load_spec(TINY, ["sft.adam_beta2=0.98", "gold_rm.adam_beta1=0.85"])
    assert trl_kwargs(spec, "sft")["adam_beta2"] == 0.98 and trl_kwargs(spec, "ppo")["adam_beta2"] == 0.999
    # the gold RM trains with the rm rows read from its own section (stages.training.trainer_args)
    gold = {m.trl: getattr(spec.gold_rm, m.canonical) for m in TABLE if m.stage == "rm"}
    assert (gold["adam_beta1"], gold["adam_beta2"]) == (0.85, 0.999)
    with pytest.raises(UserError) as err:
        load_spec(TINY, ["rm.adam_beta2=1.0", "ppo.adam_beta1=-0.1", "gold_rm.adam_beta2=1.5", "sft.adam_beta1=0.0"])
    text = err.value.render()
    for key in ("rm.adam_beta2", "ppo.adam_beta1", "gold_rm.adam_beta2"):
        assert f"{key}: must be within [0, 1)" in text, text
    assert "sft.adam_beta1" not in text and "3 problems" in text
    lines = list(_explain(PipelineSpec, "", None))
    for key, default in (("sft.adam_beta1", "0.9"), ("rm.adam_beta2", "0.999"), ("gold_rm.adam_beta2", "0.999"),
                         ("ppo.adam_beta2", "0.999")):
        assert any(line.startswith(f"{key} (float, default {default}): Adam") for line in lines), key


@pytest.mark.parametrize(
    "override, needle",
    [
        ("ppo.kl_coeff=0.1", "ppo.kl_coeff: unknown key"),
        ("sft.lr=fast", "sft.lr: Value 'fast'"),
        ("data.sft.path=missing.jsonl", "data.sft.path: file not found"),
    ],
)
def test_cli_spec_errors_exit_2_without_traceback(tmp_path, override, needle):
    proc = cli("run", str(TINY), override, "--out", str(tmp_path / "run"))
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and str(TINY) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing was started


def test_cli_missing_spec_file(tmp_path):
    proc = cli("run", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "run"))
    assert proc.returncode == 2 and "spec file not found" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft: {lr: [1, 2\n")
    proc = cli("spec", "validate", str(bad))
    assert proc.returncode == 2 and "not valid YAML" in proc.stderr


def test_reward_hacking_recipe_and_its_small_scale_only_keys():
    demo_path = TINY.parent / "reward-hacking-demo.yaml"
    demo = load_spec(demo_path)
    assert demo.rm.exploit == "longer_wins" and demo.gold_rm.enabled and demo.ppo.sample_every > 0
    assert demo.data.sft.format == "hh_rlhf_chosen"
    assert load_spec(demo_path, ["rm.exploit=none"]).rm.exploit == "none"  # the honest twin
    with pytest.raises(UserError) as err:
        load_spec(demo_path, ["scale=large"])
    text = err.value.render()
    for key in ("rm.exploit", "gold_rm.enabled", "ppo.sample_every", "data.sft.format"):
        assert f"{key}: " in text, key
    with pytest.raises(UserError) as err:
        load_spec(demo_path, ["rm.exploit=shorter_wins"])
    assert "rm.exploit" in err.value.render() and "longer_wins" in err.value.render()
