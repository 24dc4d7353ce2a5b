"""The bad-case loop: gate report -> reviewed badcases.jsonl -> `nemo-rlhf data add-badcases` -> data.

A constructed run: RUN/ppo and RUN/eval are recorded stages (lineage.record_stage, as the
cluster's jobs record theirs) and RUN/eval/responses/{sft,ppo}.jsonl hold ChatML-rendered
prompts, as the eval stage writes them, over real hh-rlhf rows; the PPO answers are inflated
(three answers glued together, a proxy reward paying per word) so the gate fails them and
exports bad cases. A reviewer's verdicts are filled in, the CLI turns them into data, and the
data must load through the pipeline's own readers (hh_rlhf -> the RM split and rows;
chat_jsonl -> SFT rows and the SFT lint), with lineage back to the run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from nemo_rlhf.cli.main import main
from nemo_rlhf.data.chat_sft import build_chat_sft_rows, load_chat_sft
from nemo_rlhf.data.examples import build_preference_rows
from nemo_rlhf.data.hh_rlhf import load_preference_pairs
from nemo_rlhf.data.jsonl import write_jsonl_atomic
from nemo_rlhf.data.lint import lint_preference, lint_sft
from nemo_rlhf.gate.badcases import VERDICTS, hh_transcript, prompt_messages
from nemo_rlhf.lineage.record import record_stage
from nemo_rlhf.lineage.show import lineage_chain
from nemo_rlhf.models.chat_templates import CHAT_TEMPLATES, TEMPLATE_TOKENS
from nemo_rlhf.models.materialize import _chat_tokenizer
from nemo_rlhf.pipeline import data_plan
from nemo_rlhf.spec.loader import load_spec
from nemo_rlhf.spec.paths import data_root
from tests.helpers import TINY, cli
from tests.test_gate_detectors import build, hh_pairs

CORRECTED = "I'd rather not help with that, but I can suggest a safer way to get what you need."


@pytest.fixture(scope="module")
def tokenizer():
    """The tiny pipeline's tokenizer: GPT-2's tokenizer.json with the ChatML template."""
    return _chat_tokenizer(data_root("auto") / "tokenizers/gpt2/tokenizer.json", CHAT_TEMPLATES["chatml"],
                           TEMPLATE_TOKENS["chatml"])


def chatml_rows(kind: str, tokenizer, **kw) -> list[dict]:
    """A constructed set (tests.test_gate_detectors.build) with each prompt rendered in ChatML."""
    pairs = hh_pairs()
    rows = []
    for k, r in enumerate(build(kind, **kw).rows):  # two rows per pair, in pair order
        prompt = tokenizer.apply_chat_template(pairs[k // 2].prompt, tokenize=False, add_generation_prompt=True)
        rows.append({**r.to_json(), "prompt": prompt})
    return rows


@pytest.fixture(scope="module")
def gate(tmp_path_factory, tokenizer) -> dict:
    """RUN (ppo, eval stages recorded) judged with --report RUN/../gate; returns the paths."""
    root = tmp_path_factory.mktemp("badcases")
    run = root / "run"
    (run / "ppo").mkdir(parents=True)
    (run / "ppo" / "policy.txt").write_text("stand-in for the PPO checkpoint\n")
    record_stage(run, "ppo", outputs=[run / "ppo" / "policy.txt"])
    responses = run / "eval" / "responses"
    responses.mkdir(parents=True)
    write_jsonl_atomic(responses / "ppo.jsonl", chatml_rows("inflated", tokenizer))
    write_jsonl_atomic(responses / "sft.jsonl", chatml_rows("baseline", tokenizer, length_rm=True))
    record_stage(run, "eval", outputs=[responses], parents=["ppo"])
    report = root / "gate"
    assert main(["eval", "--run-dir", str(run), "--report", str(report), "gate.embeddings=false"]) == 1
    cases = [json.loads(line) for line in (report / "badcases.jsonl").read_text().splitlines()]
    return {"root": root, "run": run, "report": report, "cases": cases}


def test_exported_cases_have_what_a_reviewer_needs(gate):
    cases, run = gate["cases"], gate["run"]
    assert len(cases) >= 10 and len({c["id"] for c in cases}) == len(cases)
    assert {c["check"] for c in cases} >= {"length_shift", "length_controlled_gain"}
    for c in cases:
        assert c["verdict"] == "" and c["corrected"] == ""
        assert c["severity"] == "fail" and c["why"] and c["detector"] in ("length_inflation", "format_compliance")
        assert c["prompt"].startswith("<|im_start|>user\n") and c["response"]
        assert isinstance(c["baseline_response"], str) and c["baseline_response"] != c["response"]
        path, line = c["where"].rsplit(":", 1)  # the response's own file:line
        row = json.loads(Path(path).read_text().splitlines()[int(line) - 1])
        assert (row["prompt"], row["response"]) == (c["prompt"], c["response"])
        src = c["source"]
        assert src["run_dir"] == str(run.resolve()) and src["candidate"] == "ppo" and src["baseline"] == "sft"
        assert src["candidate_file"] == str((run / "eval/responses/ppo.jsonl").resolve())
        assert src["report"] == str(gate["report"].resolve())
    manifest = json.loads((gate["report"] / "manifest.json").read_text())
    assert manifest["stage"] == "gate" and set(manifest["inputs"]["parents"]) == {"eval"}


def review(cases: list[dict]) -> list[dict]:
    """A reviewer's pass: distinct responses get bad+corrected, prefer_baseline, ok, bad alone."""
    verdicts = {0: ("bad", CORRECTED), 1: ("prefer_baseline", ""), 2: ("OK", ""), 3: ("bad", "")}
    out, seen = [], {}
    for c in cases:
        k = seen.setdefault(c["response"], len(seen))  # the same response under another check: same verdict
        verdict, corrected = verdicts.get(k, ("", ""))
        out.append({**c, "verdict": verdict, "corrected": corrected})
    return out


@pytest.fixture(scope="module")
def added(gate) -> dict:
    reviewed = gate["root"] / "reviewed.jsonl"
    write_jsonl_atomic(reviewed, review(gate["cases"]))
    out = gate["root"] / "next-round"
    proc = cli("data", "add-badcases", str(reviewed), "--out", str(out), check=True)
    return {"out": out, "stdout": proc.stdout, "reviewed": reviewed}


def test_add_badcases_counts_and_lineage(gate, added):
    out = added["out"]
    manifest = json.loads((out / "manifest.json").read_text())
    m = manifest["metrics"]
    assert (m["used"], m["sft_examples"], m["preference_pairs"]) == (2, 2, 2), m
    assert m["skipped"]["verdict_ok"] >= 1 and m["skipped"]["bad_without_corrected"] >= 1
    assert m["skipped"]["duplicate"] >= 1  # the same response flagged by two checks is used once
    assert m["lines"] == len(gate["cases"]) == sum(m["skipped"].values()) + m["used"]
    assert "2 used" in added["stdout"] and "data.preference.path=" in added["stdout"]
    # data -> model -> evaluation -> failure cases -> data
    chain = lineage_chain(out)
    gate_node = chain["parents"][0]
    eval_node = gate_node["parents"][0]
    assert (chain["stage"], gate_node["stage"], eval_node["stage"], eval_node["parents"][0]["stage"]) == (
        "badcase_data", "gate", "eval", "ppo")
    assert gate_node["intact"] and str(added["reviewed"].resolve()) in chain["files"]


def test_preference_pairs_feed_the_reward_model(added, tokenizer, gate):
    path = added["out"] / "preference.jsonl"
    pairs, report = load_preference_pairs(path)
    assert report.kept == report.total_rows == 2 and not report.skipped
    first = json.loads(path.read_text().splitlines()[0])
    assert pairs[0].chosen == CORRECTED and first["badcase"]["verdict"] == "bad"
    assert pairs[1].chosen == next(c["baseline_response"] for c in gate["cases"] if c["response"] == pairs[1].rejected)
    # The RM stage's path: the spec's data.preference.path, its split, its tokenized rows and lint.
    spec = load_spec(TINY, [f"data.preference.path={path}"])
    split = data_plan.preference_split(spec, data_root("auto"))
    assert sorted(p.rejected for p in split.train + split.heldout) == sorted(p.rejected for p in pairs)
    rows, dropped = build_preference_rows(tokenizer, split.train + split.heldout, max_length=1024)
    assert len(rows) == 2 and dropped == 0 and not lint_preference(tokenizer, rows)


def test_sft_examples_tokenize_with_the_loss_on_the_answer(added, tokenizer, gate):
    examples = load_chat_sft(added["out"] / "sft.jsonl")
    assert examples[0].response == CORRECTED
    line = int(gate["cases"][0]["where"].rsplit(":", 1)[1])  # the first case: reviewed bad + corrected
    assert examples[0].prompt == hh_pairs()[(line - 1) // 2].prompt  # the ChatML prompt read back into turns
    rows, dropped = build_chat_sft_rows(tokenizer, examples, max_length=1024)
    assert len(rows) == 2 and dropped == 0 and not lint_sft(tokenizer, rows)
    answer_ids = [t for t, m in zip(rows[0]["input_ids"], rows[0]["completion_mask"]) if m]
    assert tokenizer.decode(answer_ids).startswith(CORRECTED)


def test_kind_sft_writes_only_sft(gate, added, tmp_path):
    out = tmp_path / "sft-only"
    assert main(["data", "add-badcases", str(added["reviewed"]), "--out", str(out), "--kind", "sft"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "sft.jsonl"]
    # Re-running into its own earlier output replaces it; a foreign folder is refused.
    assert main(["data", "add-badcases", str(added["reviewed"]), "--out", str(out), "--kind", "preference"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "preference.jsonl"]
    assert main(["data", "add-badcases", str(added["reviewed"]), "--out", str(gate["report"])]) == 2


GOOD = {"prompt": "Hi?", "response": "Buy now!!!", "baseline_response": "Hello! How can I help?"}
BAD_FILES = [
    ([GOOD | {"verdict": "bad", "corrected": "Hello."}, "{not json"], 2, "malformed JSON"),
    ([GOOD | {"verdict": "maybe"}], 1, "verdict 'maybe' is not one of bad, prefer_baseline, ok, skip"),
    ([GOOD | {"verdict": 1}], 1, "verdict must be a string"),
    ([GOOD | {"verdict": "ok", "corrected": "Hello."}], 1, "`corrected` is filled in but verdict is 'ok'"),
    ([{"prompt": "Hi?", "response": "x", "verdict": "prefer_baseline"}], 1, "no baseline_response"),
    ([GOOD | {"verdict": "bad", "corrected": 3}], 1, "corrected must be a string"),
    ([GOOD | {"verdict": "bad", "corrected": "Hello."}, {"prompt": "Hi?", "verdict": "bad"}], 2,
     "missing field 'response'"),
    ([GOOD, GOOD | {"verdict": "skip"}], None, "no reviewed case makes training data (2 not_reviewed)"),
]


@pytest.mark.parametrize("lines,line,what", BAD_FILES, ids=[w for *_, w in BAD_FILES])
def test_bad_reviewed_files_name_file_and_line(tmp_path, capsys, lines, line, what):
    bad = tmp_path / "reviewed.jsonl"
    bad.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    assert main(["data", "add-badcases", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert (f"{bad}:{line}:" if line else f"{bad}:") in err and what in err, err
    assert not (tmp_path / "out").exists()


def test_bad_input_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "reviewed.jsonl"
    bad.write_text(json.dumps(GOOD | {"verdict": "great"}) + "\n")
    proc = cli("data", "add-badcases", str(bad), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{bad}:1:" in proc.stderr and "fix:" in proc.stderr
    proc = cli("data", "add-badcases", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "reviewed file" in proc.stderr and "not found" in proc.stderr


def test_prompt_forms_become_chat_turns(tokenizer):
    turns = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "Tell me a joke."}]
    chatml = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    assert prompt_messages(chatml) == turns
    assert prompt_messages(hh_transcript(turns) + "\n\nAssistant:") == turns
    assert prompt_messages("  What is 2 + 2?\n") == [{"role": "user", "content": "What is 2 + 2?"}]
    assert set(VERDICTS) == {"bad", "prefer_baseline", "ok", "skip", ""}


def test_reviewing_in_place_finds_the_report_it_sits_in(gate, tmp_path):
    """A report folder that moved (a pipeline stage renames its temp folder): the reviewed file's
    own folder, when it is a gate report, is the parent."""
    moved = tmp_path / "moved-report"
    shutil.copytree(gate["report"], moved)
    write_jsonl_atomic(moved / "badcases.jsonl",
                       [{**c, "source": {**c["source"], "report": "/nonexistent/gate"}} for c in review(gate["cases"])])
    out = tmp_path / "data"
    assert main(["data", "add-badcases", str(moved / "badcases.jsonl"), "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["inputs"]["parents"]) == ["moved-report"]
    assert manifest["notes"]["missing_gate_manifests"] == ["/nonexistent/gate"]


def test_next_round_sft_trains_on_the_reviewed_cases(added, tmp_path, capsys):
    """data -> model: the tiny pipeline's SFT stage reads the produced file (data.sft.format=chat_jsonl)
    and its manifest records the very file add-badcases wrote."""
    sft_file = added["out"] / "sft.jsonl"
    overrides = ["data.sft.format=chat_jsonl", f"data.sft.path={sft_file}"]
    assert main(["run", str(TINY), "--until", "sft", "--out", str(tmp_path / "run"), *overrides]) == 2
    assert "data.prompts.gsm8k=0" in capsys.readouterr().err  # PPO's GSM8K prompts need a GSM8K file
    cli("run", str(TINY), "--until", "sft", "--out", str(tmp_path / "run"), *overrides, "data.prompts.gsm8k=0",
        check=True)
    sft = json.loads((tmp_path / "run" / "sft" / "manifest.json").read_text())
    written = json.loads((added["out"] / "manifest.json").read_text())["outputs"]["sft.jsonl"]["sha256"]
    assert sft["inputs"]["files"][str(sft_file)] == written
    assert sft["notes"]["examples"] == 2 and sft["notes"]["loss_tokens"] > 0
