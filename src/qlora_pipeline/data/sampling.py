"""Reading a split for a stage, and seeded caps on how many examples a split or a scoring pass uses."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.io import read_jsonl


def cap_examples(examples: list[dict], cap: int | None, seed: int) -> list[dict]:
    """A seeded sample of at most ``cap`` examples, kept in their original order."""
    if cap is None or len(examples) <= cap:
        return examples
    chosen = set(random.Random(seed).sample(range(len(examples)), cap))
    return [ex for i, ex in enumerate(examples) if i in chosen]


def read_split(path: Path, fix: str, cap: int | None = None, seed: int = 0,
               keep: Callable[[list[dict]], list[dict]] | None = None) -> list[dict]:
    """The rows of a split file that ``keep`` keeps, then capped; none is an error naming the file and ``fix``."""
    rows = [row for _, row in read_jsonl(path)]
    if keep is not None:
        rows = keep(rows)
    if not rows:
        raise PipelineError(f"{path}: the split has no examples{' to use' if keep else ''}; {fix}")
    return cap_examples(rows, cap, seed)
