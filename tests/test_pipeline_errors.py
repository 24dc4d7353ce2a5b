"""The pipeline refuses bad input with exit 2, a clear message, and nothing half-written."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from nemo_rlhf.models.materialize import build_random_model, make_portable
from nemo_rlhf.spec.loader import load_spec
from nemo_rlhf.spec.paths import data_path, data_root
from tests.helpers import TINY, cli

# ChatML without <|im_end|>: assistant targets would never end with EOS, so a model
# trained on them would never learn to stop.
NO_EOS_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def no_eos_model(tmp_path_factory) -> Path:
    spec = load_spec(TINY)
    out = tmp_path_factory.mktemp("no-eos") / "model"
    build_random_model(spec.model.random, data_path(data_root("auto"), spec.model.tokenizer), "chatml", out, seed=1)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = NO_EOS_TEMPLATE
    tok.save_pretrained(out)
    make_portable(out)
    assert AutoTokenizer.from_pretrained(out).chat_template == NO_EOS_TEMPLATE
    return out


def test_lint_failure_stops_the_stage(tmp_path, no_eos_model):
    run_dir = tmp_path / "run"
    proc = cli("run", str(TINY), "--out", str(run_dir), "model.source=hf_dir", f"model.path={no_eos_model}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "sft" in proc.stderr and "EOS" in proc.stderr
    assert (run_dir / "base" / "manifest.json").is_file()
    assert not (run_dir / "sft").exists() and not list(run_dir.glob(".sft.tmp-*"))


def test_nothing_fits_max_length(tmp_path):
    run_dir = tmp_path / "run"
    proc = cli("run", str(TINY), "--out", str(run_dir), "sft.max_length=8", "--until", "sft")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no examples that fit sft.max_length" in proc.stderr and "raise sft.max_length" in proc.stderr
    assert not (run_dir / "sft").exists()


def test_out_is_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    proc = cli("run", str(TINY), "--out", str(target))
    assert proc.returncode == 2 and "is not a directory" in proc.stderr and target.read_text() == "x"


def test_hostile_run_dir_name(tmp_path):
    """Spaces, quotes, $(...) and semicolons in the run dir are just characters."""
    run_dir = tmp_path / "r u n; $(touch pwned) `id` 'q\""
    proc = cli("run", str(TINY), "--out", str(run_dir), "--until", "base")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (run_dir / "base" / "manifest.json").is_file()
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()
