"""Persona examples as token ids: the chat template renders them the same way for training and scoring.

Shared by training and evaluation (and the export report), so it lives apart from both: an edit
here re-runs what it shapes, and nothing else.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from qlora_pipeline.data.chat_ids import template_ids
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.labels import IGNORE_INDEX


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


def encode_example(tokenizer: Any, messages: list[dict], target: str, max_length: int,
                   counts: Counter | None = None) -> Encoded:
    """Token ids of prompt + reply, with labels ``-100`` on the prompt.

    The reply keeps its end-of-turn token, so the model learns to stop. Anything the template
    adds after that token (a newline) is dropped. Too-long examples lose prompt from the left
    first (the reply is what is learned), and the reply is cut only if it alone is too long.
    """
    counts = counts if counts is not None else Counter()
    prompt = template_ids(tokenizer, messages, add_generation_prompt=True)
    full = template_ids(tokenizer, [*messages, {"role": "assistant", "content": target}])
    if full[: len(prompt)] != prompt:
        raise PipelineError("model: the chat template renders the prompt differently when a reply follows; "
                            "choose a model whose chat template is prefix-stable")
    reply = full[len(prompt):]
    if tokenizer.eos_token_id not in reply:
        raise PipelineError(f"model.eos_token: the chat template does not end an assistant turn with "
                            f"{tokenizer.eos_token!r}; set model.eos_token to the token that does")
    reply = reply[: reply.index(tokenizer.eos_token_id) + 1]
    if len(prompt) + len(reply) > max_length:
        keep = max(max_length - len(reply), max_length // 2)
        if len(prompt) > keep:
            counts["prompt_truncated"] += 1
            prompt = prompt[len(prompt) - keep:]  # not prompt[-keep:]: at keep 0 that kept the whole prompt
        if len(prompt) + len(reply) > max_length:
            counts["reply_truncated"] += 1
            reply = reply[: max_length - len(prompt)]
    return Encoded(prompt + reply, [IGNORE_INDEX] * len(prompt) + reply)

