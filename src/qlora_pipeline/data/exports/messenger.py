"""Facebook Messenger and Instagram chats from Meta's "Download your information" (``data.source: messenger``).

Two shapes of one-chat JSON file are read:

- the main download (Facebook and Instagram, Format: JSON): one folder per chat,
  ``messages/inbox/<name>_<id>/message_1.json``, ``message_2.json``, ... (Instagram:
  ``your_instagram_activity/messages/inbox/<name>_<id>/``); each file holds ``participants``,
  ``thread_path`` and ``messages`` of ``{"sender_name", "timestamp_ms", "content", "type", "photos",
  "share", "is_unsent", ...}``, newest first;
- Messenger's separate download of end-to-end encrypted chats (2024+): ``<Name>_<n>.json`` per chat,
  holding ``participants`` (plain names), ``threadName`` and ``messages`` of ``{"senderName",
  "timestamp", "text", "type": text|media|link|placeholder, "media", "isUnsent"}``.

Meta writes each UTF-8 byte of non-ASCII text as its own ``\\u00XX`` escape ("café" arrives as
"cafÃ©"); :func:`repair` undoes that string by string. Times are milliseconds since 1970, read as
aware UTC datetimes. The app's notices are recognised by the export's own fields (``type``,
``call_duration``, ``is_unsent``, attachments, ``share``) in every UI language, and by their English
wording otherwise: a group rename or "reacted 😢 to your message" written in another language stays
in as text.

A long chat is split over ``message_1.json``, ``message_2.json``, ...: each file's thread carries the
chat's ``thread_path`` as its key, so that threads with one key are one chat.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from qlora_pipeline.config import DataConfig
from qlora_pipeline.data.exports.common import (
    ExportCounts,
    ExportMessage,
    NotThisExport,
    Thread,
    clean_name,
    oldest_first,
    read_json_export,
)
from qlora_pipeline.errors import PipelineError

EXPECTED = ("the message_1.json files (one folder per chat) of Facebook's or Instagram's Download your "
            "information in JSON format, or the <Name>_<n>.json files of Messenger's encrypted-chats download")

MESSAGE_FILE = re.compile(r"message_\d+\.json", re.IGNORECASE)
# The encrypted-chats download names files after the person ("Bob Jones_12.json"): too loose a name
# alone, so the file's head must show the shape too.
E2EE_FILE = re.compile(r".+_\d+\.json", re.IGNORECASE)
HEAD_BYTES = 1 << 16
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

# Notices written as "<actor> <phrase>", the actor being the sender or "You" (the export's owner).
ACTOR_NOTICES = [(reason, re.compile(pattern, re.IGNORECASE)) for reason, pattern in [
    ("system", r"named the (?:group|chat) .+"),
    ("system", r"removed the (?:group|chat) name"),
    ("system", r"(?:changed|removed) the (?:group|chat) (?:photo|picture|image)"),
    ("system", r"created the group(?: .+)?"),
    ("system", r"added .+ to the group"),
    ("system", r"removed .+ from the group"),
    ("system", r"left the group"),
    ("system", r"set (?:the nickname for .+|your nickname|(?:his|her|their) own nickname) to .+"),
    ("system", r"cleared (?:the nickname for .+|your nickname|(?:his|her|their) own nickname)"),
    ("system", r"changed the (?:chat )?theme(?: to .+)?"),
    ("system", r"set the (?:emoji|quick reaction) to .+"),
    ("system", r"(?:un)?pinned a message"),
    ("system", r"(?:made .+ an admin|removed .+ as (?:an )?admin)"),
    ("system", r"waved at .+"),
    ("system", r"mentioned you in (?:their|his|her) story"),
    ("call", r"(?:called you|called a contact|missed (?:a|your) (?:video |audio )?call.*)"),
    ("call", r"(?:joined|started) (?:the |a )?(?:video |audio )?(?:call|chat)"),
    ("call", r"started sharing video"),
    ("reaction", r"reacted .+ to (?:your|a) message"),
    ("reaction", r"liked (?:a|your) message"),
    ("deleted", r"unsent a message"),
    ("media_only", r"sent (?:an attachment|a (?:photo|video|GIF|sticker|voice message|audio clip|file|location)|"
                   + r"\d+ (?:photos|videos|files))"),
    ("link_only", r"sent a link"),
]]
# Notices with no actor in front, or whose actor is not the sender.
WHOLE_NOTICES = [(reason, re.compile(pattern, re.IGNORECASE)) for reason, pattern in [
    ("system", r"You are now connected on Messenger"),
    ("system", r"Say hi to your new Facebook friend,? .+"),
    ("system", r"Mentioned you in their story"),
    ("reaction", r"(?:Liked a message|Reacted .+ to your message)"),
    ("call", r"(?:The )?(?:video |audio )?(?:call|chat) ended"),
    ("deleted", r"(?:User unsent a message|This message was unsent)"),
    ("media_only", r".{1,80} sent an attachment"),
]]
BARE_LINK = re.compile(r"https?://\S+")
# Attachment lists of the main download: a message with one of these and no text is a photo, a voice note...
MEDIA_KEYS = ("photos", "videos", "gifs", "audio_files", "files", "sticker")


def matches(path: Path) -> bool:
    if MESSAGE_FILE.fullmatch(path.name):
        return True
    return E2EE_FILE.fullmatch(path.name) is not None and _is_e2ee_file(path)


def _is_e2ee_file(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            head = handle.read(HEAD_BYTES)
    except OSError:
        return False
    return b'"senderName"' in head and looks_like(head, path.name)


def looks_like(head: bytes, name: str) -> bool:
    """A Meta chat file: a JSON object with "participants" and a sender key, and no Telegram or Discord key."""
    text = head.decode("utf-8", errors="ignore")
    if not text.lstrip("\ufeff \t\r\n").startswith("{") or '"participants"' not in text:
        return False
    if '"sender_name"' not in text and '"senderName"' not in text:
        return False
    return not any(key in text for key in ('"from_id"', '"date_unixtime"', '"guild"'))


def repair(text: str) -> str:
    """``text`` with Meta's byte-per-character escaping undone: "cafÃ©" -> "café".

    A string already written right ("café" as ``caf\\u00e9``) is not valid UTF-8 once taken back to
    bytes, and one holding a character above U+00FF cannot be taken back at all: both are kept as they
    are, so a file written correctly (or repaired already) passes unchanged.
    """
    try:
        return text.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return text


@dataclass(frozen=True)
class Shape:
    """The keys of one of the two file shapes, and how it tells the app's notices."""

    sender: str
    time: str
    text: str
    notice: Callable[[dict, str, str], str | None]


def read(path: Path, label: str, cfg: DataConfig, counts: ExportCounts) -> list[Thread]:
    data = path.read_bytes()
    _refuse_other_downloads(data, label)
    export = read_json_export(data, label)
    shape = _shape(export, label)
    thread = Thread(key=_thread_key(export, path, shape), where=label)
    bad_times = counts.rejected["bad_time"]
    for index, record in enumerate(export["messages"]):
        message = _message(record, shape, f"{label}: messages[{index}]", counts)
        if message is not None:
            thread.messages.append(message)
    # Every time unreadable is a file reshaped by some tool, not a few damaged records.
    if export["messages"] and counts.rejected["bad_time"] - bad_times == len(export["messages"]):
        raise _no_readable_time(export["messages"][0], shape, label)
    # Meta writes newest first: reversed, then sorted by time (stable: equal times keep their order).
    thread.messages = sorted(oldest_first(thread.messages), key=lambda m: m.time)
    return [thread]


def _refuse_other_downloads(data: bytes, label: str) -> None:
    """The two other things a user gets from "Download your information", named with what to do."""
    if data.startswith(b"PK\x03\x04"):
        raise PipelineError(f"{label}: a zip archive; unzip Meta's download and point data.path at its "
                            "messages/inbox folder, or at one chat's folder")
    if data.lstrip()[:1] == b"<":
        raise PipelineError(f"{label}:1: an HTML export; request Download your information again with "
                            "Format: JSON, and point data.path at the JSON download")


def _shape(export: Any, label: str) -> Shape:
    if not isinstance(export, dict) or "participants" not in export or not isinstance(export.get("messages"), list):
        raise NotThisExport(f'{label}:1: not a Messenger/Instagram export (expected a JSON object with "participants" '
                            'and "messages", as in message_1.json)')
    records = [r for r in export["messages"][:50] if isinstance(r, dict)]
    if not records:
        return CLASSIC
    for shape in (CLASSIC, E2EE):
        if any(shape.sender in r or shape.time in r for r in records):
            return shape
    raise NotThisExport(f'{label}: messages[0]: not a Messenger/Instagram message (expected "sender_name" and '
                        '"timestamp_ms", or "senderName" and "timestamp")')


def _thread_key(export: dict, path: Path, shape: Shape) -> str:
    """The chat's identity, the same in each of its files (message_1.json, message_2.json)."""
    if shape is E2EE:
        name = export.get("threadName")
        return f"e2ee/{name if isinstance(name, str) and name else path.stem}"
    thread_path = export.get("thread_path")
    if isinstance(thread_path, str) and thread_path:
        return thread_path
    # As thread_path writes it ("inbox/bobjones_10158"), so the chat keeps its id either way.
    return f"{path.parent.parent.name}/{path.parent.name}"


def _message(record: Any, shape: Shape, where: str, counts: ExportCounts) -> ExportMessage | None:
    """One record as a message, or None once counted as a notice (removed) or unreadable (rejected)."""
    if not isinstance(record, dict):
        counts.rejected["not_an_object"] += 1
        return None
    sender = record.get(shape.sender)
    sender = clean_name(repair(sender)) if isinstance(sender, str) else ""
    if not sender:
        counts.rejected["no_sender"] += 1
        return None
    time = _time(record.get(shape.time))
    if time is None:
        counts.rejected["bad_time"] += 1
        return None
    text = record.get(shape.text)
    text = repair(text) if isinstance(text, str) else ""
    reason = shape.notice(record, text, sender)
    if reason:
        counts.removed[reason] += 1
        return None
    return ExportMessage(speaker=sender, text=text, time=time, where=where)


def _time(value: Any) -> datetime | None:
    """Milliseconds since 1970 as an aware UTC datetime; None when it is not such a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return EPOCH + timedelta(milliseconds=value)
    except (OverflowError, ValueError):
        return None


def _no_readable_time(first: Any, shape: Shape, label: str) -> PipelineError:
    value = first.get(shape.time) if isinstance(first, dict) else None
    return PipelineError(
        f'{label}: messages[0]: "{shape.time}" is {value!r}, not milliseconds since 1970, nor is any message\'s; '
        "the file was changed after Meta wrote it: point data.path at the download itself, or check data.source")


def _classic_notice(record: dict, text: str, sender: str) -> str | None:
    if record.get("is_unsent") or record.get("is_taken_down"):
        return "deleted"
    kind = record.get("type")
    if kind == "Call" or "call_duration" in record:
        return "call"
    if kind in ("Subscribe", "Unsubscribe"):
        return "system"
    has_media = any(record.get(key) for key in MEDIA_KEYS)
    is_share = kind == "Share" or bool(record.get("share"))
    return _text_notice(text, sender) or _attachment_notice(text, has_media, is_share)


def _e2ee_notice(record: dict, text: str, sender: str) -> str | None:
    if record.get("isUnsent") or record.get("type") == "placeholder":
        return "deleted"
    has_media = bool(record.get("media")) or record.get("type") == "media"
    return _text_notice(text, sender) or _attachment_notice(text, has_media, record.get("type") == "link")


def _text_notice(text: str, sender: str) -> str | None:
    """The reason when ``text`` is one of the app's English notices ("Bob named the group Hikes.")."""
    stripped = text.strip().rstrip(".!")  # the notices end in "." or "!", or in nothing (Instagram)
    for reason, pattern in WHOLE_NOTICES:
        if pattern.fullmatch(stripped):
            return reason
    rest = _after_actor(stripped, sender)
    if rest is not None:
        for reason, pattern in ACTOR_NOTICES:
            if pattern.fullmatch(rest):
                return reason
    return None


def _after_actor(text: str, sender: str) -> str | None:
    # Only the sender or "You" may lead a notice: "Bob named the group" typed by Carol is her message.
    for actor in (sender, "You"):
        if text.startswith(actor + " "):
            return text[len(actor) + 1:]
    return None


def _attachment_notice(text: str, has_media: bool, is_share: bool) -> str | None:
    """Why a message is left out when no one typed anything in it: a photo, a shared link, nothing."""
    if text.strip():
        return "link_only" if is_share and BARE_LINK.fullmatch(text.strip()) else None
    if has_media:
        return "media_only"
    return "link_only" if is_share else "empty"


CLASSIC = Shape("sender_name", "timestamp_ms", "content", _classic_notice)
E2EE = Shape("senderName", "timestamp", "text", _e2ee_notice)
