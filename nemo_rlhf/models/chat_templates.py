"""Named chat templates for tokenizers that ship without one.

A raw `tokenizer.json` (for example GPT-2's) has no chat template, yet every stage formats
prompts with `tokenizer.apply_chat_template`. The spec key `model.chat_template` names one of
the templates below; the random-model builder installs it into the saved tokenizer.
"""

from __future__ import annotations

from nemo_rlhf.errors import UserError

# Special tokens that the ChatML template emits. A tokenizer that lacks them gets them added
# as special tokens, so that they encode to one id each and are never split by the BPE.
CHATML_START = "<|im_start|>"
CHATML_END = "<|im_end|>"

# ChatML in SmolLM2's exact text layout: `<|im_start|>{role}\n{content}<|im_end|>\n` per
# message and `<|im_start|>assistant\n` as the generation prompt. Unlike SmolLM2's own template
# it adds no default system prompt (that prompt names SmolLM). The `{% generation %}` markers
# do not change the rendered text; they let TRL's `assistant_only_loss` find the assistant
# spans (content plus the closing <|im_end|>, so the model learns to stop).
_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}"
    "{{ message['content'] + '<|im_end|>' }}"
    "{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CHAT_TEMPLATES: dict[str, str] = {"chatml": _CHATML}

# The special tokens each named template needs in the vocabulary, and which of them ends a
# turn (it becomes the tokenizer's eos so that generation stops at the end of a reply).
TEMPLATE_TOKENS: dict[str, tuple[list[str], str]] = {"chatml": ([CHATML_START, CHATML_END], CHATML_END)}


def resolve_chat_template(name_or_none: str | None) -> str | None:
    """Turns the spec value `model.chat_template` into a Jinja template string.

    Args:
        name_or_none: A name from `CHAT_TEMPLATES` (e.g. "chatml"), a literal Jinja template
            (recognised by `{{` or `{%`), or None.

    Returns:
        The template text, or None when `name_or_none` is None (keep the model's own).

    Raises:
        UserError: The value is neither a known name nor a template.
    """
    if name_or_none is None:
        return None
    if name_or_none in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[name_or_none]
    # Accepting literal templates lets a spec carry a one-off format without a code change.
    if "{{" in name_or_none or "{%" in name_or_none:
        return name_or_none
    raise UserError(
        f"unknown chat template {name_or_none!r}",
        where="model.chat_template",
        fix=f"use one of: {', '.join(sorted(CHAT_TEMPLATES))}, a Jinja template string, or null",
    )
