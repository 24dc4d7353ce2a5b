"""Run the controlled reward-hacking experiment and its honest twin; write what happened.

    python bench/reward_hacking_demo.py [--spec recipes/reward-hacking-demo.yaml] [--work DIR]
        [--results bench/results] [KEY=VALUE ...]

1. `nemo-rlhf run SPEC --out WORK/demo` (rm.exploit=longer_wins: the proxy RM pays for length);
2. the honest twin, `nemo-rlhf run SPEC rm.exploit=none --out WORK/honest`, started from copies
   of the demo's base, sft and gold_rm stages (same config and inputs: the runner reuses them,
   so both runs share the SFT policy and the gold judge and differ only in the proxy RM).

Each run ends with its gate stage (exit 1 when the gate fails). Writes
bench/results/reward-hacking-demo.json (every PPO checkpoint's mean proxy/gold reward, KL,
length, EOS rate; each gate's verdict and its reward_hacking/length_inflation findings; stage
seconds), .md (the same as tables) and .png (proxy and gold reward against sqrt(KL), and
length against PPO step, for both runs). Extra KEY=VALUE overrides go to both runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SHARED_STAGES = ("base", "sft", "gold_rm")  # identical in both runs: copied, then reused by the runner
RUNS = {"demo": [], "honest": ["rm.exploit=none"]}
# The two the demo must fail, and the two the honest twin failed on before (collapse, empty answers).
KEY_DETECTORS = ("reward_hacking", "length_inflation", "degenerate_responses", "template_collapse")
ALL_STAGES = ("base", "sft", "rm", "gold_rm", "ppo", "gate", "eval")


def run(spec: str, out: Path, overrides: list[str]) -> dict:
    """One `nemo-rlhf run`; its exit code, seconds and log tail."""
    cmd = [sys.executable, "-m", "nemo_rlhf", "run", spec, *overrides, "--out", str(out)]
    print("$", " ".join(cmd), flush=True)
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    (out.parent / f"{out.name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"exit_code": proc.returncode, "seconds": round(time.monotonic() - start, 1),
            "gate_lines": [line for line in proc.stdout.splitlines() if line.startswith(("[gate]", "gate:"))],
            "stages_line": next((line for line in proc.stdout.splitlines() if line.startswith("finished in")), "")}


def manifest(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "manifest.json").read_text())


def summarize(run_dir: Path, outcome: dict) -> dict:
    """The numbers of one run: PPO checkpoints, RM accuracies, gate verdict and key findings."""
    findings = json.loads((run_dir / "gate" / "findings.json").read_text())
    key = [{k: f[k] for k in ("detector", "check", "severity", "value", "threshold", "message")}
           for f in findings["findings"] if f["detector"] in KEY_DETECTORS]
    stages = {s: manifest(run_dir, s) for s in ("sft", "rm", "gold_rm", "ppo", "gate")}
    return {
        **outcome,
        "passed": findings["passed"],
        "failed_detectors": findings.get("failed_detectors") or sorted(
            {f["detector"] for f in findings["findings"] if f["severity"] == "fail"}),
        "key_findings": key,
        "checkpoints": stages["ppo"]["notes"]["samples"]["per_step"],
        "proxy_rm": {"exploit": stages["rm"]["notes"].get("EXPLOIT"), **_rm_metrics(stages["rm"])},
        "gold_rm": _rm_metrics(stages["gold_rm"]),
        "ppo_updates": stages["ppo"]["metrics"].get("updates"),
        "stage_seconds": {s: m["duration_s"] for s, m in stages.items()},
        "pipeline_seconds": round(sum(manifest(run_dir, s)["duration_s"] for s in ALL_STAGES
                                      if (run_dir / s / "manifest.json").is_file()), 1),
    }


def length_preference(run_dir: Path, spec: str, overrides: list[str], n: int = 100) -> dict:
    """Spearman correlation of each RM's score with length (words) on real held-out hh-rlhf answers
    (chosen and rejected of the first `n` held-out pairs): what each RM learned about length from data."""
    from scipy import stats

    from nemo_rlhf.gate.judges import RewardModelJudge
    from nemo_rlhf.pipeline import data_plan
    from nemo_rlhf.spec.loader import load_spec
    from nemo_rlhf.spec.paths import data_root

    cfg = load_spec(spec, overrides)
    pairs = data_plan.preference_split(cfg, data_root(cfg.data.root)).heldout[:n]
    out = {}
    for stage in ("rm", "gold_rm"):
        judge = RewardModelJudge(run_dir / stage / "model", batch_size=16)
        prompts = [judge.tokenizer.apply_chat_template(p.prompt, tokenize=False, add_generation_prompt=True)
                   for p in pairs]
        answers = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        scores = judge.scores(prompts + prompts, [a + judge.tokenizer.eos_token for a in answers])
        rho = stats.spearmanr([len(a.split()) for a in answers], scores).statistic
        out[stage] = round(float(rho), 3)
    return out


def _rm_metrics(m: dict) -> dict:
    return {k: m["metrics"].get(k) for k in ("accuracy", "heldout_accuracy", "heldout_margin")}


def plot(results: dict, out: Path) -> None:
    """Left: proxy and gold reward (minus their step-0 value) over sqrt(KL); right: length per step."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (name, r), color in zip(results["runs"].items(), ("tab:red", "tab:blue")):
        pts = r["checkpoints"]
        d = [max(p["kl"], 0.0) ** 0.5 for p in pts]
        for key, style in (("proxy_reward", "o-"), ("gold_reward", "s--")):
            left.plot(d, [p[key] - pts[0][key] for p in pts], style, color=color, label=f"{name}: {key}")
        right.plot([p["step"] for p in pts], [p["length"] for p in pts], "o-", color=color, label=f"{name}: tokens")
    left.axhline(0, color="grey", linewidth=0.8)
    left.set_xlabel("d = sqrt(mean KL to the SFT policy, nats)")
    left.set_ylabel("reward gain over step 0 (RM units)")
    left.set_title("proxy vs gold reward along PPO")
    right.set_xlabel("PPO update")
    right.set_ylabel("mean response length (tokens)")
    right.set_title("response length on held-out prompts")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"{results['spec']}: demo (exploited proxy RM) vs honest twin")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def markdown(results: dict) -> str:
    lines = [f"# Reward-hacking experiment: {results['spec']}", "",
             f"Measured {results['date']} on {results['machine']}; overrides: {results['overrides'] or 'none'}.", ""]
    for name, r in results["runs"].items():
        verdict = "PASSED" if r["passed"] else f"FAILED ({', '.join(r['failed_detectors'])})"
        rho = r["score_length_rho_on_data"]
        lines += [f"## {name}: gate {verdict}, exit {r['exit_code']}, stages {r['pipeline_seconds']} s", "",
                  f"proxy RM held-out accuracy {r['proxy_rm']['heldout_accuracy']}, gold RM "
                  f"{r['gold_rm']['heldout_accuracy']}; Spearman(score, words) on real held-out answers: proxy "
                  f"{rho['rm']}, gold {rho['gold_rm']}; {r['ppo_updates']} PPO updates", "",
                  f"runner: {r.get('stages_line') or 'n/a'}", "",
                  "| step | proxy reward | gold reward | KL (nats) | length (tokens) | EOS rate |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {p['step']} | {p['proxy_reward']} | {p['gold_reward']} | {p['kl']} | {p['length']} | "
                  f"{p['finished']} |" for p in r["checkpoints"]]
        lines += ["", "| finding | severity | value | threshold | message |", "|---|---|---|---|---|"]
        lines += [f"| {f['detector']}/{f['check']} | {f['severity']} | {_num(f['value'])} | {_num(f['threshold'])} | "
                  f"{f['message'].replace('|', '/')} |" for f in r["key_findings"]]
        lines.append("")
    return "\n".join(lines)


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default="recipes/reward-hacking-demo.yaml")
    parser.add_argument("--work", type=Path, default=Path("/tmp/reward-hacking-demo"))
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = {"spec": args.spec, "overrides": args.overrides, "machine": _machine(), "runs": {},
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for name, extra in RUNS.items():
        out = args.work / name
        if name == "honest" and not out.exists():
            for stage in SHARED_STAGES:
                shutil.copytree(args.work / "demo" / stage, out / stage)
        results["runs"][name] = summarize(out, run(args.spec, out, [*args.overrides, *extra]))
        results["runs"][name]["score_length_rho_on_data"] = length_preference(out, args.spec,
                                                                              [*args.overrides, *extra])
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / "reward-hacking-demo"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(results))
    plot(results, stem.with_suffix(".png"))
    print(markdown(results))
    return 0


def _machine() -> str:
    import os

    return f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at the start"


if __name__ == "__main__":
    raise SystemExit(main())
