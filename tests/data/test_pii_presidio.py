"""The presidio PII engine: names, addresses and locations on top of the regex rules.

Most tests load the pinned spaCy model (about 5 s, once per test process).
"""

from __future__ import annotations

from collections import Counter

import pytest

from qlora_pipeline.config import ConfigError
from qlora_pipeline.data import pii_presidio
from qlora_pipeline.data.cleaning import clean_conversations
from qlora_pipeline.data.pii import ALL_PII_TYPES, PII_TYPES, count_pii, scrub, scrub_many
from qlora_pipeline.data.pii_presidio import ScoredHit, claim
from qlora_pipeline.errors import PipelineError

NAME = "tell Sarah Jenkins I said hi"
ADDRESS = "I live at 42 Elm Street"


def test_presidio_finds_a_name_and_a_street_address():
    assert scrub(NAME, ALL_PII_TYPES, engine="presidio") == ("tell <NAME> I said hi", Counter(name=1))
    assert scrub(ADDRESS, ALL_PII_TYPES, engine="presidio") == ("I live at <ADDRESS>", Counter(address=1))


def test_regex_engine_is_unchanged_on_them():
    for text in (NAME, ADDRESS):
        assert scrub(text, PII_TYPES) == (text, Counter())
        assert scrub(text, PII_TYPES, engine="regex") == (text, Counter())


def test_regex_types_keep_their_text_and_priority():
    # The e-mail's local part reads like a name to NER; the regex claim comes first.
    text = "Contact Mark Davis at mark.davis@example.com or 555-123-4567"
    assert scrub(text, ALL_PII_TYPES, engine="presidio") == (
        "Contact <NAME> at <EMAIL> or <PHONE>", Counter(name=1, email=1, phone=1))
    # A type replaces the same text whichever other types are chosen.
    assert scrub(text, ["name"], engine="presidio") == ("Contact <NAME> at mark.davis@example.com or 555-123-4567",
                                                       Counter(name=1))


def test_placeholders_are_never_detected_again():
    text = "<NAME> said to meet at <ADDRESS>, mail <EMAIL>"
    assert scrub(text, ALL_PII_TYPES, engine="presidio") == (text, Counter())


def test_a_presidio_type_needs_the_presidio_engine():
    with pytest.raises(ValueError, match="'name' needs engine='presidio'"):
        scrub(NAME, ["email", "name"])
    with pytest.raises(ValueError, match="unknown PII engine 'spacy'"):
        scrub(NAME, ["email"], engine="spacy")


def test_config_rejects_presidio_types_with_the_regex_engine(params_factory):
    with pytest.raises(ConfigError) as err:
        params_factory({"clean.pii": ["email", "name", "location"], "clean.pii_engine": "regex"})
    message = str(err.value)
    assert "clean.pii: type 'name' needs clean.pii_engine: presidio" in message
    assert "type 'location' needs clean.pii_engine: presidio" in message
    cfg = params_factory({"clean.pii": ["email", "name", "address", "location"], "clean.pii_engine": "presidio"}).clean
    assert cfg.pii == ["email", "name", "address", "location"]
    with pytest.raises(ConfigError, match=r"clean.pii\[0\]: must be one of 'email', .*, 'location'; got 'dna'"):
        params_factory({"clean.pii": ["dna"]})


def test_count_pii_counts_hits_per_type():
    text = "tell Sarah Jenkins I live at 42 Elm Street, mail sj@example.com or sarah@example.org"
    assert count_pii(text, ALL_PII_TYPES, engine="presidio") == Counter(name=1, address=1, email=2)
    assert count_pii(text, PII_TYPES) == Counter(email=2)
    assert count_pii(text, ["address"], engine="presidio") == Counter(address=1)


def test_scrub_many_matches_scrub_one_at_a_time():
    texts = [NAME, "", "nothing here", ADDRESS]
    assert scrub_many(texts, ALL_PII_TYPES, "presidio") == [scrub(t, ALL_PII_TYPES, "presidio") for t in texts]


def test_clean_stage_with_presidio_replaces_a_name(params_factory):
    cfg = params_factory({"clean.pii": list(ALL_PII_TYPES), "clean.pii_engine": "presidio"}).clean
    conversation = {"id": "c", "meta": {}, "messages": [
        {"speaker": "a", "text": NAME, "time": None},
        {"speaker": "b", "text": "will do, see you", "time": None}]}
    kept, metrics = clean_conversations([conversation], cfg)
    assert [m["text"] for m in kept[0]["messages"]] == ["tell <NAME> I said hi", "will do, see you"]
    assert metrics["pii_replacements"] == {"name": 1, "total": 1}
    assert metrics["messages_with_pii"] == 1


# --- claiming, without spaCy: Presidio's hits as the engine receives them -------------------


def test_a_hit_keeps_only_unclaimed_characters_without_edge_punctuation():
    text = "Jenkins <jj@example.com>, hi"
    hits = [ScoredHit(0, 24, "name", 0.85)]  # NER ran over the e-mail
    assert claim(text, hits, claimed=[(9, 23)]) == [(0, 7, "name")]


def test_scores_below_the_threshold_are_dropped():
    text = "We moved to Birch Drive"
    hits = [ScoredHit(12, 23, "address", 0.3)]
    assert claim(text, hits, claimed=[]) == []
    assert claim(text, hits, claimed=[], min_score={"address": 0.25, "name": 0.5, "location": 0.5}) == [
        (12, 23, "address")]


def test_address_claims_before_name_and_location():
    text = "at 221 Baker Street, Leeds"
    hits = [ScoredHit(7, 12, "name", 0.85), ScoredHit(3, 19, "address", 0.6), ScoredHit(21, 26, "location", 0.85)]
    assert claim(text, hits, claimed=[]) == [(3, 19, "address"), (21, 26, "location")]


def test_laughter_and_drawn_out_words_are_cut_from_ner_hits():
    text = "Hahaha lol sarah, Sooo"
    hits = [ScoredHit(0, 16, "name", 0.85), ScoredHit(18, 22, "location", 0.85)]
    assert claim(text, hits, claimed=[]) == [(11, 16, "name")]


def test_a_missing_spacy_model_names_the_fix(monkeypatch):
    monkeypatch.setattr(pii_presidio, "SPACY_PACKAGE", "en_no_such_model")
    with pytest.raises(PipelineError, match="make setup"):
        pii_presidio._check_model_installed()


@pytest.mark.parametrize("text, dropped, types", [
    ("the weather in Chicago has been wild this week", "Chicago", ("location",)),  # a place as a topic
    ("housing prices in Vancouver are insane", "Vancouver", ("location",)),
    ("have you listened to Adele's new album?", "Adele", ("name", "location")),
    ("I've been reading a lot of Stephen King lately", "Stephen King", ("name", "location")),
    ("elon musk tweeted something weird again", "elon musk", ("name", "location")),
    ("Michael Jordan was the best player ever", "Michael Jordan", ("name", "location")),
    ("these Adidas shoes are so comfy", "Adidas", ("name", "location")),
    ("I got a B on my midterm", "B", ("name", "location")),
    ("I want to learn Spanish this year", "Spanish", ("name", "location")),
    ("Beyonce was amazing at the Grammys", "Grammys", ("name", "location")),
])
def test_look_alikes_are_no_ones_data(text, dropped, types):
    start = text.index(dropped)
    for pii_type in types:
        hit = ScoredHit(start, start + len(dropped), pii_type, 0.85)
        assert claim(text, [hit], []) == []
        assert claim(text, [hit], [], look_alikes=False) == [(start, start + len(dropped), pii_type)]


@pytest.mark.parametrize("text, kept, pii_type", [
    ("I live in Chicago now, the weather is wild", "Chicago", "location"),
    ("Jordan's sneakers are still at my place", "Jordan", "name"),
    ("Ben got a B+ on his essay", "Ben", "name"),
    ("tell Marcus the news from home", "Marcus", "name"),
    ("Aisha and I are meeting at the mall in Denver", "Denver", "location"),
    ("my neighbour Carlos fixed the fence", "Carlos", "name"),
])
def test_the_same_shapes_holding_someones_data_are_kept(text, kept, pii_type):
    start = text.index(kept)
    assert claim(text, [ScoredHit(start, start + len(kept), pii_type, 0.85)], []) == [
        (start, start + len(kept), pii_type)]


def test_the_real_engine_drops_the_look_alikes_and_keeps_the_friend():
    text = "Ben got a B+ and the weather in Chicago was awful, said Taylor Swift's new album"
    out, counts = scrub(text, ["name", "location"], engine="presidio")
    assert "Ben" not in out and "B+" in out and "Chicago" in out and "Taylor Swift" in out, out
