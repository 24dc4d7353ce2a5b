"""`nemo-rlhf spec explain|validate|show`: the spec's fields, and checking a spec file."""

from __future__ import annotations

import dataclasses

import yaml


def add_parser(sub) -> None:
    p = sub.add_parser("spec", help="explain the spec format or check a spec")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    explain = verbs.add_parser("explain", help="every key with its type, default and help")
    explain.add_argument("section", nargs="?", help="only this section, e.g. ppo")
    explain.set_defaults(func=explain_spec)
    for name, func, text in (("validate", validate_spec_file, "check a spec (exit 2 with every problem)"),
                             ("show", show_spec, "print the resolved spec as YAML")):
        verb = verbs.add_parser(name, help=text)
        verb.add_argument("spec", nargs="?", help="spec YAML; default: the embedded recipe")
        verb.add_argument("overrides", nargs="*", help="dotted overrides")
        verb.set_defaults(func=func)


def explain_spec(args) -> int:
    from nemo_rlhf.spec.schema import PipelineSpec

    for line in _explain(PipelineSpec, "", args.section):
        print(line)
    return 0


def _explain(cls, prefix: str, only: str | None):
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if only and not (key == only or key.startswith(only + ".") or only.startswith(key + ".")):
            continue
        factory = f.default_factory
        if factory is not dataclasses.MISSING and dataclasses.is_dataclass(factory):
            yield f"{key}:  # {f.metadata.get('help', '')}"
            yield from _explain(factory, key + ".", only)
        else:
            default = f.default if f.default is not dataclasses.MISSING else factory()
            type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            yield f"{key} ({type_name}, default {default!r}): {f.metadata.get('help', '')}"


def validate_spec_file(args) -> int:
    from nemo_rlhf.spec.loader import load_spec

    spec = load_spec(args.spec, args.overrides)
    print(f"ok: {spec.name} ({spec.scale} scale)")
    return 0


def show_spec(args) -> int:
    from nemo_rlhf.spec.loader import load_spec, spec_to_dict

    print(yaml.safe_dump(spec_to_dict(load_spec(args.spec, args.overrides)), sort_keys=False), end="")
    return 0
