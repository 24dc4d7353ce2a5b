"""The bad-case loop: gate report -> reviewed failure cases -> training data, with lineage.

data -> model -> evaluation -> failure cases -> data:

1. `nemo-rlhf eval ... --report DIR` writes DIR/badcases.jsonl (the worst cases per check,
   each with `source`: the run dir, responses files or checkpoints it judged, and this report)
   and DIR/manifest.json (`record_gate_report`: stage `gate`, the responses files' hashes,
   the stage that produced them as its parent).
2. A reviewer fills in `verdict` on each line (`VERDICTS`, case-insensitive) and, where
   needed, `corrected` (a good response to the prompt, written by the reviewer):
   - `bad`: the candidate's response is bad. With `corrected`, it becomes training data;
     without, it is recorded as reviewed but makes nothing (there is no good answer to learn).
   - `prefer_baseline`: the baseline's response (`baseline_response`, in the file) is the good
     answer; `corrected`, when given, replaces it.
   - `ok`: the detector fired but the response is fine (a false alarm); no data.
   - `skip` or empty: not reviewed; no data.
3. `nemo-rlhf data add-badcases REVIEWED.jsonl --out OUT [--kind sft|preference|both]`
   (`add_badcases`) turns every `bad`/`prefer_baseline` case that has a good answer into
   - an SFT example (`chat_jsonl`, see nemo_rlhf.data.chat_sft): prompt -> the good answer;
   - a preference pair (`hh_rlhf` transcripts, read by nemo_rlhf.data.hh_rlhf, i.e.
     `data.preference.path` of a spec): chosen = the good answer, rejected = the candidate's;
   each row keeps `badcase` (case id, detector, check, why, source, the reviewed file:line).
   The same (prompt, response, answer) reviewed under several checks is used once.
   OUT/manifest.json (stage `badcase_data`) names the reviewed file's hash, the gate's
   findings.json and the gate report as its parent, so `nemo-rlhf lineage show OUT` walks
   back through the evaluation to the checkpoints and data that produced the failures.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from nemo_rlhf.data.chat_sft import FORMAT as SFT_FORMAT
from nemo_rlhf.data.hh_rlhf import TranscriptParseError, parse_transcript
from nemo_rlhf.data.jsonl import read_jsonl, require_fields, write_jsonl_atomic
from nemo_rlhf.errors import UserError
from nemo_rlhf.lineage.hashing import sha256_file, sha256_json, sha256_tree
from nemo_rlhf.lineage.manifest import MANIFEST, StageInputs, build_manifest, now_iso
from nemo_rlhf.lineage.record import describe_path, write_json_atomic
from nemo_rlhf.lineage.stage_dir import new_temp_stage_dir, promote

GATE_STAGE, DATA_STAGE = "gate", "badcase_data"
KINDS = ("sft", "preference", "both")
# The reviewer's verdicts: what each means and whether it asks for training data.
VERDICTS = {
    "bad": "the candidate's response is bad; `corrected` (a good response) makes it training data",
    "prefer_baseline": "the baseline's response is the good answer (or `corrected`, when given)",
    "ok": "a false alarm: the response is fine; no data",
    "skip": "not reviewed; no data (same as empty)",
    "": "not reviewed yet; no data",
}
MAKES_DATA = ("bad", "prefer_baseline")
SFT_FILE, PREFERENCE_FILE = "sft.jsonl", "preference.jsonl"
PREFERENCE_FORMAT = "hh_rlhf"

_CHATML = re.compile(r"<\|im_start\|>(system|user|assistant)\n(.*?)(?:<\|im_end\|>|$)", re.DOTALL)


# ---------------------------------------------------------------- lineage of the gate report


def owning_stage(path: str | os.PathLike, levels: int = 3) -> Path | None:
    """The nearest folder at or above `path` (up to `levels` up) holding a stage manifest."""
    here = Path(path).resolve()
    here = here if here.is_dir() else here.parent
    for folder in [here, *here.parents][: levels + 1]:
        if (folder / MANIFEST).is_file():
            return folder
    return None


def _parent_refs(child_dir: Path, stage_dirs: list[Path]) -> dict[str, dict]:
    """Parent entries as `lineage show` reads them: the manifest's path relative to the child's
    folder's parent, and its sha256. Keyed by the parent's folder name (made unique)."""
    refs = {}
    for folder in dict.fromkeys(stage_dirs):  # unique, in order
        name = folder.name
        while name in refs:
            name += "'"
        rel = os.path.relpath(folder / MANIFEST, child_dir.resolve().parent)
        refs[name] = {"manifest": Path(rel).as_posix(), "sha256": sha256_file(folder / MANIFEST)}
    return refs


def record_gate_report(report_dir: str | os.PathLike, responses: dict[str, Path], checkpoints: dict[str, Path],
                       config: dict, metrics: dict, started_at: str | None = None) -> Path:
    """Writes REPORT_DIR/manifest.json for a gate run (stage `gate`).

    Args:
        report_dir: the `--report` folder (findings.json, badcases.jsonl, report.html in it).
        responses: name -> responses file judged (their sha256 are the gate's inputs).
        checkpoints: name -> HF dir the responses were generated from (checkpoints mode).
        config: the resolved gate config.
        metrics: the verdict (passed, failed detectors).
        started_at: ISO start time of the gate run.

    Parents: the stage folder (one with a manifest) that holds each responses file or
    checkpoint, e.g. RUN/eval for RUN/eval/responses/ppo.jsonl, RUN/ppo for RUN/ppo/model.
    A checkpoint outside any stage is hashed file by file instead.
    """
    report_dir = Path(report_dir)
    files, parents = {}, []
    for path in responses.values():
        files[str(Path(path).resolve())] = sha256_file(Path(path))
        stage = owning_stage(path)
        if stage is not None and stage.resolve() != report_dir.resolve():
            parents.append(stage)
    for path in checkpoints.values():
        stage = owning_stage(path)
        if stage is not None:
            parents.append(stage)
        else:
            files[str(Path(path).resolve())] = sha256_json(sha256_tree(Path(path)))
    inputs = StageInputs(GATE_STAGE, {"gate": config, "checkpoints": {k: str(v) for k, v in checkpoints.items()}},
                         files, _parent_refs(report_dir, parents))
    outputs = {name: describe_path(report_dir / name) for name in ("findings.json", "badcases.jsonl", "report.html")
               if (report_dir / name).is_file()}
    manifest = build_manifest(inputs, started_at or now_iso(), 0.0, metrics, outputs,
                              {"responses": {k: str(v) for k, v in responses.items()}})
    return write_json_atomic(report_dir / MANIFEST, manifest)


# ---------------------------------------------------------------- reviewed cases -> data


def prompt_messages(prompt: str) -> list[dict]:
    """A responses file's prompt as chat turns ending with the user's.

    Reads a rendered ChatML prompt (what the eval stage writes), an hh-rlhf transcript
    ("\\n\\nHuman: ...\\n\\nAssistant:"), or else takes the text as one user turn.
    """
    turns = [{"role": r, "content": c.strip()} for r, c in _CHATML.findall(prompt)]
    if turns:
        while turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
            turns.pop()  # the generation prompt "<|im_start|>assistant\n"
        if turns:
            return turns
    text = prompt.rstrip()
    if text.endswith("Assistant:") and "Human:" in text:
        try:
            turns = parse_transcript(text[: -len("Assistant:")].rstrip())
        except TranscriptParseError:
            turns = []
        if turns and turns[-1]["role"] == "user":
            return turns
    return [{"role": "user", "content": prompt.strip()}]


def hh_transcript(messages: list[dict]) -> str:
    """Chat turns as an hh-rlhf transcript ("\\n\\nHuman: ...\\n\\nAssistant: ..."); system turns dropped."""
    names = {"user": "Human", "assistant": "Assistant"}
    return "".join(f"\n\n{names[m['role']]}: {m['content']}" for m in messages if m["role"] in names)


@dataclass
class Reviewed:
    """One reviewed line of a badcases file."""

    prompt: str
    response: str
    verdict: str
    corrected: str | None
    baseline_response: str | None
    where: str
    meta: dict = field(default_factory=dict)  # id, detector, check, why, source: kept as lineage

    @property
    def answer(self) -> str | None:
        """The good response this review supplies: `corrected`, else the baseline's when preferred."""
        if self.verdict not in MAKES_DATA:
            return None
        return self.corrected or (self.baseline_response if self.verdict == "prefer_baseline" else None)


LINEAGE_KEYS = ("id", "detector", "check", "why", "severity", "where", "source", "step")


def _review_problem(raw: dict) -> str | None:
    """What is wrong with one line's review fields, or None."""
    verdict = raw.get("verdict")
    if verdict is not None and not isinstance(verdict, str):
        return f"verdict must be a string, got {type(verdict).__name__}"
    verdict = (verdict or "").strip().lower()
    if verdict not in VERDICTS:
        return f"verdict {raw['verdict']!r} is not one of {', '.join(v for v in VERDICTS if v)} (or empty)"
    wrong = [k for k in ("corrected", "baseline_response") if raw.get(k) is not None and not isinstance(raw[k], str)]
    if wrong:
        return f"{', '.join(wrong)} must be a string"
    corrected = (raw.get("corrected") or "").strip()
    if corrected and verdict not in MAKES_DATA:
        return f"`corrected` is filled in but verdict is {verdict or 'empty'!r}: set verdict to bad to use it"
    if verdict == "prefer_baseline" and not corrected and not (raw.get("baseline_response") or "").strip():
        return "verdict prefer_baseline but the case has no baseline_response: write the good answer in `corrected`"
    return None


def read_reviewed(path: str | os.PathLike) -> list[Reviewed]:
    """Reads a reviewed badcases file; every bad line is reported at once as `file:line`.

    Raises:
        UserError: malformed JSON, missing `prompt`/`response`, an unknown verdict, a
            `corrected` on a line whose verdict does not use it, or a `prefer_baseline`
            without a baseline response.
    """
    rows, problems = [], []
    for lineno, raw in read_jsonl(path):
        where = f"{path}:{lineno}"
        try:
            require_fields(raw, {"prompt": str, "response": str}, path, lineno)
        except UserError as err:
            problems.append(f"{where}: {err.what}")
            continue
        problem = _review_problem(raw)
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        rows.append(Reviewed(raw["prompt"], raw["response"], (raw.get("verdict") or "").strip().lower(),
                             (raw.get("corrected") or "").strip() or None,
                             (raw.get("baseline_response") or "").strip() or None, where,
                             {k: raw[k] for k in LINEAGE_KEYS if k in raw}))
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise UserError(f"{len(problems)} reviewed line(s) cannot be used:\n  {shown}",
                        where=problems[0].split(": ", 1)[0],
                        fix='set "verdict" on each line to ' + "; ".join(f"{v}: {m}" for v, m in VERDICTS.items() if v))
    if not rows:
        raise UserError("the reviewed file has no cases", where=str(path),
                        fix="pass the badcases.jsonl of a gate report (nemo-rlhf eval ... --report DIR), reviewed")
    return rows


@dataclass
class Converted:
    """What `convert` made of the reviewed cases."""

    sft: list[dict] = field(default_factory=list)
    preference: list[dict] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    used: int = 0


def _skip_reason(case: Reviewed) -> str | None:
    if case.verdict not in MAKES_DATA:
        return "not_reviewed" if case.verdict in ("", "skip") else f"verdict_{case.verdict}"
    if case.answer is None:
        return "bad_without_corrected"
    if case.answer.strip() == case.response.strip():
        return "answer_same_as_response"
    return None


def convert(cases: list[Reviewed], kind: str = "both") -> Converted:
    """Reviewed cases -> SFT rows (`chat_jsonl`) and preference rows (`hh_rlhf`), skips counted by reason."""
    out, seen = Converted(), set()
    for c in cases:
        reason = _skip_reason(c)
        key = (c.prompt, c.response, c.answer)
        if reason is None and key in seen:
            reason = "duplicate"  # the same response flagged by several checks
        if reason is not None:
            out.skipped[reason] += 1
            continue
        seen.add(key)
        prompt = prompt_messages(c.prompt)
        lineage = {**c.meta, "verdict": c.verdict, "reviewed": c.where}
        pair = {"chosen": hh_transcript([*prompt, {"role": "assistant", "content": c.answer}]),
                "rejected": hh_transcript([*prompt, {"role": "assistant", "content": c.response}]),
                "chosen_from": "corrected" if c.corrected else "baseline_response", "badcase": lineage}
        if kind in ("preference", "both") and not _round_trips(pair):
            out.skipped["not_representable_as_hh_transcript"] += 1
            continue
        out.used += 1
        if kind in ("sft", "both"):
            out.sft.append({"messages": [*prompt, {"role": "assistant", "content": c.answer}], "badcase": lineage})
        if kind in ("preference", "both"):
            out.preference.append(pair)
    return out


def _round_trips(row: dict) -> bool:
    """Whether the hh_rlhf loader reads the pair back as written (a response holding
    "\\n\\nHuman:" would split into extra turns)."""
    try:
        chosen, rejected = parse_transcript(row["chosen"]), parse_transcript(row["rejected"])
    except TranscriptParseError:
        return False
    return (chosen[:-1] == rejected[:-1] and chosen[-1]["role"] == rejected[-1]["role"] == "assistant"
            and bool(chosen[-1]["content"]) and bool(rejected[-1]["content"]))


def _gate_reports(cases: list[Reviewed], reviewed: Path) -> tuple[list[Path], list[Path]]:
    """The gate report folders and findings.json files the cases name in their `source`, and
    the reviewed file's own folder when it is a gate report (a reviewer editing badcases.jsonl
    in place, or a report whose recorded path has moved)."""
    reports, findings = [], []
    here = reviewed.resolve().parent
    if _is_gate_report(here):
        reports.append(here)
        findings.append(here / "findings.json")
    for c in cases:
        source = c.meta.get("source") or {}
        if isinstance(source, dict):
            if source.get("report"):
                reports.append(Path(source["report"]))
            if source.get("findings"):
                findings.append(Path(source["findings"]))
    return list(dict.fromkeys(reports)), list(dict.fromkeys(findings))


def _is_gate_report(folder: Path) -> bool:
    try:
        return json.loads((folder / MANIFEST).read_text()).get("stage") == GATE_STAGE
    except (OSError, ValueError):
        return False


def add_badcases(reviewed: str | os.PathLike, out_dir: str | os.PathLike, kind: str = "both") -> dict:
    """Writes OUT_DIR/{sft,preference}.jsonl and OUT_DIR/manifest.json from a reviewed file.

    The folder is built under a temporary name and renamed into place (replacing an earlier
    output of this command), so a crash leaves no half-written data that looks finished.

    Returns:
        The manifest written.

    Raises:
        UserError: bad lines (see `read_reviewed`), an unknown kind, no case that makes data,
            or an `out_dir` that holds something other than an earlier add-badcases output.
    """
    started = now_iso()
    t0 = time.time()
    if kind not in KINDS:
        raise UserError(f"unknown --kind {kind!r}", fix=f"use one of {', '.join(KINDS)}")
    reviewed, out_dir = Path(reviewed), Path(out_dir)
    if not reviewed.is_file():
        raise UserError(f"reviewed file {reviewed} not found", where=str(reviewed),
                        fix="pass the badcases.jsonl of a gate report (nemo-rlhf eval ... --report DIR) after review")
    _check_out_dir(out_dir)
    cases = read_reviewed(reviewed)
    converted = convert(cases, kind)
    if not converted.used:
        counts = ", ".join(f"{n} {reason}" for reason, n in sorted(converted.skipped.items()))
        raise UserError(f"no reviewed case makes training data ({counts})", where=str(reviewed),
                        fix='set "verdict": "bad" with a "corrected" response, or "prefer_baseline", on the cases '
                            "to learn from")
    reports, findings = _gate_reports(cases, reviewed)
    files = {str(reviewed.resolve()): sha256_file(reviewed)}
    files.update({str(p): sha256_file(p) for p in findings if p.is_file()})
    parents = [p for p in reports if (p / MANIFEST).is_file()]
    inputs = StageInputs(DATA_STAGE, {"kind": kind, "sft_format": SFT_FORMAT, "preference_format": PREFERENCE_FORMAT},
                         files, _parent_refs(out_dir, parents))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temp_stage_dir(out_dir.parent, out_dir.name)
    try:
        outputs = {}
        for name, rows, wanted in ((SFT_FILE, converted.sft, kind in ("sft", "both")),
                                   (PREFERENCE_FILE, converted.preference, kind in ("preference", "both"))):
            if wanted:
                write_jsonl_atomic(tmp / name, rows)
                outputs[name] = {**describe_path(tmp / name), "examples": len(rows)}
        metrics = {"lines": len(cases), "used": converted.used, "sft_examples": len(converted.sft),
                   "preference_pairs": len(converted.preference), "skipped": dict(converted.skipped)}
        notes = {"gate_reports": [str(p) for p in reports], "findings": [str(p) for p in findings],
                 "missing_gate_manifests": [str(p) for p in reports if p not in parents],
                 "sources": _sources(cases)}
        manifest = build_manifest(inputs, started, time.time() - t0, metrics, outputs, notes)
        write_json_atomic(tmp / MANIFEST, manifest)
        promote(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _sources(cases: list[Reviewed]) -> list[dict]:
    seen = {}
    for c in cases:
        source = c.meta.get("source")
        if isinstance(source, dict):
            seen.setdefault(sha256_json(source), source)
    return list(seen.values())


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file", fix="choose a folder for --out")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        manifest = out_dir / MANIFEST
        try:
            ours = manifest.is_file() and json.loads(manifest.read_text()).get("stage") == DATA_STAGE
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise UserError(f"--out {out_dir} is not empty and is not an earlier add-badcases output",
                            fix="choose a new folder for --out (it is replaced as a whole)")

