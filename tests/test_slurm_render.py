"""Large-scale rendering: configs checked key by key against the real upstream YAMLs, quoted scripts,
the PPO heterogeneous job, and `sbatch --test-only` on the local SLURM cluster."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from nemo_rlhf.errors import UserError
from nemo_rlhf.slurm import aligner_config
from nemo_rlhf.slurm.render import render_pipeline
from nemo_rlhf.spec.loader import load_spec

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*-cluster.yaml"))
SHARED = REPO.parent / "shared" / "reference"
UPSTREAM = SHARED / "nemo-aligner-v0.7.0" / "conf"
HOSTILE = "we ird $(touch PWNED) `id`; 'q' \"dq\" & | > <"
# The local test cluster: 2 nodes x 2 fake GPUs, partition debug, no accounts.
LOCAL_CLUSTER = ["cluster.partition=debug", "cluster.account=null", "cluster.gpus_per_node=2",
                 "parallel.critic.inference_micro_batch_size=1", "parallel.ppo.rollout_micro_batch_size=8"]


def upstream_key_problems(config_file: Path, config: str) -> list[str]:
    """Rendered keys that neither the NeMo-Aligner YAML nor NeMo's model config (for model.*) has.

    Read from ../shared/reference (the untouched upstream files, not our shipped copies). A key may
    hold a mapping where upstream has a scalar slot (data_prefix: null), so a key passes when it or
    its closest existing ancestor is upstream."""
    allowed = aligner_config.upstream_keys(config, reference_dir=_upstream_dir())
    rendered = aligner_config.leaf_keys(yaml.safe_load(config_file.read_text()))
    problems = []
    for key in sorted(rendered):
        parts = key.split(".")
        ancestors = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
        if not any(a in allowed for a in ancestors[:1]) and not _scalar_slot(ancestors, allowed, config):
            problems.append(key)
    return problems


def _scalar_slot(ancestors: list[str], allowed: set[str], config: str) -> bool:
    upstream = yaml.safe_load((_upstream_dir() / aligner_config.CONFIG_FILES[config]).read_text())
    for key in ancestors[1:]:
        if key in allowed:
            node = upstream
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            return node is None or not isinstance(node, dict)
    return False


def _upstream_dir() -> Path:
    """The shared upstream files laid out as aligner_config expects (configs + megatron_gpt_config.yaml)."""
    return _upstream_dir.cache


@pytest.fixture(scope="module", autouse=True)
def upstream_reference(tmp_path_factory):
    if not UPSTREAM.is_dir():
        pytest.skip("../shared/reference (the real NeMo-Aligner configs) is not here")
    folder = tmp_path_factory.mktemp("upstream")
    for name in aligner_config.CONFIG_FILES.values():
        shutil.copy(UPSTREAM / name, folder / name)
    shutil.copy(SHARED / "nemo-v2.1.0" / "conf" / aligner_config.MODEL_CONFIG_FILE, folder)
    _upstream_dir.cache = folder
    return folder


def test_shipped_reference_files_are_the_upstream_ones(upstream_reference):
    for name in [*aligner_config.CONFIG_FILES.values(), aligner_config.MODEL_CONFIG_FILE]:
        assert (aligner_config.REFERENCE_DIR / name).read_bytes() == (upstream_reference / name).read_bytes()


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_rendered_key_exists_upstream(recipe, tmp_path):
    spec = load_spec(recipe)
    stages = render_pipeline(spec, tmp_path)
    names, after = ["convert", "sft", "rm", "ppo", "export", "eval"], [(), ("convert",), ("sft",), ("rm",), ("ppo",),
                                                                       ("export",)]
    if not spec.cluster.data.sft_train:  # no ready-made files: the data stage writes them first
        names, after = ["data", *names], [(), (), ("convert", "data"), *after[2:]]
    assert [s.name for s in stages] == names
    assert [s.after for s in stages] == after
    for config in aligner_config.CONFIG_FILES:
        path = tmp_path / "configs" / f"{config}.yaml"
        assert upstream_key_problems(path, config) == [], config
    for stage in stages:
        assert subprocess.run(["bash", "-n", str(stage.script)], capture_output=True).returncode == 0


def test_a_bogus_key_is_caught(tmp_path):
    render_pipeline(load_spec(RECIPES[0]), tmp_path)
    path = tmp_path / "configs" / "ppo_actor.yaml"
    data = yaml.safe_load(path.read_text())
    data["model"]["ppo"]["kl_penalty_typo"] = 0.1
    data["trainer"]["ppo"]["bogus"] = {"deep": 1}
    path.write_text(yaml.safe_dump(data))
    assert upstream_key_problems(path, "ppo_actor") == ["model.ppo.kl_penalty_typo", "trainer.ppo.bogus.deep"]


def test_build_config_refuses_a_key_upstream_lacks(monkeypatch, tmp_path):
    from nemo_rlhf.slurm import render

    real = aligner_config.nemo_settings
    monkeypatch.setattr(aligner_config, "nemo_settings", lambda spec, c: {**real(spec, c), "model.ppo.klcoef": 1})
    with pytest.raises(aligner_config.UpstreamKeyError, match="model.ppo.klcoef"):
        render.render_pipeline(load_spec(RECIPES[0]), tmp_path)


def test_hyperparameters_land_on_nemo_keys(tmp_path):
    spec = load_spec(REPO / "recipes" / "llama3-8b-cluster.yaml",
                     ["ppo.kl_coef=0.03", "ppo.clip_ratio=0.15", "ppo.adam_beta2=0.95"])
    render_pipeline(spec, tmp_path)
    actor = yaml.safe_load((tmp_path / "configs" / "ppo_actor.yaml").read_text())
    critic = yaml.safe_load((tmp_path / "configs" / "ppo_critic.yaml").read_text())
    # Adam betas: the spec's (TRL's defaults), not upstream's [0.9, 0.98], in every config with an optimizer
    assert actor["model"]["optim"]["betas"] == critic["model"]["optim"]["betas"] == [0.9, 0.95]
    for name in ("sft", "rm"):
        assert yaml.safe_load((tmp_path / "configs" / f"{name}.yaml").read_text())["model"]["optim"]["betas"] == [
            0.9, 0.999]
    assert actor["trainer"]["ppo"]["initial_policy_kl_penalty"] == 0.03
    assert actor["trainer"]["ppo"]["use_absolute_kl"] is False
    assert actor["model"]["ppo"]["ratio_eps"] == 0.15
    assert actor["model"]["ppo"]["num_rollout_samples"] == 512 and actor["trainer"]["ppo"]["max_steps"] == 40
    assert actor["model"]["tensor_model_parallel_size"] == 4 and actor["trainer"]["num_nodes"] == 2
    assert critic["trainer"]["ppo"]["port"] == actor["remote_critic_rm"]["critic"]["port"] == 5567
    assert actor["pretrained_checkpoint"]["restore_from_path"].endswith("sft/results/checkpoints/sft.nemo")
    assert critic["pretrained_checkpoint"]["restore_from_path"].endswith("rm/results/checkpoints/rm.nemo")


def test_ppo_is_one_heterogeneous_job_with_two_groups(tmp_path):
    render_pipeline(load_spec(REPO / "recipes" / "llama3-8b-cluster.yaml"), tmp_path)
    text = (tmp_path / "ppo.sbatch").read_text()
    assert text.count("#SBATCH hetjob") == 1
    groups = text.split("#SBATCH hetjob")
    assert "#SBATCH --nodes=1" in groups[0] and "#SBATCH --nodes=2" in groups[1]  # critic 1 node, actor 2
    assert "--het-group=0" in text and "--het-group=1" in text
    commands = [line for line in text.splitlines() if not line.startswith("#")]
    critic_line = next(line for line in commands if "serve_ppo_critic.py" in line)
    actor_line = next(line for line in commands if "train_gpt_ppo_actor.py" in line)
    assert critic_line.endswith("&") and actor_line.endswith("&")
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST_HET_GROUP_0" | head -n1' in text
    assert '"remote_critic_rm.critic.ip=${host_critic}"' in actor_line
    assert "export NCCL_ALGO=Tree" in text and 'wait "$actor_pid"' in text and 'wait "$critic_pid"' in text


def _words(script: Path) -> list[str]:
    """Every shell word of a script's commands (continuation lines joined), parsed like bash would."""
    body = script.read_text().replace("\\\n", " ")
    return [w for line in body.splitlines() if line and not line.startswith("#") for w in shlex.split(line)]


def test_hostile_strings_are_quoted(tmp_path):
    out = tmp_path / HOSTILE
    spec = load_spec(RECIPES[0], [f"model.path=/m/{HOSTILE}", f"cluster.aligner_repo=/opt/{HOSTILE}",
                                  f"cluster.container_image=img{HOSTILE}"])
    spec.cluster.mounts = [f"/a {HOSTILE}:/b"]
    render_pipeline(spec, out)
    for script in out.glob("*.sbatch"):
        assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0, script
    convert = _words(out / "convert.sbatch")
    assert f"/m/{HOSTILE}" in convert and f"--container-image=img{HOSTILE}" in convert
    assert f"--container-mounts=/a {HOSTILE}:/b,{out}:{out}" in convert
    sft = _words(out / "sft.sbatch")
    assert f"/opt/{HOSTILE}" in sft and f"--config-path={out}/configs" in sft
    directive = next(line for line in (out / "sft.sbatch").read_text().splitlines()
                     if line.startswith("#SBATCH --output="))
    assert shlex.split(directive.removeprefix("#SBATCH --output="))[0] == f"{out}/logs/sft.out"
    assert not Path("PWNED").exists() and not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("override", ["model.path=/a\nb", "cluster.container_image=img\tx",
                                      "cluster.aligner_repo=/opt/\x1b[0m"])
def test_control_characters_refused(override, tmp_path):
    key, _, value = override.partition("=")
    spec = load_spec(RECIPES[0])
    section, field = key.split(".")
    setattr(getattr(spec, section), field, value)
    with pytest.raises(UserError, match=key.replace(".", r"\.") + ": contains a newline or control character"):
        render_pipeline(spec, tmp_path / "run")
    assert not (tmp_path / "run").exists()


HOST = ["cluster.runtime=host", "cluster.container_image=null", "cluster.mounts=[]"]


def test_host_runtime_drops_the_container_flags_only(tmp_path):
    """Same commands, same quoting; only pyxis's --container-* / --no-container-mount-home words go."""
    container = render_pipeline(load_spec(RECIPES[0]), tmp_path / "c")
    host = render_pipeline(load_spec(RECIPES[0], HOST), tmp_path / "h")
    for c, h in zip(container, host):
        c_words = [w.replace(str(tmp_path / "c"), "RUN") for w in _words(c.script)]
        h_words = [w.replace(str(tmp_path / "h"), "RUN") for w in _words(h.script)]
        assert [w for w in c_words if "container" not in w] == h_words, c.name
        assert any(w.startswith("--container-image=") for w in c_words), c.name
        assert "Runtime `host`" in h.script.read_text()


@pytest.mark.parametrize("overrides, message", [
    (["cluster.runtime=docker"], "cluster.runtime"),
    (["cluster.runtime=host", "cluster.mounts=[]"], "cluster.container_image: 'nvcr.io#nvidia/nemo:24.12' is set but "
                                                    "cluster.runtime is host"),
    (["cluster.runtime=host", "cluster.container_image=null"], "cluster.mounts: container mounts are set but "
                                                               "cluster.runtime is host"),
    (["cluster.container_image=null"], "cluster.container_image: required when scale is large (runtime: container)"),
])
def test_runtime_settings_checked(overrides, message):
    with pytest.raises(UserError) as err:
        load_spec(REPO / "recipes" / "smollm2-360m-cluster.yaml", overrides)
    assert message in err.value.render()


def test_small_scale_spec_refused(tmp_path):
    with pytest.raises(UserError, match="scale is 'small'"):
        render_pipeline(load_spec(REPO / "recipes" / "tiny-cpu.yaml"), tmp_path)


def test_sbatch_test_only_accepts_every_script(slurm_cluster, tmp_path):
    """Every rendered script, GPU requests and the PPO het job included, on the real local SLURM."""
    spec = load_spec(REPO / "recipes" / "smollm2-360m-cluster.yaml", LOCAL_CLUSTER)
    for stage in render_pipeline(spec, tmp_path / HOSTILE):
        proc = subprocess.run(["sbatch", "--test-only", str(stage.script)], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0 and "to start at" in proc.stderr, (stage.name, proc.stderr)


def test_data_stage_feeds_the_configs_and_every_stage_records_its_manifest(tmp_path):
    spec = load_spec(REPO / "recipes" / "qwen2.5-0.5b-cluster.yaml")
    stages = {s.name: s for s in render_pipeline(spec, tmp_path)}
    data = (tmp_path / "data.sbatch").read_text()
    assert "--gpus-per-node" not in data and "--exclusive" not in data  # CPU only
    assert "prepare-aligner" in _words(tmp_path / "data.sbatch") and "record-stage" not in data
    sft = yaml.safe_load((tmp_path / "configs" / "sft.yaml").read_text())
    assert sft["model"]["data"]["train_ds"]["file_path"] == f"{tmp_path}/data/sft_train.jsonl"
    train_ds = sft["model"]["data"]["train_ds"]
    assert sft["model"]["data"]["chat"] is False and train_ds["prompt_template"] == "{input}{output}"
    assert train_ds["add_eos"] is False and train_ds["label_key"] == "output"
    rm = yaml.safe_load((tmp_path / "configs" / "rm.yaml").read_text())
    assert rm["model"]["data"]["data_prefix"]["train"] == [f"{tmp_path}/data/rm_train.jsonl"]
    actor = yaml.safe_load((tmp_path / "configs" / "ppo_actor.yaml").read_text())
    assert actor["model"]["data"]["data_prefix"]["validation"] == [f"{tmp_path}/data/ppo_val.jsonl"]
    for name, stage in stages.items():
        text = stage.script.read_text()
        assert subprocess.run(["bash", "-n", str(stage.script)], capture_output=True).returncode == 0, name
        assert f"rm -f -- {tmp_path}/{name}/manifest.json" in text and "NEMO_RLHF_STAGE_STARTED_AT" in text
        if name == "data":
            continue
        words = _words(stage.script)
        record = words.index("record-stage")
        assert words[record + 1: record + 3] == [str(tmp_path), name], name
        assert text.rfind("record-stage") > max(text.rfind(w) for w in ("train_gpt_sft.py", "train_reward_model.py",
                                                                         "train_gpt_ppo_actor.py", "nemo-to-hf",
                                                                         "eval-exported", "hf-to-nemo")), name
    ppo = _words(tmp_path / "ppo.sbatch")
    assert ppo[ppo.index("record-stage"):].count("--parent") == 3 and "--het-group=1" in ppo
    # The eval stage runs our CLI as every other tool step does (cluster.nemo_rlhf_command), not a bare python.
    eval_words = _words(tmp_path / "eval.sbatch")
    start = eval_words.index("eval-exported")
    assert eval_words[start - 2:start + 3] == ["nemo-rlhf", "slurm", "eval-exported", f"{tmp_path}/spec.yaml",
                                               str(tmp_path)]


def test_partial_aligner_data_is_refused(tmp_path):
    with pytest.raises(UserError, match="cluster.data"):
        load_spec(REPO / "recipes" / "qwen2.5-0.5b-cluster.yaml", ["cluster.data.sft_train=/x.jsonl"])


def test_rendered_configs_resume_after_preemption(tmp_path):
    render_pipeline(load_spec(RECIPES[0]), tmp_path)
    for config in aligner_config.CONFIG_FILES:
        cfg = yaml.safe_load((tmp_path / "configs" / f"{config}.yaml").read_text())
        em = cfg["exp_manager"]
        assert em["resume_if_exists"] is True and em["resume_ignore_no_checkpoint"] is True, config
        assert em["create_checkpoint_callback"] is True, config
        assert em["checkpoint_callback_params"]["save_nemo_on_train_end"] is True, config
        if config != "ppo_critic":  # a run timer would end training early with exit 0
            assert cfg["trainer"]["max_time"] is None, config
    for script in tmp_path.glob("*.sbatch"):
        text = script.read_text()
        assert "#SBATCH --requeue" in text and "#SBATCH --open-mode=append" in text, script.name
