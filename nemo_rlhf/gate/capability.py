"""Layer 1 of the gate: GSM8K exact match, candidate vs baseline, with a paired bootstrap.

Exact match reads the final answer with `nemo_rlhf.data.gsm8k.extract_final_answer` (the
number after `####`, else the last number in the response) and compares numerically with
`answers_match`; the eval stage and the gate both score through `exact_match` here, so the
rule lives in one place.

Two ways in:
- responses rows (`{"prompt", "response", ...}` from a cluster run or the eval stage):
  `score_rows` matches each prompt to a GSM8K test question (the raw question or any
  rendering that contains it, e.g. a chat template) and says how many rows were not GSM8K;
- an HF checkpoint dir: `checkpoint_responses` generates greedily (batched, progress bar,
  deterministic) on a fixed seeded subset from `gsm8k_subset`, in the chat format the
  policy was fine-tuned on.

Why not lm-eval-harness for the checkpoint path (it does run offline on the local jsonl,
see FACTS.md): (1) its gsm8k task prompts "Question: ...\\nAnswer:" with few-shot examples
from the train split and cuts generations at "Question:", while our policies are trained on
the chat template with the bare question, so it would measure a different prompt format
than the one PPO optimised and the responses-file path sees; (2) the regression test is
paired per question (candidate - baseline on the same seeded subset), which needs our own
per-question verdicts from both paths anyway, and the responses-file path has no model for
lm-eval to run; (3) it adds ~35 packages (evaluate, sacrebleu, nltk, rouge-score, ...) to a
gate that needs torch + transformers only. Its answer regexes ("strict-match" after "####",
"flexible-extract" last number anywhere) are close to ours; `lm_eval_agreement` compares
the two on the same outputs when lm-eval happens to be installed. Measured with lm-eval
0.4.13 on the 1,319 test solutions: gold solutions "... #### N" agree 1319/1319 under both
of its filters; solutions ending "The answer is N." agree 1319/1319 with flexible-extract
(strict-match finds no marker: 0/1319, by design); solutions ending "The answer is
$N.00." are right for us and wrong for lm-eval (it compares strings, "18.00" != "18", we
compare numbers); a wrong final "#### N+1" is wrong for both (1319/1319 agree).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nemo_rlhf.data.gsm8k import MathProblem, answers_match, extract_final_answer, load_gsm8k
from nemo_rlhf.errors import UserError
from nemo_rlhf.gate.bootstrap import Interval, mean_ci
from nemo_rlhf.gate.findings import Finding
from nemo_rlhf.spec.paths import data_path, data_root

GSM8K_TEST = "gsm8k/test.jsonl"
DETECTOR = "capability_regression"


def exact_match(texts: Sequence[str], problems: Sequence[MathProblem]) -> list[bool]:
    """Per-response exact match of the extracted final answer against the gold answer."""
    if len(texts) != len(problems):
        raise ValueError(f"{len(texts)} responses for {len(problems)} problems")
    return [answers_match(extract_final_answer(t), p.final_answer) for t, p in zip(texts, problems)]


def gsm8k_subset(n: int, seed: int, path: str | Path | None = None) -> list[MathProblem]:
    """A fixed subset of the GSM8K test set: `n` questions drawn with `seed`, in file order.

    Args:
        n: subset size (0 or more than the file holds = the whole set).
        seed: the draw's seed; the same seed always gives the same questions.
        path: the test jsonl; default `gsm8k/test.jsonl` under the data root.
    """
    problems = load_gsm8k(path or data_path(data_root("auto"), GSM8K_TEST))
    if not n or n >= len(problems):
        return problems
    keep = sorted(random.Random(seed).sample(range(len(problems)), n))
    return [problems[i] for i in keep]


def _normalise_text(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


@dataclass
class RowMatch:
    """Responses rows matched to GSM8K questions.

    Attributes:
        problems: the matched questions, one per kept row (first row per question).
        responses: the responses, aligned with `problems`.
        not_gsm8k: rows whose prompt contains no GSM8K test question (chat prompts etc.).
        duplicates: further rows for a question already matched (ignored).
    """

    problems: list[MathProblem] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    not_gsm8k: int = 0
    duplicates: int = 0


def match_rows(rows: Sequence[dict], problems: Sequence[MathProblem]) -> RowMatch:
    """Finds the GSM8K question in each row's prompt (exact after whitespace, else contained)."""
    by_text = {_normalise_text(p.question): p for p in problems}
    out, seen = RowMatch(), set()
    for row in rows:
        prompt = _normalise_text(row["prompt"])
        problem = by_text.get(prompt) or next((p for q, p in by_text.items() if q in prompt), None)
        if problem is None:
            out.not_gsm8k += 1
        elif problem.source_line in seen:
            out.duplicates += 1
        else:
            seen.add(problem.source_line)
            out.problems.append(problem)
            out.responses.append(row["response"])
    return out


@dataclass
class GSM8KScore:
    """One model's exact match on a set of GSM8K questions.

    Attributes:
        correct: per question (keyed by the question's test-file line).
        accuracy: bootstrap interval of the mean.
        not_gsm8k: responses rows that were not GSM8K questions (0 for checkpoints).
        responses: the response text per question line (for the bad-case export).
        problems: the question per line.
    """

    correct: dict[int, bool]
    accuracy: Interval
    not_gsm8k: int = 0
    responses: dict[int, str] = field(default_factory=dict)
    problems: dict[int, MathProblem] = field(default_factory=dict)


def score_responses(
    problems: Sequence[MathProblem], responses: Sequence[str], n_boot: int = 2000, seed: int = 0, not_gsm8k: int = 0
) -> GSM8KScore:
    """Exact match of responses aligned with `problems`, with an accuracy interval."""
    correct = exact_match(responses, problems)
    if not correct:
        raise ValueError("no GSM8K responses to score")
    keys = [p.source_line for p in problems]
    return GSM8KScore(
        correct=dict(zip(keys, correct)),
        accuracy=mean_ci([float(c) for c in correct], n_boot=n_boot, seed=seed),
        not_gsm8k=not_gsm8k,
        responses=dict(zip(keys, responses)),
        problems=dict(zip(keys, problems)),
    )


def score_rows(rows: Sequence[dict], problems: Sequence[MathProblem] | None = None, **kwargs) -> GSM8KScore | None:
    """Scores the GSM8K rows of a responses file; None when none of its rows are GSM8K.

    Args:
        rows: responses rows (`prompt`, `response`).
        problems: questions to match against; default the whole GSM8K test set.
        **kwargs: `n_boot`, `seed` for the accuracy interval.
    """
    match = match_rows(rows, problems if problems is not None else gsm8k_subset(0, 0))
    if not match.problems:
        return None
    return score_responses(match.problems, match.responses, not_gsm8k=match.not_gsm8k, **kwargs)


def checkpoint_responses(
    model_dir: str | Path,
    prompts: Sequence[str | list[dict]],
    max_new_tokens: int = 256,
    batch_size: int = 8,
    seed: int = 0,
    desc: str = "generating",
) -> list[dict]:
    """Greedy responses of an HF checkpoint, as responses rows.

    A prompt is a user question (the single user turn of the tokenizer's chat template, as
    in SFT and PPO) or a conversation (a list of `{"role", "content"}` messages, e.g. a
    held-out hh-rlhf prompt). Generation is batched, left-padded and greedy, so the result
    is deterministic.

    Returns:
        Rows `{"prompt", "response", "finished"}` in the order of `prompts`; `prompt` is the
        question as given, or the rendered conversation.
    """
    from transformers import AutoModelForCausalLM

    from nemo_rlhf.data.examples import build_prompt_rows
    from nemo_rlhf.generation import compute_device, generate
    from nemo_rlhf.stages.training import load_tokenizer

    tokenizer = load_tokenizer(Path(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(compute_device())
    messages = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
    prompt_rows, _ = build_prompt_rows(tokenizer, messages, 1 << 20)
    out = generate(
        model, tokenizer, [r["input_ids"] for r in prompt_rows], max_new_tokens, batch_size, False, seed, desc
    )
    return [
        {"prompt": p if isinstance(p, str) else r["prompt_text"], "response": g.text, "finished": g.finished}
        for p, r, g in zip(prompts, prompt_rows, out)
    ]


def score_checkpoint(
    model_dir: str | Path, problems: Sequence[MathProblem], n_boot: int = 2000, seed: int = 0, **generation
) -> GSM8KScore:
    """Generates on `problems` with `checkpoint_responses` and scores the answers."""
    rows = checkpoint_responses(model_dir, [p.question for p in problems], seed=seed, desc="gsm8k", **generation)
    return score_responses(problems, [r["response"] for r in rows], n_boot=n_boot, seed=seed)


@dataclass
class LmEvalAgreement:
    """How often lm-eval's gsm8k scoring and ours give the same verdict on the same outputs.

    Attributes:
        n: responses compared.
        agree: filter name ("strict-match", "flexible-extract") -> same verdict as ours.
        lm_eval_correct: filter name -> responses lm-eval scores correct.
        ours_correct: responses we score correct.
        disagreements: filter name -> up to 10 `(index, lm-eval's extraction, ours)`.
    """

    n: int
    agree: dict[str, int]
    lm_eval_correct: dict[str, int]
    ours_correct: int
    disagreements: dict[str, list[tuple[int, str, str | None]]]


def lm_eval_agreement(texts: Sequence[str], problems: Sequence[MathProblem]) -> LmEvalAgreement:
    """Scores `texts` with lm-eval's own gsm8k filters and exact_match, and compares with ours.

    Reads the filters and metric options from the installed lm-eval's `gsm8k.yaml`, so
    the comparison follows whatever version is installed. lm-eval is not a dependency:
    install `lm-eval` to use this.
    """
    try:
        import lm_eval
        from lm_eval.api.metrics import exact_match_hf_evaluate
        from lm_eval.filters.extraction import RegexFilter
    except ImportError:
        raise UserError(
            "lm-eval is not installed", where="lm_eval_agreement", fix="pip install -c constraints.txt lm-eval"
        ) from None
    import yaml

    task = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml").read_text())
    metric = next(m for m in task["metric_list"] if m["metric"] == "exact_match")
    options = {k: metric[k] for k in ("regexes_to_ignore", "ignore_case", "ignore_punctuation") if k in metric}
    ours = exact_match(texts, problems)
    result = LmEvalAgreement(len(ours), {}, {}, sum(ours), {})
    for entry in task["filter_list"]:
        regex = next(f for f in entry["filter"] if f["function"] == "regex")
        extractor = RegexFilter(regex["regex_pattern"], regex.get("group_select", 0))
        extracted = [extractor.apply([[t]], [{}])[0][0] for t in texts]
        theirs = [
            bool(exact_match_hf_evaluate([x], [p.answer], **options)["exact_match"])
            for x, p in zip(extracted, problems)
        ]
        name = entry["name"]
        result.agree[name] = sum(a == b for a, b in zip(theirs, ours))
        result.lm_eval_correct[name] = sum(theirs)
        result.disagreements[name] = [
            (i, extracted[i], extract_final_answer(texts[i])) for i in range(len(ours)) if theirs[i] != ours[i]
        ][:10]
    return result


@dataclass
class CapabilityComparison:
    """Candidate vs baseline on the questions both answered."""

    n: int
    candidate: float
    baseline: float
    difference: Interval  # paired bootstrap of candidate - baseline
    regressed_lines: list[int]  # questions the baseline got right and the candidate wrong


def compare(
    candidate: GSM8KScore, baseline: GSM8KScore, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05
) -> CapabilityComparison:
    """Paired bootstrap over the shared questions: resampling a question keeps both verdicts."""
    shared = sorted(set(candidate.correct) & set(baseline.correct))
    if not shared:
        raise ValueError("candidate and baseline share no GSM8K question")
    cand = [float(candidate.correct[k]) for k in shared]
    base = [float(baseline.correct[k]) for k in shared]
    diff = mean_ci([c - b for c, b in zip(cand, base)], n_boot=n_boot, seed=seed, alpha=alpha)
    return CapabilityComparison(
        n=len(shared),
        candidate=sum(cand) / len(shared),
        baseline=sum(base) / len(shared),
        difference=diff,
        regressed_lines=[k for k in shared if baseline.correct[k] and not candidate.correct[k]],
    )


def capability_finding(
    candidate: GSM8KScore,
    baseline: GSM8KScore,
    capability_drop: float = 0.0,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
    max_cases: int = 20,
) -> Finding:
    """The `capability_regression` finding.

    fail: the whole confidence interval of (candidate - baseline) lies below
    `-capability_drop` (a drop larger than the tolerated margin, beyond sampling noise);
    warn: the point estimate drops more than the margin but the interval still allows no
    such drop (too few questions to tell); info otherwise.
    """
    cmp = compare(candidate, baseline, n_boot=n_boot, seed=seed, alpha=alpha)
    d = cmp.difference
    if d.high < -capability_drop:
        severity, verdict = "fail", "a regression beyond the interval"
    elif d.estimate < -capability_drop:
        severity, verdict = "warn", "a drop the interval cannot confirm (more questions would tell)"
    else:
        severity, verdict = "info", "no regression"
    message = (
        f"GSM8K exact match {cmp.candidate:.3f} vs baseline {cmp.baseline:.3f} on {cmp.n} shared questions: "
        f"difference {d.estimate:+.3f}, {d.level:.0%} CI [{d.low:+.3f}, {d.high:+.3f}], "
        f"tolerated drop {capability_drop:.3f}: {verdict}"
    )
    skipped = {"candidate": candidate.not_gsm8k, "baseline": baseline.not_gsm8k}
    if any(skipped.values()):
        message += f" ({skipped['candidate']} candidate / {skipped['baseline']} baseline rows were not GSM8K questions)"
    cases = []
    for k in cmp.regressed_lines[:max_cases]:
        problem, response = candidate.problems[k], candidate.responses[k]
        why = f"baseline right, candidate answered {extract_final_answer(response)} (gold {problem.final_answer})"
        cases.append(
            {
                "prompt": problem.question,
                "response": response,
                "baseline_response": baseline.responses[k],
                "why": why,
                "gsm8k_line": k,
            }
        )
    return Finding(
        detector=DETECTOR,
        severity=severity,
        value=d.estimate,
        threshold=-capability_drop,
        message=message,
        details={
            "n": cmp.n,
            "candidate_exact_match": cmp.candidate,
            "baseline_exact_match": cmp.baseline,
            "difference_ci": d.to_dict(),
            "candidate_ci": candidate.accuracy.to_dict(),
            "baseline_ci": baseline.accuracy.to_dict(),
            "not_gsm8k_rows": skipped,
            "regressed_questions": len(cmp.regressed_lines),
            "cases": cases,
        },
    )
