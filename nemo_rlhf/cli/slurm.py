"""`nemo-rlhf slurm {submit,status,cancel,resume,render}`: the pipeline as a SLURM job DAG.

`scale: large` specs are preflighted and rendered into NeMo-Aligner jobs; `scale: small` specs
become one CPU job per stage running the small-scale pipeline (how the launcher is tested on
the local cluster in slurm/local/).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from nemo_rlhf.errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("slurm", help="render, submit and watch the pipeline as a SLURM job DAG")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    submit = verbs.add_parser("submit", help="queue every stage with afterok dependencies; job ids go to RUN_DIR")
    submit.add_argument("spec", type=Path, help="spec YAML")
    submit.add_argument("overrides", nargs="*", help="dotted overrides, e.g. ppo.kl_coef=0.02")
    submit.add_argument("--out", required=True, type=Path, help="run directory (stage outputs, slurm/jobs.json, logs)")
    submit.set_defaults(func=submit_cmd)

    render = verbs.add_parser("render", help="write the sbatch scripts (and configs) without submitting")
    render.add_argument("spec", type=Path, help="spec YAML")
    render.add_argument("overrides", nargs="*", help="dotted overrides, e.g. ppo.kl_coef=0.02")
    render.add_argument("--out", required=True, type=Path, help="folder for <stage>.sbatch files")
    render.set_defaults(func=render_cmd)

    status = verbs.add_parser("status", help="each stage's state, job id, elapsed time, logs; failed stages' log tail")
    status.add_argument("run_dir", type=Path, help="the RUN_DIR given to submit")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=status_cmd)

    cancel = verbs.add_parser("cancel", help="cancel every stage still queued or running")
    cancel.add_argument("run_dir", type=Path, help="the RUN_DIR given to submit")
    cancel.set_defaults(func=cancel_cmd)

    resume = verbs.add_parser("resume", help="resubmit the failed stage and what follows; finished stages are kept")
    resume.add_argument("run_dir", type=Path, help="the RUN_DIR given to submit")
    resume.set_defaults(func=resume_cmd)

    exported = verbs.add_parser("eval-exported", help="(the rendered eval stage runs this) the small-scale evaluation "
                                "on the HF checkpoints a large-scale run exported")
    exported.add_argument("spec", type=Path, help="RUN_DIR/spec.yaml (the resolved spec render wrote)")
    exported.add_argument("run_dir", type=Path, help="the run directory (reads export/, writes eval/)")
    exported.set_defaults(func=eval_exported_cmd)


def _render(spec_path: Path, overrides: list[str], run_dir: Path, script_dir: Path):
    """Load the spec and render its stages for its scale (large scale is preflighted first).

    Small scale writes its scripts into `script_dir`; the large-scale renderer decides where
    under `run_dir` its scripts and configs go.
    """
    from nemo_rlhf.spec.loader import load_spec

    spec = load_spec(spec_path, overrides)
    if spec.scale == "small":
        from nemo_rlhf.slurm.small_scale import render_small_scale

        return spec, render_small_scale(spec, spec_path, overrides, run_dir, script_dir)
    try:
        from nemo_rlhf.slurm import preflight, render
    except ImportError as err:
        raise UserError(
            f"large-scale rendering is not available in this installation ({err})", fix="use a spec with scale: small"
        ) from None
    for warning in preflight.run_preflight(spec).warnings:
        print(f"warning: {warning.render()}")
    return spec, render.render_pipeline(spec, run_dir)


def submit_cmd(args) -> int:
    from nemo_rlhf.slurm.dag import submit_dag

    run_dir = args.out.resolve()
    spec, stages = _render(args.spec, list(args.overrides), run_dir, script_dir=run_dir / "slurm")
    meta = {"spec": str(args.spec.resolve()), "overrides": list(args.overrides), "scale": spec.scale}
    record = submit_dag(stages, run_dir, meta)
    for job in record["stages"]:
        after = f" after {', '.join(job.after)}" if job.after else ""
        print(f"{job.name}: job {job.job_id}{after}; logs {job.stdout}")
    print(f"submitted {len(record['stages'])} stages; watch: nemo-rlhf slurm status {run_dir}")
    return 0


def render_cmd(args) -> int:
    out = args.out.resolve()
    _, stages = _render(args.spec, list(args.overrides), out, out)
    for stage in stages:
        print(f"{stage.name}: {stage.script}")
    return 0


def status_cmd(args) -> int:
    from nemo_rlhf.slurm.dag import dag_status

    statuses = dag_status(args.run_dir)
    failed = [s.name for s in statuses if s.failed]
    if args.json:
        rows = [{**asdict(s), "failed": s.failed} for s in statuses]
        print(json.dumps({"run_dir": str(args.run_dir), "failed": failed, "stages": rows}, indent=2))
        return 0
    print(f"{'stage':<8} {'job':>8}  {'state':<12} {'elapsed':>10}  reason / logs")
    for s in statuses:
        note = "finished (manifest)" if s.finished else s.reason
        print(f"{s.name:<8} {s.job_id:>8}  {s.state:<12} {s.elapsed:>10}  {note}")
        if s.failed or s.state == "RUNNING":
            print(f"{'':<8} stdout: {s.stdout}\n{'':<8} stderr: {s.stderr}")
        for line in s.log_tail:
            print(f"{'':<8} | {line}")
    if failed:
        print(f"failed: {', '.join(failed)}; after fixing the cause: nemo-rlhf slurm resume {args.run_dir}")
    return 0


def cancel_cmd(args) -> int:
    from nemo_rlhf.slurm.dag import cancel_dag

    cancelled = cancel_dag(args.run_dir)
    print(f"cancelled: {', '.join(f'{s.name} (job {s.job_id})' for s in cancelled) or 'nothing was queued or running'}")
    return 0


def resume_cmd(args) -> int:
    from nemo_rlhf.slurm.dag import read_jobs, resume_dag

    redo = resume_dag(args.run_dir)
    if not redo:
        print("nothing to resume: every stage has finished")
        return 0
    jobs = {j.name: j for j in read_jobs(args.run_dir)["stages"]}
    for name in redo:
        print(f"{name}: job {jobs[name].job_id} (was {jobs[name].earlier_jobs[-1]})")
    kept = [n for n in jobs if n not in redo]
    print(f"resubmitted {', '.join(redo)}; kept finished: {', '.join(kept) or 'none'}")
    return 0


def eval_exported_cmd(args) -> int:
    from nemo_rlhf.slurm.exported_eval import run_exported_eval

    print(f"wrote {run_exported_eval(args.spec, args.run_dir)}")
    return 0
