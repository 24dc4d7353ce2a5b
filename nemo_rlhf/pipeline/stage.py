"""What a pipeline stage is: a name, its parents, its config slice, its input files, a run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from nemo_rlhf.spec.schema import PipelineSpec


@dataclass
class StageContext:
    """Everything a running stage may use. It writes only under `out` (a temp dir)."""

    spec: PipelineSpec
    spec_dict: dict
    out: Path
    run_dir: Path
    data_root: Path
    parents: dict[str, Path]
    log: Callable[[str], None] = print
    notes: dict = field(default_factory=dict)


class Stage(Protocol):
    name: str

    def parents(self, spec: PipelineSpec) -> tuple[str, ...]:
        """Names of the stages whose outputs this one reads."""

    def config(self, spec: PipelineSpec) -> dict:
        """The slice of the spec this stage depends on (recorded and fingerprinted)."""

    def input_files(self, spec: PipelineSpec, data_root: Path) -> list[Path]:
        """Files outside the run dir that this stage reads (hashed into the manifest)."""

    def run(self, ctx: StageContext) -> dict:
        """Do the work into ctx.out and return the final metrics."""
