"""`nemo-rlhf run [SPEC] --out RUN_DIR [key=value ...]`: run the small-scale pipeline."""

from __future__ import annotations

import time
from pathlib import Path

from nemo_rlhf.errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "run",
        help="run a pipeline spec (SFT -> RM -> PPO -> eval) at small scale with TRL",
        description="Run a pipeline spec. Finished stages whose config and inputs did not change are skipped.",
    )
    p.add_argument("spec", nargs="?", help="spec YAML; default: the embedded recipe (SmolLM2-135M-Instruct on CPU)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. ppo.kl_coef=0.02")
    p.add_argument("--out", required=True, type=Path, help="run directory (one sub-directory per stage)")
    p.add_argument("--until", help="stop after this stage (base, sft, rm, gold_rm, ppo, eval, gate)")
    p.set_defaults(func=run)


def run(args) -> int:
    from nemo_rlhf.spec.loader import default_recipe_path, load_spec

    spec_path, overrides = args.spec, list(args.overrides)
    if spec_path is not None and "=" in spec_path and not Path(spec_path).exists():
        spec_path, overrides = None, [spec_path, *overrides]  # only overrides were given
    spec = load_spec(spec_path, overrides)
    if spec.scale != "small":
        raise UserError(
            f"scale is {spec.scale!r}: `run` executes small-scale pipelines",
            fix="set scale=small, or use the SLURM launcher for large-scale specs",
        )
    from nemo_rlhf.pipeline.runner import run_pipeline
    from nemo_rlhf.pipeline.stages import STAGE_NAMES

    if args.until is not None and args.until not in STAGE_NAMES:
        raise UserError(f"--until {args.until!r} is not a stage", fix=f"use one of {', '.join(STAGE_NAMES)}")
    print(f"spec: {spec_path or default_recipe_path()} ({spec.name}); run dir: {args.out}")
    start = time.monotonic()
    outcomes = run_pipeline(spec, args.out, until=args.until)
    ran = [o.stage for o in outcomes if o.status == "ran"]
    skipped = [o.stage for o in outcomes if o.status == "skipped"]
    print(
        f"finished in {time.monotonic() - start:.1f} s; ran: {', '.join(ran) or 'none'}; "
        f"skipped (up to date): {', '.join(skipped) or 'none'}"
    )
    print(f"lineage: nemo-rlhf lineage show {args.out / outcomes[-1].stage}")
    return _gate_exit_code(args.out, outcomes)


def _gate_exit_code(run_dir: Path, outcomes) -> int:
    """1 when the pipeline's gate stage (ppo.sample_every on) judged the run and it failed, else 0."""
    if not any(o.stage == "gate" for o in outcomes):
        return 0
    from nemo_rlhf.lineage.manifest import read_manifest

    metrics = read_manifest(run_dir / "gate")["metrics"]
    print(f"gate: {'PASSED' if metrics['passed'] else 'FAILED (' + ', '.join(metrics['failed_detectors']) + ')'}"
          f" -> {run_dir / 'gate' / 'report.html'}")
    return 0 if metrics["passed"] else 1
