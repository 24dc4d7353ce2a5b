"""`nemo-rlhf lineage show STAGE_DIR [--json]`: the chain back to data and base model."""

from __future__ import annotations

import json
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("lineage", help="inspect artifact lineage")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    show = verbs.add_parser("show", help="print the chain from a stage back to the data files and the base model")
    show.add_argument("stage_dir", type=Path, help="a finished stage directory, e.g. RUN_DIR/eval")
    show.add_argument("--json", action="store_true", help="print the chain as JSON")
    show.set_defaults(func=show_chain)


def show_chain(args) -> int:
    from nemo_rlhf.lineage.show import lineage_chain, render_chain

    chain = lineage_chain(args.stage_dir)
    if args.json:
        print(json.dumps(chain, indent=2))
    else:
        print("\n".join(render_chain(chain)))
    return 0
