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
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from qlora_pipeline.data.speakers import BIDI_MARKS, ODD_SPACES, clean_name  # noqa: F401 (readers use them)
from qlora_pipeline.errors import PipelineError



@dataclass
class ExportMessage:
    speaker: str
    text: str
    time: datetime | None  # naive = the phone's local time, as the app writes it
    where: str  # "file:line" (or "file: message N") for error messages


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


def read_text(data: bytes, label: str) -> str:
    """Bytes of a text export as str: UTF-8 with or without a BOM; an error names the line otherwise."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = err.object[: err.start].count(b"\n") + 1
        raise PipelineError(
            f"{label}:{line}: byte {err.object[err.start]:#04x} is not valid UTF-8; export the chat again "
            "(the apps write UTF-8) or re-encode the file as UTF-8") from None


def read_json_export(data: bytes, label: str):
    """A JSON export file parsed; a syntax error names the line."""
    text = read_text(data, label)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise PipelineError(f"{label}:{err.lineno}: not valid JSON ({err.msg}); the export is cut short or "
                            "is not an app's JSON export: export it again, or check data.source") from None
    except RecursionError:
        raise PipelineError(f"{label}: JSON nested too deeply to be a chat export; check data.source") from None


def zip_members(path: Path, suffixes: tuple[str, ...]) -> list[zipfile.ZipInfo]:
    """The members of a zip archive with one of ``suffixes``, in archive order."""
    try:
        with zipfile.ZipFile(path) as archive:
            return [m for m in archive.infolist() if not m.is_dir() and m.filename.lower().endswith(suffixes)]
    except zipfile.BadZipFile:
        raise PipelineError(f"{path}: not a readable zip archive; export the chat again") from None


class NotThisExport(PipelineError):
    """The file is not this app's export (fetch adds which app it looks like)."""
