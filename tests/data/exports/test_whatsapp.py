"""WhatsApp "Export chat" files: every date/time format, the app's notices and marks, zips, bad exports."""

from __future__ import annotations

import json
import re
import zipfile
from datetime import datetime
from pathlib import Path

import pytest

from qlora_pipeline.data.exports import whatsapp
from qlora_pipeline.data.exports.common import ExportCounts, NotThisExport
from qlora_pipeline.data.sources import fetch
from qlora_pipeline.errors import PipelineError

FIXTURES = Path(__file__).parent / "fixtures" / "whatsapp"
LRM, NNBSP = "\u200e", "\u202f"


@pytest.fixture
def config(params_factory):
    """The data config for one WhatsApp path, one conversation per thread, plus ``data.*`` overrides."""
    def build(path: Path, **data):
        overrides = {"data.source": "whatsapp", "data.path": str(path), "data.session_gap_minutes": None}
        return params_factory({**overrides, **{f"data.{key}": value for key, value in data.items()}}).data
    return build


@pytest.fixture
def chat(config, tmp_path):
    """Read a chat text as WhatsApp's reader does: ``(messages as (speaker, text, time), counts)``."""
    def read(text: str, **data):
        path = tmp_path / "chat.txt"
        path.write_text(text, encoding="utf-8", newline="")
        counts = ExportCounts()
        [thread] = whatsapp.read(path, "chat.txt", config(path, **data), counts)
        return [(m.speaker, m.text, m.time) for m in thread.messages], counts
    return read


def messages_of(conversation: dict) -> list[tuple]:
    return [(m["speaker"], m["text"], m["time"]) for m in conversation["messages"]]


# ------------------------------------------------------------------------ whole exports, through fetch


def test_ios_group_export_reads_exact_messages(config):
    result = fetch(config(FIXTURES / "ios_group.txt"))
    [conversation] = result.conversations
    assert messages_of(conversation) == [
        ("Renee Dubois", "Who's in for the ridge hike on Sunday?", "2023-12-30T23:58:30"),
        ("+1 555 0100", "Me! Can we start early?", "2023-12-31T00:05:10"),
        ("Renee Dubois", "7am at the trailhead\nbring layers, it's cold up there\n\nand water", "2023-12-31T00:05:40"),
        ("Sam Okafor", "Count me in @Renee Dubois", "2023-12-31T00:07:00"),
        ("Sam Okafor", "See you all at noon then", "2023-12-31T12:11:00"),
    ]
    assert result.manifest["export"]["rows_removed"] == {"call": 1, "deleted": 2, "media_omitted": 3, "system": 3}
    assert result.manifest["counts"]["rows_rejected"] == {}


def test_android_group_export_reads_exact_messages(config):
    result = fetch(config(FIXTURES / "android_group.txt"))
    [conversation] = result.conversations
    assert messages_of(conversation) == [
        ("Priya", "Welcome! First pick is due on the 20th", "2024-01-03T09:02:00"),
        ("Tomás Ruiz", "Great, I'll read it this week\nChapter 1 already hooked me", "2024-01-03T09:05:00"),
        ("Tomás Ruiz", "the cover", "2024-01-04T18:33:00"),
        ("Priya", "Love it", "2024-01-04T18:34:00"),
    ]
    assert result.manifest["export"]["rows_removed"] == {
        "call": 1, "deleted": 2, "location": 1, "media_omitted": 2, "system": 6, "undecryptable": 1}


def test_folder_reads_txt_and_zip_but_not_readme(config, tmp_path):
    (tmp_path / "README.md").write_text("my exports\n")
    (tmp_path / "ios_group.txt").write_bytes((FIXTURES / "ios_group.txt").read_bytes())
    with zipfile.ZipFile(tmp_path / "WhatsApp Chat - Book club.zip", "w") as archive:
        archive.write(FIXTURES / "android_group.txt", "WhatsApp Chat with Book club.txt")
    result = fetch(config(tmp_path))
    assert result.manifest["export"]["files"] == 2
    assert [c["messages"][0]["speaker"] for c in result.conversations] == ["Priya", "Renee Dubois"]
    assert len({c["meta"]["thread"] for c in result.conversations}) == 2


# ------------------------------------------------------------------------ dates and times


@pytest.mark.parametrize("line, expected", [
    ("[31.12.23, 21:15:02] Bob: hi", datetime(2023, 12, 31, 21, 15, 2)),  # iOS 24 h, dotted
    (f"[12/31/23, 9:15:02{NNBSP}PM] Bob: hi", datetime(2023, 12, 31, 21, 15, 2)),  # iOS 12 h, U+202F
    ("12/31/23, 21:15 - Bob: hi", datetime(2023, 12, 31, 21, 15)),  # Android 24 h
    ("12/31/23, 9:15 PM - Bob: hi", datetime(2023, 12, 31, 21, 15)),
    (f"12/31/23, 9:15{NNBSP}PM - Bob: hi", datetime(2023, 12, 31, 21, 15)),
    ("31/12/2023, 21:15 - Bob: hi", datetime(2023, 12, 31, 21, 15)),
    ("31.12.23, 21:15 - Bob: hi", datetime(2023, 12, 31, 21, 15)),
    ("31-12-2023, 21:15 - Bob: hi", datetime(2023, 12, 31, 21, 15)),
    ("2023-12-31, 21:15 - Bob: hi", datetime(2023, 12, 31, 21, 15)),  # year first
    ("31/12/2023 21:15 - Bob: hi", datetime(2023, 12, 31, 21, 15)),  # no comma
    ("31.12.23, 21.15 - Bob: hi", datetime(2023, 12, 31, 21, 15)),  # dotted time (Finnish)
    ("31/12/2023, 9:15 p.m. - Bob: hi", datetime(2023, 12, 31, 21, 15)),
    ("31/12/2023, 9:15 p. m. - Bob: hi", datetime(2023, 12, 31, 21, 15)),
    ("31/12/2023, 9:15 pm - Bob: hi", datetime(2023, 12, 31, 21, 15)),
    ("31/12/2023, 9:15 am - Bob: hi", datetime(2023, 12, 31, 9, 15)),
])
def test_each_known_header_format_reads_its_time(chat, line, expected):
    messages, _ = chat(line + "\n")
    assert messages == [("Bob", "hi", expected)]


def test_12_hour_clock_midnight_and_noon(chat):
    messages, _ = chat("[12/31/23, 12:05:00 AM] Bob: midnight\n[12/31/23, 12:05:00 PM] Bob: noon\n"
                       "[12/31/23, 1:05:00 PM] Bob: one\n")
    assert [m[2] for m in messages] == [datetime(2023, 12, 31, 0, 5), datetime(2023, 12, 31, 12, 5),
                                        datetime(2023, 12, 31, 13, 5)]


def test_day_first_detected_from_a_later_day_above_12(chat):
    messages, _ = chat("03/04/23, 10:00 - Ann: early\n25/04/23, 10:00 - Ann: later\n")
    assert [m[2] for m in messages] == [datetime(2023, 4, 3, 10), datetime(2023, 4, 25, 10)]


def test_month_first_detected_from_a_later_second_field_above_12(chat):
    messages, _ = chat("03/04/23, 10:00 - Ann: early\n04/25/23, 10:00 - Ann: later\n")
    assert [m[2] for m in messages] == [datetime(2023, 3, 4, 10), datetime(2023, 4, 25, 10)]


def test_day_first_and_month_first_in_one_file_is_an_error_naming_both_lines(chat):
    with pytest.raises(PipelineError, match=r"chat.txt:2: .*'25/04/23'.*'04/25/23' on chat.txt:3.*data.date_order"):
        chat("03/04/23, 10:00 - Ann: a\n25/04/23, 10:00 - Bo: b\n04/25/23, 10:00 - Ann: c\n")


def test_ambiguous_dates_read_in_the_order_where_time_never_goes_backwards(chat):
    # Month-first would run 1 May, 1 December, 2 March; day-first runs 5 January, 12 January, 3 February.
    messages, _ = chat("05/01/24, 10:00 - Ann: a\n12/01/24, 10:00 - Ann: b\n03/02/24, 10:00 - Ann: c\n")
    assert [m[2].date().isoformat() for m in messages] == ["2024-01-05", "2024-01-12", "2024-02-03"]


def test_ambiguous_dates_in_order_either_way_ask_for_date_order(chat):
    with pytest.raises(PipelineError, match=r"chat.txt:1: .*'01/02/24'.*data.date_order: day_first or month_first"):
        chat("01/02/24, 10:00 - Ann: a\n03/04/24, 10:00 - Bo: b\n")


def test_same_day_and_month_reads_either_way(chat):
    messages, _ = chat("01/01/24, 10:00 - Ann: a\n02/02/24, 10:00 - Ann: b\n")
    assert [m[2] for m in messages] == [datetime(2024, 1, 1, 10), datetime(2024, 2, 2, 10)]


def test_date_order_param_overrides_detection(chat):
    messages, _ = chat("01/02/24, 10:00 - Ann: a\n03/04/24, 10:00 - Ann: b\n", date_order="month_first")
    assert [m[2] for m in messages] == [datetime(2024, 1, 2, 10), datetime(2024, 3, 4, 10)]


def test_date_order_param_that_cannot_read_a_date_names_line_and_param(chat):
    with pytest.raises(PipelineError, match=r"chat.txt:2: '25/04/23' is not a date when read month-first"
                                            r".*data.date_order"):
        chat("03/04/23, 10:00 - Ann: a\n25/04/23, 10:00 - Ann: b\n", date_order="month_first")


def test_date_format_param_reads_a_textual_date(chat):
    messages, _ = chat("Dec 31, 2023, 9:15 PM - Ann: a\nJan 1, 2024, 12:01 AM - Ann: b\n", date_format="%b %d, %Y")
    assert [m[2] for m in messages] == [datetime(2023, 12, 31, 21, 15), datetime(2024, 1, 1, 0, 1)]


@pytest.mark.parametrize("line", ["[2023年12月31日 21:15:02] Ann: hi", "Dec 31, 2023, 9:15 PM - Ann: hi"])
def test_unknown_date_format_names_file_line_and_param(chat, line):
    with pytest.raises(PipelineError, match=r"chat.txt:2: cannot read the date .*data.date_format"):
        chat("\n" + line + "\n")


def test_date_format_param_that_does_not_match_names_line_and_param(chat):
    with pytest.raises(PipelineError,
                       match=r"chat.txt:1: the date '12/31/23' does not match data.date_format '%d.%m.%Y'"):
        chat("12/31/23, 21:15 - Ann: hi\n", date_format="%d.%m.%Y")


@pytest.mark.parametrize("text, date_format, line, date", [
    ("31 Aug 2023, 10:01 - Bob: yes\n1 Sept 2023, 10:00 - Ann: september now\n", "%d %b %Y", 2, "1 Sept 2023"),
    ("12/01/23, 10:00 - Ann: a\n12/02/23, 10:00 - Bob: b\n13/02/23, 10:00 - Ann: c\n", "%m/%d/%y", 3, "13/02/23"),
])
def test_a_date_format_that_reads_the_first_dates_but_not_a_later_one_is_refused(chat, text, date_format, line,
                                                                                   date):
    """Such a line was read as text of the message before it: the rest of the chat became one message."""
    with pytest.raises(PipelineError, match=rf"chat.txt:{line}: the date '{date}' does not match data.date_format "
                                            rf"'{re.escape(date_format)}' \(the lines before matched it\)"):
        chat(text, date_format=date_format)


def test_under_a_date_format_a_line_not_shaped_as_its_dates_stays_text(chat):
    messages, _ = chat("31 Aug 2023, 10:01 - Bob: the plan:\nDay 1, 09:00 - Arrival\nRoom 5, 10:00 - standup\n"
                       "1 Sep 2023, 10:00 - Ann: great\n", date_format="%d %b %Y")
    assert [m[1] for m in messages] == ["the plan:\nDay 1, 09:00 - Arrival\nRoom 5, 10:00 - standup", "great"]


def test_header_shaped_line_inside_a_message_with_unknown_date_is_text(chat):
    messages, _ = chat("12/31/23, 21:15 - Ann: I pasted this:\nDec 31, 2023, 9:15 PM - Bob: hi\n")
    assert messages == [("Ann", "I pasted this:\nDec 31, 2023, 9:15 PM - Bob: hi", datetime(2023, 12, 31, 21, 15))]


# ------------------------------------------------------------------------ lines and marks


def test_crlf_line_endings_and_bom_are_not_part_of_the_text(chat):
    messages, _ = chat("\ufeff12/31/23, 21:15 - Ann: one\r\ntwo\r\n12/31/23, 21:16 - Bob: three\r\n")
    assert [m[:2] for m in messages] == [("Ann", "one\ntwo"), ("Bob", "three")]


def test_lines_before_the_first_message_are_rejected(chat):
    messages, counts = chat("the end of a cut message\nstill cut\n12/31/23, 21:15 - Ann: hi\n")
    assert messages == [("Ann", "hi", datetime(2023, 12, 31, 21, 15))]
    assert counts.rejected == {"before_first_message": 2}


def test_header_with_no_sender_name_is_rejected(chat):
    messages, counts = chat("12/31/23, 21:15 - : hi\n12/31/23, 21:16 - Ann: hello\n")
    assert [m[0] for m in messages] == ["Ann"]
    assert counts.rejected == {"no_sender": 1}


def test_phone_number_sender_loses_its_bidi_marks(chat):
    messages, _ = chat("12/31/23, 21:15 - \u202a+1 555 0100\u202c: hi\n")
    assert messages[0][0] == "+1 555 0100"


def test_unsaved_contact_tilde_is_not_part_of_the_name(chat):
    messages, _ = chat(f"[12/31/23, 9:15:02 PM] ~{NNBSP}Sam Okafor: hi\n")
    assert messages[0][0] == "Sam Okafor"


def test_a_stranger_with_a_contacts_name_stays_another_speaker(chat, config, tmp_path):
    messages, _ = chat("31/12/23, 21:15 - Alex: hi all\n31/12/23, 21:16 - ~ Alex: hey I am the other alex\n"
                       "31/12/23, 21:17 - ~ Bo: and I am Bo\n31/12/23, 21:18 - Alex: welcome both\n")
    assert [m[0] for m in messages] == ["Alex", "~ Alex", "Bo", "Alex"]
    # across the chats of one export too: speakers are joined by name across chats
    (tmp_path / "exports").mkdir()
    (tmp_path / "exports" / "WhatsApp Chat with Alex.txt").write_text(
        "31/12/23, 21:15 - Alex: hi\n31/12/23, 21:16 - Me: hey\n", encoding="utf-8")
    (tmp_path / "exports" / "WhatsApp Chat with Group.txt").write_text(
        "31/12/23, 22:15 - ~ Alex: a stranger here\n31/12/23, 22:16 - Me: welcome\n", encoding="utf-8")
    result = fetch(config(tmp_path / "exports"))
    assert sorted({m["speaker"] for c in result.conversations for m in c["messages"]}) == ["Alex", "Me", "~ Alex"]


def test_mention_isolates_are_stripped_but_typed_rtl_mark_kept(chat):
    messages, _ = chat("12/31/23, 21:15 - Ann: thanks @\u2068Bob\u2069!\n"
                       "12/31/23, 21:16 - Dana: \u05e9\u05dc\u200f\u05d5\u05dd\n")
    assert [m[1] for m in messages] == ["thanks @Bob!", "\u05e9\u05dc\u200f\u05d5\u05dd"]


def test_ios_lrm_led_text_is_an_app_notice(chat):
    messages, counts = chat(f"[12/31/23, 9:15:02 PM] Trip: {LRM}Bob added Carol\n[12/31/23, 9:16:02 PM] Bob: hi\n")
    assert [m[:2] for m in messages] == [("Bob", "hi")]
    assert counts.removed == {"system": 1}


def test_ios_notice_after_a_chat_name_holding_a_colon(chat):
    messages, counts = chat(f"[12/31/23, 9:15:02 PM] Plans: 2024: {LRM}Bob added Carol\n")
    assert messages == [] and counts.removed == {"system": 1}


def test_android_subject_change_quoting_a_colon_is_not_a_message(chat):
    messages, counts = chat('12/31/23, 21:15 - Bob changed the subject from "Plans: 2024" to "Plans"\n'
                            '12/31/23, 21:16 - Bob changed the group description\n')
    assert messages == [] and counts.removed == {"system": 2}


def test_android_system_line_continues_to_the_next_header(chat):
    messages, counts = chat("12/31/23, 21:15 - Bob added Carol\n12/31/23, 21:16 - Carol: hi all\n")
    assert messages == [("Carol", "hi all", datetime(2023, 12, 31, 21, 16))] and counts.removed == {"system": 1}


# ------------------------------------------------------------------------ the app's placeholders


@pytest.mark.parametrize("text, reason", [
    ("<Media omitted>", "media_omitted"),
    ("null", "media_omitted"),  # view-once
    (f"{LRM}sticker omitted", "media_omitted"),
    ("GIF omitted", "media_omitted"),
    (f"{LRM}Contact card omitted", "media_omitted"),
    (f"{LRM}<attached: 00000012-PHOTO-2023-12-31-21-15-02.jpg>", "media_omitted"),
    ("VID-20231231-WA0002.mp4 (file attached)", "media_omitted"),
    (f"{LRM}Report.pdf • {LRM}3 pages {LRM}document omitted", "media_omitted"),
    ("This message was deleted", "deleted"),
    (f"{LRM}You deleted this message.", "deleted"),
    ("Missed video call", "call"),
    (f"{LRM}Voice call, {LRM}12 min", "call"),
    ("Waiting for this message. This may take a while.", "undecryptable"),
    ("location: https://maps.google.com/?q=48.85,2.35", "location"),
    ("POLL:\nWhere to?\nOPTION: beach (2 votes)\nOPTION: hills (1 vote)", "poll"),
    # The same, from phones in other languages (they were kept as typed text and learned as the person's words)
    ("<Medien ausgeschlossen>", "media_omitted"),
    ("<Multimedia omitido>", "media_omitted"),
    ("<Médias omis>", "media_omitted"),
    ("<Mídia oculta>", "media_omitted"),
    ("‹Без медиафайлов>", "media_omitted"),
    (f"{LRM}Bild weggelassen", "media_omitted"),
    ("imagen omitida", "media_omitted"),
    ("IMG-20250330-WA0001.jpg (Datei angehängt)", "media_omitted"),
    ("IMG-20250330-WA0001.jpg (arquivo anexado)", "media_omitted"),
    (f"{LRM}<adjunto: 00000012-PHOTO-2023-12-31-21-15-02.jpg>", "media_omitted"),
    ("Diese Nachricht wurde gelöscht.", "deleted"),
    ("Se eliminó este mensaje.", "deleted"),
    ("Ce message a été supprimé", "deleted"),
    ("Você apagou esta mensagem", "deleted"),
    ("Verpasster Sprachanruf", "call"),
    ("Videollamada perdida", "call"),
    ("Пропущенный аудиозвонок", "call"),
])
def test_app_placeholder_is_removed_and_counted(chat, text, reason):
    messages, counts = chat(f"12/31/23, 21:15 - Ann: {text}\n12/31/23, 21:16 - Bob: ok\n")
    assert [m[:2] for m in messages] == [("Bob", "ok")]
    assert counts.removed == {reason: 1}


def test_typed_text_that_mentions_a_call_or_media_is_kept(chat):
    messages, counts = chat("12/31/23, 21:15 - Ann: Video call tomorrow?\n"
                            "12/31/23, 21:16 - Bob: image omitted from the deck\n")
    assert [m[1] for m in messages] == ["Video call tomorrow?", "image omitted from the deck"]
    assert counts.removed == {}


def test_attachment_with_a_caption_keeps_the_caption(chat):
    messages, counts = chat(f"{LRM}[12/31/23, 9:15:02 PM] Ann: "
                            f"{LRM}<attached: 00000012-PHOTO-2023-12-31-21-15-02.jpg>\nthe view from the top\n")
    assert messages == [("Ann", "the view from the top", datetime(2023, 12, 31, 21, 15, 2))]
    assert counts.removed == {}


def test_edited_marker_is_cut_and_the_message_kept(chat):
    messages, counts = chat(f"12/31/23, 21:15 - Ann: see you at 8 <This message was edited>\n"
                            f"[12/31/23, 9:16:02 PM] Bob: line one\nline two {LRM}<This message was edited>\n"
                            f"12/31/23, 21:17 - Ann: Schön! Bis morgen <Diese Nachricht wurde bearbeitet>\n"
                            f"12/31/23, 21:18 - Bob: vale <Se editó este mensaje.>\n")
    assert [m[1] for m in messages] == ["see you at 8", "line one\nline two", "Schön! Bis morgen", "vale"]
    assert counts.removed == {}


def test_typed_text_in_another_language_is_kept(chat):
    messages, counts = chat("12/31/23, 21:15 - Ann: die Nachricht wurde gelöscht, glaube ich\n"
                            "12/31/23, 21:16 - Bob: Llamada perdida? te llamo luego\n"
                            "12/31/23, 21:17 - Ann: <3\n"
                            "12/31/23, 21:18 - Bob: Missed voice call? sorry, was driving\n")
    assert [m[1] for m in messages] == ["die Nachricht wurde gelöscht, glaube ich", "Llamada perdida? te llamo luego",
                                        "<3", "Missed voice call? sorry, was driving"]
    assert counts.removed == {}


# ------------------------------------------------------------------------ zips


def write_zip(path: Path, members: dict[str, str | bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return path


def test_ios_zip_reads_chat_txt_not_attachments_or_mac_shadows(config, tmp_path):
    path = write_zip(tmp_path / "WhatsApp Chat - Trail Crew.zip", {
        "_chat.txt": (FIXTURES / "ios_group.txt").read_text(encoding="utf-8"),
        "00000014-packing list.txt": "boots\nsocks\n",
        "__MACOSX/._chat.txt": b"\x00\x05\x16\x07",
        "00000012-PHOTO-2023-12-31-00-06-02.jpg": b"\xff\xd8\xff",
    })
    counts = ExportCounts()
    [thread] = whatsapp.read(path, "data/source/trail.zip", config(path), counts)
    assert thread.key == thread.where == "data/source/trail.zip/_chat.txt"
    assert thread.messages[0].where == "data/source/trail.zip/_chat.txt:3"
    assert len(thread.messages) == 5


def test_zip_with_several_chats_gives_a_thread_each(config, tmp_path):
    path = write_zip(tmp_path / "chats.zip", {
        "WhatsApp Chat with Ann.txt": "12/31/23, 21:15 - Ann: hi\n12/31/23, 21:16 - Bob: hey\n",
        "WhatsApp-Chat mit Carl.txt": "31.12.23, 21:15 - Carl: hallo\n31.12.23, 21:16 - Bob: hi\n",
    })
    threads = whatsapp.read(path, "chats.zip", config(path), ExportCounts())
    assert [t.key for t in threads] == ["chats.zip/WhatsApp Chat with Ann.txt", "chats.zip/WhatsApp-Chat mit Carl.txt"]
    assert [m.speaker for t in threads for m in t.messages] == ["Ann", "Bob", "Carl", "Bob"]


def test_zip_with_no_txt_is_an_error_naming_the_zip(config, tmp_path):
    path = write_zip(tmp_path / "photos.zip", {"IMG-0001.jpg": b"\xff\xd8\xff"})
    with pytest.raises(PipelineError, match=r"photos.zip: not a WhatsApp export \(the zip holds no .txt chat"):
        fetch(config(path))


def test_unreadable_zip_is_named_as_data_path_writes_it(params_factory, tmp_path):
    # Found by test_export_properties: the message named the path resolved against the root, not data.path.
    (tmp_path / "chat.zip").write_bytes(b"PK\x03\x04 cut short")
    cfg = params_factory({"data.source": "whatsapp", "data.path": "chat.zip"}).data
    with pytest.raises(PipelineError, match=r"^chat\.zip: not a readable zip archive"):
        fetch(cfg, tmp_path)


def central_directory_edit(offset: int, value: int):
    """An edit of one byte of the zip's central directory entry (6: version needed to extract, 8: flags)."""
    def edit(data: bytes) -> bytes:
        at = data.index(b"PK\x01\x02") + offset
        return data[:at] + bytes([value]) + data[at + 1:]
    return edit


# byte edits of a one-member zip (members are stored: the text is in the file as it is)
ZIP_DAMAGE = {
    "bad_crc": (lambda data: data.replace(b"Who's in", b"Who's on"),
                r"trail\.zip/_chat\.txt: cannot be read from the zip \(Bad CRC-32"),
    "encrypted": (central_directory_edit(8, 0x01), r"trail\.zip/_chat\.txt: the member is encrypted"),
    "newer_zip_version": (central_directory_edit(6, 99), r"trail\.zip: not a readable zip archive \(zip file version"),
}


@pytest.mark.parametrize("damage", list(ZIP_DAMAGE))
def test_damaged_zip_is_an_error_naming_the_zip_or_member(config, tmp_path, damage):
    # Found by test_export_properties: zipfile's own errors (BadZipFile on read, RuntimeError,
    # NotImplementedError, zlib.error, EOFError...) escaped as tracebacks.
    path = write_zip(tmp_path / "trail.zip", {"_chat.txt": (FIXTURES / "ios_group.txt").read_text(encoding="utf-8")})
    edit, message = ZIP_DAMAGE[damage]
    damaged = edit(path.read_bytes())
    assert damaged != path.read_bytes()
    path.write_bytes(damaged)
    with pytest.raises(PipelineError, match=message):
        fetch(config(path))


# ------------------------------------------------------------------------ bad exports


def test_export_of_only_notices_holds_no_messages(config, tmp_path):
    path = tmp_path / "chat.txt"
    path.write_text("12/31/23, 21:15 - Messages and calls are end-to-end encrypted.\n"
                    "12/31/23, 21:16 - Ann: <Media omitted>\n", encoding="utf-8")
    with pytest.raises(PipelineError, match=r"chat.txt: the WhatsApp export holds no messages .*'media_omitted': 1"):
        fetch(config(path))


def test_export_whose_messages_were_all_left_out_says_how_many_and_why(config, tmp_path):
    """The message counted app notices only: messages it could not read were left out of the sum."""
    path = tmp_path / "chat.txt"
    path.write_text("12/31/23, 21:15 - Ann:  \n12/31/23, 21:16 - Bob: \n12/31/23, 21:17 - Ann: <Media omitted>\n",
                    encoding="utf-8")
    with pytest.raises(PipelineError, match=r"chat.txt: the WhatsApp export holds no messages \(1 app notice\(s\) "
                                            r"removed: \{'media_omitted': 1\}; 2 message\(s\) not read: "
                                            r"\{'empty_text': 2\}\); export a chat"):
        fetch(config(path))


def test_export_with_one_speaker_is_an_error(config, tmp_path):
    path = tmp_path / "chat.txt"
    path.write_text("12/31/23, 21:15 - Ann: note to self\n12/31/23, 21:16 - Ann: another\n", encoding="utf-8")
    with pytest.raises(PipelineError, match=r"chat.txt:1: every message of the WhatsApp export is from one "
                                            r"speaker \(Ann\)"):
        fetch(config(path))


def test_plain_text_file_is_not_a_whatsapp_export(chat):
    with pytest.raises(NotThisExport, match=r"chat.txt:2: not a WhatsApp export \(expected a message line like "
                                            r".*found 'Shopping list'"):
        chat("\nShopping list\n" + "eggs\n" * 20 + "12/31/23, 21:15 - Ann: hi\n")


def test_messenger_file_pointed_at_whatsapp_names_the_right_source(config, tmp_path):
    path = tmp_path / "message_1.json"
    path.write_text(json.dumps({"participants": [{"name": "Ann"}, {"name": "Bob"}], "messages": [
        {"sender_name": "Ann", "timestamp_ms": 1704060000000, "content": "hi"}]}, indent=2))
    with pytest.raises(PipelineError, match=r"message_1.json:1: not a WhatsApp export.*data.source: messenger"):
        fetch(config(path))


def test_looks_like_claims_whatsapp_files_only(tmp_path):
    zipped = write_zip(tmp_path / "a.zip", {"_chat.txt": "12/31/23, 21:15 - Ann: hi\n"}).read_bytes()
    assert whatsapp.looks_like((FIXTURES / "ios_group.txt").read_bytes(), "_chat.txt")
    assert whatsapp.looks_like((FIXTURES / "android_group.txt").read_bytes(), "WhatsApp Chat with Book club.txt")
    assert whatsapp.looks_like(zipped, "a.zip")
    assert not whatsapp.looks_like(b'[{"id": 1, "text": "12/31/23, 21:15 - Ann: hi"}]', "chat.json")
    assert not whatsapp.looks_like(b'AuthorID,Author,Date,Content\n1,Ann,2023-12-31T21:15:00,hi\n', "chat.csv")
    assert not whatsapp.looks_like(b"\xff\xfe\x00garbage", "x.txt")
    assert not whatsapp.looks_like(write_zip(tmp_path / "b.zip", {"messages/inbox/x/message_1.json": "{}"})
                                   .read_bytes(), "b.zip")


def test_matches_export_names_only():
    assert whatsapp.matches(Path("WhatsApp Chat with Ann.txt")) and whatsapp.matches(Path("exports/trail.ZIP"))
    assert not any(whatsapp.matches(Path(name)) for name in
                   ["README.txt", "README.md", "result.json", "._chat.txt", "00000014-packing list.txt"])


@pytest.mark.parametrize(("body", "problem"), [
    ("\u200e[1/3/24, 6:59:00\u202fPM] Book Club: \u200eMessages and calls are end-to-end encrypted.\n",
     r"holds no messages"),
    ("[1/3/24, 6:59:00 PM] Ana: hi\n[1/3/24, 7:00:00 PM] Ana: anyone?\n", r"chat\.txt:1: .*one speaker \(Ana\)")])
def test_an_unusable_chat_is_named_so_before_its_ambiguous_dates(tmp_path, params_factory, body, problem):
    # 1/3/24 reads both ways, and would ask for data.date_order in a chat of two people.
    (tmp_path / "chat.txt").write_text(body, encoding="utf-8")
    cfg = params_factory({"data.source": "whatsapp", "data.path": str(tmp_path / "chat.txt")}).data
    with pytest.raises(PipelineError, match=problem):
        fetch(cfg)
    two = body + "[1/3/24, 7:01:00 PM] Bo: here\n[1/3/24, 7:02:00 PM] Cy: me too\n"
    (tmp_path / "chat.txt").write_text(two, encoding="utf-8")
    with pytest.raises(PipelineError, match=r"set data\.date_order: day_first or month_first"):
        fetch(cfg)
