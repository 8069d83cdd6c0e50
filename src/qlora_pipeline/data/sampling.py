"""Seeded caps on how many examples a split or a scoring pass uses (split and evaluate share it)."""

from __future__ import annotations

import random


def cap_examples(examples: list[dict], cap: int | None, seed: int) -> list[dict]:
    """A seeded sample of at most ``cap`` examples, kept in their original order."""
    if cap is None or len(examples) <= cap:
        return examples
    chosen = set(random.Random(seed).sample(range(len(examples)), cap))
    return [ex for i, ex in enumerate(examples) if i in chosen]
