"""`nemo-rlhf parity curves`: TRL's SFTTrainer/RewardTrainer vs megatron-core's training loop (TP=2, gloo) from the
same weights and data order, a shuffled order failing; NeMo TensorBoard logs vs a TRL train_log.jsonl."""

from __future__ import annotations

import json

import pytest

from nemo_rlhf.data.aligner_format import file_name, prepare_aligner_data
from nemo_rlhf.parity import logs
from nemo_rlhf.parity.curves import CURVE_RTOL, curve_parity
from nemo_rlhf.spec.loader import load_spec
from tests.helpers import TINY, cli

# init std 0.1 (FACTS.md); micro batch 2 so that a few steps fit the tiny recipe's rows
SFT = ["model.random.init_std=0.1", "sft.micro_batch_size=2", "model.random.tie_word_embeddings=false"]
RM = ["model.random.init_std=0.1", "rm.micro_batch_size=2", "data.preference.num_examples=40"]


def test_sft_curves_agree_over_four_steps():
    result = curve_parity(load_spec(TINY, SFT), "sft", 4)
    checks = {c.name: c for c in result.checks}
    assert result.passed, [(c.name, c.value, c.tolerance) for c in result.checks]
    assert checks["curves/sft/step1_loss"].value < 1e-5  # same weights, same batch: fp32 (measured 9.5e-7)
    assert len(result.tables["curves"]) == 4 and checks["curves/sft/loss"].tolerance == CURVE_RTOL
    assert result.meta["tied_embeddings"] is False


def test_a_tied_model_against_its_untied_nemo_drifts_apart():
    """Our converter always writes a separate output layer: same logits, but megatron trains two matrices."""
    tied = [o for o in SFT if "tie_word_embeddings" not in o]
    result = curve_parity(load_spec(TINY, tied), "sft", 4)
    checks = {c.name: c for c in result.checks}
    assert result.meta["tied_embeddings"] is True and checks["curves/sft/step1_loss"].passed
    assert not checks["curves/sft/loss"].passed and checks["curves/sft/loss"].value > CURVE_RTOL  # 2.8e-4


def test_rm_curves_agree_and_a_shuffled_data_order_fails(tmp_path):
    aligned = curve_parity(load_spec(TINY, RM), "rm", 3)
    assert aligned.passed, [(c.name, c.value, c.tolerance) for c in aligned.checks]
    assert {c.name for c in aligned.checks} >= {"curves/rm/loss", "curves/rm/accuracy"}
    # NeMo-Aligner's sampler order is not TRL's: the same pairs in another order are a different experiment
    files = tmp_path / "aligner"
    prepare_aligner_data(load_spec(TINY, RM), files)
    rm = files / file_name("rm_train")
    lines = rm.read_text().splitlines()
    pairs = [lines[i:i + 2] for i in range(0, len(lines), 2)]
    rm.write_text("".join(line + "\n" for pair in reversed(pairs) for line in pair))
    proc = cli("parity", "curves", str(TINY), *RM, "--stage", "rm", "--steps", "3", "--aligner-data", str(files),
               "--json", "--report", str(tmp_path / "rep"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    out = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    assert not out["curves/rm/step1_loss"]["passed"] and out["curves/rm/loss"]["value"] > 10 * CURVE_RTOL
    assert (tmp_path / "rep" / "curves-rm-curves.png").is_file()


def test_pipeline_parallel_loss_and_training_agree(tmp_path):
    """TP1 x PP2: megatron's pipelined schedule over gloo (p2p activations and gradients between the stages)."""
    from nemo_rlhf.parity.loss import fixed_batch, sft_checks, sft_nemo_inputs, sft_trl_side
    from nemo_rlhf.parity.megatron_launch import run_train_worker
    from nemo_rlhf.parity.models import load_hf, stage_models

    spec = load_spec(TINY, SFT)
    models = stage_models(spec, "sft", tmp_path)
    tok, model = models.tokenizer, load_hf(models, "sft")
    halves = [fixed_batch(spec, tok, "sft", 2, offset=offset) for offset in (0, 2)]
    inputs = {k: v for i, b in enumerate(halves) for k, v in sft_nemo_inputs(tok, b.records, f"mb{i}").items()}
    assert inputs["mb0.tokens"].shape[1] != inputs["mb1.tokens"].shape[1]  # one call, two widths: padded to one
    run = run_train_worker(models.nemo_path, inputs, len(tok), 1, "sft", "loss", {"micro-batches": 2}, pp=2)
    assert run.outputs is not None, run.tail
    for i, half in enumerate(halves):
        checks = sft_checks(sft_trl_side(model, tok, half.trl_rows), inputs, run.outputs, mb=i)
        assert all(c.passed for c in checks), [(c.name, c.value, c.tolerance) for c in checks]
        assert {c.name for c in checks} >= {"sft/token_ce", "sft/loss", "sft/loss_mask"}
    curves = curve_parity(load_spec(TINY, RM), "rm", 2, tp=1, pp=2)
    assert curves.passed and curves.meta["pp"] == 2, [(c.name, c.value, c.tolerance) for c in curves.checks]


# ----------------------------------------------------------------------------------------------- logs

def _nemo_events(folder, stage_tags: dict[str, list[float]]):
    """Event files written with NeMo-Aligner's tag names (as its PTL TensorBoard logger writes them)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    for tag, values in stage_tags.items():
        for step, value in enumerate(values):
            writer.add_scalar(tag, value, step)
    writer.close()
    return folder


def _trl_log(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sft_logs_aligned_on_consumed_samples_and_a_diverging_run(tmp_path):
    loss = [2.0, 1.6, 1.3, 1.1]
    events = _nemo_events(tmp_path / "tb", {"train/loss": loss, "train/consumed_samples": [8, 16, 24, 32],
                                            "train/lr": [1e-5] * 4})
    close = _trl_log(tmp_path / "close.jsonl", [{"step": i + 1, "loss": v * 1.02} for i, v in enumerate(loss)]
                     + [{"step": 4, "train_loss": 1.5}])
    result = logs.compare_logs(logs.read_tensorboard(events), logs.read_trl_log(close), "sft", samples_per_step=8)
    check = result.checks[0]
    assert result.passed and check.extra["points"] == 4 and check.value == pytest.approx(0.02 / 1.02, rel=1e-3)
    far = _trl_log(tmp_path / "far.jsonl", [{"step": i + 1, "loss": 2.0} for i in range(4)])
    assert not logs.compare_logs(logs.read_tensorboard(events), logs.read_trl_log(far), "sft", 8).passed
    # a wrong batch size aligns nothing: said, not silently passed
    none = logs.compare_logs(logs.read_tensorboard(events), logs.read_trl_log(close), "sft", 3)
    assert not none.passed and "no common consumed-sample points" in none.checks[0].detail


def test_ppo_logs_convert_nemo_per_token_kl_to_trl_per_sequence(tmp_path):
    events = _nemo_events(tmp_path / "tb", {
        "train_rollouts/rewards": [0.1, 0.4], "train_rollouts/init_policy_kl": [0.01, 0.02],
        "train_rollouts/generation_length": [20.0, 30.0], "train_rollouts/consumed_samples": [4, 8],
        "train_optim/loss": [0.3, 0.2]})
    rows = [{"step": 1, "objective/scores": 0.1, "objective/kl": 0.2, "response_length": 20.0},
            {"step": 2, "objective/scores": 0.4, "objective/kl": 0.6, "response_length": 30.0}]
    trl = _trl_log(tmp_path / "ppo.jsonl", rows)
    proc = cli("parity", "curves", "--stage", "ppo", "--tensorboard", str(events), "--trl-log", str(trl),
               "--samples-per-step", "4", "--json", "--report", str(tmp_path / "rep"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    assert out["logs/ppo/kl"]["value"] == pytest.approx(0.0, abs=1e-6)  # 0.01 x 20 = 0.2, 0.02 x 30 = 0.6
    assert (tmp_path / "rep" / "curves-ppo-curves.png").is_file()
    missing = cli("parity", "curves", "--stage", "ppo", "--tensorboard", str(tmp_path / "nothing"), "--trl-log",
                  str(trl), "--samples-per-step", "4")
    assert missing.returncode == 2 and "no TensorBoard event files" in missing.stderr
