"""Parity results: NaN never passes, JSON stays valid, the report files, and recording into a run's lineage."""

from __future__ import annotations

import json

from nemo_rlhf.lineage.hashing import sha256_file
from nemo_rlhf.parity.report import Check, ParityResult, format_text, markdown_table, record_in_run, write_report


def _result(kind="loss", stage="sft", broken=False):
    result = ParityResult(kind, meta={"stage": stage})
    result.add(Check.within("sft/loss", 1e-6, 2e-5, "masked CE"))
    result.add(Check.within("sft/token_ce", float("nan") if broken else 3e-7, 2e-5, "per token"))
    result.add(Check("sft/loss_mask", True, detail="yes/no check"))
    return result


def test_nan_fails_and_json_stays_valid():
    result = _result(broken=True)
    assert not result.passed and result.name == "loss-sft"
    text = json.dumps(result.to_dict(), allow_nan=False)  # raises if a NaN leaked into the JSON
    assert json.loads(text)["checks"][1]["value"] == "nan"
    assert "FAIL sft/token_ce" in format_text(result) and "FAILED (2/3 checks)" in format_text(result)


def test_markdown_escapes_cells_and_report_files(tmp_path):
    assert "a \\| b" in markdown_table([{"x": "a | b"}])
    result = _result()
    result.tables["both sides"] = [{"key": "ppo.kl_coef", "TRL": 0.05, "NeMo": 0.01}]
    written = write_report(result, tmp_path / "rep")
    assert [p.name for p in written] == ["loss-sft.md", "loss-sft.png"]
    md = written[0].read_text()
    assert "# parity loss-sft: PASSED" in md and "## both sides" in md and "ppo.kl_coef" in md
    only_yes_no = ParityResult("data", [Check("data/sft_train", True)])
    assert [p.name for p in write_report(only_yes_no, tmp_path / "rep")] == ["data.md"]  # nothing to plot


def test_record_in_run_lists_every_result_with_its_hash_and_the_run_stages(tmp_path):
    run = tmp_path / "run"
    (run / "sft").mkdir(parents=True)
    (run / "sft" / "manifest.json").write_text('{"stage": "sft"}\n')
    first = record_in_run(_result(), run)
    record_in_run(_result("config", None, broken=True), run)
    manifest = json.loads((run / "parity" / "manifest.json").read_text())
    entries = manifest["notes"]["parity"]
    assert set(entries) == {"loss-sft", "config"}
    assert entries["loss-sft"]["sha256"] == sha256_file(first) and entries["loss-sft"]["passed"] is True
    assert entries["config"]["failed"] == ["sft/token_ce"]
    assert manifest["inputs"]["parents"]["sft"]["sha256"] == sha256_file(run / "sft" / "manifest.json")
    assert not [p for p in (run / "parity").iterdir() if p.name.endswith(".tmp")]
