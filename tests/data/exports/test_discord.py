"""data.source: discord: DiscordChatExporter's JSON and CSV channel exports read into conversations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora_pipeline.data.exports import discord
from qlora_pipeline.data.exports.common import ExportCounts, NotThisExport
from qlora_pipeline.data.sources import fetch
from qlora_pipeline.errors import PipelineError

FIXTURES = Path(__file__).parent / "fixtures"
JSON_EXPORT = FIXTURES / "discord" / "general.json"
CSV_EXPORT = FIXTURES / "discord" / "general.csv"
HEADER = "AuthorID,Author,Date,Content,Attachments,Reactions\n"


@pytest.fixture
def fetch_discord(params_factory):
    def run(path: Path, **overrides):
        cfg = params_factory({"data.source": "discord", "data.path": str(path),
                              **{f"data.{k}": v for k, v in overrides.items()}}).data
        return fetch(cfg)
    return run


def read_one(path: Path, date_format: str | None = None):
    """The one thread of a file, and what was counted, read without the shared layer."""
    counts = ExportCounts()
    cfg = type("Cfg", (), {"date_format": date_format})()
    [thread] = discord.read(path, path.name, cfg, counts)
    return thread, counts


def write_json(tmp_path: Path, messages: list[dict]) -> Path:
    path = tmp_path / "dm.json"
    path.write_text(json.dumps({"guild": {"id": "0", "name": "Direct Messages"}, "channel": {"id": "77"},
                                "messages": messages}))
    return path


def dm(mid: int, name: str, content: str, stamp: str = "2024-03-01T18:00:00+00:00", **extra) -> dict:
    return {"id": str(mid), "type": "Default", "timestamp": stamp, "content": content,
            "author": {"id": name, "name": name, "isBot": False}, **extra}


def write_csv(tmp_path: Path, rows: str, newline: str = "\n") -> Path:
    path = tmp_path / "dm.csv"
    path.write_bytes((HEADER + rows).replace("\n", newline).encode())
    return path


def row(author: str, date: str, content: str, attachments: str = "") -> str:
    return f'"1","{author}","{date}","{content}","{attachments}",""\n'


def test_json_export_becomes_the_channels_conversation(fetch_discord):
    result = fetch_discord(JSON_EXPORT)
    [conversation] = result.conversations
    assert [(m["speaker"], m["text"], m["time"]) for m in conversation["messages"]] == [
        ("Ana", "anyone up for the ridge trail on saturday?", "2024-03-01T18:00:05.123000+00:00"),
        ("Ben", "yes!\nI can drive, 3 seats left", "2024-03-01T18:01:10+00:00"),
        ("Ana", "great, meet at 8 at the trailhead @Ben", "2024-03-01T18:02:00.500000+00:00"),
        ("Ana", "see you there :thumbsup:", "2024-03-01T18:05:00.987654+00:00"),
    ]
    assert result.manifest["export"]["rows_removed"] == {"bot": 1, "media_only": 2, "system": 2}


def test_csv_export_becomes_the_files_conversation(fetch_discord):
    result = fetch_discord(CSV_EXPORT)
    [conversation] = result.conversations
    assert [(m["speaker"], m["text"], m["time"]) for m in conversation["messages"]] == [
        ("ana_hikes", "anyone up for the ridge trail?", "2024-03-01T18:00:05.123000+00:00"),
        ("ben_o", "yes!\nI can drive", "2024-03-01T18:01:10+00:00"),
        ("ana_hikes", 'great, "8 sharp" at the trailhead', "2024-03-01T18:03:00+00:00"),
    ]
    assert result.manifest["export"]["rows_removed"] == {"media_only": 1, "system": 1}


def test_csv_where_names_the_line_a_multiline_record_starts_on():
    thread, _ = read_one(CSV_EXPORT)
    assert [m.where for m in thread.messages] == ["general.csv:2", "general.csv:3", "general.csv:7"]


def test_folder_reads_json_and_csv_exports_but_not_other_files(fetch_discord, tmp_path):
    (tmp_path / "general.json").write_bytes(JSON_EXPORT.read_bytes())
    (tmp_path / "general.csv").write_bytes(CSV_EXPORT.read_bytes())
    (tmp_path / "README.md").write_text("exported with DiscordChatExporter\n")
    result = fetch_discord(tmp_path)
    assert result.manifest["export"]["files"] == 2 and len(result.conversations) == 2


def test_nickname_is_the_speaker_and_name_stands_in_when_there_is_none(tmp_path):
    with_nick = dm(1, "ana_hikes", "hi")
    with_nick["author"]["nickname"] = "Ana\u200e"
    without = dm(2, "ben_o", "hey")  # exports before nicknames were written, or "nickname": null
    thread, _ = read_one(write_json(tmp_path, [with_nick, without]))
    assert [m.speaker for m in thread.messages] == ["Ana", "ben_o"]


def test_bot_message_is_removed_even_when_an_ordinary_type(tmp_path):
    bot = dm(2, "TrailBot", "sunny")
    bot["author"]["isBot"] = True
    thread, counts = read_one(write_json(tmp_path, [dm(1, "ana", "weather?"), bot]))
    assert [m.text for m in thread.messages] == ["weather?"] and counts.removed == {"bot": 1}


def test_notice_types_unknown_to_the_exporter_are_system(tmp_path):
    # DiscordChatExporter writes a message type it has no name for as its number
    messages = [dm(1, "ana", "hi"), {**dm(2, "ana", "Started a call that lasted 5 minutes."), "type": "Call"},
                {**dm(3, "ana", ""), "type": "24"}]
    thread, counts = read_one(write_json(tmp_path, messages))
    assert [m.text for m in thread.messages] == ["hi"] and counts.removed == {"system": 2}


def test_forward_without_a_comment_is_removed(tmp_path):
    forward = dm(2, "ben", "", reference={"type": "Forward", "messageId": "9"},
                 forwardedMessage={"timestamp": "2024-02-01T10:00:00+00:00", "content": "trail closed"})
    thread, counts = read_one(write_json(tmp_path, [dm(1, "ana", "hi"), forward]))
    assert [m.text for m in thread.messages] == ["hi"] and counts.removed == {"forwarded": 1}


def test_message_whose_type_is_not_a_string_is_rejected(tmp_path):
    # Found by test_export_properties: a list as "type" stopped fetch with "unhashable type: 'list'".
    thread, counts = read_one(write_json(tmp_path, [dm(1, "ana", "hi"), {**dm(2, "ben", "yo"), "type": ["Default"]}]))
    assert [m.text for m in thread.messages] == ["hi"] and counts.rejected == {"not_a_message": 1}


def test_content_or_a_name_that_is_not_text_is_rejected(tmp_path):
    """A hand-edited list or object became Python's text of it ("['yo']") in the messages."""
    messages = [dm(1, "ana", "hi"), dm(2, "ben", ["yo"]), dm(3, "ben", {"a": 1}), dm(4, "ben", True),
                {**dm(5, "ben", "yo"), "author": {"name": ["ben"]}}, dm(6, "ben", "hey")]
    thread, counts = read_one(write_json(tmp_path, messages))
    assert [m.text for m in thread.messages] == ["hi", "hey"] and counts.rejected == {"not_text": 4}


def test_reference_that_is_not_an_object_is_no_forward(tmp_path):
    # Found by test_export_properties: "reference": "x" on a message without text raised AttributeError.
    thread, counts = read_one(write_json(tmp_path, [dm(1, "ana", "hi"), dm(2, "ben", "", reference="Forward")]))
    assert [m.text for m in thread.messages] == ["hi"] and counts.removed == {"empty": 1}


def test_message_without_author_is_rejected(tmp_path):
    thread, counts = read_one(write_json(tmp_path, [dm(1, "ana", "hi"), {**dm(2, "x", "lost"), "author": None}]))
    assert [m.text for m in thread.messages] == ["hi"] and counts.rejected == {"no_sender": 1}


def test_json_exported_newest_first_is_read_oldest_first(tmp_path):
    newest_first = [dm(2, "ben", "second", "2024-03-01T18:05:00+00:00"), dm(1, "ana", "first")]
    thread, _ = read_one(write_json(tmp_path, newest_first))
    assert [m.text for m in thread.messages] == ["first", "second"]


def test_partitioned_export_is_one_channel(fetch_discord, tmp_path):
    # --partition splits a channel over "general [part 1].json", "[part 2]", ...: one thread, the channel's
    for part, messages in ((1, [dm(1, "ana", "hi"), dm(2, "ben", "yo", "2024-03-01T18:01:00+00:00")]),
                           (2, [dm(3, "ana", "still there?", "2024-03-01T18:02:00+00:00")])):
        write_json(tmp_path, messages).rename(tmp_path / f"general [part {part}].json")
    result = fetch_discord(tmp_path)
    assert result.manifest["export"]["threads"] == 1
    assert [m["text"] for c in result.conversations for m in c["messages"]] == ["hi", "yo", "still there?"]


def test_damaged_json_timestamp_names_the_message(tmp_path):
    path = write_json(tmp_path, [dm(1, "ana", "hi"), dm(555, "ben", "yo", "31.12.2023")])
    with pytest.raises(PipelineError, match=r"dm\.json: messages\[1\] \(id 555\): timestamp '31\.12\.2023'"):
        read_one(path)


def test_seven_fraction_digits_and_z_read_on_any_python():
    # Python 3.11's fromisoformat reads these itself; 3.10 (still supported) takes only 3 or 6 digits and no Z
    assert discord.parse_iso("2023-12-31T21:15:02.1234567+00:00").isoformat() == "2023-12-31T21:15:02.123456+00:00"
    assert discord.parse_iso("2023-12-31T21:15:02.1Z").isoformat() == "2023-12-31T21:15:02.100000+00:00"
    assert discord.parse_iso("2023-12-31T21:15:02-05:00").isoformat() == "2023-12-31T21:15:02-05:00"


def test_csv_with_crlf_keeps_the_line_breaks_inside_a_message(tmp_path):
    # The exporter on Windows ends records with CRLF; Discord's own line breaks inside a message stay LF.
    path = tmp_path / "dm.csv"
    path.write_bytes((HEADER.replace("\n", "\r\n") + '"1","ana","1709316000","one\ntwo","",""\r\n'
                      '"2","ben","1709316060","ok","",""\r\n').encode())
    thread, _ = read_one(path)
    assert [(m.text, m.where) for m in thread.messages] == [("one\ntwo", "dm.csv:2"), ("ok", "dm.csv:4")]


def test_csv_old_locale_dates_need_data_date_format(fetch_discord, tmp_path):
    path = write_csv(tmp_path, row("ana", "03/01/2024 6:00 PM", "hi") + row("ben", "03/01/2024 6:01 PM", "yo"))
    with pytest.raises(PipelineError, match=r"dm\.csv:2: cannot read the date '03/01/2024 6:00 PM'.*"
                                            r"set data\.date_format"):
        fetch_discord(path)
    result = fetch_discord(path, date_format="%m/%d/%Y %I:%M %p")
    assert [m["time"] for m in result.conversations[0]["messages"]] == ["2024-03-01T18:00:00", "2024-03-01T18:01:00"]


def test_csv_date_not_matching_data_date_format_names_it(tmp_path):
    path = write_csv(tmp_path, row("ana", "1 March 2024", "hi"))
    with pytest.raises(PipelineError, match=r"dm\.csv:2: date '1 March 2024' does not match data\.date_format "
                                            r"'%m/%d/%Y %I:%M %p'"):
        read_one(path, date_format="%m/%d/%Y %I:%M %p")


def test_csv_unix_dates_are_utc(tmp_path):
    thread, _ = read_one(write_csv(tmp_path, row("ana", "1709316000", "hi") + row("ben", "1709316060000", "yo")))
    assert [m.time.isoformat() for m in thread.messages] == ["2024-03-01T18:00:00+00:00", "2024-03-01T18:01:00+00:00"]


@pytest.mark.parametrize("date", ["\u00b2", "99999999999999999999", "9" * 5000])
def test_csv_date_of_digits_no_calendar_holds_names_the_line(tmp_path, date):
    # Found by test_export_properties: "²" is a digit to isdigit() but not to int() (ValueError), and
    # 20 digits of milliseconds overflow the C library (OSError), 5000 pass int()'s limit (ValueError).
    path = write_csv(tmp_path, row("ana", "1709316000", "hi") + row("ben", date, "yo"))
    with pytest.raises(PipelineError, match=r"dm\.csv:3: (?:cannot read the date|date '[0-9]+' is no time)"):
        read_one(path)


def test_csv_notices_are_removed_by_their_exact_text(tmp_path):
    rows = (row("ana", "1709316000", "Started a call that lasted 1,250 minutes.")
            + row("ana", "1709316001", "Added ben_o to the group.")
            + row("ben", "1709316002", "Joined the server. yay"))
    thread, counts = read_one(write_csv(tmp_path, rows))
    assert [m.text for m in thread.messages] == ["Joined the server. yay"] and counts.removed == {"system": 2}


def test_csv_exported_newest_first_is_read_oldest_first(tmp_path):
    thread, _ = read_one(write_csv(tmp_path, row("ben", "1709316060", "second") + row("ana", "1709316000", "first")))
    assert [m.text for m in thread.messages] == ["first", "second"]


def test_csv_row_with_wrong_cell_count_is_rejected(tmp_path):
    rows = row("ana", "1709316000", "hi") + '"2","ben","1709316001","a","b","c","d"\n'
    thread, counts = read_one(write_csv(tmp_path, rows))
    assert [m.text for m in thread.messages] == ["hi"] and counts.rejected == {"bad_row": 1}


def test_channel_of_only_joins_holds_no_messages(fetch_discord, tmp_path):
    join = {**dm(1, "cara", "Joined the server."), "type": "GuildMemberJoin"}
    with pytest.raises(PipelineError, match=r"dm\.json: the Discord export holds no messages.*system"):
        fetch_discord(write_json(tmp_path, [join]))


def test_channel_with_one_speaker_names_the_message_and_speaker(fetch_discord, tmp_path):
    path = write_csv(tmp_path, row("ana", "1709316000", "note") + row("ana", "1709316060", "another"))
    with pytest.raises(PipelineError, match=r"dm\.csv:2: every message .* one speaker \(ana\)"):
        fetch_discord(path)


def test_telegram_export_names_the_file_line_and_telegram(fetch_discord):
    with pytest.raises(PipelineError, match=r"result\.json:1: not a DiscordChatExporter export.*"
                                            r"set data\.source: telegram"):
        fetch_discord(FIXTURES / "telegram" / "chat" / "result.json")


def test_csv_of_another_shape_names_the_header_line(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("\nconv,who,msg\nc1,ana,hi\n")
    with pytest.raises(NotThisExport, match=r"log\.csv:2: not a DiscordChatExporter export \(expected its CSV header"):
        read_one(path)


def test_looks_like_claims_discordchatexporter_files_only():
    assert discord.looks_like(JSON_EXPORT.read_bytes()[:1 << 16], "general.json")
    assert discord.looks_like(b"\xef\xbb\xbf" + CSV_EXPORT.read_bytes(), "general.csv")
    assert not discord.looks_like((FIXTURES / "telegram" / "account" / "result.json").read_bytes(), "result.json")
    assert not discord.looks_like(b'{"participants": [], "messages": [{"sender_name": "Ana"}]}', "message_1.json")
    assert not discord.looks_like(b"conv,who,msg\nc1,ana,hi\n", "chat.csv")
    assert not discord.looks_like(b"12/31/23, 9:15 PM - Ana: hi\n", "chat.txt")


def test_matches_json_and_csv():
    assert discord.matches(Path("general.JSON")) and discord.matches(Path("general.csv"))
    assert not discord.matches(Path("general.html")) and not discord.matches(Path("general.txt"))
