"""`nemo-rlhf data VERB ...`: data files for the pipeline.

    nemo-rlhf data prepare-aligner SPEC --out DIR [key=value ...]

writes the NeMo-Aligner jsonl files of a large-scale run (SFT, RM comparisons, PPO prompts;
train and validation) from the rows the small-scale run trains on, checked token for token
against the TRL formatting, with a manifest of their hashes (nemo_rlhf.data.aligner_format).
Further verbs register themselves in `add_parser` beside it.
"""

from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="prepare data files (NeMo-Aligner formats)", description=__doc__)
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    prep = verbs.add_parser("prepare-aligner", help="write the NeMo-Aligner jsonl files of SFT, RM and PPO",
                            description="Write sft/rm/ppo_{train,val}.jsonl and manifest.json into --out, from the "
                                        "same rows, chat template and length limits as the small-scale stages.")
    prep.add_argument("spec", type=Path, help="spec YAML")
    prep.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.sft.num_examples=0")
    prep.add_argument("--out", required=True, type=Path, help="folder for the jsonl files and manifest.json")
    prep.set_defaults(func=prepare_aligner_cmd)


def prepare_aligner_cmd(args) -> int:
    from nemo_rlhf.data.aligner_format import prepare_aligner_data
    from nemo_rlhf.spec.loader import load_spec

    spec = load_spec(args.spec, args.overrides)
    manifest = prepare_aligner_data(spec, args.out)
    for name, entry in manifest["outputs"].items():
        print(f"{args.out / entry['path']}: {entry['examples']} examples ({entry['dropped_too_long']} too long, "
              f"dropped) sha256 {entry['sha256'][:12]}")
    checks = manifest["metrics"]["parity"]["checks"]
    print(f"parity with the TRL formatting: {sum(c['examples'] for c in checks)} examples, token ids and loss masks "
          f"identical; manifest {args.out / 'manifest.json'}")
    return 0
