"""clean: each rule does what it says and every removal is counted."""

from __future__ import annotations


from qlora_pipeline.data.cleaning import clean_conversations, normalize_text


def conv(cid, *messages):
    return {"id": cid, "messages": [{"speaker": s, "text": t, "time": None} for s, t in messages], "meta": {}}


def test_normalization_folds_unicode_and_whitespace():
    assert normalize_text("ｆｕｌｌ\u00a0width  \t text \r\n\n\n\nnext\x07", "NFKC") == "full width text\n\nnext"
    assert normalize_text("ｆｕｌｌ", "NFC") == "ｆｕｌｌ"


def test_normalization_removes_c1_controls_as_well_as_c0():
    # C1 controls (U+0080-U+009F) are what cp1252 quotes become when text is decoded as Latin-1.
    assert normalize_text("caf\x82e\x9d said \x93hi\x94\x85next", "NFC") == "caf e said hi next"


def test_length_bounds_and_counts(params_factory):
    cfg = params_factory({"clean.min_chars": 3, "clean.max_chars": 10, "clean.dedup": "none", "clean.min_speakers": 1}).clean
    kept, metrics = clean_conversations([conv("c", ("a", "ok"), ("b", "hello"), ("a", "x" * 11), ("b", "fine"))], cfg)
    assert [m["text"] for m in kept[0]["messages"]] == ["hello", "fine"]
    assert metrics["messages_removed"] == {"too_long": 1, "too_short": 1, "total": 2}
    assert metrics["messages_in"] == 4 and metrics["messages_out"] == 2


def test_exact_and_near_duplicates_within_a_conversation(params_factory):
    cfg = params_factory({"clean.dedup": "near", "clean.dedup_min_chars": 5, "clean.min_speakers": 1}).clean
    messages = [("a", "see you at the station"), ("b", "see you at the station"),  # other speaker: kept
                ("a", "see you at the station"),  # exact repeat
                ("a", "See you, at the STATION!"),  # same words, other case and punctuation
                ("a", "see you at the statoin"),  # a typo: ratio >= 0.9
                ("a", "lol"), ("a", "lol"),  # shorter than dedup_min_chars: natural repeats stay
                ("a", "something else entirely")]
    kept, metrics = clean_conversations([conv("c", *messages)], cfg)
    assert [m["text"] for m in kept[0]["messages"]] == [
        "see you at the station", "see you at the station", "lol", "lol", "something else entirely"]
    assert metrics["messages_removed"] == {"duplicate_exact": 1, "duplicate_near": 2, "total": 3}


def test_exact_mode_keeps_near_duplicates(params_factory):
    cfg = params_factory({"clean.dedup": "exact", "clean.dedup_min_chars": 1, "clean.min_speakers": 1}).clean
    kept, _ = clean_conversations([conv("c", ("a", "hello there"), ("a", "Hello there!"), ("a", "hello there"))], cfg)
    assert [m["text"] for m in kept[0]["messages"]] == ["hello there", "Hello there!"]


def test_duplicates_across_conversations_are_not_removed(params_factory):
    cfg = params_factory({"clean.dedup_min_chars": 1}).clean
    kept, _ = clean_conversations([conv("c1", ("a", "hello there"), ("b", "hi")),
                                   conv("c2", ("a", "hello there"), ("b", "hi"))], cfg)
    assert len(kept) == 2


def test_excluded_speakers_lose_everything_they_wrote(params_factory):
    cfg = params_factory({"clean.exclude_speakers": ["bob"], "clean.min_messages": 1, "clean.min_speakers": 1}).clean
    kept, metrics = clean_conversations([conv("c", ("a", "hi bob"), ("bob", "my secret"), ("a", "bye"))], cfg)
    assert all(m["speaker"] != "bob" for c in kept for m in c["messages"])
    assert "my secret" not in str(kept)
    assert metrics["messages_removed"]["excluded_speaker"] == 1


def test_conversations_left_too_short_are_removed_and_counted(params_factory):
    cfg = params_factory({"clean.min_messages": 2, "clean.min_speakers": 2, "clean.exclude_speakers": ["b"]}).clean
    kept, metrics = clean_conversations([conv("c1", ("a", "hi"), ("b", "hey")),
                                         conv("c2", ("a", "one"), ("a", "two"), ("c", "three"))], cfg)
    assert [c["id"] for c in kept] == ["c2"]
    assert metrics["conversations_removed"] == {"too_few_messages": 1, "total": 1}
    assert metrics["messages_removed"]["in_removed_conversation:too_few_messages"] == 1
    assert metrics["conversations_in"] == 2 and metrics["conversations_out"] == 1


def test_pii_is_scrubbed_and_counted_per_type(params_factory):
    cfg = params_factory({"clean.pii": ["email", "phone"]}).clean
    kept, metrics = clean_conversations(
        [conv("c", ("a", "mail me at jo@example.com or call 555-123-4567"), ("b", "ok @jo, at 10:30"))], cfg)
    assert kept[0]["messages"][0]["text"] == "mail me at <EMAIL> or call <PHONE>"
    assert kept[0]["messages"][1]["text"] == "ok @jo, at 10:30"  # handle not selected; a time is no phone
    assert metrics["pii_replacements"] == {"email": 1, "phone": 1, "total": 2}
    assert metrics["messages_with_pii"] == 1


def test_message_accounting_balances(params_factory):
    cfg = params_factory({"clean.min_chars": 3}).clean
    convs = [conv("c1", ("a", "hi"), ("b", "hello there"), ("a", "hello there friend")),
             conv("c2", ("a", "x"), ("b", "yo"))]
    kept, metrics = clean_conversations(convs, cfg)
    assert metrics["messages_in"] == metrics["messages_out"] + metrics["messages_removed"]["total"]
