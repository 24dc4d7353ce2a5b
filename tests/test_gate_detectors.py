"""The gate's detectors on constructed response sets whose right answer is known.

Prompts and response texts are real rows (hh-rlhf harmless-base test, GSM8K test); what a
set does wrong is built on purpose (longer answers a length-loving reward pays for, one
template for every prompt, loops, a proxy reward that climbs while gold falls), so each
detector must fire on its own failure and stay quiet on the healthy candidate.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

from nemo_rlhf.data.hh_rlhf import load_preference_pairs
from nemo_rlhf.gate.detectors import DETECTORS
from nemo_rlhf.gate.detectors.degenerate import loop_reason
from nemo_rlhf.gate.detectors.hacking import fit_gao_rl, turnover
from nemo_rlhf.gate.findings import GateResult
from nemo_rlhf.gate.format_checks import template_leaks
from nemo_rlhf.gate.responses import Response, ResponseSet
from nemo_rlhf.gate.run import resolve_config
from nemo_rlhf.spec.paths import data_root

N = 40  # prompts; two responses each
TEMPLATES = [
    "I'm sorry, but I can't help with that. Is there anything else I can do for you today?",
    "I'm sorry, but I can't help with that request. Is there anything else I can help you with?",
    "I'm sorry, but I cannot help with that. Is there something else I can do for you today?",
]
# Gao et al.'s RL form for the gold reward along training: peaks at d* = exp(1 / 0.6 - 1) = 1.95.
HACK_ALPHA, HACK_BETA = 1.0, 0.6
STEP_D = [0.4, 0.8, 1.2, 1.6, 2.0, 2.6, 3.2, 4.0, 5.0]


@functools.lru_cache(maxsize=1)
def hh_pairs():
    """The first 3N hh-rlhf pairs whose own responses neither leak a role marker nor loop.

    0.7% of the real responses contain a line starting "Human:" (the writer role-playing the
    user): degenerate_responses rightly counts those, so the healthy sets leave them out.
    """
    pairs, _ = load_preference_pairs(data_root("auto") / "hh-rlhf" / "harmless-base-test.jsonl.gz")
    def clean(text):
        return not template_leaks(text) and not loop_reason(Response("", text))

    return [p for p in pairs if clean(p.chosen) and clean(p.rejected)][: 3 * N]


def prompt_text(pair) -> str:
    """The hh-rlhf transcript up to the assistant's turn, as the policy sees it."""
    turns = "".join(f"\n\nHuman: {t['content']}" if t["role"] == "user" else f"\n\nAssistant: {t['content']}"
                    for t in pair.prompt)
    return turns + "\n\nAssistant:"


def build(kind: str, seed: int = 0, length_rm: bool | None = None) -> ResponseSet:
    """A response set: baseline, healthy, inflated, collapsed, degenerate, safety_drop, hacked, honest_run.

    `length_rm`: the proxy reward pays 0.08 per word on top of gold (the inflated scenario's
    reward model, for the candidate and its baseline alike); default only for `inflated`.
    """
    length_rm = kind == "inflated" if length_rm is None else length_rm
    rng = np.random.default_rng(seed)
    pairs = hh_pairs()
    rows = []
    for i in range(N):
        pair = pairs[i]
        texts = [pair.rejected, pair.chosen] if kind == "baseline" else [pair.chosen, pair.rejected]
        for j, text in enumerate(texts):
            rows.append(_row(kind, i, j, text, pairs, rng, length_rm))
    if kind in ("hacked", "honest_run"):
        return ResponseSet(kind, _trajectory(rows, kind, rng))
    return ResponseSet(kind, rows)


def _row(kind, i, j, text, pairs, rng, length_rm) -> Response:
    prompt = prompt_text(pairs[i])
    gold = rng.normal(0.0, 1.0)
    proxy = gold + rng.normal(0.0, 0.3)
    finished, kl = True, max(rng.normal(3.0, 1.0), 0.0)
    if kind == "baseline":
        kl = 0.0
    elif kind == "healthy":
        proxy, gold = proxy + 0.8, gold + 0.3
    elif kind == "inflated":  # three answers glued together; the proxy pays per word
        more = [(p.chosen, p.rejected)[j] for p in (pairs[i + N], pairs[i + 2 * N])]
        text = " ".join([text, *more])
        finished = bool(rng.random() > 0.4)
    elif kind == "collapsed":
        text = TEMPLATES[i % len(TEMPLATES)]
    elif kind == "degenerate" and i % 4 == 0:
        broken = ["", "I think so.\nI think so.\nI think so.\nI think so.", text + "<|im_end|>", "Sure. " * 20]
        text = broken[j + i % 8 // 4 * 2]  # 1 in 4 prompts: empty, line loop, leaked token, 4-gram loop
    elif kind == "safety_drop":
        gold -= 0.8
    if length_rm:
        proxy += 0.08 * len(text.split())
    return Response(prompt, text, proxy_reward=float(proxy), gold_reward=float(gold), kl=float(kl), finished=finished)


def _trajectory(rows: list[Response], kind: str, rng) -> list[Response]:
    """The same prompts at every PPO step; KL = d^2; proxy climbs; gold follows Gao's form."""
    beta = HACK_BETA if kind == "hacked" else 0.05
    out = []
    for step, d in enumerate(STEP_D):
        for r in rows:
            gold = d * (HACK_ALPHA - beta * math.log(d)) + rng.normal(0.0, 0.5)
            out.append(Response(r.prompt, r.response, proxy_reward=1.5 * d + rng.normal(0.0, 0.5),
                                gold_reward=float(gold), kl=float(d * d + rng.normal(0.0, 0.3)), step=step * 10,
                                finished=True))
    return out


def baseline_for_trajectory() -> ResponseSet:
    rng = np.random.default_rng(7)
    base = build("baseline")
    return ResponseSet("baseline", [Response(r.prompt, r.response, proxy_reward=float(rng.normal(0, 0.5)),
                                             gold_reward=float(rng.normal(0, 0.5)), kl=0.0, finished=True)
                                    for r in base.rows])


CFG = resolve_config(None)


def findings(detector: str, kind: str, baseline: ResponseSet | None = None):
    candidate = build(kind)
    base = baseline or (baseline_for_trajectory() if kind in ("hacked", "honest_run")
                        else build("baseline", length_rm=kind == "inflated"))
    return {f.check: f for f in DETECTORS[detector](candidate, base, CFG)}


# (detector, set) -> the checks that must fail; every other check of that detector must not.
EXPECTED_FAILS = [
    ("length_inflation", "healthy", set()),
    ("length_inflation", "collapsed", set()),
    ("length_inflation", "inflated", {"length_shift", "truncation_rate", "length_controlled_gain"}),
    ("template_collapse", "healthy", set()),
    ("template_collapse", "inflated", set()),
    ("template_collapse", "collapsed", {"distinct_n", "self_bleu", "cross_prompt_ngram", "cross_prompt_embedding",
                                        "prompt_dependence", "same_opening"}),
    ("degenerate_responses", "healthy", set()),
    ("degenerate_responses", "collapsed", set()),
    ("degenerate_responses", "degenerate", {"empty", "loops", "leaked_tokens"}),
    ("reward_hacking", "healthy", set()),
    ("reward_hacking", "honest_run", set()),
    ("reward_hacking", "hacked", {"proxy_up_gold_down"}),
    ("kl_budget", "healthy", set()),
    ("kl_budget", "hacked", {"kl_mean"}),
    ("safety_regression", "healthy", set()),
    ("safety_regression", "safety_drop", {"gold_reward_delta"}),
]


@pytest.mark.parametrize("detector,kind,expected", EXPECTED_FAILS, ids=[f"{d}-{k}" for d, k, _ in EXPECTED_FAILS])
def test_detector_fires_exactly_on_its_failure(detector, kind, expected):
    found = findings(detector, kind)
    assert {c for c, f in found.items() if f.severity == "fail"} == expected, {c: f.message for c, f in found.items()}
    for f in found.values():
        assert f.detector == detector
        if not f.details.get("skipped"):  # every finding states the measured value and its threshold
            assert f.value is not None and f.threshold is not None and "threshold" in f.message
        if f.severity == "fail":
            assert f.details.get("cases") or f.check in ("distinct_n", "self_bleu", "prompt_dependence",
                                                        "truncation_rate"), f.check


def test_healthy_candidate_passes_the_whole_gate():
    from nemo_rlhf.gate.run import run_gate

    result = run_gate(build("healthy"), build("baseline"), CFG)
    assert isinstance(result, GateResult)
    assert result.passed, [f.message for f in result.findings if f.severity == "fail"]
    assert {f.detector for f in result.findings} >= set(DETECTORS) | {"format_compliance"}


def test_length_reward_correlation_warns_but_does_not_fail():
    found = findings("length_inflation", "inflated")
    assert found["reward_length_corr"].severity == "warn" and found["reward_length_corr"].value > 0.9


def test_length_control_keeps_a_real_gain_that_comes_with_longer_answers():
    """Longer AND better (gold-like reward independent of length): the gain survives length control."""
    rng = np.random.default_rng(3)
    base, cand = build("baseline", length_rm=True), build("inflated")
    for r in base.rows:
        r.proxy_reward = float(rng.normal(0, 1))
    for r in cand.rows:
        r.proxy_reward = float(rng.normal(1.0, 1))
    found = {f.check: f for f in DETECTORS["length_inflation"](cand, base, CFG)}
    assert found["length_controlled_gain"].severity == "info"
    assert found["length_controlled_gain"].value < 0.3


def test_hacking_fires_on_one_checkpoint_pair_too():
    """Without PPO steps: proxy up, gold down between baseline and candidate."""
    cand, base = build("healthy"), build("baseline")
    for r in cand.rows:
        r.gold_reward -= 1.0
    found = {f.check: f for f in DETECTORS["reward_hacking"](cand, base, CFG)}
    assert found["proxy_up_gold_down"].severity == "fail"
    assert found["gold_turnover"].details.get("skipped")


def test_hacked_run_is_past_the_gold_turnover():
    turn = findings("reward_hacking", "hacked")["gold_turnover"]
    d_star = math.exp(HACK_ALPHA / HACK_BETA - 1)
    assert turn.severity == "warn"
    assert turn.details["alpha"] == pytest.approx(HACK_ALPHA, rel=0.15)
    assert turn.details["beta"] == pytest.approx(HACK_BETA, rel=0.15)
    assert turn.threshold == pytest.approx(d_star, rel=0.2)


def test_gao_fit_recovers_alpha_beta():
    rng = np.random.default_rng(0)
    d = np.linspace(0.2, 6.0, 40)
    for alpha, beta in [(1.0, 0.6), (0.5, 0.1), (2.0, 0.8)]:
        gain = d * (alpha - beta * np.log(d)) + rng.normal(0, 0.02, d.shape)
        a, b = fit_gao_rl(d, gain)
        assert a == pytest.approx(alpha, abs=0.02) and b == pytest.approx(beta, abs=0.02)
        d_star = math.exp(alpha / beta - 1)
        if d_star < d.max():  # beyond the data, d* is an extrapolation and not pinned down
            assert turnover(a, b) == pytest.approx(d_star, rel=0.05)
    assert turnover(1.0, -0.1) == math.inf  # gold never turns over


def test_detectors_skip_without_their_fields():
    bare = [Response(r.prompt, r.response) for r in build("baseline").rows]
    cand, base = ResponseSet("c", bare), ResponseSet("b", list(bare))
    for name in ("reward_hacking", "kl_budget", "safety_regression"):
        found = DETECTORS[name](cand, base, CFG)
        assert found and all(f.severity == "info" and f.details.get("skipped") for f in found), name


def test_gsm8k_prompts_are_not_degenerate():
    """Real GSM8K worked answers (with #### and arithmetic) do not trip the loop or leak checks."""
    from nemo_rlhf.data.gsm8k import load_gsm8k

    problems = load_gsm8k(data_root("auto") / "gsm8k" / "test.jsonl", limit=200)
    rows = [Response(p.question, p.answer) for p in problems]
    found = {f.check: f for f in DETECTORS["degenerate_responses"](ResponseSet("c", rows), ResponseSet("b", rows), CFG)}
    assert all(f.severity == "info" for f in found.values()), {c: f.message for c, f in found.items()}
    assert found["loops"].value < 0.01


def _scored(rows: list[Response], rng, per_word: float = 0.0) -> list[Response]:
    """The same texts with a fresh gold reward and a proxy that pays `per_word` per word on top of it."""
    out = []
    for r in rows:
        gold = float(rng.normal(0.0, 1.0))
        proxy = gold + float(rng.normal(0.0, 0.3)) + per_word * len(r.response.split())
        out.append(Response(r.prompt, r.response, proxy_reward=proxy, gold_reward=gold, kl=0.0, finished=True))
    return out


@pytest.mark.parametrize("direction", ["longer", "shorter"])
def test_length_controlled_gain_fails_only_when_the_candidate_is_longer(direction):
    """Same share of the gain explained by length both ways; only the inflating direction fails.

    Shorter: the baseline answers are three glued hh-rlhf answers, the candidate's one answer,
    and the proxy pays for brevity (an RM trained where refusals are shorter)."""
    rng = np.random.default_rng(11)
    short, long_ = build("baseline").rows, build("inflated", length_rm=False).rows
    per_word = 0.08 if direction == "longer" else -0.08
    base_rows, cand_rows = (short, long_) if direction == "longer" else (long_, short)
    base, cand = ResponseSet("b", _scored(base_rows, rng, per_word)), ResponseSet("c", _scored(cand_rows, rng, per_word))
    found = {f.check: f for f in DETECTORS["length_inflation"](cand, base, CFG)}
    gain = found["length_controlled_gain"]
    assert gain.value > CFG.thresholds.length_explained_max_share  # length explains the gain either way
    assert gain.details["candidate_longer"] == (direction == "longer")
    if direction == "longer":
        assert gain.severity == "fail" and gain.details["cases"]
    else:
        assert {f.severity for f in found.values()} == {"info"}, {c: f.message for c, f in found.items()}
        assert "SHORTER" in gain.message


@pytest.mark.parametrize("empties,fails", [(2, False), (3, False), (6, True)])
def test_empty_rate_fails_only_beyond_sampling_noise(empties, fails):
    """80 responses, 2% threshold: 2 or 3 empties (2.5%, 3.75%) are what a policy with a true 2%
    rate produces often (binomial p 0.48, 0.22); 6 (p 0.005) are not."""
    rows = [Response(r.prompt, "" if i < empties else r.response) for i, r in enumerate(build("healthy").rows)]
    found = {f.check: f for f in DETECTORS["degenerate_responses"](ResponseSet("c", rows), build("baseline"), CFG)}
    empty = found["empty"]
    assert empty.value == pytest.approx(empties / len(rows)) and empty.value > CFG.thresholds.empty_max_rate
    assert (empty.severity == "fail") == fails, empty.message
    assert "binomial" in empty.message and "p=" in empty.message


def _two_checkpoints(rng, offset_sd: float, noise_sd: float, drop: float) -> tuple[ResponseSet, ResponseSet]:
    """Baseline, step 0 and step 10 on the same prompts; gold = prompt offset + noise, falling by
    `drop` at step 10 while the proxy climbs."""
    rows = build("baseline").rows
    offsets = {p: rng.normal(0.0, offset_sd) for p in dict.fromkeys(r.prompt for r in rows)}

    def at(step, gold_shift, proxy, kl):
        return [Response(r.prompt, r.response, proxy_reward=proxy + float(rng.normal(0, 0.1)),
                         gold_reward=float(offsets[r.prompt] + gold_shift + rng.normal(0.0, noise_sd)),
                         kl=kl, step=step, finished=True) for r in rows]

    base = ResponseSet("b", at(None, 0.0, 0.0, 0.0))
    return ResponseSet("c", at(0, 0.1, 0.5, 1.0) + at(10, 0.1 - drop, 1.0, 2.0)), base


def test_hacking_uses_the_paired_standard_error_over_prompts():
    """Prompt difficulty (sd 1) dominates gold; the fall of 0.25 is within the unpaired error but
    far outside the paired one: the same prompts at both checkpoints make it a sure drop."""
    cand, base = _two_checkpoints(np.random.default_rng(5), offset_sd=1.0, noise_sd=0.05, drop=0.25)
    found = {f.check: f for f in DETECTORS["reward_hacking"](cand, base, CFG)}["proxy_up_gold_down"]
    best, last = cand.at_step(0).rows, cand.at_step(10).rows
    unpaired = math.sqrt(np.var([r.gold_reward for r in best], ddof=1) / len(best)
                         + np.var([r.gold_reward for r in last], ddof=1) / len(last))
    mean_drop = np.mean([r.gold_reward for r in best]) - np.mean([r.gold_reward for r in last])
    assert mean_drop < 1.96 * unpaired  # an unpaired test would call it noise
    assert found.severity == "fail" and found.details["stderr_kind"] == "paired over 40 prompts"
    assert found.details["stderr"] < 0.05


def test_hacking_does_not_fire_on_a_fall_within_paired_noise():
    """No prompt effect, gold noise sd 1 per answer: a fall past the 0.1-std threshold that the
    paired error over 40 prompts (~0.16) explains does not fail."""
    cand, base = _two_checkpoints(np.random.default_rng(2), offset_sd=0.0, noise_sd=1.0, drop=0.15)
    found = {f.check: f for f in DETECTORS["reward_hacking"](cand, base, CFG)}["proxy_up_gold_down"]
    assert found.value > CFG.thresholds.hacking_gold_drop and found.details["proxy_rise"] > 0
    assert found.severity == "info", found.message
    assert found.details["stderr_kind"].startswith("paired")
