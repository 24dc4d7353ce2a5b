"""Stage `gate`: the evaluation gate on the PPO checkpoint samples, inside `nemo-rlhf run`.

With `ppo.sample_every` on, the PPO stage writes ppo/samples.jsonl (held-out prompts sampled at
every N-th update, scored by the proxy RM and the gold RM, with their KL to the reference) and
ppo/baseline.jsonl (the same prompts at step 0: the SFT policy). This stage judges the first
against the second with `nemo_rlhf.gate.run.run_gate` and the spec's `gate` section, the very
thing `nemo-rlhf eval --candidate ppo/samples.jsonl --baseline ppo/baseline.jsonl` does, and
writes findings.json, badcases.jsonl and report.html. Pairwise battles are judged by the gold
RM (gate.judge=gold_rm) when the pipeline trained one.

A failing gate is a finished stage: its verdict is the output (metrics `passed`,
`failed_detectors`), the log says FAILED loudly and prints the equivalent `nemo-rlhf eval`
command. The stage itself fails only on bad input.
"""

from __future__ import annotations

import shlex
from dataclasses import asdict
from pathlib import Path

from nemo_rlhf.errors import UserError
from nemo_rlhf.spec.schema import PipelineSpec
from nemo_rlhf.stages.base_model import MODEL_DIR
from nemo_rlhf.stages.ppo import BASELINE, SAMPLES

FINDINGS = "findings.json"


def eval_command(run_dir: Path, spec_path: str | None = None) -> str:
    """The `nemo-rlhf eval` command that judges this run's PPO samples by hand."""
    ppo = Path(run_dir) / "ppo"
    parts = ["nemo-rlhf", "eval"] + ([spec_path] if spec_path else [])
    parts += ["--candidate", str(ppo / SAMPLES), "--baseline", str(ppo / BASELINE)]
    gold = Path(run_dir) / "gold_rm" / MODEL_DIR
    if gold.is_dir():
        parts += ["--gold-rm", str(gold)]
    return " ".join(shlex.quote(p) for p in parts)


class GateStage:
    name = "gate"
    off_reason = "ppo.sample_every is 0: no PPO checkpoint samples to judge"

    def enabled(self, spec: PipelineSpec) -> bool:
        return bool(spec.ppo.sample_every)

    def parents(self, spec: PipelineSpec) -> tuple[str, ...]:
        return ("ppo", "gold_rm") if spec.gold_rm.enabled else ("ppo",)

    def config(self, spec: PipelineSpec) -> dict:
        return {"gate": asdict(spec.gate), "seed": spec.seed}

    def input_files(self, spec: PipelineSpec, root: Path) -> list[Path]:
        return []

    def run(self, ctx) -> dict:
        from nemo_rlhf.gate.report_html import write_html_report
        from nemo_rlhf.gate.responses import read_responses
        from nemo_rlhf.gate.run import (
            bad_cases,
            battle_check,
            load_reward_model,
            make_judge,
            resolve_config,
            run_gate,
            write_report,
        )

        ppo = ctx.parents["ppo"]
        files = {"ppo": ppo / SAMPLES, "sft": ppo / BASELINE}
        for path in files.values():
            if not path.is_file():
                raise UserError(f"gate: {path} is missing", where="gate",
                                fix="re-run the ppo stage with ppo.sample_every > 0")
        candidate, baseline = read_responses(files["ppo"], "ppo"), read_responses(files["sft"], "sft")
        cfg = resolve_config(ctx.spec.gate, ctx.spec.seed)
        gold = load_reward_model(str(ctx.parents["gold_rm"] / MODEL_DIR)) if "gold_rm" in ctx.parents else None
        result = run_gate(candidate, baseline, cfg, extra=[battle_check(make_judge(cfg, gold))])
        source = {"run_dir": str(ctx.run_dir.resolve()), "candidate_file": str(files["ppo"].resolve()),
                  "baseline_file": str(files["sft"].resolve()), "stage": "gate"}
        # ctx.out is a temporary folder renamed on success: the cases name where it ends up.
        write_report(result, ctx.out, baseline, source, candidate, final_dir=ctx.run_dir / self.name)
        cases = bad_cases(result, baseline, source, candidate)
        write_html_report(ctx.out, result, candidate, baseline, cases=cases, source=source)
        self._log(ctx, result)
        return {"passed": result.passed, "failed_detectors": result.failed_detectors,
                "findings": {s: sum(f.severity == s for f in result.findings) for s in ("fail", "warn", "info")}}

    def _log(self, ctx, result) -> None:
        for f in result.findings:
            if f.severity != "info":
                ctx.log(f"[gate] {f.severity.upper()} {f.detector}: {f.message}")
        verdict = "PASSED" if result.passed else f"FAILED ({', '.join(result.failed_detectors)})"
        ctx.log(f"[gate] verdict: {verdict}; report: {ctx.run_dir / self.name / 'report.html'}")
        ctx.log(f"[gate] the same judgement by hand: {eval_command(ctx.run_dir)}")
        ctx.notes["verdict"] = verdict
        ctx.notes["eval_command"] = eval_command(ctx.run_dir)
