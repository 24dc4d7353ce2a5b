"""`nemo-rlhf lineage VERB`: inspect and record artifact lineage.

    nemo-rlhf lineage show STAGE_DIR [--json]
    nemo-rlhf lineage record-stage RUN_DIR STAGE [--config F ...] [--input P ...] [--output P ...] [--parent S ...]

`record-stage` is what each rendered large-scale sbatch script runs after its stage succeeded: it
writes RUN_DIR/STAGE/manifest.json atomically, which is how `nemo-rlhf slurm resume` knows the
stage has finished.
"""

from __future__ import annotations

import json
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("lineage", help="inspect and record artifact lineage", description=__doc__)
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    show = verbs.add_parser("show", help="print the chain from a stage back to the data files and the base model")
    show.add_argument("stage_dir", type=Path, help="a finished stage directory, e.g. RUN_DIR/eval")
    show.add_argument("--json", action="store_true", help="print the chain as JSON")
    show.set_defaults(func=show_chain)

    record = verbs.add_parser("record-stage", help="write RUN_DIR/STAGE/manifest.json for a finished stage "
                                                   "(run by the rendered sbatch scripts)")
    record.add_argument("run_dir", type=Path, help="the run directory")
    record.add_argument("stage", help="stage name (its folder RUN_DIR/STAGE gets the manifest)")
    record.add_argument("--config", action="append", default=[], type=Path, help="a config file the stage ran with")
    record.add_argument("--input", action="append", default=[], type=Path, help="a file or folder the stage read")
    record.add_argument("--output", action="append", default=[], type=Path, help="a file or folder it wrote (must exist)")
    record.add_argument("--parent", action="append", default=[], help="a stage whose outputs it used")
    record.add_argument("--started-at", default=None,
                        help="ISO start time (default: $NEMO_RLHF_STAGE_STARTED_AT, set by the sbatch script)")
    record.add_argument("--hash-limit-gb", type=float, default=20.0,
                        help="files/folders larger than this are recorded by size and mtime, without sha256")
    record.set_defaults(func=record_stage_cmd)


def show_chain(args) -> int:
    from nemo_rlhf.lineage.show import lineage_chain, render_chain

    chain = lineage_chain(args.stage_dir)
    if args.json:
        print(json.dumps(chain, indent=2))
    else:
        print("\n".join(render_chain(chain)))
    return 0


def record_stage_cmd(args) -> int:
    from nemo_rlhf.lineage.record import record_stage

    path = record_stage(args.run_dir, args.stage, configs=args.config, inputs=args.input, outputs=args.output,
                        parents=args.parent, started_at=args.started_at, hash_limit=int(args.hash_limit_gb * 1e9))
    print(f"recorded {args.stage}: {path}")
    return 0
