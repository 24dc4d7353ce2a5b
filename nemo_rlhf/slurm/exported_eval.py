"""The large-scale pipeline's `eval` stage: the small-scale evaluation on exported HF checkpoints.

    nemo-rlhf slurm eval-exported RUN_DIR/spec.yaml RUN_DIR   (cluster.nemo_rlhf_command, like the other tools)

Runs `nemo_rlhf.stages.evaluate.EvalStage` (the same code as at small scale) with the base model
(model.path) and the checkpoints the export stage wrote to RUN_DIR/export/{sft,rm,ppo}/model;
results go to RUN_DIR/eval/.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def run_exported_eval(spec_file: Path, run_dir: Path) -> Path:
    """Evaluate base / SFT / PPO (scored by the trained RM) and write RUN_DIR/eval atomically."""
    from nemo_rlhf.pipeline.stage import StageContext
    from nemo_rlhf.spec.loader import load_spec, spec_to_dict
    from nemo_rlhf.spec.paths import data_root
    from nemo_rlhf.stages.evaluate import EvalStage

    spec = load_spec(spec_file)
    base = Path(spec.model.path)
    parents = {"base": _with_model_dir(base, run_dir), **{s: run_dir / "export" / s for s in ("sft", "rm", "ppo")}}
    out, tmp = run_dir / "eval", run_dir / "eval.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ctx = StageContext(spec=spec, spec_dict=spec_to_dict(spec), out=tmp, run_dir=run_dir,
                       data_root=data_root(spec.data.root), parents=parents)
    EvalStage().run(ctx)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _with_model_dir(hf_dir: Path, run_dir: Path) -> Path:
    """A folder whose `model` entry is the base HF checkpoint (the layout EvalStage reads)."""
    holder = run_dir / "export" / "base"
    holder.mkdir(parents=True, exist_ok=True)
    link = holder / "model"
    if not link.exists():
        link.symlink_to(hf_dir)
    return holder


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m nemo_rlhf.slurm.exported_eval SPEC RUN_DIR")
    print(run_exported_eval(Path(sys.argv[1]), Path(sys.argv[2])))
