"""The `nemo-rlhf` command: one module per verb, each registering its own subparser."""

from __future__ import annotations

import argparse
import sys

from nemo_rlhf import __version__
from nemo_rlhf.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    from nemo_rlhf.cli import convert, data, lineage, models, parity, preflight, run, slurm, spec, verify
    from nemo_rlhf.cli import eval as eval_gate  # the gate verb (`run`'s eval stage is another thing)

    parser = argparse.ArgumentParser(prog="nemo-rlhf", description=__doc__)
    parser.add_argument("--version", action="version", version=f"nemo-rlhf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (run, models, convert, verify, lineage, spec, slurm, preflight, eval_gate, data, parity):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may follow options (`run SPEC --out DIR a.b=1`), which argparse alone
    # cannot collect into the positional list.
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"error: {err.render()}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
