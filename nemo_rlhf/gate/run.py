"""The gate's runner: responses in, verdict out.

`run_gate(candidate, baseline, cfg)` walks the detector table (`nemo_rlhf.gate.detectors`)
and the layer-1/2 checks (`LAYER_CHECKS`: capability, format, instruction following,
pairwise battles), collecting their findings into a `GateResult`. `load_inputs` finds the
two responses files (given, or the ones the small-scale eval stage wrote), `score_missing`
fills in rewards with HF reward models, `write_report` writes findings.json and the bad
cases for reviewers.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

from nemo_rlhf.atomic_file import write_text_atomic
from nemo_rlhf.data.jsonl import write_jsonl_atomic
from nemo_rlhf.errors import UserError
from nemo_rlhf.gate.detectors import DETECTORS
from nemo_rlhf.gate.detectors.common import DEFAULT_SEED, skipped
from nemo_rlhf.gate.findings import Finding, GateResult
from nemo_rlhf.gate.responses import ResponseSet, check_same_prompts, read_responses
from nemo_rlhf.spec.schema import GateConfig

# The small-scale eval stage's files: <run>/eval/responses/<checkpoint>.jsonl.
EVAL_STAGE, CANDIDATE, BASELINE, BASE = "eval", "ppo", "sft", "base"


def _rows(s: ResponseSet) -> list[dict]:
    return [r.to_json() for r in s.final().rows]


def capability_findings(candidate: ResponseSet, baseline: ResponseSet, cfg: GateConfig) -> list[Finding]:
    """Layer 1: GSM8K exact match on the rows whose prompt is a GSM8K test question (gate.capability)."""
    from nemo_rlhf.gate.capability import capability_finding, score_rows

    kw = dict(n_boot=cfg.bootstrap_samples, seed=cfg.seed)
    cand, base = score_rows(_rows(candidate), **kw), score_rows(_rows(baseline), **kw)
    if cand is None or base is None:
        return [skipped("capability_regression", "capability_regression", "no GSM8K test questions in the files")]
    return [capability_finding(cand, base, cfg.thresholds.capability_drop, cfg.bootstrap_samples, cfg.seed,
                               1 - cfg.confidence, cfg.max_cases)]


def format_findings(candidate: ResponseSet, baseline: ResponseSet, cfg: GateConfig) -> list[Finding]:
    """Layer 1: format compliance of the candidate (gate.format_checks)."""
    from nemo_rlhf.gate.format_checks import format_finding

    return [format_finding(_rows(candidate), cfg.thresholds.format_min_pass_rate, max_cases=cfg.max_cases)]


def instruction_findings(candidate: ResponseSet, baseline: ResponseSet, cfg: GateConfig) -> list[Finding]:
    """Layer 1: the instruction-following set, where the files answer its prompts (gate.instructions)."""
    from nemo_rlhf.gate.instructions import instruction_finding, score_rows

    cand, base = score_rows(_rows(candidate)), score_rows(_rows(baseline))
    if not cand.passed or not base.passed:
        return [skipped("instruction_following", "instruction_following", "no instruction-set prompts in the files")]
    return [instruction_finding(cand, base, cfg.thresholds.instruction_max_drop, cfg.max_cases)]


# Layer 1 checks, each `(candidate, baseline, cfg) -> list[Finding]`, after the detectors.
# Layer 2 (pairwise battles) needs a judge model: `battle_check(make_judge(...))` joins them.
LAYER_CHECKS: list[Callable[[ResponseSet, ResponseSet, GateConfig], list[Finding]]] = [
    capability_findings,
    format_findings,
    instruction_findings,
]


def make_judge(cfg: GateConfig, gold_rm=None):
    """The battles' judge named by `gate.judge`: the gold RM (a loaded `RewardModelJudge`, from
    --gold-rm), an HF reward-model dir, or an OpenAI-compatible endpoint; None when gold_rm is
    named but not given."""
    from nemo_rlhf.gate.judges import ChatJudge, RewardModelJudge

    if cfg.judge == "openai":
        if not (cfg.judge_url and cfg.judge_model):
            raise UserError("gate.judge is openai but gate.judge_url or gate.judge_model is not set",
                            fix="set gate.judge_url=http://host:port/v1 gate.judge_model=NAME")
        return ChatJudge(cfg.judge_url, cfg.judge_model)
    if cfg.judge == "gold_rm":
        return gold_rm
    return RewardModelJudge(cfg.judge)


def battle_check(judge) -> Callable[[ResponseSet, ResponseSet, GateConfig], list[Finding]]:
    """Layer 2: candidate vs baseline judged in both orders, raw and length-controlled win rate (gate.battles)."""

    def battles(candidate: ResponseSet, baseline: ResponseSet, cfg: GateConfig) -> list[Finding]:
        if judge is None:
            return [skipped("preference", "preference", "gate.judge is gold_rm and no --gold-rm was given")]
        from nemo_rlhf.gate.battles import battle_rows, length_gap_finding, preference_finding

        result = battle_rows(judge, _rows(candidate), _rows(baseline), names=(candidate.name, baseline.name),
                             n_boot=cfg.bootstrap_samples, seed=cfg.seed, alpha=1 - cfg.confidence)
        t = cfg.thresholds
        return [preference_finding(result, t.preference_min_win_rate, cfg.max_cases),
                length_gap_finding(result, t.lc_max_gap)]

    return battles


def resolve_config(cfg: GateConfig | None, spec_seed: int | None = None) -> GateConfig:
    """The gate config with its seed filled in (gate.seed, else the spec's seed, else the default)."""
    cfg = cfg or GateConfig()
    seed = cfg.seed if cfg.seed is not None else (spec_seed if spec_seed is not None else DEFAULT_SEED)
    return dataclasses.replace(cfg, seed=seed)


def run_gate(candidate: ResponseSet, baseline: ResponseSet, cfg: GateConfig | None = None,
             extra: list[Callable] = ()) -> GateResult:
    """Every detector and layer check on candidate vs baseline.

    Args:
        candidate: the responses to judge (may hold several PPO `step`s; the last is judged,
            the earlier ones feed reward_hacking's trajectory).
        baseline: the reference responses (the SFT policy), on the same prompts.
        cfg: the `gate` section; default thresholds when None.
        extra: more checks of the same signature (e.g. battles with a judge).

    Raises:
        UserError: the two files are not on the same prompts.
    """
    check_same_prompts(candidate, baseline)
    cfg = resolve_config(cfg)
    findings: list[Finding] = []
    for detector in [*DETECTORS.values(), *LAYER_CHECKS, *extra]:
        findings += detector(candidate, baseline, cfg)
    return GateResult(findings)


def input_files(candidate: str | None, baseline: str | None, run_dir: str | None) -> dict[str, Path]:
    """The two responses files by set name: the files given ({candidate, baseline}), or the eval
    stage's in `run_dir` ({ppo, sft}), candidate first.

    Raises:
        UserError: only one of candidate/baseline, neither files nor run_dir, or a run_dir
            whose eval stage has not written its responses.
    """
    if candidate or baseline:
        if not (candidate and baseline):
            raise UserError("--candidate and --baseline go together",
                            fix="pass both files: --candidate ppo.jsonl --baseline sft.jsonl")
        return {"candidate": Path(candidate), "baseline": Path(baseline)}
    if not run_dir:
        raise UserError("nothing to judge", fix="pass --candidate FILE --baseline FILE, or a SPEC with --run-dir DIR")
    folder = Path(run_dir) / EVAL_STAGE / "responses"
    files = {name: folder / f"{name}.jsonl" for name in (CANDIDATE, BASELINE)}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise UserError(f"the eval stage's responses are missing: {', '.join(missing)}",
                        fix=f"run the pipeline through eval first: nemo-rlhf run SPEC --out {run_dir}")
    return files


def load_inputs(candidate: str | None, baseline: str | None, run_dir: str | None) -> tuple[ResponseSet, ResponseSet]:
    """The two responses sets: the files given, or those of the eval stage in `run_dir` (ppo vs sft)."""
    (cand_name, cand_path), (base_name, base_path) = input_files(candidate, baseline, run_dir).items()
    return read_responses(cand_path, cand_name), read_responses(base_path, base_name)


def run_dir_sets(run_dir: str | None, candidate: ResponseSet, baseline: ResponseSet) -> dict[str, ResponseSet]:
    """Every checkpoint's responses for the report's length histogram: base (when the eval stage
    wrote it), baseline, candidate."""
    sets = {}
    base = Path(run_dir) / EVAL_STAGE / "responses" / f"{BASE}.jsonl" if run_dir else None
    if base is not None and base.is_file():
        sets[BASE] = read_responses(base, BASE)
    return {**sets, baseline.name: baseline, candidate.name: candidate}


def load_reward_model(model_dir: str, batch_size: int = 8):
    """An HF reward model (AutoModelForSequenceClassification; the tokenizer's chat template when
    it has one), batched with a progress bar: `nemo_rlhf.gate.judges.RewardModelJudge`."""
    from nemo_rlhf.gate.judges import RewardModelJudge  # torch + transformers: only when asked for

    return RewardModelJudge(model_dir, batch_size=batch_size)


def score_missing(sets: list[ResponseSet], field: str, judge) -> int:
    """Fills `field` (proxy_reward or gold_reward) where missing with `judge.scores`; returns how many.

    gold_reward is filled only on the rows that carry a proxy_reward when some do (the chat
    prompts the pipeline scored, not its GSM8K rows), so safety_regression sees the same set.
    """
    rows = [r for s in sets for r in s.rows]
    if field == "gold_reward" and any(r.proxy_reward is not None for r in rows):
        rows = [r for r in rows if r.proxy_reward is not None]
    todo = [r for r in rows if getattr(r, field) is None]
    if not todo:
        return 0
    for row, score in zip(todo, judge.scores([r.prompt for r in todo], [r.response for r in todo])):
        setattr(row, field, float(score))
    return len(todo)


# A bad case's fields in the order a reviewer reads them; the case's own extras (scores,
# `where` = file:line of the response) follow, then `source`, then the reviewer's fields.
CASE_HEAD = ("id", "detector", "check", "severity", "why", "prompt", "response", "baseline_response")
REVIEW_FIELDS = {"verdict": "", "corrected": ""}  # filled in by the reviewer (nemo_rlhf.gate.badcases)


def bad_cases(result: GateResult, baseline: ResponseSet | None = None, source: dict | None = None,
              candidate: ResponseSet | None = None) -> list[dict]:
    """The worst cases of every finding as review records (see `write_report`).

    Each has a unique `id` (check#n), the finding's detector/check/severity, `why`, the
    prompt, the candidate's `response`, the baseline's answer to the same prompt (null when
    there is none), `where` (the response's file:line, looked up in `candidate` when the
    check did not say), the source and empty `verdict`/`corrected` for the reviewer.
    """
    answers, lines = {}, {}
    for row in (baseline.rows if baseline is not None else []):
        answers.setdefault(row.prompt, row.response)
    for row in (candidate.rows if candidate is not None else []):
        lines[(row.prompt, row.response)] = row.where  # the last PPO step's, as the checks judge it
    cases = []
    for f in result.findings:
        for n, case in enumerate(f.to_json(with_cases=True)["details"].get("cases", []), start=1):
            head = {"id": f"{f.check}#{n}", "detector": f.detector, "check": f.check, "severity": f.severity,
                    "why": case.get("why", f.message), "prompt": case.get("prompt"), "response": case.get("response"),
                    "baseline_response": case.get("baseline_response", answers.get(case.get("prompt")))}
            rest = {k: v for k, v in case.items() if k not in head and k not in REVIEW_FIELDS}
            rest.setdefault("where", lines.get((head["prompt"], head["response"])))
            cases.append({**head, **rest, "source": source or {}, **REVIEW_FIELDS})
    return cases


def write_report(result: GateResult, out_dir: str | os.PathLike, baseline: ResponseSet | None = None,
                 source: dict | None = None, candidate: ResponseSet | None = None,
                 final_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """findings.json (the verdict, every finding) and badcases.jsonl (`bad_cases`: worst cases
    per check, each with an empty `verdict` for a reviewer), each written to a temp file and renamed.

    Args:
        result: the gate's verdict.
        out_dir: the report folder.
        baseline: when given, a case without `baseline_response` gets the baseline's response
            to the same prompt (a reviewer compares them; `data add-badcases` pairs them).
        source: where the judged responses came from (run dir, responses files, checkpoints);
            every case carries it, with this report's folder, so reviewed cases trace back.
        candidate: when given, a case without `where` gets its response's file:line.
        final_dir: where `out_dir` will live once renamed (a pipeline stage writes into a
            temporary folder): the path the cases' `source.report` names, default `out_dir`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    findings_path, cases_path = out / "findings.json", out / "badcases.jsonl"
    write_text_atomic(findings_path, json.dumps(result.to_json(), indent=2, ensure_ascii=False) + "\n")
    final = Path(final_dir or out).resolve()
    origin = {**(source or {}), "report": str(final), "findings": str(final / findings_path.name)}
    write_jsonl_atomic(cases_path, bad_cases(result, baseline, origin, candidate))
    return findings_path, cases_path


def write_reports(result: GateResult, out_dir: str | os.PathLike, candidate: ResponseSet, baseline: ResponseSet,
                  files: dict[str, Path], config: GateConfig, source: dict | None = None,
                  sets: dict[str, ResponseSet] | None = None) -> dict[str, Path]:
    """Everything `nemo-rlhf eval --report DIR` writes: findings.json, badcases.jsonl,
    report.html (`report_html`) and, last, manifest.json (stage `gate`: the judged files'
    hashes, the stages that produced them as parents; `badcases.record_gate_report`).

    The old manifest goes first, so a report interrupted half-way never looks finished.
    """
    from nemo_rlhf.gate.badcases import record_gate_report
    from nemo_rlhf.gate.report_html import write_html_report
    from nemo_rlhf.lineage.manifest import MANIFEST, now_iso

    started, out = now_iso(), Path(out_dir)
    (out / MANIFEST).unlink(missing_ok=True)
    paths = [str(Path(p).resolve()) for p in files.values()]  # `input_files` order: candidate, baseline
    source = {**(source or {}), **dict(zip(("candidate_file", "baseline_file"), paths))}
    findings, cases = write_report(result, out, baseline, source, candidate)
    rows = [json.loads(line) for line in cases.read_text(encoding="utf-8").splitlines() if line.strip()]
    html = write_html_report(out, result, candidate, baseline, sets=sets, cases=rows, source=source)
    manifest = record_gate_report(out, files, {}, _config_dict(config),
                                  {"passed": result.passed, "failed_detectors": result.failed_detectors,
                                   "bad_cases": len(rows)}, started_at=started)
    return {"findings": findings, "badcases": cases, "html": html, "manifest": manifest}


def _config_dict(cfg: GateConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
