"""`nemo-rlhf eval`: exit codes (0 pass, 1 fail, 2 bad input), --json, --report, files and run-dir modes.

Most cases call the CLI's `main` in this process (the embedding model loads once); one runs
the real command in a subprocess to check exit codes and that bad input prints no traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nemo_rlhf.cli.main import main
from nemo_rlhf.data.gsm8k import load_gsm8k
from nemo_rlhf.data.jsonl import write_jsonl_atomic
from nemo_rlhf.gate.responses import Response, ResponseSet
from nemo_rlhf.spec.paths import data_root
from tests.helpers import TINY, cli
from tests.test_gate_detectors import build

DETECTOR_NAMES = {"reward_hacking", "length_inflation", "template_collapse", "degenerate_responses", "kl_budget",
                  "safety_regression", "capability_regression"}
FINDING_KEYS = {"detector", "severity", "value", "threshold", "message"}


def write_set(path: Path, responses: ResponseSet) -> Path:
    write_jsonl_atomic(path, [r.to_json() for r in responses.rows])
    return path


def gsm8k_rows(correct: bool, n: int = 30) -> list[Response]:
    """Real GSM8K test questions: the reference solution, or a wrong final answer."""
    problems = load_gsm8k(data_root("auto") / "gsm8k" / "test.jsonl", limit=n)
    return [Response(p.question, p.answer if correct else "Let me think. The answer is 0.", finished=True)
            for p in problems]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """candidate/baseline files: healthy and inflated hh-rlhf sets, plus GSM8K rows answered right or wrong."""
    d = tmp_path_factory.mktemp("gate")
    base, length_base = build("baseline"), build("baseline", length_rm=True)
    math_ok, math_bad = gsm8k_rows(True), gsm8k_rows(False)
    return {
        "baseline": write_set(d / "baseline.jsonl", ResponseSet("b", base.rows + math_ok)),
        "healthy": write_set(d / "healthy.jsonl", ResponseSet("c", build("healthy").rows + math_ok)),
        "math_regressed": write_set(d / "math_bad.jsonl", ResponseSet("c", build("healthy").rows + math_bad)),
        "length_baseline": write_set(d / "length_baseline.jsonl", length_base),
        "inflated": write_set(d / "inflated.jsonl", build("inflated")),
    }


def run_json(capsys, *args) -> tuple[int, dict]:
    code = main(["eval", *args, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out)


def test_healthy_candidate_passes_with_json_shape(files, capsys):
    code, result = run_json(capsys, "--candidate", str(files["healthy"]), "--baseline", str(files["baseline"]))
    assert code == 0 and result["passed"] is True, [f["message"] for f in result["findings"] if f["severity"] == "fail"]
    assert {f["detector"] for f in result["findings"]} >= DETECTOR_NAMES
    for f in result["findings"]:
        assert FINDING_KEYS <= set(f) and f["severity"] in ("fail", "warn", "info")
    cap = next(f for f in result["findings"] if f["detector"] == "capability_regression")
    assert cap["severity"] == "info" and cap["value"] == 0.0  # 30 real GSM8K questions, same answers


def test_inflated_candidate_fails_and_names_length_inflation(files, capsys, tmp_path):
    report = tmp_path / "report"
    code, result = run_json(capsys, "--candidate", str(files["inflated"]), "--baseline", str(files["length_baseline"]),
                            "--report", str(report))
    assert code == 1 and result["passed"] is False
    assert "length_inflation" in result["failed_detectors"]
    saved = json.loads((report / "findings.json").read_text())
    assert saved["passed"] is False and len(saved["findings"]) == len(result["findings"])
    cases = [json.loads(line) for line in (report / "badcases.jsonl").read_text().splitlines()]
    assert cases and all(c["verdict"] == "" and c["detector"] and "response" in c for c in cases)
    assert {c["check"] for c in cases} >= {"length_shift", "length_controlled_gain"}
    assert all(c["where"].startswith(f"{files['inflated']}:") and c["corrected"] == "" for c in cases)
    assert f"FAILED: {', '.join(result['failed_detectors'])}" in (report / "report.html").read_text()  # see test_gate_report
    assert json.loads((report / "manifest.json").read_text())["metrics"]["passed"] is False
    assert not [p for p in report.iterdir() if p.name.startswith(".")]  # no temp files left


def test_capability_regression_on_real_gsm8k_rows(files, capsys):
    code, result = run_json(capsys, "--candidate", str(files["math_regressed"]), "--baseline", str(files["baseline"]),
                            "gate.embeddings=false")
    assert code == 1 and result["failed_detectors"] == ["capability_regression"]


def test_thresholds_come_from_the_spec(files, capsys, tmp_path):
    spec = tmp_path / "gate.yaml"
    spec.write_text(TINY.read_text() + "\ngate:\n  embeddings: false\n  thresholds: {length_max_ratio: 10.0, "
                    "truncation_max_increase: 0.5, length_explained_max_share: 1.0}\n")
    code, result = run_json(capsys, str(spec), "--candidate", str(files["inflated"]),
                            "--baseline", str(files["length_baseline"]))
    shift = next(f for f in result["findings"] if f.get("check") == "length_shift")
    assert shift["threshold"] == 10.0 and shift["severity"] == "info"
    assert "length_inflation" not in result["failed_detectors"]


BAD_LINES = [
    ('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": \n', 2, "malformed JSON"),
    ('{"prompt": "a", "response": "b"}\n\n{"prompt": "a", "response": 5}\n', 3, "field 'response' is integer"),
    ('{"prompt": "a"}\n', 1, "missing field 'response'"),
    ('{"prompt": "a", "response": "b", "kl": "high"}\n', 1, "field 'kl' is string"),
    ('{"prompt": "a", "response": "b", "finished": 1}\n', 1, "field 'finished' is integer"),
    ('["prompt", "response"]\n', 1, "expected an object"),
]


@pytest.mark.parametrize("text,line,what", BAD_LINES, ids=[w for *_, w in BAD_LINES])
def test_bad_jsonl_names_file_and_line(files, capsys, tmp_path, text, line, what):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(text)
    assert main(["eval", "--candidate", str(bad), "--baseline", str(files["baseline"])]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:{line}:" in err and what in err, err


def test_other_prompts_are_bad_input(files, capsys):
    code = main(["eval", "--candidate", str(files["inflated"]), "--baseline", str(files["baseline"])])
    err = capsys.readouterr().err
    assert code == 2 and "not on the same prompts" in err and "30 of 70 baseline prompts" in err, err


def test_missing_inputs_are_bad_input(files, capsys, tmp_path):
    assert main(["eval", "--candidate", str(files["healthy"])]) == 2
    assert "--candidate and --baseline go together" in capsys.readouterr().err
    assert main(["eval", "--run-dir", str(tmp_path)]) == 2
    assert "eval stage's responses are missing" in capsys.readouterr().err


def test_run_dir_mode_reads_the_eval_stage(files, capsys, tmp_path):
    """A run directory's eval/responses/{ppo,sft}.jsonl, as the small-scale eval stage writes them."""
    responses = tmp_path / "run" / "eval" / "responses"
    responses.mkdir(parents=True)
    (responses / "ppo.jsonl").write_text(files["healthy"].read_text())
    (responses / "sft.jsonl").write_text(files["baseline"].read_text())
    code, result = run_json(capsys, str(TINY), "--run-dir", str(tmp_path / "run"), "gate.embeddings=false")
    assert code == 0 and result["passed"]


def test_reward_models_score_missing_rewards(files, capsys, tmp_path):
    """--gold-rm fills gold_reward with an HF reward model (a tiny random one here)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from nemo_rlhf.models.materialize import build_random_model
    from nemo_rlhf.spec.schema import RandomModelConfig

    lm = build_random_model(RandomModelConfig(), data_root("auto") / "tokenizers" / "gpt2" / "tokenizer.json",
                            "chatml", tmp_path / "lm", seed=0)
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(lm, num_labels=1)
    rm.save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(lm).save_pretrained(tmp_path / "rm")
    rows = [Response(r.prompt, r.response, proxy_reward=r.proxy_reward) for r in build("baseline").rows[:8]]
    cand = write_set(tmp_path / "c.jsonl", ResponseSet("c", rows))
    code, result = run_json(capsys, "--candidate", str(cand), "--baseline", str(cand),
                            "--gold-rm", str(tmp_path / "rm"), "gate.embeddings=false")
    safety = next(f for f in result["findings"] if f["detector"] == "safety_regression")
    assert safety["value"] == pytest.approx(0.0) and safety["severity"] == "info"  # scored, and identical
    # The gold RM is also the default battle judge: identical files tie on every prompt.
    preference = next(f for f in result["findings"] if f["detector"] == "preference")
    assert preference["value"] == pytest.approx(0.5) and preference["details"]["ties"] == 4  # 4 prompts
    assert any(f["detector"] == "length_controlled_gap" for f in result["findings"])


def test_battles_are_skipped_without_a_judge(files, capsys):
    code, result = run_json(capsys, "--candidate", str(files["healthy"]), "--baseline", str(files["baseline"]),
                            "gate.embeddings=false")
    preference = next(f for f in result["findings"] if f["detector"] == "preference")
    assert preference["severity"] == "info" and "no --gold-rm" in preference["message"]


def test_real_command_exit_codes(files, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\nnot json\n')
    proc = cli("eval", "--candidate", str(bad), "--baseline", str(files["baseline"]))
    assert proc.returncode == 2 and f"{bad}:2:" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("eval", "gate.embeddings=false", "--candidate", str(files["math_regressed"]),
               "--baseline", str(files["baseline"]))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "verdict: FAILED (capability_regression)" in proc.stdout
