"""Personal data in what the model says: PII hits per type and the scrubbing placeholders it learned.

The detector is the one the clean stage scrubbed the training data with (``clean.pii`` and
``clean.pii_engine``), so a type counted here is a type cleaning would have removed. A reply that
says ``<EMAIL>`` leaks nothing, but shows the model learned the scrubbed corpus's shape; those
placeholders are counted apart and never as PII.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from qlora_pipeline.data.pii import PLACEHOLDERS, count_pii

_PLACEHOLDER_RE = re.compile("|".join(re.escape(p) for p in sorted(set(PLACEHOLDERS.values()))))


def pii_hits(replies: Sequence[str], types: Sequence[str], engine: str) -> list[Counter]:
    """Per reply, PII hits per type (placeholders excluded: the detector skips them)."""
    return [count_pii(reply, types, engine=engine) for reply in replies]


def placeholder_hits(replies: Sequence[str]) -> list[Counter]:
    """Per reply, how often it says each placeholder (``<EMAIL>`` ...)."""
    return [Counter(_PLACEHOLDER_RE.findall(reply)) for reply in replies]


def flags(hits: Sequence[Counter], kind: str | None = None) -> list[bool]:
    """Per reply: any hit (``kind`` None) or a hit of ``kind``."""
    return [bool(sum(h.values())) if kind is None else h.get(kind, 0) > 0 for h in hits]
