"""clean: normalise text, scrub PII, drop what should not be learned from, and count every drop.

Rules run per message in this order: excluded speaker, normalisation, PII scrubbing, length
bounds, duplicates within the conversation. Then conversations left too short are dropped.
PII is scrubbed a conversation at a time: the presidio engine runs spaCy over the batch.
Every removal is counted by reason in ``metrics/clean.json``; nothing disappears uncounted.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from typing import Iterable

from qlora_pipeline.config import CleanConfig
from qlora_pipeline.data.pii import scrub_many
from qlora_pipeline.data.pseudonyms import build_pseudonyms, pseudonymize
from qlora_pipeline.data.speakers import find_speaker, message_counts, resolve_persona, speakers_in_order

_HSPACE = re.compile(r"[^\S\n]+")  # whitespace other than newlines
_BLANK_LINES = re.compile(r"\n{3,}")
# C0 and C1 control characters but \t and \n (whitespace, handled below); C1 ones come from
# text decoded as Latin-1 or cp1252 somewhere upstream and are never meant as text.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_NON_WORD = re.compile(r"[\W_]+")


@dataclass
class CleanStats:
    conversations_in: int = 0
    messages_in: int = 0
    messages_changed_by_normalization: int = 0
    messages_with_pii: int = 0
    messages_removed: Counter = field(default_factory=Counter)
    conversations_removed: Counter = field(default_factory=Counter)
    pii_replacements: Counter = field(default_factory=Counter)

    def as_dict(self, conversations_out: int, messages_out: int) -> dict:
        return {
            "conversations_in": self.conversations_in,
            "conversations_out": conversations_out,
            "messages_in": self.messages_in,
            "messages_out": messages_out,
            "messages_changed_by_normalization": self.messages_changed_by_normalization,
            "messages_with_pii": self.messages_with_pii,
            "messages_removed": _with_total(self.messages_removed),
            "conversations_removed": _with_total(self.conversations_removed),
            "pii_replacements": _with_total(self.pii_replacements),
        }


def _with_total(counter: Counter) -> dict:
    return {**dict(sorted(counter.items())), "total": sum(counter.values())}


def normalize_text(text: str, form: str) -> str:
    """Unicode normal form, no control characters, single spaces, at most one blank line."""
    if form != "none":
        text = unicodedata.normalize(form, text)
    text = _CONTROL.sub(" ", text.replace("\r\n", "\n").replace("\r", "\n"))
    lines = [_HSPACE.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def near_key(text: str) -> str:
    """What two near-identical messages share: case, punctuation and spacing ignored."""
    return _NON_WORD.sub(" ", text.casefold()).strip()


class DuplicateFinder:
    """Remembers what each speaker said in one conversation and spots repeats."""

    def __init__(self, cfg: CleanConfig):
        self.cfg = cfg
        self.seen: dict[str, list[tuple[str, str]]] = {}

    def check(self, speaker: str, text: str) -> str | None:
        """Return ``duplicate_exact``/``duplicate_near`` for a repeat, else remember it and return None."""
        if self.cfg.dedup == "none" or len(text) < self.cfg.dedup_min_chars:
            return None
        earlier = self.seen.setdefault(speaker, [])
        if any(text == old_text for old_text, _ in earlier):
            return "duplicate_exact"
        key = near_key(text)
        recent = [old_key for _, old_key in earlier[-self.cfg.near_dup_window:]]
        if self.cfg.dedup == "near" and self._near(key, recent):
            return "duplicate_near"
        earlier.append((text, key))
        return None

    def _near(self, key: str, earlier_keys: list[str]) -> bool:
        if key in earlier_keys:
            return True
        ratio = self.cfg.near_dup_ratio
        matcher = SequenceMatcher(None, autojunk=False)
        matcher.set_seq2(key)  # difflib caches the second sequence: set it once per message
        for old_key in earlier_keys:
            # Two strings this different in length cannot reach the ratio: skip without difflib.
            if 2 * min(len(key), len(old_key)) < ratio * (len(key) + len(old_key)):
                continue
            matcher.set_seq1(old_key)
            if matcher.quick_ratio() >= ratio and matcher.ratio() >= ratio:
                return True
        return False


def normalized_message(message: dict, cfg: CleanConfig, stats: CleanStats) -> str | None:
    """The message's normalised text, or None when it is removed (the reason is counted)."""
    if message["speaker"] in cfg.exclude_speakers:
        stats.messages_removed["excluded_speaker"] += 1
        return None
    text = normalize_text(message["text"], cfg.unicode_normalization)
    if text != message["text"]:
        stats.messages_changed_by_normalization += 1
    if not text:
        stats.messages_removed["empty"] += 1
        return None
    return text


def scrubbed_texts(texts: list[str], cfg: CleanConfig, stats: CleanStats) -> list[str]:
    """The texts with PII replaced (``clean.pii`` by ``clean.pii_engine``); hits are counted."""
    out = []
    for text, hits in scrub_many(texts, cfg.pii, cfg.pii_engine):
        if hits:
            stats.messages_with_pii += 1
            stats.pii_replacements.update(hits)
        out.append(text)
    return out


def _length_reason(text: str, cfg: CleanConfig) -> str | None:
    if len(text) < cfg.min_chars:
        return "too_short"
    if len(text) > cfg.max_chars:
        return "too_long"
    return None


def clean_conversation(conv: dict, cfg: CleanConfig, stats: CleanStats) -> dict | None:
    """Clean one conversation; None when too little of it is left to learn from."""
    stats.conversations_in += 1
    stats.messages_in += len(conv["messages"])
    normalized = [(m, normalized_message(m, cfg, stats)) for m in conv["messages"]]
    survivors = [(m, text) for m, text in normalized if text is not None]
    scrubbed = scrubbed_texts([text for _, text in survivors], cfg, stats)
    duplicates = DuplicateFinder(cfg)
    kept = []
    for (message, _), text in zip(survivors, scrubbed):
        reason = _length_reason(text, cfg) or duplicates.check(message["speaker"], text)
        if reason:
            stats.messages_removed[reason] += 1
        else:
            kept.append({**message, "text": text})
    reason = _conversation_reason(kept, cfg)
    if reason:
        stats.conversations_removed[reason] += 1
        stats.messages_removed[f"in_removed_conversation:{reason}"] += len(kept)
        return None
    return {**conv, "messages": kept}


def _conversation_reason(messages: list[dict], cfg: CleanConfig) -> str | None:
    if len(messages) < cfg.min_messages:
        return "too_few_messages"
    if len({m["speaker"] for m in messages}) < cfg.min_speakers:
        return "too_few_speakers"
    return None


def clean_conversations(conversations: Iterable[dict], cfg: CleanConfig) -> tuple[list[dict], dict]:
    """Clean every conversation; return the survivors and the metrics dict."""
    stats = CleanStats()
    kept = [c for c in (clean_conversation(conv, cfg, stats) for conv in conversations) if c is not None]
    metrics = stats.as_dict(len(kept), sum(len(c["messages"]) for c in kept))
    return kept, metrics


def resolve_exclusions(conversations: list[dict], cfg: CleanConfig, source: str) -> CleanConfig:
    """``cfg`` with each ``exclude_speakers`` name replaced by the speaker it names; an unknown one is an error."""
    counts = message_counts(conversations)
    names = [find_speaker(name, counts, "clean.exclude_speakers", source) for name in cfg.exclude_speakers]
    return cfg.model_copy(update={"exclude_speakers": names})


def hide_other_speakers(raw: list[dict], kept: list[dict], persona: str, source: str) -> tuple[list[dict], dict]:
    """Everyone but the persona (``split.persona``) pseudonymized in ``kept``; the counts of what changed.

    Numbers follow first messages in ``raw``, the data before cleaning, so removing a message or an
    excluded person never renumbers the others. The persona, resolved here from ``auto`` or a name,
    is declared in every conversation's meta: split must not pick a "Friend" by message count.
    """
    keep = None if persona == "all" else resolve_persona(kept, persona, source)
    table = build_pseudonyms(speakers_in_order(raw), keep)
    hidden = pseudonymize(kept, table)
    if keep is not None:
        hidden = [{**conv, "meta": {**conv.get("meta", {}), "persona": keep}} for conv in hidden]
    present = {m["speaker"] for c in kept for m in c["messages"]} - {keep}
    return hidden, {"speakers": len(present), "names_in_text": sum(table.replaced_in_text.values())}
