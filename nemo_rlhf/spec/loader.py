"""Load a pipeline spec: YAML + dotted overrides -> validated `PipelineSpec`.

Every problem is collected and reported at once (unknown keys with a "did you mean",
wrong types, impossible values), naming the key and the file. Loading never starts work.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nemo_rlhf.errors import UserError
from nemo_rlhf.spec.schema import PipelineSpec
from nemo_rlhf.spec.validate import validate_spec

DEFAULT_RECIPE = "smollm2-135m-cpu.yaml"


def default_recipe_path() -> Path:
    """The embedded default recipe (recipes/ is shipped as the nemo_rlhf.recipes package)."""
    return Path(str(importlib.resources.files("nemo_rlhf.recipes").joinpath(DEFAULT_RECIPE)))


def load_spec(path: str | Path | None, overrides: list[str] | None = None) -> PipelineSpec:
    """Load, merge overrides, type-check and validate a spec.

    Args:
        path: YAML file; None means the embedded default recipe.
        overrides: dotted `key=value` strings, e.g. `ppo.kl_coef=0.02`.

    Raises:
        UserError: listing every problem found, each with its key and the file.
    """
    path = Path(path) if path is not None else default_recipe_path()
    raw = _read_yaml(path)
    raw = _apply_overrides(raw, overrides or [], path)
    problems = _unknown_keys(raw, PipelineSpec, prefix="")
    if problems:
        raise _spec_error(path, problems, "remove or rename the keys (see `nemo-rlhf spec explain`)")
    spec = _typed(raw, path)
    problems = validate_spec(spec)
    if problems:
        raise _spec_error(path, problems, "change the values above")
    return spec


def _typed(raw: dict, path: Path) -> PipelineSpec:
    """Merge `raw` into the typed schema leaf by leaf, so every type error is reported."""
    config = OmegaConf.structured(PipelineSpec)
    problems = []
    for key, value in _leaves(raw, ""):
        try:
            OmegaConf.update(config, key, value, merge=True)
        except OmegaConfBaseException as err:
            problems.append(f"{key}: {str(err).splitlines()[0]}")
    if problems:
        raise _spec_error(path, problems, "give each key a value of the type shown by `nemo-rlhf spec explain`")
    return OmegaConf.to_object(config)


def _leaves(raw: dict, prefix: str):
    for key, value in raw.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def spec_to_dict(spec: PipelineSpec) -> dict[str, Any]:
    """A plain, JSON-safe dict of the resolved spec (what manifests record)."""
    return dataclasses.asdict(spec)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"spec file not found: {path}", fix="pass the path of a YAML spec, e.g. recipes/tiny-cpu.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UserError(f"not valid YAML: {err}", where=str(path), fix="fix the YAML syntax") from None
    except UnicodeDecodeError:
        raise UserError("not a UTF-8 text file", where=str(path), fix="pass a YAML spec file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(
            "the spec must be a YAML mapping of sections", where=str(path), fix="start from recipes/tiny-cpu.yaml"
        )
    return data


def _apply_overrides(raw: dict, overrides: list[str], path: Path) -> dict:
    """Apply `a.b.c=value` overrides; values are parsed as YAML scalars (1e-5, true, null)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise UserError(f"bad override {item!r}", fix="write overrides as dotted.key=value, e.g. ppo.kl_coef=0.02")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(
                    f"override {item!r}: {part} is not a section",
                    where=str(path),
                    fix="override a key inside a section",
                )
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            node[parts[-1]] = value
    return raw


def _unknown_keys(raw: Any, cls: type, prefix: str) -> list[str]:
    """Keys in `raw` that `cls` (a dataclass) does not have, recursively, with suggestions."""
    if not isinstance(raw, dict):
        return []
    fields = {f.name: f for f in dataclasses.fields(cls)}
    problems = []
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            problems.append(f"{full}: unknown key{hint}")
            continue
        sub = _dataclass_of(cls, key)
        if sub is not None:
            if value is not None and not isinstance(value, dict):
                problems.append(f"{full}: must be a section (a mapping), got {type(value).__name__}")
            else:
                problems.extend(_unknown_keys(value, sub, prefix=f"{full}."))
    return problems


def _dataclass_of(cls: type, name: str) -> type | None:
    """The dataclass type of field `name`, or None for a scalar field."""
    default_factory = cls.__dataclass_fields__[name].default_factory
    if default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(default_factory):
        return default_factory
    return None


def _spec_error(path: Path, problems: list[str], fix: str) -> UserError:
    lines = "\n".join(f"  - {p}" for p in problems)
    noun = "problem" if len(problems) == 1 else "problems"
    return UserError(f"invalid spec ({len(problems)} {noun}):\n{lines}", where=str(path), fix=fix)
