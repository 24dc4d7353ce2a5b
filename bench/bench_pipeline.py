"""Benchmark the small-scale pipeline: per-stage wall time and peak RSS, and the overhead of
our stage wrapper against a bare TRL script doing the same stage on the same data.

    python bench/bench_pipeline.py [--spec SPEC] [--results bench/results] [--no-bare]

Each stage runs in its own process (`nemo-rlhf run --until STAGE`, earlier stages are
reused), so that process's peak RSS is the stage's. Stage seconds are the manifest's
`duration_s` (imports excluded); the bare scripts time their body the same way.
Writes bench/results/pipeline-<spec name>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nemo_rlhf.data.examples import (  # noqa: E402
    gsm8k_sft_target,
    math_prompt_messages,
    prompt_example,
)
from nemo_rlhf.pipeline import data_plan  # noqa: E402
from nemo_rlhf.pipeline.stages import STAGE_NAMES  # noqa: E402
from nemo_rlhf.spec.loader import default_recipe_path, load_spec  # noqa: E402
from nemo_rlhf.spec.paths import data_root  # noqa: E402
from nemo_rlhf.stages.training import load_tokenizer  # noqa: E402


def measured(cmd: list[str]) -> tuple[int, float, float, str]:
    """Run cmd; return (exit code, wall seconds, peak RSS in GiB, stdout)."""
    start = time.monotonic()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"},
        )
        _, status, usage = os.wait4(proc.pid, 0)
        out.seek(0)
        text = out.read()
    return os.waitstatus_to_exitcode(status), time.monotonic() - start, usage.ru_maxrss / 2**20, text


def export_rows(spec, run: Path, stage: str, path: Path) -> None:
    """The rows our stage trains on, as plain TRL conversational jsonl."""
    root = data_root(spec.data.root)
    if stage == "sft":
        rows = [
            {
                "prompt": math_prompt_messages(p),
                "completion": [{"role": "assistant", "content": gsm8k_sft_target(p.answer)}],
            }
            for p in data_plan.sft_problems(spec, root)
        ]
    elif stage == "rm":
        rows = [
            {
                "prompt": p.prompt,
                "chosen": [{"role": "assistant", "content": p.chosen}],
                "rejected": [{"role": "assistant", "content": p.rejected}],
            }
            for p in data_plan.rm_train_pairs(spec, root)
        ]
    else:
        tok = load_tokenizer(run / "sft" / "model")
        items = data_plan.ppo_chat_prompts(spec, root) + data_plan.ppo_math_questions(spec, root)
        rows = [
            {"prompt": _messages(i)}
            for i in items
            if prompt_example(tok, _messages(i), spec.ppo.prompt_max_length) is not None
        ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _messages(item):
    return item if isinstance(item, list) else math_prompt_messages(item)


def bench(spec_path: str | None, results: Path, bare: bool) -> dict:
    spec = load_spec(spec_path)
    work = Path(tempfile.mkdtemp(prefix="nemo-rlhf-bench-"))
    run = work / "run"
    report = {
        "spec": str(spec_path or default_recipe_path()),
        "name": spec.name,
        "cpu_count": os.cpu_count(),
        "stages": {},
    }
    total_start = time.monotonic()
    for stage in STAGE_NAMES:
        cmd = [
            sys.executable,
            "-m",
            "nemo_rlhf",
            "run",
            *([spec_path] if spec_path else []),
            "--out",
            str(run),
            "--until",
            stage,
        ]
        code, wall, rss, text = measured(cmd)
        if code != 0:
            raise SystemExit(f"stage {stage} failed ({code}):\n{text[-3000:]}")
        manifest = json.loads((run / stage / "manifest.json").read_text())
        row = {
            "seconds": manifest["duration_s"],
            "process_wall_s": round(wall, 1),
            "peak_rss_gib": round(rss, 2),
            "train_seconds": manifest["notes"].get("train_seconds"),
            # Work a bare script does not do at all (RM: scoring the held-out pairs).
            "extra_eval_seconds": manifest["notes"].get("heldout_eval_seconds", 0.0),
        }
        if bare and stage in ("sft", "rm", "ppo"):
            row.update(_bare(spec, spec_path, run, stage, work))
        report["stages"][stage] = row
        print(stage, row, flush=True)
    # The bench's own wall time includes the bare baselines; the pipeline's is the stages' sum.
    report["bench_wall_s"] = round(time.monotonic() - total_start, 1)
    report["pipeline_stage_seconds"] = round(sum(r["seconds"] for r in report["stages"].values()), 1)
    report["pipeline_process_wall_s"] = round(sum(r["process_wall_s"] for r in report["stages"].values()), 1)
    return report


def _bare(spec, spec_path, run: Path, stage: str, work: Path) -> dict:
    rows = work / f"{stage}.jsonl"
    export_rows(spec, run, stage, rows)
    cmd = [
        sys.executable,
        "bench/bare_trl.py",
        stage,
        "--run",
        str(run),
        "--rows",
        str(rows),
        "--out",
        str(work / f"bare-{stage}"),
        *(["--spec", spec_path] if spec_path else []),
    ]
    code, _, rss, text = measured(cmd)
    if code != 0:
        raise SystemExit(f"bare {stage} failed ({code}):\n{text[-3000:]}")
    result = json.loads(text.strip().splitlines()[-1])
    return {
        "bare_trl_seconds": round(result["seconds"], 2),
        "bare_trl_train_seconds": round(result["train_seconds"], 2),
        "bare_trl_peak_rss_gib": round(rss, 2),
    }


def write(report: dict, results: Path) -> None:
    results.mkdir(parents=True, exist_ok=True)
    for row in report["stages"].values():
        if "bare_trl_seconds" in row:
            # Whole stage against the whole bare script; and the time outside train() on
            # each side (our extra work: lint, held-out scoring, plots, hashing, manifests).
            row["overhead_ratio"] = round(row["seconds"] / row["bare_trl_seconds"], 3)
            row["like_for_like_ratio"] = round(
                (row["seconds"] - row["extra_eval_seconds"]) / row["bare_trl_seconds"], 3
            )
            row["train_ratio"] = round(row["train_seconds"] / row["bare_trl_train_seconds"], 3)
            row["outside_train_s"] = round(row["seconds"] - row["train_seconds"], 1)
            row["bare_outside_train_s"] = round(row["bare_trl_seconds"] - row["bare_trl_train_seconds"], 1)
    stem = results / f"pipeline-{report['name']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# {report['name']} on {report['cpu_count']} CPU cores: pipeline stages {report['pipeline_stage_seconds']} s "
        f"({report['pipeline_process_wall_s']} s with process start-up, one process per stage)",
        "",
        "| stage | seconds | peak RSS GiB | bare TRL seconds | ratio | ratio without held-out scoring "
        "(target <= 1.05) | train() ratio | outside train(): ours / bare s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for stage, row in report["stages"].items():
        lines.append(
            f"| {stage} | {row['seconds']:.1f} | {row['peak_rss_gib']} | {row.get('bare_trl_seconds', '-')} | "
            f"{row.get('overhead_ratio', '-')} | {row.get('like_for_like_ratio', '-')} | "
            f"{row.get('train_ratio', '-')} | "
            f"{row.get('outside_train_s', '-')} / {row.get('bare_outside_train_s', '-')} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", help="spec YAML (default: the embedded recipe)")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--no-bare", action="store_true", help="skip the bare TRL baselines")
    args = parser.parse_args()
    write(bench(args.spec, args.results, not args.no_bare), args.results)
