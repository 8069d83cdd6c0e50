"""Messenger/Instagram exports (data.source: messenger): the fixtures under fixtures/messenger/ are
invented chats written the way Meta writes them (see its README.md); the fine cases build a file inline."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from qlora_pipeline.config import DataConfig
from qlora_pipeline.data.exports import messenger
from qlora_pipeline.data.exports.common import ExportCounts, NotThisExport
from qlora_pipeline.data.sources import fetch
from qlora_pipeline.errors import PipelineError

FIXTURES = Path(__file__).parent / "fixtures" / "messenger"
RENEE = "facebook/messages/inbox/reneedubois_10158"
CREW = "facebook/messages/inbox/trailcrew_20481"
INSTAGRAM = "instagram/your_instagram_activity/messages/inbox/sofiarossi_17841"
E2EE = "e2ee/Renee Dubois_3.json"
BASE_MS = 1_704_103_200_000  # 2024-01-01 10:00:00 UTC
CFG = DataConfig(source="messenger", path="message_1.json")


def meta_escaped(value):
    """Strings as Meta writes them: each UTF-8 byte as its own character (json.dumps then gives \\u00XX)."""
    if isinstance(value, str):
        return value.encode("utf-8").decode("latin-1")
    if isinstance(value, list):
        return [meta_escaped(v) for v in value]
    if isinstance(value, dict):
        return {k: meta_escaped(v) for k, v in value.items()}
    return value


def msg(sender: str | None, content: str | None = None, at: int = 0, **fields) -> dict:
    record = {"sender_name": sender, "timestamp_ms": BASE_MS + at * 1000, "content": content, "type": "Generic"}
    return {k: v for k, v in {**record, **fields}.items() if v is not None}


def write_thread(folder: Path, messages: list[dict], escape: bool = True, name: str = "message_1.json",
                 **top) -> Path:
    """A main-download chat file from ``messages`` in chat order (oldest first), stored newest first."""
    body = {"participants": [{"name": "Ana Silva"}, {"name": "Ben Carter"}], "messages": messages[::-1],
            "title": "Ben Carter", "is_still_participant": True, "thread_path": "inbox/bencarter_555",
            "magic_words": [], **top}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(meta_escaped(body) if escape else body, indent=2, ensure_ascii=True))
    return path


def read_one(path: Path) -> tuple[list, ExportCounts]:
    counts = ExportCounts()
    threads = messenger.read(path, path.name, CFG, counts)
    assert len(threads) == 1
    return threads[0].messages, counts


def texts(messages) -> list[tuple[str, str]]:
    return [(m.speaker, m.text) for m in messages]


def fetch_fixture(params_factory, path: str):
    cfg = params_factory({"data.source": "messenger", "data.path": path}).data
    return fetch(cfg, FIXTURES)


def utc(text: str) -> str:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).isoformat()


# ------------------------------------------------------------------ whole exports, through fetch


def test_facebook_chat_read_oldest_first_repaired_and_without_notices(params_factory):
    result = fetch_fixture(params_factory, RENEE)
    [conversation] = result.conversations
    assert [(m["speaker"], m["text"], m["time"]) for m in conversation["messages"]] == [
        ("Renée Dubois", "Salut Zoë ! Tu viens au café ce soir ?", utc("2024-01-05 18:00:02")),
        ("Zoë Wright", "Oui 😂 j’arrive", utc("2024-01-05 18:01:15")),
        ("Renée Dubois", "我们在二楼\nsecond floor, by the window", utc("2024-01-05 18:03:00")),
        ("Renée Dubois", "À demain !", utc("2024-01-05 18:06:30")),
    ]
    assert result.manifest["export"]["rows_removed"] == {"call": 1, "deleted": 1, "media_only": 1, "reaction": 1,
                                                         "system": 1}
    assert result.manifest["counts"]["rows_rejected"] == {}


def test_instagram_chat_drops_likes_reactions_attachments_and_shared_posts(params_factory):
    result = fetch_fixture(params_factory, INSTAGRAM)
    [conversation] = result.conversations
    assert [(m["speaker"], m["text"]) for m in conversation["messages"]] == [
        ("Sofia Rossi", "Ciao Max! Wie war die Wanderung?"),
        ("Max Müller", "Schön, aber kalt ❄️"),
        ("Max Müller", "Grazie, alla prossima 🙌"),
    ]
    assert result.manifest["export"]["rows_removed"] == {"link_only": 1, "media_only": 1, "reaction": 2,
                                                         "system": 1}


def test_encrypted_chats_download_read_in_its_own_shape(params_factory):
    result = fetch_fixture(params_factory, E2EE)
    [conversation] = result.conversations
    assert [(m["speaker"], m["text"], m["time"]) for m in conversation["messages"]] == [
        ("Renée Dubois", "Coucou 👋", utc("2024-06-01 08:00:00")),
        ("Zoë Wright", "Merci, à bientôt", utc("2024-06-01 08:03:00")),
    ]
    assert result.manifest["export"]["rows_removed"] == {"deleted": 1, "link_only": 1, "media_only": 1}


def test_folder_reads_only_chat_files(params_factory):
    # The fixture folder also holds a README.md and a Telegram result.json; both are passed over.
    cfg = params_factory({"data.source": "messenger", "data.path": "instagram"}).data
    assert len(fetch(cfg, FIXTURES).conversations) == 1


def test_chat_split_over_two_files_is_one_thread_in_time_order(params_factory):
    conversations = fetch_fixture(params_factory, CREW).conversations
    assert len({c["id"] for c in conversations}) == len(conversations)
    assert len({c["meta"]["thread"] for c in conversations}) == 1
    assert [[m["text"] for m in c["messages"]] for c in conversations] == [  # two sessions, a week apart
        ["Who's in for Saturday?", "Me! 🥾"],  # message_2.json: the older part
        ["Ben Carter named the group Trail Crew, right?", "This is the route: https://example.com/route",
         "See you at 8 at the trailhead."],
    ]


# ------------------------------------------------------------------ the encoding fault


def test_accented_names_repaired(tmp_path):
    messages, _ = read_one(write_thread(tmp_path, [msg("José Núñez", "hola"), msg("Ana Silva", "hi", at=1)]))
    assert [m.speaker for m in messages] == ["José Núñez", "Ana Silva"]


def test_emoji_written_as_four_escapes_repaired(tmp_path):
    path = write_thread(tmp_path, [msg("Ana Silva", "so good 😂👍🏽")])
    assert "\\u00f0\\u009f\\u0098\\u0082" in path.read_text()
    messages, _ = read_one(path)
    assert messages[0].text == "so good 😂👍🏽"


def test_cjk_repaired(tmp_path):
    messages, _ = read_one(write_thread(tmp_path, [msg("Ana Silva", "你好，明天见")]))
    assert messages[0].text == "你好，明天见"


def test_curly_apostrophe_repaired(tmp_path):
    messages, _ = read_one(write_thread(tmp_path, [msg("Ana Silva", "I’m on my way…")]))
    assert messages[0].text == "I’m on my way…"


def test_correctly_encoded_file_kept_unchanged(tmp_path):
    # A file some tool already repaired: "caf\u00e9" is "café" itself, not two bytes of one letter.
    path = write_thread(tmp_path, [msg("Zoë Wright", "café 😀 à 8h"), msg("Ana Silva", "Ça marche", at=1)],
                        escape=False)
    assert "caf\\u00e9" in path.read_text()
    messages, _ = read_one(path)
    assert texts(messages) == [("Zoë Wright", "café 😀 à 8h"), ("Ana Silva", "Ça marche")]


def test_mixed_string_that_cannot_be_repaired_is_kept():
    assert messenger.repair("cafÃ© 😀") == "cafÃ© 😀"  # a character above U+00FF: not bytes at all
    assert messenger.repair("Ã and é") == "Ã and é"  # Latin-1, but not valid UTF-8 as bytes
    assert messenger.repair("cafÃ©") == "café"


# ------------------------------------------------------------------ order and thread identity


def test_files_of_one_chat_share_its_key_and_message_2_is_older():
    counts = ExportCounts()
    newer = messenger.read(FIXTURES / CREW / "message_1.json", "message_1.json", CFG, counts)[0]
    older = messenger.read(FIXTURES / CREW / "message_2.json", "message_2.json", CFG, counts)[0]
    assert newer.key == older.key == "inbox/trailcrew_20481"
    assert older.messages[-1].time < newer.messages[0].time


def test_key_falls_back_to_the_chat_folder_without_thread_path(tmp_path):
    path = write_thread(tmp_path / "inbox" / "bencarter_555", [msg("Ana Silva", "hi")], thread_path=None)
    assert messenger.read(path, "message_1.json", CFG, ExportCounts())[0].key == "inbox/bencarter_555"


def test_equal_timestamps_keep_the_chat_order(tmp_path):
    messages, _ = read_one(write_thread(tmp_path, [msg("Ana Silva", "first"), msg("Ben Carter", "second"),
                                                   msg("Ana Silva", "third", at=1)]))
    assert [m.text for m in messages] == ["first", "second", "third"]


def test_times_are_utc_from_milliseconds(tmp_path):
    messages, _ = read_one(write_thread(tmp_path, [msg("Ana Silva", "hi", timestamp_ms=1_704_057_302_123)]))
    assert messages[0].time == datetime(2023, 12, 31, 21, 15, 2, 123000, tzinfo=timezone.utc)


def test_message_where_names_its_index_in_the_file(tmp_path):
    messages, _ = read_one(write_thread(tmp_path, [msg("Ana Silva", "old"), msg("Ben Carter", "new", at=1)]))
    assert [m.where for m in messages] == ["message_1.json: messages[1]", "message_1.json: messages[0]"]


# ------------------------------------------------------------------ notices


def test_calls_removed(tmp_path):
    messages, counts = read_one(write_thread(tmp_path, [
        msg("Ana Silva", "You called Ben Carter.", type="Call", call_duration=75),
        msg("Ben Carter", "You missed a call from Ben Carter.", at=1, type="Call", call_duration=0, missed=True),
        msg("Ben Carter", "The video call ended.", at=2),
        msg("Ana Silva", "call me later", at=3),
    ]))
    assert texts(messages) == [("Ana Silva", "call me later")]
    assert counts.removed == {"call": 3}


def test_members_added_and_leaving_removed_as_system(tmp_path):
    messages, counts = read_one(write_thread(tmp_path, [
        msg("Ana Silva", "Ana Silva added Carol Diaz to the group.", type="Subscribe", users=[{"name": "Carol Diaz"}]),
        msg("Carol Diaz", "Carol Diaz left the group.", at=1, type="Unsubscribe", users=[{"name": "Carol Diaz"}]),
        msg("Ben Carter", "bye Carol", at=2),
    ]))
    assert texts(messages) == [("Ben Carter", "bye Carol")]
    assert counts.removed == {"system": 2}


def test_group_and_chat_settings_notices_removed(tmp_path):
    notices = ["Ana Silva named the group Lake Trip 🌊.", "Ana Silva changed the group photo.",
               "Ana Silva set the nickname for Ben Carter to Benny.", "You set your nickname to Ana.",
               "Ana Silva changed the theme to Love.", "Ana Silva set the emoji to 🔥.",
               "Ana Silva pinned a message.", "You are now connected on Messenger"]
    messages, counts = read_one(write_thread(tmp_path, [msg("Ana Silva", text, at=i) for i, text in
                                                        enumerate(notices)] + [msg("Ben Carter", "ok", at=99)]))
    assert texts(messages) == [("Ben Carter", "ok")]
    assert counts.removed == {"system": len(notices)}


def test_notice_wording_typed_by_someone_else_is_kept(tmp_path):
    # Only the sender (or "You") leads a real notice: Ben quoting Ana's rename is Ben talking.
    messages, counts = read_one(write_thread(tmp_path, [
        msg("Ben Carter", "Ana Silva named the group Lake Trip and I love it"),
        msg("Ana Silva", "thanks", at=1)]))
    assert len(messages) == 2 and not counts.removed


def test_reaction_notices_removed(tmp_path):
    messages, counts = read_one(write_thread(tmp_path, [
        msg("Ana Silva", "lunch?"),
        msg("Ben Carter", "Ben Carter reacted 😢 to your message", at=1),
        msg("Ben Carter", "Reacted ❤️ to your message ", at=2),
        msg("Ben Carter", "Liked a message", at=3),
        msg("Ben Carter", "sure", at=4, reactions=[{"reaction": "👍", "actor": "Ana Silva"}]),
    ]))
    assert texts(messages) == [("Ana Silva", "lunch?"), ("Ben Carter", "sure")]
    assert counts.removed == {"reaction": 3}


def test_unsent_messages_removed_as_deleted(tmp_path):
    messages, counts = read_one(write_thread(tmp_path, [
        msg("Ana Silva", None, is_unsent=True),
        msg("Ben Carter", "Ben Carter unsent a message.", at=1),
        msg("Ana Silva", "oops, wrong chat", at=2, is_unsent=False),
    ]))
    assert texts(messages) == [("Ana Silva", "oops, wrong chat")]
    assert counts.removed == {"deleted": 2}


def test_media_without_text_removed(tmp_path):
    photo = [{"uri": "messages/inbox/bencarter_555/photos/1.jpg", "creation_timestamp": 1704103200}]
    messages, counts = read_one(write_thread(tmp_path, [
        msg("Ana Silva", photos=photo),
        msg("Ben Carter", sticker={"uri": "messages/stickers_used/1.png"}, at=1),
        msg("Ben Carter", audio_files=[{"uri": "audio/1.mp4"}], at=2),
        msg("Ana Silva", "You sent an attachment.", at=3),
        msg("Ben Carter", "Ben Carter sent a photo.", at=4),
        msg("Ana Silva", "nice!", at=5),
    ]))
    assert texts(messages) == [("Ana Silva", "nice!")]
    assert counts.removed == {"media_only": 5}


def test_photo_with_a_caption_keeps_the_caption(tmp_path):
    messages, _ = read_one(write_thread(tmp_path, [msg("Ana Silva", "the summit!", photos=[{"uri": "p/1.jpg"}])]))
    assert texts(messages) == [("Ana Silva", "the summit!")]


def test_share_of_only_a_link_removed(tmp_path):
    messages, counts = read_one(write_thread(tmp_path, [
        msg("Ana Silva", "https://example.com/a", type="Share", share={"link": "https://example.com/a"}),
        msg("Ben Carter", None, at=1, type="Share", share={"link": "https://example.com/b", "share_text": "B"}),
    ]))
    assert messages == [] and counts.removed == {"link_only": 2}


def test_share_with_typed_text_kept(tmp_path):
    text = "look at this one https://example.com/a"
    messages, _ = read_one(write_thread(tmp_path, [
        msg("Ana Silva", text, type="Share", share={"link": "https://example.com/a"})]))
    assert texts(messages) == [("Ana Silva", text)]


def test_message_with_nothing_in_it_removed_as_empty(tmp_path):
    messages, counts = read_one(write_thread(tmp_path, [msg("Ana Silva", None), msg("Ben Carter", "  ", at=1)]))
    assert messages == [] and counts.removed == {"empty": 2}


def test_multiline_text_kept_as_written(tmp_path):
    messages, _ = read_one(write_thread(tmp_path, [msg("Ana Silva", "list:\n- boots\n- water  ")]))
    assert messages[0].text == "list:\n- boots\n- water  "


def test_notice_in_another_ui_language_stays_as_text(tmp_path):
    # Documented limit: only the English wording of text notices is known.
    messages, _ = read_one(write_thread(tmp_path, [msg("Ana Silva", "Ana Silva a nommé le groupe Rando.")]))
    assert texts(messages) == [("Ana Silva", "Ana Silva a nommé le groupe Rando.")]


# ------------------------------------------------------------------ unreadable records and files


def test_records_without_sender_or_time_rejected(tmp_path):
    messages, counts = read_one(write_thread(tmp_path, [
        msg(None, "who said this?"),
        msg("", "nobody", at=1),
        msg("Ana Silva", "when?", timestamp_ms="yesterday"),
        "not a message",
        msg("Ben Carter", "fine", at=2),
    ]))
    assert texts(messages) == [("Ben Carter", "fine")]
    assert counts.rejected == {"no_sender": 2, "bad_time": 1, "not_an_object": 1}


def test_file_with_no_readable_time_names_file_message_and_param(tmp_path):
    path = write_thread(tmp_path, [msg("Ana Silva", "hi", timestamp_ms="2024-01-01T10:00:00"),
                                   msg("Ben Carter", "hey", timestamp_ms="2024-01-01T10:01:00")])
    with pytest.raises(PipelineError, match=r"message_1\.json: messages\[0\]: \"timestamp_ms\" is "
                                            r"'2024-01-01T10:01:00'.*data\.path.*data\.source"):
        read_one(path)


def test_number_longer_than_python_reads_names_its_line(tmp_path):
    # Found by test_export_properties: json.loads raises a plain ValueError for an integer of more than
    # sys.get_int_max_str_digits() digits, which escaped as a traceback.
    path = write_thread(tmp_path, [msg("Ana Silva", "hi"), msg("Ben Carter", "hey", at=1)], escape=False)
    lines = path.read_text().split("\n")
    line = next(number for number, text in enumerate(lines, start=1) if '"timestamp_ms"' in text)
    lines[line - 1] = lines[line - 1].replace(str(BASE_MS + 1000), "9" * 5000)
    path.write_text("\n".join(lines))
    with pytest.raises(PipelineError, match=rf"message_1\.json:{line}: a number has more than \d+ digits"):
        read_one(path)


def test_telegram_file_is_not_this_export(tmp_path):
    with pytest.raises(NotThisExport, match=r"other/result\.json:1: not a Messenger/Instagram export"):
        messenger.read(FIXTURES / "other" / "result.json", "other/result.json", CFG, ExportCounts())


def test_telegram_export_named_with_its_data_source(params_factory):
    with pytest.raises(PipelineError, match=r"other/result\.json:1: .*data\.source: telegram"):
        fetch_fixture(params_factory, "other/result.json")


def test_html_download_named_with_the_fix(tmp_path):
    path = tmp_path / "message_1.html"
    path.write_text("<html><head><title>Ben Carter</title></head><body></body></html>")
    with pytest.raises(PipelineError, match=r"message_1\.html:1: an HTML export.*Format: JSON"):
        read_one(path)


def test_zipped_download_named_with_the_fix(tmp_path):
    path = tmp_path / "facebook-anasilva-2024.zip"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 26)
    with pytest.raises(PipelineError, match=r"facebook-anasilva-2024\.zip: a zip archive; unzip"):
        read_one(path)


def test_chat_of_only_notices_holds_no_messages(params_factory, tmp_path):
    write_thread(tmp_path, [msg("Ana Silva", "You are now connected on Messenger"),
                            msg("Ben Carter", "Liked a message", at=1)])
    cfg = params_factory({"data.source": "messenger", "data.path": str(tmp_path)}).data
    with pytest.raises(PipelineError, match=r"message_1\.json: the Messenger/Instagram export holds no messages "
                                            r"\(2 app notice\(s\) removed.*data\.path"):
        fetch(cfg)


def test_chat_with_one_speaker_errors(params_factory, tmp_path):
    write_thread(tmp_path, [msg("Ana Silva", "note to self"), msg("Ana Silva", "buy socks", at=1)])
    cfg = params_factory({"data.source": "messenger", "data.path": str(tmp_path)}).data
    with pytest.raises(PipelineError, match=r"message_1\.json: messages\[1\]: every message .* one speaker "
                                            r"\(Ana Silva\)"):
        fetch(cfg)


# ------------------------------------------------------------------ telling files apart


@pytest.mark.parametrize("name, wanted", [
    ("message_1.json", True), ("message_12.json", True), ("message_1.html", False), ("result.json", False),
    ("README.md", False), ("your_posts_1.json", False), ("Renee Dubois_3.json", True)])
def test_matches_chat_files_only(tmp_path, name, wanted):
    # "<Name>_<n>.json" is the encrypted-chats download only when its head shows that shape.
    path = tmp_path / name
    shape = "e2ee" if name.startswith("Renee") else "posts"
    path.write_text((FIXTURES / E2EE).read_text() if shape == "e2ee" else '[{"timestamp": 1, "data": []}]')
    assert messenger.matches(path) is wanted


@pytest.mark.parametrize("sample, wanted", [
    (f"{RENEE}/message_1.json", True),
    (E2EE, True),
    ("other/result.json", False),
])
def test_looks_like_claims_meta_files_only(sample, wanted):
    head = (FIXTURES / sample).read_bytes()[:1 << 16]
    assert messenger.looks_like(head, Path(sample).name) is wanted


DISCORD_HEAD = (b'{"guild": {"id": "1", "name": "Direct Messages"}, "channel": {"name": "ana"}, "participants": [], '
                b'"messages": [{"author": {"name": "ana"}, "content": "hi", "sender_name": "x"}]}')


@pytest.mark.parametrize("head", [
    DISCORD_HEAD,
    b'01/02/2024, 10:00 - Ana Silva: {"participants": [], "sender_name": "x"}\n',
    b'{"conversation": "c1", "speaker": "Ana", "text": "hi"}\n',
    b'\x80\x81 not utf-8 "participants"',
])
def test_looks_like_leaves_other_formats_alone(head):
    assert messenger.looks_like(head, "chat.json") is False


OTHER_APPS = sorted(p for p in FIXTURES.parent.glob("*/**/*") if p.is_file() and "messenger" not in p.parts)


@pytest.mark.parametrize("path", OTHER_APPS, ids=lambda p: str(p.relative_to(FIXTURES.parent)))
def test_other_apps_fixtures_neither_matched_nor_claimed(path):
    assert not messenger.matches(path)
    assert not messenger.looks_like(path.read_bytes()[:1 << 16], path.name)
