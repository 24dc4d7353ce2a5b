"""Judges for pairwise battles: a reward model, or an OpenAI-compatible chat endpoint.

A judge answers one question per prompt: is response A better than response B? Its
`prefer(prompts, a, b)` returns 1.0 (A), 0.0 (B), 0.5 (no preference) or None (the judge's
answer could not be read). `battles.battle` asks in both orders to cancel position bias.

- `RewardModelJudge`: an HF reward model dir (AutoModelForSequenceClassification, one
  label). Each prompt + response is scored once (the order of A and B cannot matter), in
  batches, rendered with the tokenizer's chat template when it has one and the prompt is
  not already rendered.
- `ChatJudge`: an OpenAI-compatible `/chat/completions` endpoint (off by default; a URL
  must be given). Temperature 0, the answer is the first standalone "A" or "B".
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

from nemo_rlhf.errors import UserError


class RewardModelJudge:
    """Prefers the response the reward model scores higher (ties within `tie_margin`)."""

    def __init__(self, model_dir: str | Path, batch_size: int = 8, max_length: int = 1024, tie_margin: float = 0.0):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from nemo_rlhf.generation import compute_device

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise UserError(
                "not a Hugging Face model directory (no config.json)",
                where=str(model_dir),
                fix="pass the reward model's HF dir (the rm stage's model/ folder)",
            )
        self.name = f"reward model {model_dir}"
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "left"  # the score is read at the end: keep the response
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1).eval()
        self.model.to(compute_device())
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        # Never past the model's positions: a longer text would index past its position table.
        positions = getattr(self.model.config, "max_position_embeddings", None) or getattr(
            self.model.config, "n_positions", None
        )
        self.max_length = min(max_length, positions) if positions else max_length
        self.batch_size, self.tie_margin = batch_size, tie_margin
        self._torch = torch
        self._cache: dict[tuple[str, str], float] = {}

    def text(self, prompt: str, response: str) -> str:
        """The string the reward model reads for one prompt + response."""
        tok = self.tokenizer
        rendered = any(t and t in prompt for t in tok.all_special_tokens)
        if getattr(tok, "chat_template", None) and not rendered:
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            return tok.apply_chat_template(messages, tokenize=False)
        return prompt + response

    def scores(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """Reward per (prompt, response), computed once each and cached."""
        todo = sorted({(p, r) for p, r in zip(prompts, responses)} - set(self._cache))
        batches = [todo[i : i + self.batch_size] for i in range(0, len(todo), self.batch_size)]
        with self._torch.no_grad():
            for batch in tqdm(batches, desc="judge: reward model", leave=False):
                enc = self.tokenizer(
                    [self.text(p, r) for p, r in batch],
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    add_special_tokens=False,
                )
                logits = self.model(**enc.to(self.model.device)).logits.float().squeeze(-1)
                self._cache.update(zip(batch, logits.tolist()))
        return [self._cache[(p, r)] for p, r in zip(prompts, responses)]

    def prefer(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[float | None]:
        sa, sb = self.scores(prompts, a), self.scores(prompts, b)
        return [0.5 if abs(x - y) <= self.tie_margin else float(x > y) for x, y in zip(sa, sb)]


JUDGE_PROMPT = """You are comparing two responses to the same user prompt. Decide which response is more \
helpful, honest and harmless. Answer with a single letter: A or B.

[Prompt]
{prompt}

[Response A]
{a}

[Response B]
{b}

Which response is better? Answer A or B."""

_CHOICE = re.compile(r"\b([AB])\b")


def parse_choice(content: str) -> float | None:
    """1.0 for "A", 0.0 for "B" (the first standalone letter), None when neither appears."""
    match = _CHOICE.search(content or "")
    return None if match is None else float(match.group(1) == "A")


class ChatJudge:
    """An OpenAI-compatible chat-completions endpoint as the judge.

    Args:
        url: the endpoint, either the full `.../chat/completions` URL or the API base
            (`http://host:port/v1`), to which `/chat/completions` is appended.
        model: the model name sent in the request.
        api_key: sent as a Bearer token when given.
        timeout: seconds per request.
        concurrency: requests in flight at once (answers keep the prompts' order).
    """

    def __init__(
        self, url: str, model: str = "judge", api_key: str | None = None, timeout: float = 60.0, concurrency: int = 4
    ):
        if not url.startswith(("http://", "https://")):
            raise UserError(
                f"judge URL must start with http:// or https://, got {url!r}",
                where="judge url",
                fix="pass the endpoint, e.g. http://127.0.0.1:8000/v1",
            )
        self.url = url if url.rstrip("/").endswith("/chat/completions") else url.rstrip("/") + "/chat/completions"
        self.name = f"chat judge {model} at {self.url}"
        self.model, self.api_key, self.timeout, self.concurrency = model, api_key, timeout, max(1, concurrency)

    def ask(self, prompt: str, a: str, b: str) -> str:
        """One request; returns the reply's text. Network and protocol problems are UserErrors."""
        body = {
            "model": self.model,
            "temperature": 0,
            "max_tokens": 8,
            "messages": [{"role": "user", "content": JUDGE_PROMPT.format(prompt=prompt, a=a, b=b)}],
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        fix = "check the judge URL, that the server is up and serves OpenAI-style /chat/completions"
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                reply = json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as err:
            detail = err.read().decode("utf-8", "replace")[:200]
            raise UserError(f"judge endpoint answered HTTP {err.code}: {detail}", where=self.url, fix=fix) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
            reason = getattr(err, "reason", err)
            raise UserError(
                f"judge endpoint unreachable or timed out after {self.timeout:g} s: {reason}", where=self.url, fix=fix
            ) from None
        except json.JSONDecodeError:
            raise UserError("judge endpoint did not answer JSON", where=self.url, fix=fix) from None
        try:
            return reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise UserError(
                f"judge reply has no choices[0].message.content: {str(reply)[:200]}", where=self.url, fix=fix
            ) from None

    def prefer(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[float | None]:
        triples = list(zip(prompts, a, b))
        with ThreadPoolExecutor(self.concurrency) as pool:
            answers = pool.map(lambda t: self.ask(*t), triples)  # in order; the first error propagates
            return [
                parse_choice(x) for x in tqdm(answers, total=len(triples), desc="judge: chat endpoint", leave=False)
            ]
