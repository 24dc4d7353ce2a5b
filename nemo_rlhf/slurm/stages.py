"""The one type shared by every SLURM renderer: a stage rendered to an sbatch script.

Both renderers return ``list[RenderedStage]`` in submission order:

- ``nemo_rlhf.slurm.render.render_pipeline(spec, out_dir)`` for ``scale: large`` specs
  (NeMo-Aligner configs + sbatch scripts run inside NVIDIA's container). ``nemo-rlhf slurm
  submit SPEC --out RUN_DIR`` passes RUN_DIR as ``out_dir``, ``slurm render SPEC --out DIR``
  passes DIR;
- ``nemo_rlhf.slurm.small_scale.render_small_scale(spec, spec_path, overrides, run_dir, script_dir)``
  for ``scale: small`` specs (one CPU job per stage running ``nemo-rlhf run --until <stage>``).

``nemo_rlhf.slurm.dag`` submits such a list as a dependency DAG: each stage is submitted with
``--dependency=afterok:<job ids of its `after` stages>``; the log paths are read back from
``scontrol``. ``resume`` treats a stage as finished when RUN_DIR/<name>/manifest.json exists
(the lineage manifest, written last), so every stage's script must leave one there on success.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RenderedStage:
    """One pipeline stage as an sbatch script.

    Attributes:
        name: the stage name (``sft``, ``rm``, ``ppo``...); also the name of the stage's output
            directory RUN_DIR/<name>/ that holds its lineage manifest.json once it has finished.
        script: the sbatch script file to submit.
        after: names of the stages that must finish successfully before this one starts
            (rendered as ``--dependency=afterok:``). Every name must be an earlier stage of the list.
    """

    name: str
    script: Path
    after: tuple[str, ...] = ()
