"""Gate layer 1: GSM8K exact match + paired bootstrap, format compliance, instruction following."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nemo_rlhf.data.gsm8k import MathProblem, extract_final_answer
from nemo_rlhf.errors import UserError
from nemo_rlhf.gate import capability, format_checks, instructions
from nemo_rlhf.gate.bootstrap import mean_ci

# ---------------------------------------------------------------- GSM8K exact match


@pytest.fixture(scope="module")
def test_set():
    return capability.gsm8k_subset(0, 0)


def test_gold_answers_of_the_real_test_set_match_themselves(test_set):
    assert len(test_set) == 1319
    assert all(capability.exact_match([p.answer for p in test_set], test_set))
    # Without the marker the last number of the solution is read; on the real set it is
    # the final answer for the large majority of solutions.
    unmarked = [p.answer.split("####")[0] + f" So the answer is {p.final_answer}." for p in test_set[:200]]
    assert all(capability.exact_match(unmarked, test_set[:200]))


@pytest.mark.parametrize(
    "text, gold, ok",
    [
        ("She makes 9 * 2 = $18 every day.\n#### 18", "18", True),
        ("The total is $1,250.", "1250", True),
        ("#### 1,000", "1000", True),
        ("The price is $18.00 in the end.", "18", True),
        ("It costs 2.50 dollars.", "2.5", True),
        ("The temperature dropped to -7.", "-7", True),
        ("#### -3\nThen 5 more words 12", "-3", True),
        ("10-5 leaves 5", "5", True),
        ("3,4,5 are the sides", "5", True),
        ("The answer is 17", "18", False),
        ("#### eighteen", "18", False),  # committed to a non-number: no credit for the 18 above
        ("I do not know.", "18", False),
    ],
)
def test_extraction_tricky_cases(text, gold, ok):
    problem = MathProblem("q", f"#### {gold}", gold, 1)
    assert capability.exact_match([text], [problem]) == [ok], extract_final_answer(text)


def test_subset_is_fixed_by_its_seed(test_set):
    a, b, c = capability.gsm8k_subset(50, 7), capability.gsm8k_subset(50, 7), capability.gsm8k_subset(50, 8)
    assert [p.source_line for p in a] == [p.source_line for p in b] != [p.source_line for p in c]
    assert len(a) == 50 and [p.source_line for p in a] == sorted(p.source_line for p in a)


def test_rows_are_matched_to_questions_and_the_rest_counted(test_set):
    problems = test_set[:5]
    rows = [
        {"prompt": f"<|im_start|>user\n{p.question}<|im_end|>\n<|im_start|>assistant\n", "response": p.answer}
        for p in problems
    ]
    rows += [{"prompt": problems[0].question, "response": "#### 0"}]  # duplicate: first row wins
    rows += [{"prompt": "Human: what is love?\n\nAssistant:", "response": "Baby don't hurt me."}]
    score = capability.score_rows(rows, test_set)
    assert score.accuracy.estimate == 1.0 and len(score.correct) == 5 and score.not_gsm8k == 1
    assert capability.score_rows(rows[-1:], test_set) is None


def _score(correct: list[bool]) -> capability.GSM8KScore:
    problems = [MathProblem(f"q{i}", "#### 1", "1", i) for i in range(len(correct))]
    return capability.score_responses(problems, ["#### 1" if c else "#### 0" for c in correct], n_boot=500)


def test_paired_bootstrap_interval_covers_the_true_difference():
    # Candidate and baseline answer correlated questions (shared difficulty); the true
    # accuracy difference is -0.1. The 95% interval must cover it in most replicates.
    rng = np.random.default_rng(0)
    covered = 0
    for rep in range(60):
        easy = rng.random(200) < 0.6
        base = easy | (rng.random(200) < 0.1)
        cand = np.where(rng.random(200) < 0.8, easy, rng.random(200) < 0.35)
        true_diff = (0.8 * 0.6 + 0.2 * 0.35) - (0.6 + 0.4 * 0.1)
        ci = mean_ci(cand.astype(float) - base.astype(float), n_boot=500, seed=rep)
        covered += ci.low <= true_diff <= ci.high
    assert covered >= 52  # ~95% of 60


def test_regression_finding_fires_only_when_it_should():
    rng = np.random.default_rng(1)
    base = list(rng.random(300) < 0.6)
    worse = [b and rng.random() > 0.3 for b in base]  # loses ~30% of what the baseline solved
    slightly = [b and rng.random() > 0.05 for b in base]
    fail = capability.capability_finding(_score(worse), _score(base), n_boot=500)
    assert fail.severity == "fail" and fail.detector == "capability_regression"
    assert fail.value < -0.1 and fail.details["difference_ci"]["high"] < 0
    case = fail.details["cases"][0]
    assert case["prompt"].startswith("q") and case["response"] == "#### 0" and "gold 1" in case["why"]
    same = capability.capability_finding(_score(base), _score(base), n_boot=500)
    assert same.severity == "info" and same.value == 0.0
    better = capability.capability_finding(_score(base), _score(worse), n_boot=500)
    assert better.severity == "info"
    # A small drop within the tolerated margin does not fire.
    assert capability.capability_finding(_score(slightly), _score(base), capability_drop=0.1).severity == "info"
    # Ten questions cannot confirm a drop of one question: warn, not fail.
    small = capability.capability_finding(_score([True] * 9 + [False]), _score([True] * 10), n_boot=500)
    assert small.severity == "warn"


# ---------------------------------------------------------------- format compliance


def test_format_checks_each_failure():
    rows = [
        {"prompt": "p", "response": "A fine answer.", "finished": True},
        {"prompt": "p", "response": "Cut off in the mid", "finished": False},
        {"prompt": "p", "response": "Sure!<|im_end|>\n<|im_start|>user\nmore", "finished": True},
        {"prompt": "p", "response": "[INST] again [/INST]"},
        {"prompt": "p", "response": "Fine.\n\nHuman: and now you answer me"},
        {"prompt": "p", "response": "word " * 30},
        {"prompt": "p", "response": "No finished field, short."},
    ]
    results = format_checks.check_rows(rows, max_length=20)
    assert [r.failures for r in results] == [[], ["eos"], ["template"], ["template"], ["template"], ["length"], []]
    assert results[2].leaks == ["<|im_end|>"] and results[4].leaks == ["Human:"]
    finding = format_checks.format_finding(rows, format_min_pass_rate=0.5, max_length=20)
    assert finding.severity == "fail" and finding.value == pytest.approx(2 / 7)
    assert finding.details["failures_by_check"] == {"eos": 1, "template": 3, "length": 1}
    assert [c["why"] for c in finding.details["cases"]][:2] == ["format: eos", "format: template"]
    assert format_checks.format_finding(rows[:1] + rows[-1:], 0.9).severity == "info"


def test_format_length_in_tokens_with_a_tokenizer(gpt2_tokenizer):
    text = "internationalization " * 5
    assert format_checks.response_length(text, gpt2_tokenizer) > format_checks.response_length(text) == 5


def _gpt2_tokenizer():
    from transformers import PreTrainedTokenizerFast

    from nemo_rlhf.spec.paths import data_root

    path = data_root("auto") / "tokenizers/gpt2/tokenizer.json"
    return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    return _gpt2_tokenizer()


# ---------------------------------------------------------------- instruction following

CHECKER_CASES = [
    ("max_words", 5, "one two three four five", "one two three four five six"),
    ("min_words", 3, "one two three", "one two"),
    ("bullet_count", 2, "Here:\n- a\n- b", "- a\n- b\n- c"),
    ("bullet_count", 3, "* a\n* b\n* c", "a, b and c"),
    ("numbered_items", 3, "1. tea\n2. water\n3. wait", "1. tea\n3. water\n4. wait"),
    ("numbered_items", 2, "Steps:\n1) boil\n2) pour", "1. boil\n2. pour\n3. drink"),
    ("json_keys", ["name", "age"], '{"name": "Ada", "age": 36}', '{"name": "Ada"}'),
    ("json_keys", ["a"], '```json\n{"a": 1}\n```', 'Sure! {"a": 1}'),
    ("lowercase", None, "all quiet here.", "All quiet here."),
    ("include_word", "granite", "Granite peaks.", "Granitelike peaks."),
    ("exclude_word", "cute", "A small cat.", "A very CUTE cat."),
    ("ends_with", "Keep going!", "You can do it. Keep going!\n", "Keep going! You can do it."),
]


@pytest.mark.parametrize("kind, value, good, bad", CHECKER_CASES)
def test_each_checker_passes_and_fails(kind, value, good, bad):
    checker, _ = instructions.CHECKERS[kind]
    assert checker(good, value) is True
    assert checker(bad, value) is False


def test_every_checker_has_cases_and_the_data_file_loads():
    assert {case[0] for case in CHECKER_CASES} == set(instructions.CHECKERS)
    items = instructions.load_instructions()
    assert 30 <= len(items) <= 40 and len({i.id for i in items}) == len(items)
    assert {c["kind"] for i in items for c in i.constraints} == set(instructions.CHECKERS)


def test_unknown_constraint_is_a_user_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"id": "x", "prompt": "p", "constraints": [{"kind": "rhyme"}]}) + "\n")
    with pytest.raises(UserError, match="bad.jsonl:1"):
        instructions.load_instructions(path)


# constraint kind -> (a response that satisfies it, one that violates it), given the value.
RESPONSES_FOR = {
    "max_words": (lambda n: "short answer", lambda n: "word " * (n + 1)),
    "min_words": (lambda n: "word " * n, lambda n: "short"),
    "bullet_count": (lambda n: "\n".join(f"- item {i}" for i in range(n)), lambda n: "no list"),
    "numbered_items": (lambda n: "\n".join(f"{i}. step" for i in range(1, n + 1)), lambda n: "no list"),
    "json_keys": (lambda keys: json.dumps({k: 1 for k in keys}), lambda keys: "not json"),
    "lowercase": (lambda _: "all lowercase", lambda _: "Not Lowercase"),
    "include_word": (lambda w: f"it has {w} in it", lambda w: "nothing here"),
    "exclude_word": (lambda w: "nothing here", lambda w: f"it has {w} in it"),
    "ends_with": (lambda p: f"Done. {p}", lambda p: f"{p} Done."),
}


def test_instruction_finding_compares_with_the_baseline():
    items = instructions.load_instructions()
    assert set(RESPONSES_FOR) == set(instructions.CHECKERS)
    single = [i for i in items if len(i.constraints) == 1][:10]

    def rows(good: int) -> list[dict]:
        out = []
        for n, item in enumerate(single):
            c = item.constraints[0]
            make_good, make_bad = RESPONSES_FOR[c["kind"]]
            text = (make_good if n < good else make_bad)(c.get("value"))
            out.append({"prompt": f"<|im_start|>user\n{item.prompt}", "response": text})
        return out

    base = instructions.score_rows(rows(10), items)
    assert base.pass_rate == 1.0 and base.unmatched_rows == 0
    cand = instructions.score_rows(rows(7) + [{"prompt": "other", "response": "x"}], items)
    assert cand.pass_rate == pytest.approx(0.7) and cand.unmatched_rows == 1
    finding = instructions.instruction_finding(cand, base, instruction_max_drop=0.1)
    assert finding.severity == "fail" and finding.value == pytest.approx(0.3) and len(finding.details["cases"]) == 3
    case = finding.details["cases"][0]
    assert case["prompt"] == single[7].prompt and case["why"].startswith("failed ")
    assert instructions.instruction_finding(cand, base, instruction_max_drop=0.35).severity == "info"


def test_lm_eval_scores_gold_solutions_as_we_do(test_set):
    sample = test_set[:100]
    texts = [p.answer for p in sample] + [p.answer.split("####")[0] + "#### 123456789" for p in sample]
    agreement = capability.lm_eval_agreement(texts, sample + sample)
    assert agreement.ours_correct == 100 and agreement.agree == {"strict-match": 200, "flexible-extract": 200}


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from nemo_rlhf.models.chat_templates import CHAT_TEMPLATES

    path = tmp_path_factory.mktemp("tiny_policy")
    tokenizer = _gpt2_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATES["chatml"]
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=1024, vocab_size=len(tokenizer))
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_checkpoint_path_is_deterministic_and_scores_every_question(tiny_policy):
    problems = capability.gsm8k_subset(6, 3)
    first = capability.score_checkpoint(tiny_policy, problems, n_boot=100, max_new_tokens=6, batch_size=4)
    again = capability.score_checkpoint(tiny_policy, problems, n_boot=100, max_new_tokens=6, batch_size=3)
    assert first.responses == again.responses and set(first.correct) == {p.source_line for p in problems}
    assert first.not_gsm8k == 0
    rows = instructions.checkpoint_rows(tiny_policy, instructions.load_instructions()[:3], max_new_tokens=4)
    assert [r["prompt"] for r in rows] == [i.prompt for i in instructions.load_instructions()[:3]]
    assert all(isinstance(r["finished"], bool) for r in rows)
    chat = [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "?"}]
    ]
    (row,) = capability.checkpoint_responses(tiny_policy, chat, max_new_tokens=3)
    assert row["prompt"].startswith("<|im_start|>user\nHi<|im_end|>") and row["prompt"].endswith("assistant\n")
