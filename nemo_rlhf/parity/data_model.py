"""Data and model parity as ParityResults: the existing data comparison and the conversion certificate.

* data: the TRL rows of every file (`aligner_format.build_trl_rows`) against the NeMo-Aligner records,
  either written now from those rows or read from files written earlier (`--aligner-data`), through
  NeMo's tokenization (`parity.data`): identical token ids and loss masks, or the first mismatch decoded.
* model: `verify.certificate.verify_conversion` at the TP/PP the large-scale recipe gives the stage
  (`parallel.<stage>`): logits (rewards) within the certificate's bound and every greedy token equal.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from nemo_rlhf.parity.report import Check, ParityResult
from nemo_rlhf.spec.schema import PipelineSpec

LAYOUT_OF_STAGE = {"sft": "sft", "rm": "rm", "ppo": "ppo"}


def data_parity(spec: PipelineSpec, aligner_dir: Path | None = None) -> ParityResult:
    """Token-for-token parity of every NeMo-Aligner data file with the TRL rows."""
    from nemo_rlhf.data.aligner_format import build_trl_rows, read_records, spec_tokenizer, to_records
    from nemo_rlhf.parity import data as data_parity_checks
    from nemo_rlhf.spec.paths import data_root

    root = data_root(spec.data.root)
    tokenizer = spec_tokenizer(spec, root)
    rows, dropped = build_trl_rows(spec, root, tokenizer)
    records = read_records(aligner_dir) if aligner_dir else {name: to_records(name, r) for name, r in rows.items()}
    result = ParityResult("data", meta={"aligner_data": str(aligner_dir or "rendered from the TRL rows"),
                                        "dropped_too_long": dropped})
    for check in data_parity_checks.compare_all(tokenizer, rows, records):
        detail = check.render().replace("\n", " | ")
        result.add(Check.within(f"data/{check.name}", check.mismatches + len(check.notes), 0, detail,
                                examples=check.examples, first_mismatch=check.first_mismatch, notes=check.notes))
    return result


def model_parity(spec: PipelineSpec, stage: str, hf_dir: Path | None = None, nemo_path: Path | None = None,
                 tp: int | None = None, pp: int | None = None) -> ParityResult:
    """The conversion certificate of a stage's model at the recipe's layout (or `tp`/`pp`)."""
    from nemo_rlhf.parity.models import stage_models
    from nemo_rlhf.verify.certificate import verify_conversion

    layout = getattr(spec.parallel, LAYOUT_OF_STAGE[stage])
    tp, pp = tp or layout.tp, pp or layout.pp
    with tempfile.TemporaryDirectory(prefix="nemo-rlhf-parity-model-") as tmp:
        models = stage_models(spec, "rm" if stage == "rm" else "sft", Path(tmp), hf_dir, nemo_path)
        cert = verify_conversion(models.hf_dir, models.nemo_path, tp=tp, pp=pp)
    result = ParityResult("model", meta={"stage": stage, "tp": tp, "pp": pp, "certificate": cert.to_dict()})
    if cert.error:
        result.add(Check("model/megatron_run", False, detail=cert.error))
        return result
    if cert.kind == "reward":
        result.add(Check.within("model/rewards", cert.max_abs_reward_diff, cert.tolerance,
                                f"max |reward diff| HF vs megatron-core at TP={tp} PP={pp}"))
    else:
        result.add(Check.within("model/logits", cert.max_abs_logit_diff, cert.tolerance,
                                f"max |logit diff| HF vs megatron-core at TP={tp} PP={pp} over {cert.num_tokens} "
                                f"tokens (mean KL {cert.mean_kl:.3g})"))
        result.add(Check.within("model/greedy_disagreement", 1.0 - cert.top1_agreement, 0.0,
                                "share of positions whose greedy next token differs"))
    return result
