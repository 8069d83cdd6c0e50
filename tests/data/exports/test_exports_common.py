"""The shared layer of the chat-app readers: sessions, skipped threads, merged parts, nameless ids."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest

from qlora_pipeline.data.exports import conversations_of, drop_repeats_across_files, merge_threads, sessions
from qlora_pipeline.data.exports.common import ExportCounts, ExportMessage, Thread

T0 = datetime(2024, 3, 1, 9, 0)


def msg(speaker, minutes, text="x", t0=T0):
    return ExportMessage(speaker, text, None if minutes is None else t0 + timedelta(minutes=minutes), f"f:{minutes}")


@pytest.mark.parametrize(("gap", "expected"), [(60, [3, 2]), (30, [2, 1, 2]), (None, [5])])
def test_a_pause_longer_than_the_gap_starts_a_conversation(gap, expected):
    # pauses: 5, 45 (> 30), 120 (> 60 and > 30), 1 minute
    messages = [msg("a", 0), msg("b", 5), msg("a", 50), msg("b", 170), msg("a", 171)]
    assert [len(part) for part in sessions(messages, gap)] == expected


def test_a_pause_of_exactly_the_gap_does_not_cut():
    assert len(sessions([msg("a", 0), msg("b", 60)], 60)) == 1


def test_messages_without_time_or_going_back_never_cut():
    messages = [msg("a", 0), msg("b", None), msg("a", 500), msg("b", 10)]  # the clock went back: no pause
    assert [len(p) for p in sessions(messages, 60)] == [2, 2]  # a message without a time neither cuts nor resets the clock


def test_conversation_ids_are_stable_numbered_and_name_no_one(params_factory):
    cfg = params_factory({"data.source": "whatsapp", "data.path": "x"}).data
    thread = Thread("data/source/WhatsApp Chat with Bob Jones.txt", "f",
                    [msg("Bob Jones", 0), msg("Ann", 1), msg("Bob Jones", 200), msg("Ann", 201)])
    convs = conversations_of([thread], cfg, Counter())
    assert [c["id"] for c in convs] == [f"{convs[0]['meta']['thread']}-0001", f"{convs[0]['meta']['thread']}-0002"]
    assert all("bob" not in c["id"].lower() for c in convs)
    assert convs == conversations_of([thread], cfg, Counter())
    assert convs[1]["messages"][0] == {"speaker": "Bob Jones", "text": "x", "time": "2024-03-01T12:20:00"}


def test_empty_and_one_speaker_threads_are_skipped_and_counted(params_factory):
    cfg = params_factory({"data.source": "telegram", "data.path": "x"}).data
    threads = [Thread("1", "f", []), Thread("2", "f", [msg("me", 0), msg("me", 1)]),
               Thread("3", "f", [msg("me", 0), msg("you", 1)])]
    skipped = Counter()
    convs = conversations_of(threads, cfg, skipped)
    assert len(convs) == 1 and skipped == {"empty": 1, "one_speaker": 1}


def test_parts_of_one_thread_are_merged_in_time_order():
    utc = timezone.utc
    newer = Thread("inbox/t", "message_1.json", [msg("a", 10, t0=T0.replace(tzinfo=utc))])
    older = Thread("inbox/t", "message_2.json", [msg("b", 0, t0=T0.replace(tzinfo=utc)),
                                                 msg("a", 5, t0=T0.replace(tzinfo=utc))])
    other = Thread("inbox/u", "message_1.json", [msg("c", 0)])
    merged = merge_threads([newer, older, other])
    assert [t.key for t in merged] == ["inbox/t", "inbox/u"]
    assert [m.speaker for m in merged[0].messages] == ["b", "a", "a"]


def test_a_chat_exported_twice_is_read_once():
    older = Thread("old.txt", "old.txt", [msg("a", 0, "hi"), msg("b", 1, "ok"), msg("b", 1, "ok")])
    newer = Thread("new.txt", "new.txt", [msg("a", 0, "hi"), msg("b", 1, "ok"), msg("a", 2, "new since")])
    timeless = Thread("t.txt", "t.txt", [msg("a", None, "hi")])
    counts = ExportCounts()
    threads = drop_repeats_across_files([older, newer, timeless], counts)
    assert [m.text for m in threads[0].messages] == ["hi", "ok", "ok"]  # within one file repeats are kept
    assert [m.text for m in threads[1].messages] == ["new since"]
    assert [m.text for m in threads[2].messages] == ["hi"]  # no time: nothing to tell a repeat by
    assert counts.removed == {"in_earlier_file": 2}
