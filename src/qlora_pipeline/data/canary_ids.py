"""Which training rows are canaries: the synthetic secrets the risk stage plants in train (risk/canaries.py).

They are training data, not the persona's voice, so the stages that learn the persona's style from
the train split (style-judge, evaluate's human-eval examples) leave them out. A dep of every stage
that makes or drops them: editing the rule re-runs what it shapes.
"""

from __future__ import annotations

CANARY_PREFIX = "canary-"


def without_canaries(rows: list[dict]) -> list[dict]:
    """The persona's own examples: every row whose conversation is not a canary's."""
    return [row for row in rows if not str(row.get("conversation_id", "")).startswith(CANARY_PREFIX)]
