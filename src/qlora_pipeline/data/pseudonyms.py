"""Everyone but the persona becomes Friend 1, Friend 2, ... (``clean.pseudonymize_speakers``).

Numbers follow each person's first message in the fetched data, so the same export gives the
same pseudonyms on every run, and people added by a newer export get new numbers. People whose
messages ``clean.exclude_speakers`` removed get a number too: their names are hidden where others
mention them.

In message text, a person's full display name is replaced, and so is each part of it (a first
name, a surname) on its own, whatever its case, word by word ("Bob's" -> "Friend 1's"). A part is
left alone when replacing it would do harm or mislabel:
- it is also an everyday word (``name_words.txt``: "Will", "May", "Rose"..., and labels such as "Work", "Mom"):
  it is replaced only where written as in the name ("Will", not "will"), and so is a one-word name that is such
  a word;
- it is part of the persona's own name ("Alex" when the persona is Alex Kim and a friend Alex Roe);
- two friends share it: it becomes plain "Friend", naming neither;
- it has fewer than two letters (initials) or none (a phone number: the PII scrub handles those).
Nicknames, misspellings and names of people who never wrote in the chat are not known here.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from itertools import pairwise

from qlora_pipeline.data.speakers import clean_name

PSEUDONYM = "Friend {number}"
SHARED = "Friend"  # a name part two friends share: hidden without naming either
# Words of a name are runs of letters and digits; a name written "O'Brien" or "Anne-Marie"
# matches the same words in text however they are joined.
_WORD = re.compile(r"\w+", re.UNICODE)
# What may stand between the words of one name in text: a space or two, an apostrophe, a hyphen
# (not a full stop: "tell sam. Lee's cat" is two sentences, not Sam Lee).
_JOINER = re.compile(r"[ \t]{1,2}|['’\-]")


def name_words() -> frozenset[str]:
    """First names that are also everyday English words (``name_words.txt``), case-folded."""
    text = resources.files("qlora_pipeline.data").joinpath("name_words.txt").read_text(encoding="utf-8")
    return frozenset(w.casefold() for line in text.splitlines() if (w := line.split("#")[0].strip()))


def _words(text: str) -> tuple[str, ...]:
    return tuple(w.casefold() for w in _WORD.findall(text))


@dataclass
class Pseudonyms:
    speakers: dict[str, str]  # speaker -> pseudonym
    phrases: dict[tuple[str, ...], str] = field(default_factory=dict)  # case-folded name words -> replacement
    cased: dict[tuple[str, ...], str] = field(default_factory=dict)  # everyday words: matched as written
    longest: int = 0
    firsts: set[str] = field(default_factory=set)  # case-folded first words: most text words start nothing
    replaced_in_text: Counter = field(default_factory=Counter)  # pseudonym -> occurrences replaced

    def speaker(self, name: str) -> str:
        return self.speakers.get(name, name)

    def text(self, text: str) -> str:
        """``text`` with every known name (or part of one) replaced, longest match first."""
        if not self.firsts:
            return text
        words = list(_WORD.finditer(text))
        out, cursor, index = [], 0, 0
        while index < len(words):
            match = self._match_at(text, words, index)
            if match is None:
                index += 1
                continue
            length, replacement = match
            out.append(text[cursor: words[index].start()] + replacement)
            cursor = words[index + length - 1].end()
            self.replaced_in_text[replacement] += 1
            index += length
        return "".join(out) + text[cursor:]

    def _match_at(self, text: str, words: list, index: int) -> tuple[int, str] | None:
        if words[index].group().casefold() not in self.firsts:
            return None
        for length in range(min(self.longest, len(words) - index), 0, -1):
            span = words[index: index + length]
            if any(not _JOINER.fullmatch(text[a.end(): b.start()]) for a, b in pairwise(span)):
                continue
            written = tuple(w.group() for w in span)
            replacement = self.phrases.get(tuple(w.casefold() for w in written)) or self.cased.get(written)
            if replacement is not None:
                return length, replacement
        return None


def build_pseudonyms(speakers: list[str], keep: str | None) -> Pseudonyms:
    """Pseudonyms for ``speakers`` (in first-message order) except ``keep`` (the persona, or None for all)."""
    others = [s for s in speakers if s != keep]
    table = Pseudonyms({s: PSEUDONYM.format(number=n) for n, s in enumerate(others, start=1)})
    everyday = name_words()
    protected = set(_words(keep)) if keep else set()
    owners: dict[tuple[str, ...], set[str]] = {}
    for speaker in others:
        written = unicodedata.normalize("NFKC", clean_name(speaker))  # as clean's text is
        full = _words(written)
        if len(full) == 1 and full[0] in everyday:
            table.cased[tuple(_WORD.findall(written))] = table.speakers[speaker]
        elif full:
            table.phrases[full] = table.speakers[speaker]
        for part in written.split():
            words = _WORD.findall(part)
            if len(words) != 1 or sum(ch.isalpha() for ch in part) < 2 or words[0].casefold() in protected:
                continue
            owners.setdefault((words[0],), set()).add(speaker)
    for (word,), people in owners.items():
        replacement = table.speakers[next(iter(people))] if len(people) == 1 else SHARED
        if word.casefold() in everyday:
            table.cased.setdefault((word,), replacement)
        else:
            # Someone's whole (one-word) name wins over another's part of the same spelling.
            table.phrases.setdefault((word.casefold(),), replacement)
    keys = list(table.phrases) + list(table.cased)
    table.longest = max((len(k) for k in keys), default=0)
    table.firsts = {k[0].casefold() for k in keys}
    return table


def pseudonymize(conversations: list[dict], table: Pseudonyms) -> list[dict]:
    """Conversations with speakers and names in text replaced; ``table`` counts the replacements."""
    return [{**conv, "messages": [{**m, "speaker": table.speaker(m["speaker"]), "text": table.text(m["text"])}
                                  for m in conv["messages"]]}
            for conv in conversations]
