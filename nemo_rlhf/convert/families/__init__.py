"""Architecture families: one module each, registered by HF architecture name.

A family module declares a class holding `FamilySpec` fields and decorates it with `@register_family(...)`.
Nothing central lists the families: `get_family` imports every module of this package once,
so adding a family is adding a file, and no other family is touched.

A family is data, read in both directions:

* `weights`: `WeightEntry` rows, HF name pattern(s) -> Megatron name + mapping kind. The table
  is complete: an HF tensor that matches no row is an error, a tensor dropped on purpose is a
  row with `megatron=None`.
* `config_fields`: `ConfigField` rows, HF config.json key <-> model_config.yaml key(s).
* `required_hf` / `fixed_nemo`: HF config values the family's mapping assumes (checked, all
  problems reported at once) and the model_config.yaml values they imply.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from nemo_rlhf.convert.param_mapping import Kind
from nemo_rlhf.errors import UserError

LAYER = "{layer}"  # marks the layer index in an HF name pattern


@dataclass(frozen=True)
class WeightEntry:
    """One row of a family's weight table.

    Attributes:
        hf: HF tensor name pattern(s), in the order the kind expects (q, k, v; gate, up).
            `{layer}` stands for the layer index; such rows are stacked over layers.
        megatron: Name under the `model.` prefix (stacked rows under `decoder.layers.`), or
            None for an HF tensor that is dropped on purpose.
        kind: The mapping kind (see `param_mapping`); None when dropped.
        tied_to: HF tensor that stands in when this one is absent and the config ties the
            input and output embeddings (HF saves `lm_head.weight` only when untied).
    """

    hf: tuple[str, ...]
    megatron: str | None
    kind: Kind | None = None
    tied_to: str | None = None

    @property
    def stacked(self) -> bool:
        return LAYER in self.hf[0]

    def regexes(self) -> list[re.Pattern]:
        """One regex per HF pattern; group 1 is the layer index of stacked rows."""
        return [re.compile(re.escape(p).replace(re.escape(LAYER), r"(\d+)") + r"\Z") for p in self.hf]

    def hf_name(self, index: int, layer: int | None) -> str:
        return self.hf[index].replace(LAYER, str(layer)) if layer is not None else self.hf[index]


@dataclass(frozen=True)
class ConfigField:
    """One row of the config table: an HF config.json key <-> model_config.yaml key(s).

    Attributes:
        hf: The HF key.
        nemo: The model_config.yaml keys that receive the value (the first is read back).
        read_hf: Reads the value from the HF config dict (default: `cfg[hf]`, required).
        write_hf: Stores the value into an HF config dict (default: `cfg[hf] = value`).
    """

    hf: str
    nemo: tuple[str, ...]
    read_hf: Callable[[dict], Any] | None = None
    write_hf: Callable[[dict, Any], None] | None = None

    def get(self, hf_cfg: dict) -> Any:
        if self.read_hf is not None:
            return self.read_hf(hf_cfg)
        if self.hf not in hf_cfg:
            raise UserError(f"config.json has no {self.hf!r}", fix="use a complete config.json (save_pretrained)")
        return hf_cfg[self.hf]

    def put(self, hf_cfg: dict, value: Any) -> None:
        if self.write_hf is not None:
            self.write_hf(hf_cfg, value)
        else:
            hf_cfg[self.hf] = value


@dataclass(frozen=True)
class FamilySpec:
    """Everything the converter knows about one architecture family (see module docstring)."""

    architectures: tuple[str, ...] = ()
    model_type: str = ""
    reference_yaml: str = ""
    weights: tuple[WeightEntry, ...] = ()
    config_fields: tuple[ConfigField, ...] = ()
    required_hf: dict[str, Callable[[dict], tuple[Any, Any]]] = field(default_factory=dict)
    fixed_nemo: dict[str, Any] = field(default_factory=dict)
    extra_state: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.architectures[0]

    def check_hf_config(self, hf_cfg: dict, where: str) -> None:
        """Raises one UserError listing every HF config value this family cannot convert."""
        problems = []
        for key, probe in self.required_hf.items():
            have, want = probe(hf_cfg)
            if have != want:
                problems.append(f"{key} = {have!r} (supported: {want!r})")
        if problems:
            raise UserError(f"{self.name}: unsupported settings: " + "; ".join(problems), where=where,
                            fix="these variants are not converted yet; use a model without them")

    def matches_nemo(self, nemo_cfg: dict) -> bool:
        """True when a model_config.yaml carries this family's fixed values."""
        # NeMo reads flags with cfg.get(key, False): a missing flag is False.
        return all(nemo_cfg.get(k, False if isinstance(v, bool) else None) == v for k, v in self.fixed_nemo.items())


_REGISTRY: dict[str, FamilySpec] = {}
_LOADED = False


def register_family(*architectures: str):
    """Class decorator: registers a family (a class holding FamilySpec fields) under HF architecture names."""

    def decorate(cls: type) -> type:
        # The family module writes a plain class whose attributes are FamilySpec's fields.
        values = {f.name: getattr(cls, f.name) for f in dataclasses.fields(FamilySpec)
                  if f.name != "architectures" and hasattr(cls, f.name)}
        spec = FamilySpec(architectures=architectures, **values)
        for arch in architectures:
            if arch in _REGISTRY:
                raise RuntimeError(f"architecture {arch} registered twice")
            _REGISTRY[arch] = spec
        return cls

    return decorate


def _load_all() -> None:
    global _LOADED
    if not _LOADED:
        for module in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{module.name}")
        _LOADED = True


def get_family(architecture: str, where: str = "config.json") -> FamilySpec:
    """The family registered for an HF architecture name (e.g. "LlamaForCausalLM")."""
    _load_all()
    if architecture not in _REGISTRY:
        raise UserError(f"architecture {architecture!r} is not supported", where=where,
                        fix=f"supported: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[architecture]


def family_for_nemo(nemo_cfg: dict, where: str) -> FamilySpec:
    """The family whose fixed model_config.yaml values a NeMo config carries."""
    _load_all()
    # By identity: a spec holds dicts, so it is unhashable; one spec may serve several names.
    for spec in {id(s): s for s in _REGISTRY.values()}.values():
        if spec.matches_nemo(nemo_cfg):
            return spec
    raise UserError("model_config.yaml matches no supported architecture family", where=where,
                    fix=f"supported: {', '.join(sorted(_REGISTRY))}")
