"""Properties of the chat-app export readers (whatsapp, telegram, discord, messenger) through fetch (hypothesis).

Whatever a file with an app's usual name holds (any bytes; a real export with lines dropped,
repeated or swapped, odd characters typed in, any value of its JSON replaced by one of another
type; a zip damaged in transit), ``fetch`` either returns or raises a ``PipelineError`` whose
message starts with the file's label (``data.path`` as written), and a line it names is in the
file. What it returns can be written out: every message has a speaker without the apps'
invisible marks, a text, and an ISO time or none; ids are unique; and every record of the file
is a message, a removed notice or a rejected record. WhatsApp files written from a small grammar
are cut into conversations exactly at the pauses longer than ``data.session_gap_minutes``.

Profiles as in tests/data/test_properties.py: derandomized, so a red run is a bug, not luck. For
a longer random search: ``DATA_PROPERTIES_PROFILE=thorough pytest tests/data/exports/test_export_properties.py``.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import re
import zipfile
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from conftest import PROPERTIES_PROFILE, make_params
from qlora_pipeline.data.sources import fetch
from qlora_pipeline.data.speakers import BIDI_MARKS
from qlora_pipeline.errors import PipelineError

PROFILE = PROPERTIES_PROFILE  # tests/conftest.py: fixed examples unless DATA_PROPERTIES_PROFILE=thorough
# The JSON exports hold the most places to break, and an example takes a few milliseconds.
PROFILE_MORE = settings(PROFILE, max_examples=3 * PROFILE.max_examples)

FIXTURES = Path(__file__).parent / "fixtures"
BOM = b"\xef\xbb\xbf"
# data.source -> the names the app gives its export files
FILE_NAMES = {"whatsapp": ["chat.txt", "chat.zip"], "telegram": ["result.json"],
              "discord": ["general.json", "general.csv"], "messenger": ["message_1.json"]}
APP_FILES = [(app, name) for app, names in FILE_NAMES.items() for name in names]
# The hand-written exports of each app and format
REAL = {
    "whatsapp": sorted((FIXTURES / "whatsapp").glob("*.txt")),
    "telegram": sorted((FIXTURES / "telegram").rglob("result.json")),
    "discord_json": [FIXTURES / "discord" / "general.json"],
    "discord_csv": [FIXTURES / "discord" / "general.csv"],
    "messenger": sorted((FIXTURES / "messenger").rglob("message_*.json")) + sorted(
        (FIXTURES / "messenger" / "e2ee").glob("*.json")),
}
JSON_APPS = {"telegram": ("telegram", "result.json"), "discord_json": ("discord", "general.json"),
             "messenger": ("messenger", "message_1.json")}

# ----------------------------------------------------------------------------- strategies

# As in tests/data/test_properties.py: text no UTF-8 file can hold (lone surrogates) only where a
# JSON escape can carry it.
ANY_CHAR = st.characters(exclude_categories=())
UTF8_CHAR = st.characters(codec="utf-8")
# The apps' own marks and spaces (LRM, NNBSP, isolates, BOM) beside what breaks naive code.
ODD_PIECES = ["", " ", "\x00", "\r", "\n", "\r\n", "\t", "\x0b", "\x1f", "\x7f", "\x85", "\u2028", "\ufeff",
              "\u200b", "\u200e", "\u200f", "\u202a", "\u202c", "\u202e", "\u2068", "\u2069", "\u2060", "\u202f",
              "\u00a0", "~", "~\u202f", "e\u0301", "\U0001F600", "\U0010FFFF", "ｆｕｌｌ", '"', "'", ",", ":", ": ",
              " - ", "[", "]", "{}", "\\", "1", "12/31/23, 9:15\u202fPM", "٣", "²"]
HUGE = st.builds(lambda char, size: char * size, st.sampled_from(["x", "é", "\ufdfa", "1"]), st.integers(1000, 4000))


# Halves of surrogate pairs, emoji cut in two: only a JSON escape can carry them (written "\ud83d").
LONE_SURROGATES = ["\ud83d", "\ude00", "\udfff"]


def odd_text(chars: st.SearchStrategy[str] = UTF8_CHAR, odd: list[str] = ODD_PIECES) -> st.SearchStrategy[str]:
    """Short runs of any characters mixed with the ones that break naive code, now and then a huge one."""
    pieces = st.one_of(st.text(chars, max_size=10), st.sampled_from(odd), HUGE)
    return st.lists(pieces, max_size=5).map("".join)


# Values that break a reader expecting another type: a number or true where a list or object is,
# text no UTF-8 file can hold (a lone surrogate, from a JSON escape), an empty list or object.
BREAKING_VALUES = [1709316065, True, "Ben \ud83d", "\ude00", 1e308, -1, 0, [], {}]
# Values the readers look for (a message type, a date, an epoch...).
TELLING_VALUES = ["message", "service", "unsupported", "bot_chat", "personal_chat", "Default", "Reply", "Forward",
                  "GuildMemberJoin", "Call", "Generic", "Share", "media", "link", "placeholder", "text",
                  "2024-03-01T19:01:05", "2024-03-01T18:00:05.1230000+00:00", "2024-03-01T19:01:05+05:00",
                  "1709316065", "user5550001", 1709316065000, "", " ", "\u200e",
                  {"type": "Forward"}, {"id": "1", "name": "x"}, {"list": []}, [""], [{"type": "bold"}]]
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                         odd_text(ANY_CHAR, LONE_SURROGATES + ODD_PIECES))
SCALARS = st.one_of(st.sampled_from([v for v in BREAKING_VALUES + TELLING_VALUES if not isinstance(v, (dict, list))]),
                    JSON_SCALARS)


def json_containers(inner: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)


# Any JSON value, a breaking or a telling one as often as any other
JSON_VALUES = st.one_of(st.sampled_from(BREAKING_VALUES).map(copy.deepcopy),
                        st.sampled_from(TELLING_VALUES).map(copy.deepcopy),
                        st.recursive(JSON_SCALARS, json_containers, max_leaves=6))
# Keys each reader looks for: a mutation may add one where the export has none.
READER_KEYS = {  # a message's keys first (hypothesis favours the first choices), then the export's
    "telegram": ["from", "text", "type", "date", "date_unixtime", "from_id", "forwarded_from", "via_bot", "id", "photo",
                 "messages", "chats", "left_chats", "list", "personal_information"],
    "discord_json": ["reference", "type", "content", "author", "timestamp", "forwardedMessage", "attachments",
                     "stickers", "embeds", "isBot", "nickname", "name", "id", "guild", "channel", "messages"],
    "messenger": ["sender_name", "timestamp_ms", "content", "type", "is_unsent", "is_taken_down", "call_duration",
                  "photos", "share", "senderName", "timestamp", "text", "media", "isUnsent", "participants",
                  "messages", "thread_path", "threadName"],
}

# Byte pieces of every app's files, so that a concatenation now and then starts like one.
BYTE_PIECES = [BOM, b"\n", b"\r\n", b"\r", b"", b",", b'"', b"\x00", b"\xff", b"\xed\xa0\x80", b"\xe4", b"\xe2\x80\x8e",
               b"12/31/23, 21:15 - Bob: hi\n", b"[12/31/23, 9:15:02\xe2\x80\xafPM] Ann: yo\n",
               b"31/12/2023, 09:00 - Ann joined\n", b"99/99/99, 99:99 - a: b\n", b"[1/2/3, 1:00] : \n",
               b"00/00/00, 00:00 - \xe2\x80\xaa: x\n", b"2023-12-31, 24:60 - a: b\n",
               b"PK\x03\x04", b"PK\x05\x06" + bytes(18), b"{", b"}", b"[", b"]", b":", b"null", b'"\\ud800"',
               b'"messages": [', b'"type": "message", ', b'"from": "Ann", ', b'"date_unixtime": "1", ',
               b'"from_id": "user1", ', b'"guild": {}, ', b'"channel": {}, ', b'"participants": [], ',
               b'"sender_name": "Ann", ', b'"timestamp_ms": 1, ', b'"content": "hi"', b"9" * 4400,
               b"AuthorID,Author,Date,Content,Attachments,Reactions\n",
               b'"1","ann","2024-03-01T18:00:05Z","hi","",""\n',
               b'"1","ann","99999999999999999999","hi","",""\n', b"<html>"]
ANY_BYTES = st.lists(st.one_of(st.binary(max_size=12), st.sampled_from(BYTE_PIECES)), max_size=10).map(b"".join)


def lines_of(data: bytes) -> list[bytes]:
    return data.split(b"\n")


@st.composite
def line_edits(draw, lines: list, max_edits: int = 3) -> list:
    """``lines`` with a few dropped, repeated or swapped (any kind of item: bytes lines or CSV records)."""
    lines = list(lines)
    for _ in range(draw(st.integers(0, max_edits))):
        if not lines:
            break
        i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
        edit = draw(st.sampled_from(["drop", "repeat", "swap"]))
        if edit == "drop":
            del lines[i]
        elif edit == "repeat":
            lines.insert(j, lines[i])
        else:
            lines[i], lines[j] = lines[j], lines[i]
    return lines


@st.composite
def typed_in(draw, data: bytes, pieces: st.SearchStrategy[str], max_edits: int = 3) -> bytes:
    """``data`` with odd text inserted at a few places (any offset: inside a character too, now and then)."""
    for _ in range(draw(st.integers(1, max_edits))):
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(pieces).encode("utf-8", "surrogatepass") + data[at:]
    return data


# ------------------------------------------------------------------------- fetch and its checks


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The root the exports are read from; data.path is relative to it, so the label is short and exact."""
    return tmp_path_factory.mktemp("export-properties")


@pytest.fixture(scope="module")
def export_cfg(base_params_dict, folder):
    """``data`` params reading ``<app>/<name>`` under ``folder``, plus ``data.*`` overrides (built once each)."""
    built = {}

    def build(app: str, name: str, **data):
        key = (app, name, tuple(sorted(data.items())))
        if key not in built:
            (folder / app).mkdir(exist_ok=True)
            overrides = {"data.source": app, "data.path": f"{app}/{name}", **{f"data.{k}": v for k, v in data.items()}}
            built[key] = make_params(base_params_dict, overrides).data
        return built[key]
    return build


def fetch_bytes(cfg, root: Path, data: bytes):
    """``fetch`` of ``data.path`` holding ``data``: the result, or the PipelineError it raised."""
    (root / cfg.path).write_bytes(data)
    try:
        result = fetch(cfg, root)
    except PipelineError as err:
        event(f"refused: {str(err)[len(cfg.path):].split(';')[0][:40]}")  # see --hypothesis-show-statistics
        return err
    event("read")
    return result


def assert_names_the_file(err: PipelineError, cfg, root: Path) -> None:
    """The message starts with the file's label (or a zip member's); a line it names is in the file."""
    message = str(err)
    assert message.startswith((f"{cfg.path}:", f"{cfg.path}/")), message
    named = re.match(rf"{re.escape(cfg.path)}:(\d+): ", message)
    if named:
        last_line = (root / cfg.path).read_bytes().count(b"\n") + 1
        assert 1 <= int(named[1]) <= last_line, message


def assert_canonical(result, single_file: bool = True) -> None:
    """Conversations the fetch stage can write and the next stages read, with the counts they sum to."""
    json.dumps(result.conversations, ensure_ascii=False).encode("utf-8")  # a lone surrogate would crash the write
    ids = [c["id"] for c in result.conversations]
    assert len(ids) == len(set(ids)), ids
    for message in (m for c in result.conversations for m in c["messages"]):
        assert set(message) == {"speaker", "text", "time"}, message
        speaker, text, time = message["speaker"], message["text"], message["time"]
        assert isinstance(speaker, str) and speaker, message
        assert speaker == speaker.strip() and not BIDI_MARKS.match(speaker[0]) and not BIDI_MARKS.match(speaker[-1]), \
            repr(speaker)
        assert isinstance(text, str), message
        assert time is None or (isinstance(time, str) and datetime.fromisoformat(time).isoformat() == time), message
    counts = result.manifest["counts"]
    assert counts["messages"] == sum(len(c["messages"]) for c in result.conversations)
    if single_file:  # one file has no earlier file to repeat
        assert "in_earlier_file" not in result.manifest["export"]["rows_removed"], result.manifest["export"]


def records_out(result) -> int:
    """Messages + removed notices + rejected records: what the file's records became."""
    removed = sum(result.manifest["export"]["rows_removed"].values())
    return result.manifest["counts"]["messages"] + removed + sum(result.manifest["counts"]["rows_rejected"].values())


def check(cfg, root: Path, data: bytes, single_file: bool = True):
    """Property 1 and 3 on one file: the result (checked canonical) or None once the error is checked."""
    result = fetch_bytes(cfg, root, data)
    if isinstance(result, PipelineError):
        assert_names_the_file(result, cfg, root)
        return None
    assert_canonical(result, single_file)
    return result


# ------------------------------------------------------------------------------ any bytes


@PROFILE
@given(raw=ANY_BYTES)
@pytest.mark.parametrize("app, name", APP_FILES)
def test_any_bytes_are_read_or_refused_by_name(export_cfg, folder, app, name, raw):
    check(export_cfg(app, name), folder, raw)


# ------------------------------------------------------------------------------ WhatsApp

# The fixtures' header lines, and only them, with the marks an edit may put before them.
WHATSAPP_HEADER = re.compile("[\u200e\ufeff\u2068]*" + r"(?:\[\d|\d\d/\d\d/\d{4}, )")
END_PIECES = st.sampled_from([p for p in ODD_PIECES if "\n" not in p]) | st.text(UTF8_CHAR.filter(lambda c: c != "\n"),
                                                                                  max_size=6)


def whatsapp_records(text: str) -> int:
    """What a WhatsApp file's lines must become: each header line, and each non-blank line before the first."""
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    first = next((i for i, line in enumerate(lines) if WHATSAPP_HEADER.match(line)), len(lines))
    return sum(1 for line in lines if WHATSAPP_HEADER.match(line)) + sum(1 for line in lines[:first] if line.strip())


@st.composite
def edited_whatsapp(draw) -> tuple[bytes, bool]:
    """A real WhatsApp export, edited; and whether its header lines are still known (no edit inside a line)."""
    data = draw(st.sampled_from(REAL["whatsapp"])).read_bytes()
    lines = draw(line_edits(lines_of(data)))
    if draw(st.booleans()):  # marks at line starts, odd text at line ends: every line keeps its kind
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(0, len(lines) - 1)) if lines else None
            if i is not None:
                start = draw(st.sampled_from(["", "\u200e", "\ufeff", "\u2068"])).encode()
                lines[i] = start + lines[i] + draw(END_PIECES).encode()
    data = b"\n".join(lines)
    if draw(st.booleans()):
        data = data.replace(b"\n", b"\r\n")
    known = True
    if draw(st.booleans()):
        data, known = draw(typed_in(data, st.one_of(st.sampled_from(ODD_PIECES), odd_text()))), False
    return (BOM + data if draw(st.booleans()) else data), known


WHATSAPP_PARAMS = st.fixed_dictionaries({
    "date_order": st.sampled_from(["auto", "auto", "day_first", "month_first", "year_first"]),
    "date_format": st.sampled_from([None, None, None, "%d/%m/%Y", "%m/%d/%y"]),
    "session_gap_minutes": st.sampled_from([None, 60, 1])})


@PROFILE
@given(edited_whatsapp(), WHATSAPP_PARAMS)
def test_edited_whatsapp_export_is_read_and_counted_or_refused_by_name(export_cfg, folder, edited, data):
    raw, known = edited
    cfg = export_cfg("whatsapp", "chat.txt", **data)
    result = check(cfg, folder, raw)
    if result is not None and known and not data["date_format"]:
        # Every header line is a message, a removed notice or a rejected line; so is each stray line before the first.
        assert records_out(result) == whatsapp_records(raw.decode("utf-8-sig")), result.manifest


ZIP_MEMBERS = ["_chat.txt", "WhatsApp Chat with Bob.txt", "WhatsApp-Chat mit Ann.txt", "notes.txt", "._chat.txt",
               "__MACOSX/._chat.txt", "00000012-PHOTO.txt", "photo.jpg", "a/b/_chat.txt"]


@st.composite
def whatsapp_zip(draw) -> bytes:
    """A zip of chat texts (real, edited or any bytes) and other members, now and then damaged."""
    contents = st.one_of(st.sampled_from(REAL["whatsapp"]).map(Path.read_bytes), edited_whatsapp().map(lambda e: e[0]),
                         ANY_BYTES)
    members = draw(st.lists(st.tuples(st.sampled_from(ZIP_MEMBERS), contents), max_size=3, unique_by=lambda m: m[0]))
    method = draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, content in members:
            archive.writestr(name, content)
    data = buffer.getvalue()
    damage = draw(st.sampled_from(["none", "none", "cut", "flip", "overwrite"]))
    at = draw(st.integers(0, max(len(data) - 1, 0)))
    if damage == "cut":
        data = data[:at]
    elif damage == "flip":
        data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
    elif damage == "overwrite":
        patch = draw(st.binary(min_size=1, max_size=8))
        data = data[:at] + patch + data[at + len(patch):]
    return data


@PROFILE
@given(whatsapp_zip())
def test_whatsapp_zip_is_read_or_refused_by_name(export_cfg, folder, raw):
    check(export_cfg("whatsapp", "chat.zip", session_gap_minutes=None), folder, raw, single_file=False)


# ------------------------------------------------------------------------- JSON exports


def tree_paths(tree, path: tuple = ()) -> list[tuple]:
    """Every place in a JSON tree, the root included, as a tuple of keys and indices."""
    found = [path]
    if isinstance(tree, dict):
        for key, value in tree.items():
            found += tree_paths(value, (*path, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            found += tree_paths(value, (*path, index))
    return found


def at_path(tree, path: tuple):
    for step in path:
        tree = tree[step]
    return tree


def values_by_key(tree, found: dict[str, list]) -> dict[str, list]:
    """Every value each key holds anywhere in a JSON tree."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            found.setdefault(key, []).append(value)
            values_by_key(value, found)
    elif isinstance(tree, list):
        for value in tree:
            values_by_key(value, found)
    return found


def key_values(kind: str, key: str) -> st.SearchStrategy:
    """A value the real exports give ``key`` (so that one odd value meets sound ones), or any JSON value."""
    seen = SEEN[kind].get(key)
    return st.one_of(st.sampled_from(seen).map(copy.deepcopy), JSON_VALUES) if seen else JSON_VALUES


SEEN = {kind: values_by_key([json.loads(path.read_bytes()) for path in REAL[kind]], {}) for kind in JSON_APPS}


@st.composite
def edited_tree(draw, kind: str):
    """A real export's JSON with a few values replaced by any JSON value, keys set or removed, items repeated."""
    tree = json.loads(draw(st.sampled_from(REAL[kind])).read_bytes())
    for _ in range(draw(st.integers(1, 3))):
        paths = tree_paths(tree)
        edit = draw(st.sampled_from(["replace", "replace", "set_keys", "set_keys", "remove", "repeat"]))
        if edit == "set_keys":  # several of the keys the reader looks for, set to any value
            dicts = [p for p in paths if isinstance(at_path(tree, p), dict)]
            records = [p for p in dicts if len(p) >= 2 and p[-2] == "messages"]
            if dicts:
                path = draw(st.sampled_from(records if records and draw(st.integers(0, 2)) else dicts))
                at_path(tree, path).update(draw(st.fixed_dictionaries(
                    {}, optional={key: key_values(kind, key) for key in READER_KEYS[kind]})))
            continue
        # Inside a message record, where the readers look most closely; or a list or object outside
        # them, which give the export its shape (a place picked from all would nearly always be a leaf).
        in_messages = [p for p in paths if "messages" in p[:-1]]
        shape = sorted((p for p in paths if "messages" not in p[:-1] and isinstance(at_path(tree, p), (dict, list))),
                       key=len)  # the outermost first, which hypothesis favours
        path = draw(st.sampled_from(in_messages if in_messages and draw(st.booleans()) else shape or paths))
        target = at_path(tree, path)
        if edit == "remove" and path:
            del at_path(tree, path[:-1])[path[-1]]
        elif edit == "repeat" and path and isinstance(path[-1], int):
            at_path(tree, path[:-1]).insert(path[-1], copy.deepcopy(target))
        else:  # a list or an object often by a scalar: the shape the reader walks is then broken
            value = draw(SCALARS if isinstance(target, (dict, list)) and draw(st.booleans()) else JSON_VALUES)
            if path:
                at_path(tree, path[:-1])[path[-1]] = value
            else:
                tree = value
    return tree


@st.composite
def edited_json(draw, kind: str) -> bytes:
    """An edited export tree written as JSON (ASCII escapes or raw, indented or not), its text now and then edited."""
    tree = draw(edited_tree(kind)) if draw(st.integers(0, 7)) else json.loads(
        draw(st.sampled_from([p for k in JSON_APPS for p in REAL[k]])).read_bytes())  # another app's export
    text = json.dumps(tree, ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 1, 2])))
    data = text.encode("utf-8", "surrogatepass")  # a raw lone surrogate is invalid UTF-8: named like any bad byte
    edit = draw(st.sampled_from(["none", "none", "none", "lines", "typed", "long_number"]))
    if edit == "long_number":  # more digits than Python converts to an int (no JSON value written can hold one)
        numbers = list(re.finditer(rb"(?<=[:\[,] )-?[0-9]+|(?<=[:\[,])-?[0-9]+", data))
        if numbers:
            number = draw(st.sampled_from(numbers))
            data = data[:number.start()] + b"9" * 4400 + data[number.end():]
    elif edit == "lines":
        data = b"\n".join(draw(line_edits(lines_of(data))))
    elif edit == "typed":
        escapes = st.sampled_from(["\\ud800", "\\udfff", "\\ud83d\\ude00", "\\u200e", "\\u0000", '\\"', "\\"])
        data = draw(typed_in(data, st.one_of(escapes, st.sampled_from(ODD_PIECES), odd_text())))
    return BOM + data if draw(st.booleans()) else data


def parsed(data: bytes):
    """The JSON a file holds, as json reads it; None when it is not JSON."""
    try:
        return json.loads(data.decode("utf-8-sig"))
    except ValueError:
        return None


def telegram_records(tree) -> int:
    """Messages in the chats of a Telegram export that fetch read (one chat, or the chats of an account)."""
    def is_chat(value) -> bool:
        return isinstance(value, dict) and isinstance(value.get("messages"), list) and "type" in value and "id" in value
    if is_chat(tree):
        return len(tree["messages"])
    chats = [chat for section in ("chats", "left_chats") if isinstance(tree.get(section), dict)
             for chat in (tree[section].get("list") or [])]
    return sum(len(chat["messages"]) for chat in chats)


def assert_every_record_counted(app: str, result, tree) -> None:
    """One file, read: every record of its message list(s) is a message, a removed notice or a rejected record."""
    if result is None or tree is None or result.manifest["export"]["threads_skipped"]:
        return  # a skipped thread's messages are counted as a thread, not one by one
    expected = telegram_records(tree) if app == "telegram" else len(tree["messages"])
    assert records_out(result) == expected, result.manifest


@PROFILE_MORE
@given(st.data())
@pytest.mark.parametrize("kind", list(JSON_APPS))
def test_edited_json_export_is_read_and_counted_or_refused_by_name(export_cfg, folder, kind, data):
    app, name = JSON_APPS[kind]
    raw = data.draw(edited_json(kind))
    assert_every_record_counted(app, check(export_cfg(app, name), folder, raw), parsed(raw))


@st.composite
def one_value_replaced(draw, kind: str) -> bytes:
    """A real export with one value, of a message record or of the export's outer shape, set to any JSON value.

    The edits above seldom break one thing alone; here nothing else changes, and the file is written
    with ASCII escapes, so a lone surrogate arrives as the escape an app's JSON writer gives it.
    """
    tree = json.loads(draw(st.sampled_from(REAL[kind])).read_bytes())
    paths = tree_paths(tree)
    records = [p for p in paths if len(p) >= 2 and p[-2] == "messages" and isinstance(at_path(tree, p), dict)]
    if records and draw(st.booleans()):
        record = at_path(tree, draw(st.sampled_from(records)))
        record[draw(st.sampled_from(list(dict.fromkeys([*READER_KEYS[kind], *record]))))] = draw(JSON_VALUES)
    else:
        shape = sorted((p for p in paths if p and "messages" not in p[:-1]), key=len)  # the outermost first
        path = draw(st.sampled_from(shape))
        at_path(tree, path[:-1])[path[-1]] = draw(st.one_of(SCALARS, JSON_VALUES))
    return json.dumps(tree, indent=1).encode()


@PROFILE_MORE
@given(st.data())
@pytest.mark.parametrize("kind", list(JSON_APPS))
def test_json_export_with_one_value_of_any_type_is_read_and_counted_or_refused_by_name(export_cfg, folder, kind,
                                                                                        data):
    app, name = JSON_APPS[kind]
    raw = data.draw(one_value_replaced(kind))
    assert_every_record_counted(app, check(export_cfg(app, name), folder, raw), parsed(raw))


# ------------------------------------------------------------------------- Discord CSV

# Digits first (hypothesis favours the first choices): the numbers a calendar cannot hold, then sound ones.
DATE_CELLS = ["²", "99999999999999999999", "9" * 5000, "9" * 400, "١٧٠٩٣١٦٠٦٥", " 1709316065 ", "1709316065000",
              "0", "-1", "2024-03-01T18:00:05Z", "2024-03-01T18:00:05.1234567+00:00", "2024-03-01t18:00:05z",
              "2024-13-01T00:00:00", "12/31/2023 9:15 PM", ""]
CSV_CELLS = st.one_of(
    odd_text(),
    st.sampled_from(["", " ", "\u200e", "\u202aBob\u202c", "~ Sam", "Joined the server.", "Pinned a message.",
                     "https://cdn.discordapp.com/a.png", "two\r\nlines", "lone\rCR", *DATE_CELLS]))
# Date cells more often from dates and numbers, where the reader parses
CELLS_BY_COLUMN = {"Date": st.one_of(st.sampled_from(DATE_CELLS), CSV_CELLS)}


@st.composite
def edited_csv(draw) -> tuple[bytes, int, bool]:
    """The real CSV with records dropped, repeated, swapped, cells replaced, added or removed, written back
    as DiscordChatExporter writes (every cell quoted); with its record count and whether the header is intact."""
    text = REAL["discord_csv"][0].read_text(encoding="utf-8")
    header, *records = list(csv.reader(io.StringIO(text, newline="")))
    original_header = header
    records = draw(line_edits(records))
    for _ in range(draw(st.integers(0, 4))):
        rows = [header, *records]
        # The header now and then: an edited one is no DiscordChatExporter CSV, and ends the example.
        at_header = not records or draw(st.sampled_from(["record"] * 7 + ["header"])) == "header"
        i = 0 if at_header else draw(st.integers(1, len(rows) - 1))
        row = list(rows[i])
        edit = draw(st.sampled_from(["cell", "cell", "cell", "add", "remove"]))
        if edit == "cell":
            # Date and Content first: the cells the reader parses (hypothesis favours the first choices)
            column = draw(st.sampled_from([c for c in (2, 3, 1, 4, 0, 5, *range(6, len(row))) if c < len(row)]))
            name = original_header[column] if column < len(original_header) else None
            row[column] = draw(CELLS_BY_COLUMN.get(name, CSV_CELLS))
        elif edit == "add":
            row.insert(draw(st.integers(0, len(row))), draw(CSV_CELLS))
        elif len(row) > 1:
            del row[draw(st.integers(0, len(row) - 1))]
        if i == 0:
            header = row
        else:
            records[i - 1] = row
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator=draw(st.sampled_from(["\n", "\r\n"])), quoting=csv.QUOTE_ALL)
    writer.writerows([header, *records])
    data = buffer.getvalue().encode("utf-8")
    return (BOM + data if draw(st.booleans()) else data), len(records), header == original_header


@PROFILE
@given(edited_csv(), st.sampled_from([None, "%m/%d/%Y %I:%M %p", "%Y"]))
def test_edited_discord_csv_is_read_and_counted_or_refused_by_name(export_cfg, folder, edited, date_format):
    raw, rows, header_intact = edited
    result = check(export_cfg("discord", "general.csv", date_format=date_format), folder, raw)
    if result is not None:
        assert header_intact
        assert records_out(result) == rows, result.manifest


@PROFILE
@given(st.data())
def test_discord_csv_with_text_typed_in_is_read_or_refused_by_name(export_cfg, folder, data):
    raw = data.draw(typed_in(REAL["discord_csv"][0].read_bytes(), st.one_of(st.sampled_from(ODD_PIECES), odd_text())))
    check(export_cfg("discord", "general.csv"), folder, raw)


# -------------------------------------------------------------------- WhatsApp sessions

# (as written in the export, the speaker fetch gives): marks around numbers, "~ " before non-contacts
SPEAKERS = [("Ana", "Ana"), ("Ben Okafor", "Ben Okafor"), ("\u202a+1 555 0100\u202c", "+1 555 0100"),
            ("~\u202fSam Li", "Sam Li"), ("Renée", "Renée")]
WORDS = ["hi", "ok", "see you at 7", "bring layers", "what's up?", "ça va", "👍", "a: b", "[later]", "- fine -"]
TEXTS = st.lists(st.lists(st.sampled_from(WORDS), min_size=1, max_size=3).map(" ".join), min_size=1,
                 max_size=3).map("\n".join)
# (date format, data.date_order, iOS?) as phones write them
DATE_STYLES = [("%m/%d/%y", "month_first"), ("%d/%m/%Y", "day_first"), ("%d.%m.%y", "day_first"),
               ("%Y-%m-%d", "year_first")]
HALVES = [("AM", "PM"), ("am", "pm"), ("a.m.", "p.m."), ("a. m.", "p. m.")]


def clock(stamp: datetime, half: tuple[str, str] | None, space: str, seconds: bool) -> str:
    """The time as a phone writes it: 24 h, or 12 h with AM/PM after a (narrow no-break) space."""
    tail = f":{stamp.second:02d}" if seconds else ""
    if half is None:
        return f"{stamp.hour:02d}:{stamp.minute:02d}{tail}"
    return f"{(stamp.hour - 1) % 12 + 1}:{stamp.minute:02d}{tail}{space}{half[stamp.hour >= 12]}"


@st.composite
def whatsapp_chat(draw):
    """A WhatsApp export written from a grammar.

    Returns its bytes, the params to read it, its messages as (speaker, text, time), the pauses
    between them in seconds and how many notices it holds.
    """
    date_format, order = draw(st.sampled_from(DATE_STYLES))
    ios = draw(st.booleans())
    half = draw(st.sampled_from([None, *HALVES]))
    space = draw(st.sampled_from([" ", "\u202f", ""]))
    gap = draw(st.sampled_from([None, 1, 5, 30, 60, 240, 0.5]))
    steps = st.one_of(st.integers(0, 300), st.just(gap or 0).map(int), st.integers(0, 3 * 24 * 60))
    stamp = draw(st.datetimes(datetime(2001, 1, 1), datetime(2090, 1, 1))).replace(microsecond=0)
    stamp = stamp if ios else stamp.replace(second=0)
    lines, expected, pauses = [], [], []
    notices = draw(st.integers(0, 1))
    if notices:  # the app's first line: a notice, not a message
        notice = "Messages and calls are end-to-end encrypted."
        lines.append(f"\u200e[{stamp.strftime(date_format)}, {clock(stamp, half, space, True)}] Chat: \u200e{notice}"
                     if ios else f"{stamp.strftime(date_format)}, {clock(stamp, half, space, False)} - {notice}")
    for index in range(draw(st.integers(2, 12))):
        if index:
            step = timedelta(minutes=draw(steps), seconds=draw(st.integers(0, 59)) if ios else 0)
            stamp += step
            pauses.append(step.total_seconds())
        written, speaker = draw(st.sampled_from(SPEAKERS))
        text = draw(TEXTS)
        head = (f"[{stamp.strftime(date_format)}, {clock(stamp, half, space, True)}]" if ios
                else f"{stamp.strftime(date_format)}, {clock(stamp, half, space, False)} -")
        lines.append(f"{head} {written}: {text}")
        expected.append((speaker, text, stamp.isoformat()))
    assume(len({speaker for speaker, _, _ in expected}) >= 2)
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    data = (newline.join(lines) + draw(st.sampled_from(["", newline]))).encode("utf-8")
    data = BOM + data if draw(st.booleans()) else data
    return data, {"date_order": order, "session_gap_minutes": gap}, expected, pauses, notices


@PROFILE
@given(whatsapp_chat())
def test_whatsapp_chat_is_cut_at_each_pause_longer_than_the_gap(export_cfg, folder, chat):
    raw, params, expected, pauses, notices = chat
    result = fetch_bytes(export_cfg("whatsapp", "chat.txt", **params), folder, raw)
    assert not isinstance(result, PipelineError), str(result)
    assert_canonical(result)
    gap = params["session_gap_minutes"]
    cuts = 0 if gap is None else sum(pause > gap * 60 for pause in pauses)
    assert len(result.conversations) == 1 + cuts
    read = [(m["speaker"], m["text"], m["time"]) for c in result.conversations for m in c["messages"]]
    assert read == expected
    assert result.manifest["export"]["rows_removed"] == ({"system": notices} if notices else {})
    assert result.manifest["counts"]["rows_rejected"] == {}
