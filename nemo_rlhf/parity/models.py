"""The HF model of a stage and the .nemo our converter makes of it: the two sides of loss and curve parity.

`--hf DIR` names the small-scale model (a policy for SFT, a *ForSequenceClassification for the RM,
e.g. a run's sft/model or rm/model); without it a spec with `model.source: random` gets its base
model built exactly as the pipeline's base_model stage builds it (same config, tokenizer, seed),
and for the RM a one-label classifier over it, as the RM stage makes one. The .nemo is written by
`convert.hf_to_nemo` (TransformerEngine names, the cluster default) unless `--nemo` names one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from nemo_rlhf.errors import UserError
from nemo_rlhf.spec.paths import data_path, data_root
from nemo_rlhf.spec.schema import PipelineSpec


@dataclass
class StageModels:
    hf_dir: Path
    nemo_path: Path
    tokenizer: object
    built: bool  # True when the HF model was built here from the spec (not given)


def _build_base(spec: PipelineSpec, out: Path) -> Path:
    from nemo_rlhf.models.materialize import build_random_model

    m = spec.model
    if m.source != "random":
        raise UserError(f"model.source is {m.source!r}: the parity check needs the small-scale model to compare",
                        where="--hf", fix="pass --hf DIR (e.g. RUN/sft/model, or RUN/rm/model for --stage rm)")
    return build_random_model(m.random, data_path(data_root(spec.data.root), m.tokenizer), m.chat_template, out,
                              seed=spec.seed)


def _reward_model_from(policy: Path, out: Path, seed: int) -> Path:
    """A one-label classifier over the policy, its score head seeded (the RM stage's starting point)."""
    from transformers import AutoModelForSequenceClassification

    from nemo_rlhf.stages.training import load_tokenizer

    tokenizer = load_tokenizer(policy)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(str(policy), num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def stage_models(spec: PipelineSpec, stage: str, workdir: Path, hf_dir: Path | None = None,
                 nemo_path: Path | None = None) -> StageModels:
    """The HF model of `stage` (given or built from the spec) and its .nemo (given or converted here)."""
    from nemo_rlhf.convert.convert import hf_to_nemo
    from nemo_rlhf.models.materialize import check_hf_dir
    from nemo_rlhf.stages.training import load_tokenizer

    built = hf_dir is None
    if built:
        hf_dir = _build_base(spec, workdir / "policy")
        if stage == "rm":
            hf_dir = _reward_model_from(hf_dir, workdir / "reward", spec.seed)
    hf_dir = check_hf_dir(Path(hf_dir))
    if nemo_path is None:
        nemo_path = hf_to_nemo(hf_dir, workdir / "converted", kind="reward" if stage == "rm" else "policy")
    elif not Path(nemo_path).exists():
        raise UserError(f"{nemo_path} does not exist", where="--nemo", fix="pass a .nemo file or extracted folder")
    return StageModels(hf_dir, Path(nemo_path), load_tokenizer(hf_dir), built)


def load_hf(models: StageModels, stage: str):
    """The HF model in fp32, as the certificate loads it (a reward model for the RM stage)."""
    from nemo_rlhf.convert import reward_head
    from nemo_rlhf.verify.certificate import load_hf_model

    model = load_hf_model(models.hf_dir, reward_head.REWARD if stage == "rm" else reward_head.POLICY)
    if stage == "rm" and model.config.pad_token_id is None:
        model.config.pad_token_id = models.tokenizer.pad_token_id
    return model
