"""Chat turns -> prompt token ids, rendered as training rendered them (chat template + trained system prompt)."""

from __future__ import annotations

from typing import Any, Sequence

from qlora_pipeline.errors import PipelineError

ROLES = ("system", "user", "assistant")


def with_system_prompt(messages: Sequence[dict], system_prompt: str | None) -> list[dict]:
    """``messages`` led by ``system_prompt`` unless they bring their own system message."""
    messages = list(messages)
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def prompt_ids(tokenizer: Any, messages: Sequence[dict]) -> list[int]:
    """The messages as the chat template renders them, the assistant's turn opened, as token ids.

    A message's text is text: ``<|im_end|><|im_start|>system`` typed into one is read as those characters, not as
    the template's control tokens, so a client (or the person whose words a client passes on) cannot end its turn
    early or write a turn of another role. OpenAI's API reads it so; vLLM and llama.cpp's server take it as control
    tokens unless told otherwise. Text without such a token is tokenized whole, exactly as training tokenized it.
    """
    rendered = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    if not any(_holds_control_text(tokenizer, m["content"]) for m in messages):
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return _ids_with_contents_as_text(tokenizer, messages)


def _holds_control_text(tokenizer: Any, text: str) -> bool:
    return any(token in text for token in _control_tokens(tokenizer))


def _control_tokens(tokenizer: Any) -> list[str]:
    """The texts the tokenizer reads as one control token whatever surrounds them (the template's among them)."""
    return [token.content for token in tokenizer.added_tokens_decoder.values() if token.special]


def _ids_with_contents_as_text(tokenizer: Any, messages: Sequence[dict]) -> list[int]:
    """The template rendered around a marker per message, its own parts tokenized as usual and each message's text
    with the tokenizer's ``split_special_tokens`` (control tokens read as the characters they are written with)."""
    markers = [f"\x00{index}\x00" for index in range(len(messages))]
    rendered = tokenizer.apply_chat_template([{**m, "content": marker} for m, marker in zip(messages, markers)],
                                             tokenize=False, add_generation_prompt=True)
    ids: list[int] = []
    for message, marker in zip(messages, markers):
        before, found, rendered = rendered.partition(marker)
        if not found or marker in rendered:  # a template that changes or repeats a message's text
            raise PipelineError("a message holds a control token of the model's chat template (one of "
                                f"{', '.join(_control_tokens(tokenizer))}), which this template cannot keep as text; "
                                "remove it from the message")
        ids += _tokens(tokenizer, before) + _tokens(tokenizer, message["content"], split_special_tokens=True)
    return ids + _tokens(tokenizer, rendered)


def _tokens(tokenizer: Any, text: str, **options: Any) -> list[int]:
    return tokenizer(text, add_special_tokens=False, **options)["input_ids"] if text else []


def fit_history(tokenizer: Any, messages: Sequence[dict], budget: int) -> tuple[list[dict], list[int], int]:
    """Drop the oldest exchanges (system messages stay) until the prompt takes at most ``budget`` tokens.

    Returns the kept messages, their prompt ids and how many messages were dropped. The newest user
    turn always stays; if it alone is too long, that is an error the caller reports.
    """
    messages = list(messages)
    dropped = 0
    while True:
        ids = prompt_ids(tokenizer, messages)
        if len(ids) <= budget:
            return messages, ids, dropped
        conversation = [i for i, m in enumerate(messages) if m["role"] != "system"]
        if len(conversation) <= 1:
            raise PipelineError(f"the message takes {len(ids)} tokens with its system prompt, more than the "
                                f"{budget} the context leaves; shorten it")
        # Drop the oldest exchange whole: the conversation must still open with a user turn.
        del messages[conversation[0]]
        dropped += 1
        while conversation[0] < len(messages) - 1 and messages[conversation[0]]["role"] == "assistant":
            del messages[conversation[0]]
            dropped += 1
