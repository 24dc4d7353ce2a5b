"""`nemo-rlhf parity all`: the chosen layers in order, each result written and recorded as its own verb's, one verdict.

The layers themselves are tested in test_parity_{config,data_model,loss,curves}.py; here the cheap ones
(config, data) run for real to check the wiring: selection, summary, exit codes, report and lineage files.
"""

from __future__ import annotations

import json

from tests.helpers import TINY, cli
from tests.test_parity_config import ALIGNED


def test_all_runs_the_chosen_layers_and_records_each(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    proc = cli("parity", "all", str(TINY), *ALIGNED, "--only", "config,data", "--run-dir", str(run), "--report",
               str(tmp_path / "rep"), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["kind"] == "all" and summary["passed"]
    assert [c["name"] for c in summary["checks"]] == ["config", "data"]
    recorded = json.loads((run / "parity" / "manifest.json").read_text())["notes"]["parity"]
    assert set(recorded) == {"config", "data", "all"} and all(r["passed"] for r in recorded.values())
    assert (tmp_path / "rep" / "config.md").is_file() and (tmp_path / "rep" / "data.json").is_file()


def test_all_fails_with_the_failing_checks_named_and_refuses_unknown_layers():
    proc = cli("parity", "all", str(TINY), "--skip", "model,loss,curves")  # the tiny recipe as shipped
    assert proc.returncode == 1
    assert "FAIL config" in proc.stdout and "config/ppo/logprob_temperature" in proc.stdout
    bad = cli("parity", "all", str(TINY), "--only", "config,lossy")
    assert bad.returncode == 2 and "unknown layer(s): lossy" in bad.stderr and "Traceback" not in bad.stderr
