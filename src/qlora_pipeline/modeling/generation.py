"""Batched greedy (or sampled) chat replies: left padding, KV cache, stop on the end-of-turn token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence


@dataclass
class Reply:
    text: str
    new_tokens: int
    stopped: bool  # ended on the end-of-turn token before the token limit


def chat_prompts(tokenizer: Any, conversations: Sequence[list[dict]]) -> list[str]:
    return [tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
            for messages in conversations]


def generate_replies(model: Any, tokenizer: Any, conversations: Sequence[list[dict]], batch_size: int,
                     **generate_kwargs: Any) -> list[Reply]:
    """One reply per conversation, in order."""
    import torch

    encoded = tokenizer(chat_prompts(tokenizer, conversations), add_special_tokens=False)["input_ids"]
    # Batches of similar length: left padding to a batch's longest prompt is computed for nothing.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    replies: list[Reply | None] = [None] * len(encoded)
    previous_side, tokenizer.padding_side = tokenizer.padding_side, "left"  # decoder-only: pad on the left
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in chunk]}, return_tensors="pt").to(model.device)
            with torch.no_grad():
                output = model.generate(**batch, use_cache=True, pad_token_id=tokenizer.pad_token_id,
                                        eos_token_id=tokenizer.eos_token_id, **generate_kwargs)
            for i, reply in zip(chunk, _decode(tokenizer, output[:, batch["input_ids"].shape[1]:])):
                replies[i] = reply
    finally:
        tokenizer.padding_side = previous_side
    return replies


def _decode(tokenizer: Any, new_ids: Any) -> list[Reply]:
    out = []
    for row in new_ids.tolist():
        if tokenizer.eos_token_id in row:
            row, stopped = row[: row.index(tokenizer.eos_token_id)], True
        else:
            stopped = False
        row = [t for t in row if t != tokenizer.pad_token_id]
        out.append(Reply(tokenizer.decode(row, skip_special_tokens=True).strip(), len(row), stopped))
    return out
