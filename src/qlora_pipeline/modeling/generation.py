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

    replies: list[Reply] = []
    prompts = chat_prompts(tokenizer, conversations)
    previous_side, tokenizer.padding_side = tokenizer.padding_side, "left"  # decoder-only: pad on the left
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(model.device)
            with torch.no_grad():
                output = model.generate(**batch, use_cache=True, pad_token_id=tokenizer.pad_token_id,
                                        eos_token_id=tokenizer.eos_token_id, **generate_kwargs)
            replies.extend(_decode(tokenizer, output[:, batch["input_ids"].shape[1]:]))
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
