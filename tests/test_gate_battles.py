"""Gate layer 2: pairwise battles under a reward-model judge and an OpenAI-compatible chat judge."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from nemo_rlhf.errors import UserError
from nemo_rlhf.gate import battles
from nemo_rlhf.gate.judges import ChatJudge, RewardModelJudge, parse_choice
from nemo_rlhf.spec.paths import data_root

# ---------------------------------------------------------------- constructed battle set


def constructed_set():
    """60 prompts: the candidate is longer on 30, shorter on 6, equally long on 24.

    A judge that prefers the longer answer (and says "A" when the lengths are equal, a pure
    position bias) gives the candidate 30 wins, 6 losses and 24 ties: raw win rate 0.70,
    all of it explained by length, so the length-controlled win rate must be ~0.5.
    """
    prompts, cand, base = [], [], []
    for i in range(60):
        prompts.append(f"Question {i}: tell me something.")
        if i < 30:
            cand.append("long " * (20 + i % 7)), base.append("short " * (10 + i % 5))
        elif i < 36:
            cand.append("short " * 10), base.append("long " * (18 + i % 4))
        else:
            cand.append("same " * 15), base.append("also " * 15)
    return prompts, cand, base


class LongerJudge:
    """In-process stand-in with the same preference as the HTTP server below."""

    name = "longer"

    def prefer(self, prompts, a, b):
        return [float(len(x.split()) >= len(y.split())) for x, y in zip(a, b)]


def test_lc_win_rate_removes_a_pure_length_preference():
    result = battles.battle(LongerJudge(), *constructed_set(), n_boot=300)
    assert (result.wins, result.losses, result.ties, result.order_disagreements) == (30, 6, 24, 24)
    assert result.win_rate.estimate == pytest.approx(0.70)
    assert abs(result.lc_win_rate.estimate - 0.5) < 0.03 and result.length_coefficient > 2
    gap = battles.length_gap_finding(result, lc_max_gap=0.1)
    assert gap.detector == "length_controlled_gap" and gap.severity == "warn" and gap.value > 0.15


def test_lc_win_rate_equals_raw_when_length_does_not_matter():
    rng = np.random.default_rng(0)
    outcomes = (rng.random(400) < 0.7).astype(float)
    term = np.tanh(rng.normal(size=400))
    lc, coef = battles.lc_win_rate(outcomes, term)
    assert abs(lc - outcomes.mean()) < 0.03 and abs(coef) < 0.5
    # All wins, no length difference: finite and near 1.
    assert battles.lc_win_rate(np.ones(20), np.zeros(20))[0] > 0.95


def test_pair_rows_and_round_robin_names():
    a = [{"prompt": "p1", "response": "a1"}, {"prompt": "p2", "response": "a2"}, {"prompt": "p3", "response": "a3"}]
    b = [{"prompt": "p2", "response": "b2"}, {"prompt": "p1", "response": "b1"}, {"prompt": "p4", "response": "b4"}]
    pairing = battles.pair_rows(a, b)
    assert pairing.prompts == ["p1", "p2"] and pairing.baseline == ["b1", "b2"]
    assert (pairing.unmatched_candidate, pairing.unmatched_baseline) == (1, 1)
    results = battles.round_robin(LongerJudge(), {"base": b, "sft": a, "rlhf": a}, n_boot=50)
    assert [(r.candidate, r.baseline) for r in results] == [("sft", "base"), ("rlhf", "base"), ("rlhf", "sft")]


def test_preference_finding_severities():
    prompts = [f"p{i}" for i in range(80)]
    lose = battles.battle(LongerJudge(), prompts, ["a"] * 80, ["b b"] * 80, n_boot=200)
    lost = battles.preference_finding(lose)
    assert lost.severity == "fail" and lose.win_rate.estimate == 0.0
    assert lost.details["cases"][0] == {
        "prompt": "p0",
        "response": "a",
        "baseline_response": "b b",
        "why": "longer preferred baseline in both orders",
    }
    win = battles.battle(LongerJudge(), prompts, ["a a"] * 80, ["b"] * 80, n_boot=200)
    assert battles.preference_finding(win).severity == "info"
    mixed = battles.battle(LongerJudge(), prompts[:8], ["a a", "a"] * 4, ["b", "b b"] * 4, n_boot=200)
    assert battles.preference_finding(mixed).severity == "warn"


# ---------------------------------------------------------------- reward-model judge


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny_rm")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(data_root("auto") / "tokenizers/gpt2/tokenizer.json"),
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        n_positions=256,
        vocab_size=len(tokenizer),
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    GPT2ForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_reward_model_battle_is_deterministic_and_symmetric(tiny_rm):
    prompts, cand, base = constructed_set()
    prompts, cand, base = prompts[:16], cand[:16], [f"A different answer number {i}." for i in range(16)]
    judge = RewardModelJudge(tiny_rm, batch_size=4)
    first = battles.battle(judge, prompts, cand, base, n_boot=100)
    again = battles.battle(RewardModelJudge(tiny_rm, batch_size=16), prompts, cand, base, n_boot=100)
    assert first.outcomes == again.outcomes and first.win_rate == again.win_rate
    swapped = battles.battle(judge, prompts, base, cand, n_boot=100)
    assert swapped.outcomes == [1.0 - o for o in first.outcomes]
    assert first.order_disagreements == 0 and first.wins + swapped.wins == 16
    # Scores do not depend on batch composition (padding) beyond float noise.
    alone = RewardModelJudge(tiny_rm, batch_size=1).scores(prompts[:3], cand[:3])
    assert np.allclose(alone, judge.scores(prompts[:3], cand[:3]), atol=1e-5)


def test_reward_model_judge_rejects_a_non_model_dir(tmp_path):
    with pytest.raises(UserError, match="config.json"):
        RewardModelJudge(tmp_path)


# ---------------------------------------------------------------- OpenAI-compatible judge

_SECTION = re.compile(r"\[Response A\]\n(.*?)\n\n\[Response B\]\n(.*?)\n\nWhich response", re.DOTALL)


class _Handler(BaseHTTPRequestHandler):
    """chat/completions stand-in: prefers the longer response, says "A" on equal lengths."""

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path.endswith("/broken/chat/completions"):
            return self._send(500, {"error": "boom"})
        if self.path.endswith("/slow/chat/completions"):
            time.sleep(1.0)
        a, b = _SECTION.search(body["messages"][-1]["content"]).groups()
        choice = "A" if len(a.split()) >= len(b.split()) else "B"
        self._send(200, {"choices": [{"message": {"role": "assistant", "content": f"{choice}"}}]})

    def _send(self, code, payload):
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # the timeout test's client hangs up before the slow answer: a broken pipe is expected


@pytest.fixture(scope="module")
def judge_server():
    server = _QuietServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_chat_judge_win_rate_and_length_control(judge_server):
    result = battles.battle(ChatJudge(f"{judge_server}/v1"), *constructed_set(), n_boot=300)
    assert (result.wins, result.losses, result.ties) == (30, 6, 24)
    assert result.order_disagreements == 24 and result.unparsed == 0  # the equal-length position bias, cancelled
    assert result.win_rate.estimate == pytest.approx(0.70) and result.win_rate.low > 0.5
    assert abs(result.lc_win_rate.estimate - 0.5) < 0.03
    assert battles.preference_finding(result).severity == "info"
    assert battles.length_gap_finding(result).severity == "warn"


def test_chat_judge_errors_are_user_errors(judge_server):
    with pytest.raises(UserError, match="HTTP 500"):
        ChatJudge(f"{judge_server}/broken").ask("p", "a", "b")
    with pytest.raises(UserError, match="timed out"):
        ChatJudge(f"{judge_server}/slow", timeout=0.2).ask("p", "a", "b")
    with pytest.raises(UserError, match="unreachable"):
        ChatJudge("http://127.0.0.1:9/v1", timeout=2).ask("p", "a", "b")
    with pytest.raises(UserError, match="http"):
        ChatJudge("127.0.0.1:8000")


@pytest.mark.parametrize(
    "text, choice",
    [("A", 1.0), ("B", 0.0), ("Response B is better.", 0.0), ("**A**", 1.0), ("Neither", None), ("", None)],
)
def test_parse_choice(text, choice):
    assert parse_choice(text) == choice


def test_reward_model_text_uses_the_chat_template_unless_the_prompt_is_rendered(tiny_rm):
    judge = RewardModelJudge(tiny_rm)
    assert judge.text("Human: hi\n\nAssistant:", " yo") == "Human: hi\n\nAssistant: yo"  # no template: concatenated
    judge.tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
    assert judge.text("hi", "yo") == "<user>hi\n<assistant>yo\n"
    assert judge.text("<|endoftext|>hi", "yo") == "<|endoftext|>hiyo"  # already rendered: kept as is
