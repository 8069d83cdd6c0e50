"""Chats as the chat template renders them, as token ids: the one way training, every stage's prompts, serve, chat
and the GGUF export's template check tokenize a chat.

A module of its own, so that each of those depends on this rendering and nothing else of the others': an edit
to the engine does not retrain, an edit to training's encoding does not re-run the stages that only generate.
"""

from __future__ import annotations

from typing import Any, Iterable


def chat_ids(tokenizer: Any, conversations: Iterable[list[dict]], add_generation_prompt: bool = False,
             chat_template: str | None = None) -> list[list[int]]:
    """Each conversation's token ids, rendered by ``chat_template`` (None: the tokenizer's own); a message's text is
    text.

    ``<|im_end|>`` written in a chat (people talk about language models) is those characters, not the template's
    control token (transformers' ``sanitize_control_tokens``): read as the token, it cut the reply it was in at
    the first one and taught the model to end a turn there, and a client of serve could end its turn and open a
    system one. Text without a control token gets the same ids as the rendered text tokenized whole.
    """
    conversations = [list(messages) for messages in conversations]
    if not conversations:
        return []
    return tokenizer.apply_chat_template(conversations, chat_template=chat_template, tokenize=True,
                                         add_generation_prompt=add_generation_prompt, sanitize_control_tokens=True,
                                         return_dict=False)


def template_ids(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False,
                 chat_template: str | None = None) -> list[int]:
    """One conversation's token ids (``chat_ids``)."""
    return chat_ids(tokenizer, [messages], add_generation_prompt, chat_template)[0]
