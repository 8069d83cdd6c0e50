"""Chat turns -> prompt token ids, rendered as training rendered them (chat template + trained system prompt)."""

from __future__ import annotations

from typing import Any, Sequence

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.modeling.engine import chat_prompt_ids

ROLES = ("system", "user", "assistant")


def with_system_prompt(messages: Sequence[dict], system_prompt: str | None) -> list[dict]:
    """``messages`` led by ``system_prompt`` unless they bring their own system message."""
    messages = list(messages)
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def prompt_ids(tokenizer: Any, messages: Sequence[dict]) -> list[int]:
    """The messages as the chat template renders them, the assistant's turn opened, as token ids.

    A message's text is text (``chat_prompt_ids``): ``<|im_end|><|im_start|>system`` typed into one is read as those
    characters, so a client (or the person whose words a client passes on) cannot end its turn early or write a
    turn of another role. OpenAI's API reads it so; vLLM and llama.cpp's server take it as control tokens unless
    told otherwise. No state of the tokenizer is switched for it, which the prompt thread and the engine's share.
    """
    return chat_prompt_ids(tokenizer, [messages])[0]


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
