"""`nemo-rlhf preflight SPEC [key=value ...]`: check a large-scale spec before anything is queued.

Prints each stage's layout and memory estimate (with its parts) and any warnings; exits 2 with
every problem (its key and the fix) when the spec would fail or not fit on the cluster.
"""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("preflight", help="check a large-scale spec: parallel layout, batch math, memory per GPU",
                       description=__doc__)
    p.add_argument("spec", help="spec YAML (scale: large)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.sft.tp=2")
    p.set_defaults(func=preflight)


def preflight(args) -> int:
    from nemo_rlhf.slurm.preflight import run_preflight
    from nemo_rlhf.spec.loader import load_spec

    spec = load_spec(args.spec, args.overrides)
    if spec.scale != "large":
        print(f"{spec.name}: scale is {spec.scale!r}; preflight checks large-scale (NeMo-Aligner) layouts only")
        return 0
    report = run_preflight(spec)
    print(report.render())
    print(f"ok: {spec.name} passed preflight ({len(report.warnings)} warning(s))")
    return 0
