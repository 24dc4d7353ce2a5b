"""`nemo-rlhf eval`: the evaluation gate. Exit 0 when it passes, 1 when it fails, 2 on bad input.

Not the pipeline's `eval` stage (`nemo-rlhf run` generates base/SFT/PPO responses there):
this verb judges responses, from files (how cluster runs are gated) or from that stage's output.
"""

from __future__ import annotations

import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="the evaluation gate: judge a candidate's responses against a baseline's (exit 0 pass, 1 fail)",
        description="Judge a candidate's responses against a baseline's: reward hacking, length inflation, template "
        "collapse, degenerate responses, KL budget, safety and capability regression. Exit code 0 when the gate "
        "passes, 1 when it fails, 2 on bad input.",
    )
    p.add_argument("spec", nargs="?", help="spec YAML (its `gate` section); default thresholds when omitted")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. gate.thresholds.kl_max_mean=10")
    p.add_argument("--candidate", help="candidate responses JSONL ({prompt, response, ...} per line)")
    p.add_argument("--baseline", help="baseline responses JSONL on the same prompts")
    p.add_argument("--run-dir", help="a small-scale run directory: judge its eval stage's ppo vs sft responses")
    p.add_argument("--proxy-rm", help="HF reward-model dir scoring responses that lack proxy_reward")
    p.add_argument("--gold-rm", help="HF reward-model dir scoring responses that lack gold_reward")
    p.add_argument("--json", action="store_true", help="print one JSON object: passed, findings")
    p.add_argument("--report", type=Path,
                   help="write findings.json, badcases.jsonl (worst cases, a `verdict` to fill in), report.html "
                        "(one self-contained page: verdict, numbers, plots, samples) and manifest.json here")
    p.set_defaults(func=run_eval)


def run_eval(args) -> int:
    from nemo_rlhf.gate.run import (
        battle_check,
        load_inputs,
        load_reward_model,
        make_judge,
        resolve_config,
        run_gate,
        score_missing,
    )

    cfg, seed, source = None, None, "built-in defaults (see `nemo-rlhf spec explain gate`)"
    if args.spec is not None and "=" in args.spec and not Path(args.spec).exists():
        args.spec, args.overrides = None, [args.spec, *args.overrides]  # only overrides were given
    if args.spec is not None or args.overrides:
        from nemo_rlhf.spec.loader import load_spec

        spec = load_spec(args.spec, args.overrides)
        cfg, seed = spec.gate, spec.seed
        source = f"the gate section of {args.spec or 'the embedded recipe'}"
        source += " with overrides" if args.overrides else ""
    candidate, baseline = load_inputs(args.candidate, args.baseline, args.run_dir)
    cfg = resolve_config(cfg, seed)
    log = sys.stderr if args.json else sys.stdout
    print(f"thresholds: {source}", file=log)
    models = {}
    for field, model_dir in (("proxy_reward", args.proxy_rm), ("gold_reward", args.gold_rm)):
        if model_dir:
            models[field] = load_reward_model(model_dir)
            n = score_missing([candidate, baseline], field, models[field])
            print(f"scored {n} responses' {field} with {model_dir}", file=log)
    judge = make_judge(cfg, models.get("gold_reward"))
    result = run_gate(candidate, baseline, cfg, extra=[battle_check(judge)])
    if args.report:
        _write_reports(args, result, candidate, baseline, cfg, log)
    if args.json:
        print(result.dumps())
    else:
        _print_table(result, candidate, baseline)
    return 0 if result.passed else 1


def _write_reports(args, result, candidate, baseline, cfg, log) -> None:
    """--report DIR: findings, bad cases, report.html and the manifest, each case saying where it came from."""
    from nemo_rlhf.gate.run import input_files, run_dir_sets, write_reports

    origin = {"run_dir": args.run_dir and Path(args.run_dir).resolve(), "spec": args.spec and Path(args.spec).resolve(),
              "overrides": " ".join(args.overrides) or None, "candidate": candidate.name, "baseline": baseline.name,
              "proxy_rm": args.proxy_rm, "gold_rm": args.gold_rm}
    paths = write_reports(result, args.report, candidate, baseline,
                          input_files(args.candidate, args.baseline, args.run_dir), cfg,
                          source={k: str(v) for k, v in origin.items() if v is not None},
                          sets=run_dir_sets(args.run_dir, candidate, baseline))
    print(f"report: {paths['html']} (bad cases to review: {paths['badcases']})", file=log)


def _print_table(result, candidate, baseline) -> None:
    print(f"gate: {candidate.name} ({len(candidate)} responses) vs {baseline.name} ({len(baseline)} responses)")
    marks = {"fail": "FAIL", "warn": "warn", "info": "ok  "}
    for f in result.findings:
        print(f"  {marks[f.severity]}  {f.detector}: {f.message}")
    failed = ", ".join(result.failed_detectors)
    print(f"verdict: {'PASSED' if result.passed else 'FAILED (' + failed + ')'}")
