"""NeMo-Aligner data files written from the small-scale rows: token-for-token parity with the TRL formatting
(real GSM8K and hh-rlhf rows, the real SmolLM2 tokenizer and chat template), wrong masks caught, atomic
lineage manifests for large-scale stages."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from nemo_rlhf.data import aligner_format
from nemo_rlhf.errors import UserError
from nemo_rlhf.lineage.record import record_stage
from nemo_rlhf.parity import data as parity
from nemo_rlhf.spec.loader import load_spec
from nemo_rlhf.spec.paths import data_root
from tests.helpers import cli

REPO = Path(__file__).resolve().parents[1]
SFT_ROWS = 300


@pytest.fixture(scope="module")
def spec():
    return load_spec(REPO / "recipes" / "smollm2-135m-cpu.yaml", [f"data.sft.num_examples={SFT_ROWS}", "sft.max_length=512",
                                                                  "data.preference.num_examples=64"])


@pytest.fixture(scope="module")
def tokenizer(spec):
    """SmolLM2-135M-Instruct's own tokenizer and ChatML template with its default system prompt (from the GGUF)."""
    return aligner_format.spec_tokenizer(spec, data_root(spec.data.root))


@pytest.fixture(scope="module")
def prepared(spec, tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("aligner")
    manifest = aligner_format.prepare_aligner_data(spec, out, tokenizer=tokenizer)
    rows, _ = aligner_format.build_trl_rows(spec, data_root(spec.data.root), tokenizer)
    return out, manifest, rows, aligner_format.read_records(out)


def test_files_as_written_match_the_trl_rows_token_for_token(prepared, tokenizer):
    out, manifest, rows, records = prepared
    assert sorted(p.name for p in out.iterdir()) == sorted([*(f"{n}.jsonl" for n in aligner_format.FILES),
                                                           "manifest.json"])
    checks = parity.compare_all(tokenizer, rows, records)
    assert all(c.passed for c in checks), "\n".join(c.render() for c in checks)
    sizes = {c.name: c.examples for c in checks}
    assert sizes["sft_train"] == SFT_ROWS and sizes["rm_train"] == 2 * len(rows["rm_train"]) > 0
    assert sizes["ppo_train"] == len(rows["ppo_train"]) > 0
    assert manifest["metrics"]["parity"]["passed"] is True
    assert json.loads((out / "manifest.json").read_text())["outputs"]["sft_train"]["lines"] == SFT_ROWS


def test_sft_loss_mask_is_exactly_the_assistant_response(prepared, tokenizer):
    _, _, rows, records = prepared
    row, record = rows["sft_train"][0], records["sft_train"][0]
    ids, mask = parity.nemo_sft_tokens(tokenizer, record)
    trained = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert trained == record["output"] and trained.endswith("<|im_end|>") and "#### " in trained
    assert record["input"].startswith("<|im_start|>system\n") and record["input"].endswith("<|im_start|>assistant\n")
    assert (ids, mask) == (row["input_ids"], row["completion_mask"])


def test_a_wrong_mask_is_caught(prepared, tokenizer):
    _, _, rows, records = prepared
    # The classic mistake: the role header "assistant\n" on the trained side. Same tokens, wrong mask.
    shifted = [{"input": r["input"].removesuffix("assistant\n"), "output": "assistant\n" + r["output"]}
               for r in records["sft_train"][:20]]
    check = parity.compare_sft("sft_train", tokenizer, rows["sft_train"][:20], shifted)
    assert not check.passed and check.mismatches == 20
    assert check.first_mismatch["what"] == "loss masks" and "<|im_start|>[[ass" in check.first_mismatch["nemo"]
    assert "FAIL sft_train" in check.render()
    # EOS appended by NeMo on top of ours (add_eos: True, upstream's default) changes the ids.
    eos_twice = parity.compare_sft("sft_train", tokenizer, rows["sft_train"][:5], records["sft_train"][:5],
                                   {**parity.SFT_TEMPLATE_SETTINGS, "add_eos": True})
    assert eos_twice.first_mismatch["what"] == "token ids"


def test_rm_pairs_keep_chosen_then_rejected(prepared, tokenizer):
    _, _, rows, records = prepared
    assert len(records["rm_train"]) == 2 * len(rows["rm_train"])
    assert records["rm_train"][0]["text"].endswith(rows["rm_train"][0]["chosen_text"])
    swapped = [line for a, b in zip(records["rm_train"][::2], records["rm_train"][1::2]) for line in (b, a)]
    check = parity.compare_comparisons("rm_train", tokenizer, rows["rm_train"], swapped)
    assert not check.passed and check.first_mismatch["what"] == "token ids"


def test_ppo_prompts_end_at_the_assistant_turn(prepared, tokenizer):
    _, _, rows, records = prepared
    assert all(r["text"].endswith("<|im_start|>assistant\n") for r in records["ppo_train"])
    truncated = [{"text": r["text"].removesuffix("assistant\n")} for r in records["ppo_train"]]
    assert not parity.compare_prompts("ppo_train", tokenizer, rows["ppo_train"], truncated).passed
    assert not parity.compare_prompts("ppo_train", tokenizer, rows["ppo_train"], records["ppo_train"][1:]).passed


def test_nothing_is_written_when_parity_fails(spec, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(aligner_format, "sft_record", lambda row: {
        "input": row["prompt_text"].removesuffix("assistant\n"), "output": "assistant\n" + row["completion_text"]})
    with pytest.raises(UserError, match="tokenize these rows differently"):
        aligner_format.prepare_aligner_data(spec, tmp_path, tokenizer=tokenizer)
    assert list(tmp_path.iterdir()) == []


def test_record_stage_writes_the_manifest_atomically(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "sft" / "results").mkdir(parents=True)
    (run / "data").mkdir()
    (run / "data" / "manifest.json").write_text("{}")
    nemo, cfg = run / "sft" / "results" / "sft.nemo", run / "sft.yaml"
    nemo.write_bytes(b"weights"), cfg.write_text("a: 1\n")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("NEMO_RLHF_STAGE_STARTED_AT", "2026-01-01T00:00:00+00:00")

    def interrupted(src, dst):
        raise KeyboardInterrupt

    real_replace = os.replace
    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        record_stage(run, "sft", configs=[cfg], outputs=[nemo], parents=["data", "convert"])
    assert list((run / "sft").iterdir()) == [run / "sft" / "results"]  # no manifest, no temp file left
    monkeypatch.setattr(os, "replace", real_replace)
    path = record_stage(run, "sft", configs=[cfg], outputs=[nemo], parents=["data", "convert"])
    manifest = json.loads(path.read_text())
    assert path == run / "sft" / "manifest.json" and manifest["notes"]["slurm"]["slurm_job_id"] == "4242"
    assert manifest["started_at"] == "2026-01-01T00:00:00+00:00" and manifest["stage"] == "sft"
    assert manifest["config"]["config_files"][str(cfg)] and manifest["outputs"][str(nemo)]["sha256"]
    assert manifest["inputs"]["parents"]["data"]["sha256"] and manifest["inputs"]["parents"]["convert"]["sha256"] is None
    from nemo_rlhf.slurm.dag import stage_finished
    assert stage_finished(run, "sft")


def test_record_stage_cli_refuses_a_missing_output(tmp_path):
    proc = cli("lineage", "record-stage", str(tmp_path), "rm", "--output", str(tmp_path / "rm.nemo"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    assert not (tmp_path / "rm" / "manifest.json").exists()
