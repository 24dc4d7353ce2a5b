"""Tokenized training examples for SFT, reward modelling and PPO.

We hand TRL datasets that are already tokenized (`input_ids` + `completion_mask` for SFT,
`chosen_ids`/`rejected_ids` for the reward model, prompt `input_ids` for PPO) so that the
data lint (`nemo_rlhf.data.lint`) checks exactly the tokens that get trained, and TRL's
own formatting never runs.

Every text goes through the tokenizer's chat template. Targets end with the EOS token
because generation stops there: ChatML templates append "\\n" after `<|im_end|>`, and that
newline is cut off so that the last trained token is EOS itself.

GSM8K SFT target: the worked answer with the calculator annotations ("<<48/2=24>>")
removed, keeping the final "#### N" line. The annotations are tool-use markup the policy
cannot execute, while "#### N" is what exact match reads (`extract_final_answer`), so the
policy must learn to write it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from nemo_rlhf.data.gsm8k import MathProblem
from nemo_rlhf.data.hh_rlhf import PreferencePair
from nemo_rlhf.errors import UserError

_CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")


def gsm8k_sft_target(answer: str) -> str:
    """The SFT response for a GSM8K answer: annotations removed, "#### N" kept."""
    return _CALCULATOR_ANNOTATION.sub("", answer).strip()


def math_prompt_messages(problem: MathProblem) -> list[dict]:
    """The chat prompt for a math problem; SFT and PPO share it so their prompts match."""
    return [{"role": "user", "content": problem.question}]


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """Applies the tokenizer's chat template to text (not ids)."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "the tokenizer has no chat template",
            where=getattr(tokenizer, "name_or_path", None) or "tokenizer",
            fix="set model.chat_template (e.g. chatml) in the spec",
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _ids(tokenizer, text: str) -> list[int]:
    # The chat template already wrote every special token; adding BOS/EOS again would
    # double them for tokenizers that add special tokens by default.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _prompt_and_completion(tokenizer, prompt_messages: list[dict], response: str) -> tuple[str, str]:
    """Renders `(prompt_text, completion_text)`; their concatenation is the full text.

    The full text is cut right after the last EOS that belongs to the completion. An EOS
    found only inside the prompt is not a cut point (that would truncate the prompt); the
    text is then left whole and the lint reports the missing EOS.

    Raises:
        UserError: the rendered conversation does not start with the rendered prompt
            (a template that rewrites earlier turns), so no mask boundary exists.
    """
    prompt_text = _render(tokenizer, prompt_messages, add_generation_prompt=True)
    full_text = _render(tokenizer, [*prompt_messages, {"role": "assistant", "content": response}], False)
    if not full_text.startswith(prompt_text):
        raise UserError(
            "the chat template renders the prompt differently with and without the response, "
            f"so the loss mask has no boundary: prompt ends {prompt_text[-60:]!r}, "
            f"conversation has {full_text[max(len(prompt_text) - 60, 0) : len(prompt_text)]!r}",
            where="chat template",
            fix="use a template whose generation prompt is a prefix of the rendered conversation (e.g. chatml)",
        )
    eos = tokenizer.eos_token
    cut = full_text.rfind(eos) if eos else -1
    if cut >= len(prompt_text):
        full_text = full_text[: cut + len(eos)]
    return prompt_text, full_text[len(prompt_text) :]


def sft_example(tokenizer, prompt_messages: list[dict], response: str, max_length: int) -> dict | None:
    """One SFT example: the conversation's tokens and which of them are trained.

    Args:
        tokenizer: a HF tokenizer with a chat template and an EOS token.
        prompt_messages: the conversation before the response.
        response: the assistant response to train on.
        max_length: longest allowed sequence in tokens.

    Returns:
        `{input_ids, completion_mask, prompt_text, completion_text}` where
        `completion_mask` is 0 over the prompt's tokens and 1 over the response's, or
        None when the example is longer than `max_length` (the caller counts drops).
    """
    prompt_text, completion_text = _prompt_and_completion(tokenizer, prompt_messages, response)
    input_ids = _ids(tokenizer, prompt_text + completion_text)
    if len(input_ids) > max_length:
        return None
    # The boundary comes from the prompt's own tokenization; if the tokenizer merged
    # tokens across it, the lint's split-merge check reports it instead of guessing here.
    prompt_len = min(len(_ids(tokenizer, prompt_text)), len(input_ids))
    return {
        "input_ids": input_ids,
        "completion_mask": [0] * prompt_len + [1] * (len(input_ids) - prompt_len),
        "prompt_text": prompt_text,
        "completion_text": completion_text,
    }


def preference_example(
    tokenizer, prompt_messages: list[dict], chosen: str, rejected: str, max_length: int
) -> dict | None:
    """One reward-model example: the full chosen and rejected conversations.

    Args:
        tokenizer: a HF tokenizer with a chat template and an EOS token.
        prompt_messages: the shared conversation before the final response.
        chosen: the preferred response.
        rejected: the other response.
        max_length: longest allowed sequence (either side) in tokens.

    Returns:
        `{chosen_ids, rejected_ids, prompt_len, prompt_text, chosen_text, rejected_text}`
        (each id sequence is prompt + response ending with EOS; `prompt_len` counts the
        prompt's tokens), or None when either side is longer than `max_length`.
    """
    prompt_text, chosen_text = _prompt_and_completion(tokenizer, prompt_messages, chosen)
    _, rejected_text = _prompt_and_completion(tokenizer, prompt_messages, rejected)
    chosen_ids = _ids(tokenizer, prompt_text + chosen_text)
    rejected_ids = _ids(tokenizer, prompt_text + rejected_text)
    if max(len(chosen_ids), len(rejected_ids)) > max_length:
        return None
    return {
        "chosen_ids": chosen_ids,
        "rejected_ids": rejected_ids,
        "prompt_len": len(_ids(tokenizer, prompt_text)),
        "prompt_text": prompt_text,
        "chosen_text": chosen_text,
        "rejected_text": rejected_text,
    }


def prompt_example(tokenizer, prompt_messages: list[dict], max_length: int) -> dict | None:
    """One PPO prompt: the conversation followed by the generation prompt.

    Args:
        tokenizer: a HF tokenizer with a chat template.
        prompt_messages: the conversation the policy answers.
        max_length: longest allowed prompt in tokens.

    Returns:
        `{input_ids, prompt_text}`, or None when the prompt is longer than `max_length`.
    """
    prompt_text = _render(tokenizer, prompt_messages, add_generation_prompt=True)
    input_ids = _ids(tokenizer, prompt_text)
    if len(input_ids) > max_length:
        return None
    return {"input_ids": input_ids, "prompt_text": prompt_text}


def build_sft_rows(tokenizer, problems: Iterable[MathProblem], max_length: int) -> tuple[list[dict], int]:
    """SFT rows for GSM8K problems (target: `gsm8k_sft_target`).

    Returns:
        `(rows, dropped)`: rows also carry `source_line`; `dropped` counts problems longer
        than `max_length`.
    """
    rows, dropped = [], 0
    for problem in problems:
        row = sft_example(tokenizer, math_prompt_messages(problem), gsm8k_sft_target(problem.answer), max_length)
        if row is None:
            dropped += 1
            continue
        rows.append({**row, "source_line": problem.source_line})
    return rows, dropped


def build_preference_rows(
    tokenizer, pairs: Iterable[PreferencePair], max_length: int, limit: int | None = None
) -> tuple[list[dict], int]:
    """Reward-model rows for preference pairs.

    Args:
        limit: stop once this many rows are built (None: all pairs).

    Returns:
        `(rows, dropped)`: rows also carry `source_line`; `dropped` counts pairs with a
        side longer than `max_length` among those looked at.
    """
    rows, dropped = [], 0
    for pair in pairs:
        if limit is not None and len(rows) >= limit:
            break
        row = preference_example(tokenizer, pair.prompt, pair.chosen, pair.rejected, max_length)
        if row is None:
            dropped += 1
            continue
        rows.append({**row, "source_line": pair.source_line})
    return rows, dropped


def _prompt_messages_of(item: MathProblem | PreferencePair | list[dict]) -> list[dict]:
    """The prompt conversation of a math problem, a preference pair, or messages as-is."""
    if isinstance(item, MathProblem):
        return math_prompt_messages(item)
    if isinstance(item, PreferencePair):
        return item.prompt
    if isinstance(item, list):
        return item
    raise TypeError(f"cannot make a prompt from {type(item).__name__}")


def build_prompt_rows(
    tokenizer, prompts: Iterable[MathProblem | PreferencePair | list[dict]], max_length: int
) -> tuple[list[dict], int]:
    """PPO prompt rows from math problems, preference pairs' prompts, or message lists.

    Returns:
        `(rows, dropped)`: rows carry `source_line` when the item has one; `dropped`
        counts prompts longer than `max_length`.
    """
    rows, dropped = [], 0
    for item in prompts:
        row = prompt_example(tokenizer, _prompt_messages_of(item), max_length)
        if row is None:
            dropped += 1
            continue
        source_line = getattr(item, "source_line", None)
        rows.append(row if source_line is None else {**row, "source_line": source_line})
    return rows, dropped
