"""data.source: telegram: Telegram Desktop's result.json, one chat or a whole account, read into conversations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora_pipeline.data.exports import telegram
from qlora_pipeline.data.exports.common import ExportCounts, NotThisExport
from qlora_pipeline.data.sources import fetch
from qlora_pipeline.errors import PipelineError

FIXTURES = Path(__file__).parent / "fixtures"
CHAT = FIXTURES / "telegram" / "chat" / "result.json"
ACCOUNT = FIXTURES / "telegram" / "account" / "result.json"


@pytest.fixture
def fetch_telegram(params_factory):
    def run(path: Path, **overrides):
        cfg = params_factory({"data.source": "telegram", "data.path": str(path),
                              **{f"data.{k}": v for k, v in overrides.items()}}).data
        return fetch(cfg)
    return run


def message(mid: int, sender: str | None, text, date: str = "2024-03-01T19:00:00", **extra) -> dict:
    return {"id": mid, "type": "message", "date": date, "from": sender, "from_id": f"user{mid}", "text": text, **extra}


def write_chat(tmp_path: Path, messages: list[dict], chat_type: str = "personal_chat") -> Path:
    path = tmp_path / "result.json"
    path.write_text(json.dumps({"name": "Chat", "type": chat_type, "id": 42, "messages": messages}))
    return path


def read_messages(path: Path) -> tuple[list, ExportCounts]:
    counts = ExportCounts()
    threads = telegram.read(path, "result.json", None, counts)
    return [(m.speaker, m.text) for t in threads for m in t.messages], counts


def test_one_chat_export_becomes_its_conversation(fetch_telegram):
    result = fetch_telegram(CHAT)
    [conversation] = result.conversations
    assert [(m["speaker"], m["text"], m["time"]) for m in conversation["messages"]] == [
        ("Ana Lima", "hi Ben! are we still on for saturday?", "2024-03-01T19:01:05"),
        ("Ben Okafor", "yes! see you at https://example.com/trail", "2024-03-01T19:02:10"),
        ("Ana Lima", "the view last time", "2024-03-01T19:03:00"),
        ("Ben Okafor", "I'll bring:\n- water\n- snacks", "2024-03-01T19:05:45"),
    ]
    assert result.manifest["export"]["rows_removed"] == {"forwarded": 1, "media_only": 1, "service": 1}


def test_whole_account_export_reads_every_chat_and_the_left_ones(fetch_telegram):
    result = fetch_telegram(ACCOUNT)
    firsts = [c["messages"][0]["text"] for c in result.conversations]
    assert firsts == ["hi Ben! are we still on for saturday?", "morning! who is driving?",
                      "last meetup of the year on friday"]
    export = result.manifest["export"]
    assert export["threads"] == 6
    # the bot chat (once the bot's replies are gone), saved messages and the channel
    assert export["threads_skipped"] == {"one_speaker": 3}
    assert export["rows_removed"] == {"bot": 1, "forwarded": 1, "media_only": 1, "service": 2, "via_bot": 1}
    assert result.manifest["counts"]["rows_rejected"] == {"no_sender": 1}


def test_folder_reads_each_result_json_and_nothing_else(fetch_telegram, tmp_path):
    (tmp_path / "ChatExport_2024-03-05").mkdir()
    (tmp_path / "ChatExport_2024-03-05" / "result.json").write_bytes(CHAT.read_bytes())
    (tmp_path / "README.md").write_text("my exports\n")
    (tmp_path / "notes.json").write_text("{}")
    result = fetch_telegram(tmp_path)
    assert len(result.conversations) == 1 and result.manifest["export"]["files"] == 1


def test_text_with_formatting_is_its_parts_joined(tmp_path):
    text = ["run ", {"type": "code", "text": "make test"}, ", then ask ",
            {"type": "mention_name", "text": "Ben", "user_id": 5550001}, {"type": "text_link", "text": " here",
                                                                          "href": "https://example.com"}]
    messages, _ = read_messages(write_chat(tmp_path, [message(1, "Ana", text)]))
    assert messages == [("Ana", "run make test, then ask Ben here")]


def test_deleted_account_is_rejected_as_no_sender(tmp_path):
    messages, counts = read_messages(write_chat(tmp_path, [message(1, None, "hello"), message(2, "Ben", "hi")]))
    assert messages == [("Ben", "hi")]
    assert counts.rejected == {"no_sender": 1} and not counts.removed


def test_photo_without_caption_is_media_only_but_a_caption_is_kept(tmp_path):
    photo = "(File not included. Change data exporting settings to download.)"
    messages, counts = read_messages(write_chat(tmp_path, [message(1, "Ana", "", photo=photo),
                                                           message(2, "Ana", "look", photo=photo),
                                                           message(3, "Ana", " ")]))
    assert messages == [("Ana", "look")]
    assert counts.removed == {"media_only": 1, "empty": 1}


def test_forwarded_from_a_hidden_sender_is_removed(tmp_path):
    # Telegram writes "forwarded_from": null when the original sender hides their name
    messages, counts = read_messages(write_chat(tmp_path, [message(1, "Ana", "news!", forwarded_from=None)]))
    assert messages == [] and counts.removed == {"forwarded": 1}


def test_bots_replies_in_a_bot_chat_are_removed(tmp_path):
    bot_reply = {**message(2, "WeatherBot", "sunny"), "from_id": "user42"}  # the bot chat's id is the bot's
    messages, counts = read_messages(write_chat(tmp_path, [message(1, "Ana", "/forecast"), bot_reply], "bot_chat"))
    assert messages == [("Ana", "/forecast")] and counts.removed == {"bot": 1}


def test_unsupported_message_is_removed_and_unknown_type_rejected(tmp_path):
    path = write_chat(tmp_path, [{"id": 1, "type": "unsupported"}, {"id": 2, "type": "reaction"},
                                 message(3, "Ana", "hi")])
    messages, counts = read_messages(path)
    assert messages == [("Ana", "hi")]
    assert counts.removed == {"unsupported": 1} and counts.rejected == {"unknown_type": 1}


def test_local_date_is_naive_and_date_unixtime_alone_is_utc(tmp_path):
    local = message(1, "Ana", "hi", date="2024-03-01T19:00:00", date_unixtime="1709316000")
    epoch_only = {k: v for k, v in message(2, "Ben", "yo", date_unixtime="1709316060").items() if k != "date"}
    counts = ExportCounts()
    [thread] = telegram.read(write_chat(tmp_path, [local, epoch_only]), "result.json", None, counts)
    assert [m.time.isoformat() for m in thread.messages] == ["2024-03-01T19:00:00", "2024-03-01T18:01:00+00:00"]


def test_damaged_date_names_the_message(tmp_path):
    path = write_chat(tmp_path, [message(1, "Ana", "hi"), message(7, "Ben", "yo", date="yesterday")])
    with pytest.raises(PipelineError, match=r"result\.json: messages\[1\] \(id 7\): date 'yesterday'.*data\.path"):
        telegram.read(path, "result.json", None, ExportCounts())


def test_half_of_a_surrogate_pair_names_its_line(tmp_path):
    # Found by test_export_properties: "\ud83d" alone was read into a speaker or text that no UTF-8 file
    # can hold, and writing the conversations crashed with UnicodeEncodeError.
    path = write_chat(tmp_path, [message(1, "Ana", "hi"), message(2, "Ben \ud83d", "yo")])
    path.write_text(path.read_text().replace('", "', '",\n "'))  # one field a line, so the line says which
    line = path.read_text().split("\n").index(' "from": "Ben \\ud83d",') + 1
    with pytest.raises(PipelineError, match=rf"result\.json:{line}: a \\u escape encodes half of a UTF-16 "
                                            "surrogate pair"):
        telegram.read(path, "result.json", None, ExportCounts())


def test_an_export_saved_in_utf16_is_named_as_not_utf8_not_as_another_apps(tmp_path):
    path = write_chat(tmp_path, [message(1, "Ana", "hi"), message(2, "Ben", "yo")])
    path.write_bytes(path.read_text().encode("utf-16"))  # re-saved by an editor; it was called "not a Telegram export"
    with pytest.raises(PipelineError, match=r"^result\.json:1: byte 0xff is not valid UTF-8; export the chat again"):
        telegram.read(path, "result.json", None, ExportCounts())


def test_whole_surrogate_pairs_and_escaped_backslashes_are_text(tmp_path):
    path = write_chat(tmp_path, [message(1, "Ana", "\U0001F600 C:\\ud800"), message(2, "Ben", "yo")])
    assert "\\ud83d\\ude00" in path.read_text()  # json.dumps escapes the emoji as a pair
    assert read_messages(path)[0][0] == ("Ana", "\U0001F600 C:\\ud800")


def test_chat_list_that_is_not_a_list_names_it(tmp_path):
    # Found by test_export_properties: "list": 5 stopped fetch with "'int' object is not iterable".
    path = tmp_path / "result.json"
    path.write_text(json.dumps({"personal_information": {}, "chats": {"list": 5}}))
    with pytest.raises(PipelineError, match=r"result\.json: chats\.list: not a list of chats \(a int\)"):
        telegram.read(path, "result.json", None, ExportCounts())


def test_one_message_in_two_chats_of_one_export_is_kept_in_both(fetch_telegram, tmp_path):
    # Found by test_export_properties: the same words, sender and second in two chats of one result.json
    # (a cross-post) were removed from the second as "in_earlier_file", though there is no earlier file.
    chats = [{"name": name, "type": "private_group", "id": chat_id,
              "messages": [message(1, "Ana", "meeting at 8"), message(2, "Ben", f"ok from {name}")]}
             for chat_id, name in ((1, "Hikes"), (2, "Climbing"))]
    path = tmp_path / "result.json"
    path.write_text(json.dumps({"personal_information": {}, "chats": {"list": chats}}))
    result = fetch_telegram(path)
    assert [m["text"] for c in result.conversations for m in c["messages"]] == [
        "meeting at 8", "ok from Hikes", "meeting at 8", "ok from Climbing"]
    assert result.manifest["export"]["rows_removed"] == {}


def test_chat_of_only_service_messages_holds_no_messages(fetch_telegram, tmp_path):
    join = {"id": 1, "type": "service", "date": "2024-03-01T19:00:00", "actor": "Ana", "action": "create_group",
            "text": ""}
    with pytest.raises(PipelineError, match=r"result\.json: the Telegram export holds no messages.*service"):
        fetch_telegram(write_chat(tmp_path, [join], "private_group"))


def test_chat_with_one_speaker_names_the_message_and_speaker(fetch_telegram, tmp_path):
    path = write_chat(tmp_path, [message(1, "Ana", "note one"), message(2, "Ana", "note two")], "saved_messages")
    with pytest.raises(PipelineError, match=r"result\.json: messages\[0\] \(id 1\): every message .* one speaker "
                                            r"\(Ana\)"):
        fetch_telegram(path)


def test_discord_export_names_the_file_line_and_discord(fetch_telegram):
    with pytest.raises(PipelineError, match=r"general\.json:1: not a Telegram export.*set data\.source: discord"):
        fetch_telegram(FIXTURES / "discord" / "general.json")


def test_messenger_like_json_with_messages_is_not_a_telegram_chat(tmp_path):
    path = tmp_path / "result.json"
    path.write_text(json.dumps({"participants": [{"name": "Ana"}], "messages": [
        {"sender_name": "Ana", "timestamp_ms": 1709316000000, "content": "hi", "date_unixtime": "x"}]}))
    with pytest.raises(NotThisExport, match=r"result\.json:1: not a Telegram export"):
        telegram.read(path, "result.json", None, ExportCounts())


def test_looks_like_claims_telegram_exports_only():
    assert telegram.looks_like(CHAT.read_bytes()[:1 << 16], "result.json")
    assert telegram.looks_like(ACCOUNT.read_bytes()[:200], "result.json")  # "personal_information" early on
    assert not telegram.looks_like((FIXTURES / "discord" / "general.json").read_bytes(), "general.json")
    assert not telegram.looks_like((FIXTURES / "discord" / "general.csv").read_bytes(), "general.csv")
    assert not telegram.looks_like(b'{"participants": [], "messages": [{"sender_name": "Ana"}]}', "message_1.json")
    assert not telegram.looks_like(b"12/31/23, 9:15 PM - Ana: hi\n", "chat.txt")
    assert not telegram.looks_like(b'{"conv": "c1", "who": "ana", "msg": "hi"}\n', "chat.jsonl")


def test_matches_result_json_only():
    assert telegram.matches(Path("ChatExport/result.json"))
    assert not telegram.matches(Path("ChatExport/messages.html")) and not telegram.matches(Path("other.json"))
