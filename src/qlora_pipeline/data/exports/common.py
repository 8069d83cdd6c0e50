"""What every chat-app export reader returns, and the helpers they share.

A reader turns one export file into :class:`Thread` objects: the messages of one chat, in the
order the chat shows them, with the app's own notices (system lines, media placeholders,
deleted messages) already removed and counted in ``removed``, and lines or records it cannot
read counted in ``rejected``. It raises :class:`PipelineError` naming the file and line, and the
param to set, for a file it cannot read at all. Cutting threads into conversations, the checks
for empty and one-speaker chats and the canonical records are done once, in ``exports/__init__``.
"""

from __future__ import annotations

import json
import lzma
import re
import sys
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from qlora_pipeline.data.speakers import BIDI_MARKS, ODD_SPACES, clean_name  # noqa: F401 (readers use them)
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.io import refuse_archive


@dataclass
class ExportMessage:
    speaker: str
    text: str
    time: datetime | None  # naive = the phone's local time, as the app writes it
    where: str  # "file:line" (or "file: message N") for error messages
    non_contact: bool = False  # WhatsApp's "~ Carol": a member not in the phone's contacts, by her own name


@dataclass
class Thread:
    """One chat of an export: a WhatsApp file, a Telegram chat, a Discord channel, a Messenger thread."""

    key: str  # stable identity within the export (file name, chat id); hashed, never shown
    where: str  # the file it came from, for error messages
    messages: list[ExportMessage] = field(default_factory=list)


@dataclass
class ExportCounts:
    """What a reader left out, by reason: app notices (``removed``) and what it could not read (``rejected``)."""

    removed: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)


def read_text(data: bytes, label: str,
              fix: str = "export the chat again (the apps write UTF-8) or re-encode the file as UTF-8") -> str:
    """Bytes of a text file as str: UTF-8 with or without a BOM (Windows editors write one); an error names the line."""
    refuse_archive(data, label)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        # err.start counts from after the BOM, if any: find the line and the byte in err.object.
        line = err.object[: err.start].count(b"\n") + 1
        raise PipelineError(f"{label}:{line}: byte {err.object[err.start]:#04x} is not valid UTF-8; {fix}") from None


def read_json_export(data: bytes | str, label: str):
    """A JSON export file (its bytes, or its text from read_text) parsed; a syntax error names the line."""
    text = read_text(data, label) if isinstance(data, bytes) else data
    try:
        export = json.loads(text)
    except json.JSONDecodeError as err:
        raise PipelineError(f"{label}:{err.lineno}: not valid JSON ({err.msg}); the export is cut short or "
                            "is not an app's JSON export: export it again, or check data.source") from None
    except RecursionError:
        raise PipelineError(f"{label}: JSON nested too deeply to be a chat export; check data.source") from None
    except ValueError:  # Python refuses to convert integers this long (a guard against slow parsing)
        raise PipelineError(f"{label}:{_long_number_line(text)}: a number has more than "
                            f"{sys.get_int_max_str_digits()} digits, which no app writes; the file is damaged or "
                            "is not an app's JSON export: export it again, or check data.source") from None
    line = _lone_surrogate_line(text)
    if line is not None:
        # Python reads "\ud800" as a string no UTF-8 file can hold: writing the conversations would crash.
        raise PipelineError(f"{label}:{line}: a \\u escape encodes half of a UTF-16 surrogate pair, which is not a "
                            "character; fix or remove that escape (often an emoji cut in half), or export the chat "
                            "again")
    return export


def _long_number_line(text: str) -> int:
    """The line of the first number with more digits than ``int()`` converts."""
    long_number = re.search(rf"[0-9]{{{sys.get_int_max_str_digits() + 1},}}", text)
    return text.count("\n", 0, long_number.start()) + 1 if long_number else 1


# A \u escape of a UTF-16 surrogate that is not itself escaped (an even run of backslashes before it).
_SURROGATE_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u([dD][89a-fA-F][0-9a-fA-F]{2})")


def _lone_surrogate_line(text: str) -> int | None:
    """The line of the first \\u escape of half a surrogate pair whose other half does not follow it at once."""
    high = None  # a high half waiting for its low half
    for match in _SURROGATE_ESCAPE.finditer(text):
        is_low = int(match[1], 16) >= 0xDC00
        if is_low and high is not None and high.end() == match.end() - 6:
            high = None  # a pair: one character
            continue
        if is_low or high is not None:
            return text.count("\n", 0, (high or match).start()) + 1
        high = match
    return None if high is None else text.count("\n", 0, high.start()) + 1


# What zipfile raises for a damaged archive: a bad CRC or header, a corrupt deflate, bzip2 (OSError)
# or lzma stream, a stream cut short (EOFError), a name flagged UTF-8 that is not.
_ZIP_DAMAGE = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, OSError, EOFError, UnicodeDecodeError)
# ... and for one it cannot read: a newer zip version or a feature it lacks.
_ZIP_UNREADABLE = (*_ZIP_DAMAGE, NotImplementedError)


def zip_members(path: Path, label: str, suffixes: tuple[str, ...]) -> list[zipfile.ZipInfo]:
    """The members of a zip archive with one of ``suffixes``, in archive order (``label`` names it in errors)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return [m for m in archive.infolist() if not m.is_dir() and m.filename.lower().endswith(suffixes)]
    except _ZIP_UNREADABLE as err:
        # The label, as data.path writes it, not the path resolved against the repository root.
        raise PipelineError(f"{label}: not a readable zip archive ({err}); export the chat again") from None


def read_zip_member(path: Path, member: zipfile.ZipInfo, label: str) -> bytes:
    """One member's bytes; a member zipfile cannot read is an error naming it (``label/member``), not a traceback."""
    where = f"{label}/{member.filename}"
    if member.flag_bits & 0x1:  # zipfile would raise RuntimeError asking for a password
        raise PipelineError(f"{where}: the member is encrypted; export the chat again without a password, or "
                            "unzip it and point data.path at the .txt")
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.read(member)
    except NotImplementedError as err:  # a compression method or feature Python's zipfile lacks
        raise PipelineError(f"{where}: written with a zip feature Python cannot read ({err}); unzip it yourself "
                            "and point data.path at the .txt") from None
    except _ZIP_DAMAGE as err:
        raise PipelineError(f"{where}: cannot be read from the zip ({err}); the archive is damaged: export the "
                            "chat again, or unzip it and point data.path at the .txt") from None


def oldest_first(messages: list[ExportMessage]) -> list[ExportMessage]:
    """Messages in reading order: reversed when the export lists them newest first (Messenger,
    DiscordChatExporter's --reverse), judged by the first and last timed ones."""
    times = [m.time for m in messages if m.time is not None]
    try:
        newest_first = len(times) > 1 and times[0] > times[-1]
    except TypeError:  # naive and aware times mixed (data.date_format without %z beside ISO dates)
        newest_first = False
    return messages[::-1] if newest_first else messages


class NotThisExport(PipelineError):
    """The file is not this app's export (fetch adds which app it looks like)."""
