"""clean.pseudonymize_speakers and names in params: who is hidden, where, and what is left alone."""

from __future__ import annotations

import pytest

from qlora_pipeline.data.cleaning import clean_conversations, hide_other_speakers, resolve_exclusions
from qlora_pipeline.data.pseudonyms import build_pseudonyms, name_words
from qlora_pipeline.data.speakers import find_speaker, message_counts, resolve_persona
from qlora_pipeline.data.splitting import split_examples
from qlora_pipeline.errors import PipelineError


def conv(cid, *messages):
    return {"id": cid, "messages": [{"speaker": s, "text": t, "time": None} for s, t in messages], "meta": {}}


def hidden_texts(raw, persona="Alex Kim", cfg=None):
    kept = raw if cfg is None else clean_conversations(raw, cfg)[0]
    out, counts = hide_other_speakers(raw, kept, persona, "chat.txt")
    return [m["text"] for c in out for m in c["messages"]], [m["speaker"] for c in out for m in c["messages"]], counts


def test_friends_are_numbered_by_first_message_and_the_persona_keeps_their_name():
    raw = [conv("c1", ("Sam Lee", "hi"), ("Alex Kim", "hey")), conv("c2", ("Jo Park", "yo"), ("Sam Lee", "hello"))]
    _, speakers, counts = hidden_texts(raw)
    assert speakers == ["Friend 1", "Alex Kim", "Friend 2", "Friend 1"]
    assert counts == {"speakers": 2, "names_in_text": 0}


def test_full_names_and_name_parts_in_text_are_replaced_in_any_case():
    raw = [conv("c", ("Sam Lee", "hi"), ("Alex Kim", "did SAM LEE call? tell sam. Lee's cat too"))]
    texts, _, counts = hidden_texts(raw)
    assert texts[1] == "did Friend 1 call? tell Friend 1. Friend 1's cat too"
    assert counts["names_in_text"] == 3


def test_a_name_inside_a_longer_word_is_left_alone():
    raw = [conv("c", ("Ann Roe", "hi"), ("Alex Kim", "Annex, Bobby, annoy and Ann"))]
    assert hidden_texts(raw)[0][1] == "Annex, Bobby, annoy and Friend 1"


def test_a_name_that_is_an_everyday_word_is_replaced_only_as_written():
    assert "will" in name_words() and "may" in name_words()
    raw = [conv("c", ("Will Turner", "hi"), ("May", "hey"), ("Alex Kim", "Will said you will come in may, May"))]
    texts, _, _ = hidden_texts(raw)
    assert texts[2] == "Friend 1 said you will come in may, Friend 2"
    assert hidden_texts([conv("c", ("Will Turner", "hi"), ("Alex Kim", "ask turner"))])[0][1] == "ask Friend 1"


def test_a_label_in_a_contacts_name_is_replaced_only_as_written():
    """A contact saved as "Sarah Work" made every "work" in the chat read "Friend 1"."""
    raw = [conv("c", ("Sarah Work", "is the gym open? work is crazy"), ("Mom", "see you at work, sarah"),
                ("Alex Kim", "the gym is open, work is fine; Sarah Work, mom says hi"))]
    texts, _, _ = hidden_texts(raw)
    assert texts == ["is the gym open? work is crazy", "see you at work, Friend 1",
                     "the gym is open, work is fine; Friend 1, mom says hi"]


def test_a_first_name_two_friends_share_names_neither():
    raw = [conv("c", ("Sam Lee", "hi"), ("Sam Park", "hey"), ("Alex Kim", "sam and Sam Park and Lee"))]
    assert hidden_texts(raw)[0][2] == "Friend and Friend 2 and Friend 1"


def test_a_name_part_the_persona_shares_is_kept():
    raw = [conv("c", ("Alex Roe", "hi"), ("Alex Kim", "Alex here, and Alex Roe and roe"))]
    assert hidden_texts(raw)[0][1] == "Alex here, and Friend 1 and Friend 1"


def test_names_are_matched_across_the_marks_and_spaces_the_apps_insert():
    raw = [conv("c", ("\u202aJo\u00a0Park\u202c", "hi"), ("Alex Kim", "jo park!"))]
    texts, speakers, _ = hidden_texts(raw)
    assert (texts[1], speakers[0]) == ("Friend 1!", "Friend 1")


def test_excluded_people_are_numbered_and_hidden_where_others_name_them(params_factory):
    raw = [conv("c", ("Sam Lee", "hi"), ("Jo Park", "secret"), ("Alex Kim", "Jo told me"), ("Sam Lee", "ok"))]
    cfg = resolve_exclusions(raw, params_factory({"clean.exclude_speakers": ["jo park"]}).clean, "chat.txt")
    assert cfg.exclude_speakers == ["Jo Park"]
    texts, speakers, counts = hidden_texts(raw, cfg=cfg)
    assert texts == ["hi", "Friend 2 told me", "ok"] and speakers == ["Friend 1", "Alex Kim", "Friend 1"]
    assert counts["speakers"] == 1  # Jo Park's messages are gone; Sam Lee is the one pseudonym left


def test_an_unknown_excluded_name_stops_clean_with_close_names(params_factory):
    raw = [conv("c", ("Sam Lee", "hi"), ("Alex Kim", "hey"))]
    with pytest.raises(PipelineError, match=r"clean\.exclude_speakers: speaker 'Sam Le' does not occur in chat\.txt; "
                                            r"did you mean 'Sam Lee'\?"):
        resolve_exclusions(raw, params_factory({"clean.exclude_speakers": ["Sam Le"]}).clean, "chat.txt")


def test_a_name_that_fits_two_speakers_must_be_written_exactly():
    counts = message_counts([conv("c", ("sam", "a"), ("Sam", "b"), ("x", "c"))])
    assert find_speaker("Sam", counts, "split.persona", "f") == "Sam"
    with pytest.raises(PipelineError, match=r"split\.persona: 'SAM' fits several speakers in f: Sam, sam"):
        find_speaker("SAM", counts, "split.persona", "f")


def test_auto_persona_is_declared_so_split_never_picks_a_friend(params_factory):
    # Zed and Zoe tie; auto takes the first name, Zed. Renamed, Zoe (Friend 1) would sort first.
    raw = [conv(f"c{i}", ("Zoe", "a question?"), ("Zed", "an answer")) for i in range(4)]
    out, _ = hide_other_speakers(raw, raw, "auto", "chat.txt")
    assert {c["meta"]["persona"] for c in out} == {"Zed"}
    undeclared = [{**c, "meta": {}} for c in out]
    assert resolve_persona(undeclared, "auto", "clean") == "Friend 1"
    splits, metrics = split_examples(out, params_factory().split, 0, "clean")
    assert metrics["persona"] == "Zed"
    assert {ex["speaker"] for rows in splits.values() for ex in rows} == {"Zed"}


def test_persona_by_display_name_ignores_case_and_spacing():
    raw = [conv("c", ("Sam Lee", "hi"), ("Alex  Kim", "hey"))]
    out, _ = hide_other_speakers(raw, raw, "alex kim", "chat.txt")
    assert [m["speaker"] for m in out[0]["messages"]] == ["Friend 1", "Alex  Kim"]


def test_a_group_voice_pseudonymizes_everyone():
    raw = [conv("c", ("Sam Lee", "hi Alex"), ("Alex Kim", "hey Sam"))]
    texts, speakers, _ = hidden_texts(raw, persona="all")
    assert speakers == ["Friend 1", "Friend 2"] and texts == ["hi Friend 2", "hey Friend 1"]


def test_one_word_name_wins_over_another_friends_part():
    table = build_pseudonyms(["Sam", "Sam Lee", "Alex"], keep="Alex")
    assert table.text("sam, Sam Lee") == "Friend 1, Friend 2"
