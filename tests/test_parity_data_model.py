"""`nemo-rlhf parity data` (the NeMo-Aligner files vs the TRL rows) and `parity model` (the certificate at the
recipe's layout), each passing on aligned inputs and failing on a misaligned one."""

from __future__ import annotations

import json

from nemo_rlhf.data.aligner_format import file_name, prepare_aligner_data
from nemo_rlhf.parity.data_model import data_parity, model_parity
from nemo_rlhf.parity.models import stage_models
from nemo_rlhf.spec.loader import load_spec
from tests.helpers import TINY, cli

WIDER_INIT = "model.random.init_std=0.1"  # a wrong model must move logits well past the bound (FACTS.md)


def test_data_files_pass_and_a_shifted_mask_fails_with_both_sides_decoded(tmp_path):
    spec = load_spec(TINY)
    files = tmp_path / "aligner"
    prepare_aligner_data(spec, files)
    result = data_parity(spec, files)
    assert result.passed and {c.name for c in result.checks} >= {"data/sft_train", "data/rm_train", "data/ppo_train"}
    sft = files / file_name("sft_train")
    rows = [json.loads(line) for line in sft.read_text().splitlines()]
    rows[2] = {"input": rows[2]["input"].removesuffix("assistant\n"), "output": "assistant\n" + rows[2]["output"]}
    sft.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = cli("parity", "data", str(TINY), "--aligner-data", str(files), "--json")
    assert proc.returncode == 1, proc.stderr[-2000:]
    check = next(c for c in json.loads(proc.stdout)["checks"] if c["name"] == "data/sft_train")
    first = check["extra"]["first_mismatch"]
    assert check["value"] == 1 and first["index"] == 2 and first["what"] == "loss masks"
    assert "[[ass" in first["nemo"] and "[[ass" not in first["trl"]


def test_model_certificate_at_the_recipe_layout_and_a_wrong_checkpoint(tmp_path):
    spec = load_spec(TINY, [WIDER_INIT, "parallel.sft.tp=2"])
    result = model_parity(spec, "sft")
    assert result.passed and result.meta["tp"] == 2, [(c.name, c.value) for c in result.checks]
    other = stage_models(load_spec(TINY, [WIDER_INIT, "seed=7"]), "sft", tmp_path).nemo_path  # another model's .nemo
    wrong = model_parity(spec, "sft", nemo_path=other)
    logits = next(c for c in wrong.checks if c.name == "model/logits")
    assert not wrong.passed and logits.value > 100 * logits.tolerance
