"""`nemo-rlhf data VERB ...`: data files for the pipeline.

    nemo-rlhf data prepare-aligner SPEC --out DIR [key=value ...]

writes the NeMo-Aligner jsonl files of a large-scale run (SFT, RM comparisons, PPO prompts;
train and validation) from the rows the small-scale run trains on, checked token for token
against the TRL formatting, with a manifest of their hashes (nemo_rlhf.data.aligner_format).

    nemo-rlhf data add-badcases REVIEWED.jsonl --out DIR [--kind sft|preference|both]

turns a gate report's reviewed badcases.jsonl into SFT examples (chat_jsonl) and preference
pairs (hh_rlhf) for the next round, with a manifest tracing them back to the gate report
and the run it judged (nemo_rlhf.gate.badcases).
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
    _add_badcases_parser(verbs)


def _add_badcases_parser(verbs) -> None:
    from nemo_rlhf.gate.badcases import KINDS, VERDICTS

    vocabulary = "; ".join(f"{v}: {meaning}" for v, meaning in VERDICTS.items() if v)
    bad = verbs.add_parser(
        "add-badcases", help="turn reviewed gate bad cases into SFT / preference data for the next round",
        description="Read a gate report's badcases.jsonl after review and write sft.jsonl (chat_jsonl: "
                    "{messages}), preference.jsonl (hh_rlhf: {chosen, rejected}) and manifest.json into --out. "
                    f"Verdicts: {vocabulary}; empty = not reviewed.")
    bad.add_argument("reviewed", type=Path, help="the reviewed badcases.jsonl (verdict filled in)")
    bad.add_argument("--out", required=True, type=Path, help="folder for the data files and manifest.json")
    bad.add_argument("--kind", choices=KINDS, default="both", help="which data to write (default both)")
    bad.set_defaults(func=add_badcases_cmd)


def add_badcases_cmd(args) -> int:
    from nemo_rlhf.gate.badcases import add_badcases

    manifest = add_badcases(args.reviewed, args.out, args.kind)
    m = manifest["metrics"]
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(m["skipped"].items())) or "none"
    print(f"{m['lines']} reviewed lines: {m['used']} used, skipped: {skipped}")
    for name, entry in manifest["outputs"].items():
        print(f"{args.out / name}: {entry['examples']} examples, sha256 {entry['sha256'][:12]}")
    parents = ", ".join(manifest["inputs"]["parents"]) or "none (the gate report has no manifest.json)"
    print(f"lineage: {args.out / 'manifest.json'} <- gate report {parents} (nemo-rlhf lineage show {args.out})")
    if "sft.jsonl" in manifest["outputs"]:
        sft = (args.out / "sft.jsonl").resolve()
        print(f"fine-tune on the examples: data.sft.format=chat_jsonl data.sft.path={sft} data.prompts.gsm8k=0")
    if "preference.jsonl" in manifest["outputs"]:
        print(f"train a reward model on the pairs: data.preference.path={(args.out / 'preference.jsonl').resolve()}")
    return 0


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
