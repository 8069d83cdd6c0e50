"""Verbatim memorization: replies that repeat a long span of one training target word for word.

Words are lower-cased runs of letters, digits and apostrophes, so case, punctuation and line
breaks do not hide a copy; any other change (one word swapped, added or left out) breaks the span.
Every ``n``-word window of every training target goes into one hash index, so a reply is checked
in time linear in its length, whatever the size of the training split (no pairwise scan).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_WORD = re.compile(r"[\w']+")


def words(text: str) -> list[str]:
    return [w.strip("'") for w in _WORD.findall(text.lower()) if w.strip("'")]


@dataclass(frozen=True)
class Match:
    """The longest verbatim span a reply shares with one training target."""

    words: int
    span: str
    target_index: int


class SpanIndex:
    """Every ``n``-word window of the training targets -> the targets that hold it."""

    def __init__(self, targets: Iterable[str], n: int):
        if n < 1:
            raise ValueError(f"span length must be >= 1, got {n}")
        self.n = n
        self.targets: list[list[str]] = []
        self._windows: dict[tuple[str, ...], list[int]] = {}
        for index, target in enumerate(targets):
            tokens = words(target)
            self.targets.append(tokens)
            for start in range(len(tokens) - n + 1):
                holders = self._windows.setdefault(tuple(tokens[start:start + n]), [])
                if not holders or holders[-1] != index:
                    holders.append(index)

    def __len__(self) -> int:
        return len(self._windows)

    def longest_match(self, reply: str) -> Match | None:
        """The longest span of ``reply`` (>= n words) found verbatim in one training target, or None."""
        tokens = words(reply)
        best: Match | None = None
        start = 0
        while start + self.n <= len(tokens):
            for target_index in self._windows.get(tuple(tokens[start:start + self.n]), ()):
                length = self._extend(tokens, start, self.targets[target_index])
                if best is None or length > best.words:
                    best = Match(length, " ".join(tokens[start:start + length]), target_index)
            start += 1
        return best

    def _extend(self, tokens: list[str], start: int, target: list[str]) -> int:
        """How far the window at ``start`` keeps matching ``target`` (at its best alignment)."""
        window = tokens[start:start + self.n]
        best = self.n
        for offset in range(len(target) - self.n + 1):
            if target[offset:offset + self.n] != window:
                continue
            length = self.n
            while (start + length < len(tokens) and offset + length < len(target)
                   and tokens[start + length] == target[offset + length]):
                length += 1
            best = max(best, length)
        return best


def memorized(index: SpanIndex, replies: Sequence[str]) -> list[Match | None]:
    """Per reply, its longest verbatim span of the training targets (None below ``index.n`` words)."""
    return [index.longest_match(reply) for reply in replies]
