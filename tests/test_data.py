"""Data loading, tokenized example building and data lint, on the real shared data.

The tokenizer is GPT-2's real BPE with ChatML special tokens added and the project's
"chatml" template, built once per session into a tmp dir and loaded back the way stages
load a saved tokenizer.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from nemo_rlhf.data.examples import (
    build_preference_rows,
    build_prompt_rows,
    build_sft_rows,
    gsm8k_sft_target,
    math_prompt_messages,
    prompt_example,
    sft_example,
)
from nemo_rlhf.data.gsm8k import answers_match, extract_final_answer, load_gsm8k
from nemo_rlhf.data.hh_rlhf import (
    PreferencePair,
    TranscriptParseError,
    load_preference_pairs,
    parse_transcript,
    prompt_key,
    split_heldout,
)
from nemo_rlhf.data.jsonl import read_jsonl, require_fields, write_jsonl_atomic
from nemo_rlhf.data.lint import (
    check_chat_template,
    check_eos,
    check_loss_masks,
    check_split_merge,
    lint_preference,
    lint_prompts,
    lint_sft,
    raise_if_issues,
)
from nemo_rlhf.errors import LintError, UserError
from nemo_rlhf.models.chat_templates import CHAT_TEMPLATES

DATA = Path("/work/shared/data")
GSM8K_TRAIN = DATA / "gsm8k" / "train.jsonl"
HH_TEST = DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"
GPT2_TOKENIZER = DATA / "tokenizers" / "gpt2" / "tokenizer.json"
EOS = "<|im_end|>"


@pytest.fixture(scope="session")
def chatml_tokenizer(tmp_path_factory):
    """GPT-2 BPE + ChatML tokens and template, saved and reloaded with AutoTokenizer."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(GPT2_TOKENIZER),
        additional_special_tokens=["<|im_start|>", EOS],
        eos_token=EOS,
        pad_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATES["chatml"]
    directory = tmp_path_factory.mktemp("chatml_tokenizer")
    tokenizer.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="session")
def gsm8k_problems():
    return load_gsm8k(GSM8K_TRAIN, limit=40)


@pytest.fixture(scope="session")
def hh_pairs():
    return load_preference_pairs(HH_TEST)


def _decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _masked_in(row):
    return [token for token, keep in zip(row["input_ids"], row["completion_mask"]) if keep]


# --- formatting real rows -------------------------------------------------------------


def test_gsm8k_sft_mask_covers_exactly_the_answer(chatml_tokenizer, gsm8k_problems):
    rows, dropped = build_sft_rows(chatml_tokenizer, gsm8k_problems, max_length=512)
    assert dropped == 0 and len(rows) == len(gsm8k_problems)
    for row, problem in zip(rows, gsm8k_problems):
        target = gsm8k_sft_target(problem.answer)
        assert _decode(chatml_tokenizer, _masked_in(row)) == target + EOS
        prompt_ids = [t for t, keep in zip(row["input_ids"], row["completion_mask"]) if not keep]
        assert _decode(chatml_tokenizer, prompt_ids).endswith("<|im_start|>assistant\n")
        assert row["input_ids"][-1] == chatml_tokenizer.eos_token_id
        assert row["source_line"] == problem.source_line
    assert lint_sft(chatml_tokenizer, rows) == []


def test_gsm8k_target_drops_annotations_but_keeps_final_answer(gsm8k_problems):
    for problem in gsm8k_problems:
        target = gsm8k_sft_target(problem.answer)
        assert "<<" not in target and target.splitlines()[-1].startswith("####")
        assert extract_final_answer(target) == problem.final_answer
    assert gsm8k_sft_target(gsm8k_problems[0].answer).startswith("Natalia sold 48/2 = 24 clips in May.")


def test_hh_preference_rows_share_prompt_and_end_with_eos(chatml_tokenizer, hh_pairs):
    pairs = hh_pairs[0][:60]
    rows, dropped = build_preference_rows(chatml_tokenizer, pairs, max_length=1024)
    assert len(rows) + dropped == len(pairs) and len(rows) > 40
    by_line = {pair.source_line: pair for pair in pairs}
    for row in rows:
        pair, n = by_line[row["source_line"]], row["prompt_len"]
        assert row["chosen_ids"][:n] == row["rejected_ids"][:n]
        assert _decode(chatml_tokenizer, row["chosen_ids"][n:]) == pair.chosen + EOS
        assert _decode(chatml_tokenizer, row["rejected_ids"][n:]) == pair.rejected + EOS
        assert _decode(chatml_tokenizer, row["chosen_ids"][:n]) == row["prompt_text"]
    assert lint_preference(chatml_tokenizer, rows) == []


def test_too_long_examples_are_dropped_and_counted(chatml_tokenizer, gsm8k_problems, hh_pairs):
    rows, dropped = build_sft_rows(chatml_tokenizer, gsm8k_problems, max_length=100)
    lengths = [len(r["input_ids"]) for r in build_sft_rows(chatml_tokenizer, gsm8k_problems, 10_000)[0]]
    assert dropped == sum(length > 100 for length in lengths) > 0
    assert len(rows) + dropped == len(gsm8k_problems)
    assert build_preference_rows(chatml_tokenizer, hh_pairs[0][:5], max_length=8) == ([], 5)


def test_ppo_prompts_match_the_sft_prompt(chatml_tokenizer, gsm8k_problems, hh_pairs):
    rows, dropped = build_prompt_rows(chatml_tokenizer, gsm8k_problems, max_length=512)
    sft_rows, _ = build_sft_rows(chatml_tokenizer, gsm8k_problems, max_length=512)
    assert dropped == 0
    for prompt_row, sft_row in zip(rows, sft_rows):
        assert prompt_row["prompt_text"].endswith("<|im_start|>assistant\n")
        # The policy is sampled from exactly the tokens it was fine-tuned to continue.
        n = sft_row["completion_mask"].index(1)
        assert prompt_row["input_ids"] == sft_row["input_ids"][:n]
    hh_rows, _ = build_prompt_rows(chatml_tokenizer, hh_pairs[0][:20], max_length=1024)
    assert lint_prompts(chatml_tokenizer, rows + hh_rows) == []


def test_gsm8k_answer_extraction_and_match():
    assert extract_final_answer("so 3 + 4 = 7\n#### 1,000") == "1000"
    assert extract_final_answer("She pays $1,234.50 in total.") == "1234.50"
    assert extract_final_answer("The answer is 72.") == "72"
    assert extract_final_answer("pages 10-5 then 8") == "8"
    assert extract_final_answer("It drops to -3.") == "-3"
    assert extract_final_answer("#### 72\nQuestion: what is 5?") == "72"
    assert extract_final_answer("#### none") is None
    assert extract_final_answer("no digits") is None
    assert answers_match("2.50", "2.5") and answers_match("1,000", "1000")
    assert not answers_match("7", "8") and not answers_match(None, "8")


# --- hh-rlhf parsing and splitting ----------------------------------------------------


def test_parse_transcript_roles_and_errors():
    text = "\n\nHuman: hi  \n\nAssistant: hello\n\nHuman: say Human: ok\n\nAssistant: Human: ok"
    assert parse_transcript(text) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        # "Human:" not after a blank line is content (the assistant quoting the user).
        {"role": "user", "content": "say Human: ok"},
        {"role": "assistant", "content": "Human: ok"},
    ]
    for bad in ["just text", "\n\nAssistant: hi", "\n\nHuman: a\n\nHuman: b", "preamble\n\nHuman: a"]:
        with pytest.raises(TranscriptParseError):
            parse_transcript(bad)


def test_hh_parse_counts_on_the_real_file(hh_pairs):
    pairs, report = hh_pairs
    assert (report.total_rows, report.kept, len(pairs)) == (2312, 2299, 2299)
    # Real rows with two assistant turns in a row, and four with an empty chosen response.
    assert dict(report.skipped) == {"parse_error": 9, "empty_response": 4}
    assert report.examples["empty_response"][0] == f"{HH_TEST}:87: chosen final response is empty"
    assert f"{HH_TEST}:668: chosen: turn 5 is 'assistant'" in report.examples["parse_error"][0]
    assert "kept 2299 of 2312" in report.summary()
    for pair in pairs:
        assert pair.prompt[-1]["role"] == "user" and pair.chosen and pair.chosen != pair.rejected


def test_heldout_split_is_deterministic_disjoint_and_subset_stable(hh_pairs):
    pairs = hh_pairs[0]
    # Same prompt, different responses: must never straddle the split.
    twin = PreferencePair(pairs[0].prompt, "other", "answer", -1)
    items = [*pairs, twin]
    train, heldout = split_heldout(items, 0.1)
    assert (train, heldout) == split_heldout(items, 0.1)
    assert not {prompt_key(p) for p in train} & {prompt_key(p) for p in heldout}
    assert 0.07 < len(heldout) / len(items) < 0.13
    # A subset splits the same way: each item keeps its side.
    subset = items[::3]
    sub_train, sub_heldout = split_heldout(subset, 0.1)
    in_subset = set(map(id, subset))
    assert sub_heldout == [p for p in heldout if id(p) in in_subset]
    assert sub_train == [p for p in train if id(p) in in_subset]
    with pytest.raises(UserError, match="fraction"):
        split_heldout(items, 1.0)


# --- jsonl ----------------------------------------------------------------------------


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "#### 1"}\n\n{"question": "q2", "answer": \n')
    with pytest.raises(UserError) as error:
        list(read_jsonl(path))
    assert error.value.where == f"{path}:3" and "malformed JSON" in str(error.value)
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(UserError, match=rf"{path}:2: row is a JSON list"):
        list(read_jsonl(path))
    with pytest.raises(UserError, match="data file not found") as error:
        list(read_jsonl(tmp_path / "missing.jsonl"))
    assert "fix:" in str(error.value)


def test_required_fields_and_gold_answer_errors(tmp_path):
    with pytest.raises(UserError) as error:
        require_fields({"question": 3}, {"question": str, "answer": str}, "f.jsonl", 7)
    message = str(error.value)
    assert message.startswith("f.jsonl:7:") and "'question' is integer" in message
    assert "missing field 'answer'" in message
    path = tmp_path / "gsm.jsonl"
    path.write_text('{"question": "q", "answer": "#### 4"}\n{"question": "q", "answer": "no marker"}\n')
    with pytest.raises(UserError, match=rf"{path}:2: gold answer has no '#### N'"):
        load_gsm8k(path)
    assert len(load_gsm8k(path, limit=1)) == 1


def test_write_jsonl_atomic_round_trip_plain_and_gzip(tmp_path):
    rows = [{"chosen": "a", "rejected": "b"}, {"chosen": "ü", "rejected": "c"}]
    for name in ("out.jsonl", "out.jsonl.gz"):
        assert write_jsonl_atomic(tmp_path / "sub" / name, rows) == 2
        assert [row for _, row in read_jsonl(tmp_path / "sub" / name)] == rows
    assert gzip.decompress((tmp_path / "sub" / "out.jsonl.gz").read_bytes()).count(b"\n") == 2
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["out.jsonl", "out.jsonl.gz"]

    def failing_rows():
        yield rows[0]
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_jsonl_atomic(tmp_path / "sub" / "out.jsonl", failing_rows())
    assert [row for _, row in read_jsonl(tmp_path / "sub" / "out.jsonl")] == rows
    assert len(list((tmp_path / "sub").iterdir())) == 2


# --- each lint check fires ------------------------------------------------------------


@pytest.fixture
def sft_rows(chatml_tokenizer, gsm8k_problems):
    return build_sft_rows(chatml_tokenizer, gsm8k_problems[:3], max_length=512)[0]


def test_lint_all_zero_and_all_one_masks(sft_rows):
    zero = {**sft_rows[0], "completion_mask": [0] * len(sft_rows[0]["input_ids"])}
    one = {**sft_rows[1], "completion_mask": [1] * len(sft_rows[1]["input_ids"])}
    issues = check_loss_masks([zero, one, sft_rows[2]])
    assert [(i.check, i.example_index) for i in issues] == [("loss_mask", 0), ("loss_mask", 1)]
    assert "all 0" in issues[0].message and "all 1" in issues[1].message
    assert "Natalia" in issues[0].message  # the response text is shown


def test_lint_missing_eos(chatml_tokenizer, sft_rows):
    cut = {**sft_rows[0], "input_ids": sft_rows[0]["input_ids"][:-1]}
    issues = check_eos([cut, sft_rows[1]], chatml_tokenizer.eos_token_id, ["input_ids"], chatml_tokenizer)
    assert [(i.check, i.example_index) for i in issues] == [("eos", 0)]
    assert "#### 72" in issues[0].message
    # The same fault reaches raise_if_issues through the stage lint.
    with pytest.raises(LintError, match="eos: 1"):
        raise_if_issues("sft", lint_sft(chatml_tokenizer, [cut]))


def test_lint_chat_template_differs():
    assert check_chat_template("rm", CHAT_TEMPLATES["chatml"], CHAT_TEMPLATES["chatml"], "sft manifest") == []
    other = CHAT_TEMPLATES["chatml"].replace("<|im_start|>", "<s>")
    issues = check_chat_template("rm", other, CHAT_TEMPLATES["chatml"], "sft artifact manifest")
    assert len(issues) == 1 and issues[0].example_index is None
    assert "'rm'" in issues[0].message and "sft artifact manifest" in issues[0].message
    with pytest.raises(LintError, match="chat_template: 1"):
        raise_if_issues("rm", issues)


def test_lint_split_merge_on_a_response_starting_with_blank_line(chatml_tokenizer):
    # With GPT-2's BPE, "\n" ending the generation prompt merges with a response's "\n\n"
    # into one "\n\n" token: the prompt's tokens stop being a prefix of the sequence.
    prompt = [{"role": "user", "content": "Say hi."}]
    merged = sft_example(chatml_tokenizer, prompt, "\n\nHi", max_length=64)
    clean = sft_example(chatml_tokenizer, prompt, "Hi", max_length=64)
    issues = check_split_merge(chatml_tokenizer, [clean, merged], "prompt_text", "completion_text")
    assert [(i.check, i.example_index) for i in issues] == [("split_merge", 1)]
    assert "ĊĊ" in issues[0].message
    with pytest.raises(LintError) as error:
        raise_if_issues("sft", lint_sft(chatml_tokenizer, [clean, merged]))
    assert "split_merge: 1" in str(error.value) and "example 1" in str(error.value)


def test_lint_prompt_ending_with_eos(chatml_tokenizer):
    good = prompt_example(chatml_tokenizer, [{"role": "user", "content": "q"}], 64)
    # Without the generation prompt the prompt ends with the user's <|im_end|>.
    text = good["prompt_text"].removesuffix("\n<|im_start|>assistant\n")
    bad = {"prompt_text": text, "input_ids": chatml_tokenizer(text, add_special_tokens=False)["input_ids"]}
    assert bad["input_ids"][-1] == chatml_tokenizer.eos_token_id
    issues = lint_prompts(chatml_tokenizer, [good, bad])
    assert [(i.check, i.example_index) for i in issues] == [("prompt_end", 1)]


def test_raise_if_issues_counts_and_limits_shown(chatml_tokenizer, sft_rows):
    cut = [
        {**row, "input_ids": row["input_ids"][:-1], "completion_mask": row["completion_mask"][:-1]} for row in sft_rows
    ]
    zero = [{**row, "completion_mask": [0] * len(row["input_ids"])} for row in sft_rows]
    issues = lint_sft(chatml_tokenizer, cut + zero)
    with pytest.raises(LintError) as error:
        raise_if_issues("sft", issues)
    text = str(error.value)
    assert "6 problem(s)" in text and "eos: 3" in text and "loss_mask: 3" in text
    assert text.count("  [") == 5 and "and 1 more" in text and "fix:" in text
    assert "(source line 1)" in text
    raise_if_issues("sft", [])  # no issues: no error


def test_math_prompt_is_the_question(gsm8k_problems):
    assert math_prompt_messages(gsm8k_problems[0]) == [{"role": "user", "content": gsm8k_problems[0].question}]
