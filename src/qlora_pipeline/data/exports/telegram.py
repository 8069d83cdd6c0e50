"""Telegram Desktop's JSON export (``data.source: telegram``) -> one thread per chat.

Telegram Desktop writes ``result.json`` (choose "Machine-readable JSON" in the export dialog):
"Export chat history" gives one chat, ``{"name", "type", "id", "messages": [...]}``; "Export
Telegram data" gives every chat under ``chats.list`` and the groups you left under
``left_chats.list`` (both are read), beside contacts, sessions and profile data (not read).

A message's time is its ``date``: the exporting computer's local time, naive; an export with only
``date_unixtime`` gives UTC. Its text is the text and the text of each formatting entity (bold,
link, mention...), joined. Removed and counted: service messages (calls, joins, pins:
``service``), messages without text (a photo, sticker or voice message with no caption:
``media_only``), forwarded messages (someone else's words: ``forwarded``), messages sent through
an inline bot (``via_bot``), the bot's replies in a chat with a bot (``bot``) and messages Telegram
could not export (``unsupported``). Rejected: the messages of deleted accounts (``from: null``),
whose speaker is unknown (``no_sender``); the rest of the chat is kept.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path

from qlora_pipeline.config import DataConfig
from qlora_pipeline.data.exports.common import (
    ExportCounts,
    ExportMessage,
    NotThisExport,
    Thread,
    clean_name,
    read_json_export,
    read_text,
)
from qlora_pipeline.errors import PipelineError

EXPECTED = "the result.json that Telegram Desktop's Export chat history writes (format: JSON)"

# Keys only Telegram Desktop writes near the top of result.json: a message's epoch date, a sender
# id such as "user123", the full export's personal_information, a chat's type.
_SIGNS = re.compile(
    r'"date_unixtime"\s*:|"from_id"\s*:\s*"(?:user|channel|chat)\d+"|"personal_information"\s*:'
    r'|"type"\s*:\s*"(?:personal_chat|bot_chat|saved_messages|replies|private_group|private_supergroup'
    r'|public_supergroup|private_channel|public_channel)"')
# Keys of a message that carry media: without text, such a message is a photo, sticker, poll...
_MEDIA_KEYS = {"photo", "file", "media_type", "sticker_emoji", "poll", "contact_information",
               "location_information", "place_name", "game_title", "invoice_information"}
_CHAT_LISTS = ("chats", "left_chats")


def matches(path: Path) -> bool:
    """Telegram names its export result.json; another name is read when data.path names the file."""
    return path.name.lower() == "result.json"


def looks_like(head: bytes, name: str) -> bool:
    text = head.decode("utf-8", "ignore").lstrip("\ufeff \t\r\n")
    return text.startswith("{") and _SIGNS.search(text) is not None


def read(path: Path, label: str, cfg: DataConfig, counts: ExportCounts) -> list[Thread]:
    data = path.read_bytes()
    text = read_text(data, label)  # a file in another encoding (UTF-16) is named as such, not as another app's
    # Checked before parsing, so that a JSONL log or a WhatsApp .txt gets "set data.source",
    # not a JSON syntax error.
    if not looks_like(data[:1 << 16], path.name):
        raise NotThisExport(f"{label}:1: not a Telegram export (expected {EXPECTED})")
    chats = _chats(read_json_export(text, label), label)
    # Every chat's thread is from this one file: a message two chats share (cross-posted in one
    # second) is no repeat of an earlier export, which is what a thread's file is compared for.
    return [_thread(chat, label, prefix, counts) for chat, prefix in chats]


def _chats(export, label: str) -> list[tuple[dict, str]]:
    """``(chat, prefix of its messages' where)`` of a one-chat or a whole-account export."""
    if _is_chat(export):
        return [(export, f"{label}: ")]
    if not isinstance(export, dict) or not any(k in export for k in (*_CHAT_LISTS, "personal_information")):
        raise NotThisExport(f'{label}:1: not a Telegram export (expected a chat with "messages", or "chats": '
                            f"{{\"list\": [...]}}, at the top of {EXPECTED})")
    found = []
    for section in _CHAT_LISTS:
        for index, chat in enumerate(_listed_chats(export, section, label)):
            where = f"{label}: {section}.list[{index}]"
            if not _is_chat(chat):
                raise PipelineError(f'{where}: not a Telegram chat (no "type", "id" and "messages" list); '
                                    "the export is damaged: export it again (data.path)")
            found.append((chat, f"{where}."))
    return found


def _listed_chats(export: dict, section: str, label: str) -> list:
    """``export[section]["list"]``: none when absent, an error naming it when it is no list."""
    listing = export.get(section)
    chats = listing.get("list") if isinstance(listing, dict) else None
    if chats is None:
        return []
    if not isinstance(chats, list):  # a number or true would stop fetch with a TypeError
        raise PipelineError(f"{label}: {section}.list: not a list of chats (a {type(chats).__name__}); the export "
                            "is damaged: export it again (data.path)")
    return chats


def _is_chat(value) -> bool:
    return isinstance(value, dict) and isinstance(value.get("messages"), list) and "type" in value and "id" in value


def _thread(chat: dict, label: str, prefix: str, counts: ExportCounts) -> Thread:
    # In a chat with a bot the chat's id is the bot's: its replies are written "from_id": "user<id>".
    bot = {f"user{chat['id']}", str(chat["id"])} if chat.get("type") == "bot_chat" else set()
    messages = []
    for index, raw in enumerate(chat["messages"]):
        at = f"{prefix}messages[{index}]" + (f" (id {raw['id']})" if isinstance(raw, dict) and "id" in raw else "")
        message = _message(raw, at, bot, counts)
        if message is not None:
            messages.append(message)
    return Thread(str(chat["id"]), label, messages)


def _message(raw, where: str, bot: set[str], counts: ExportCounts) -> ExportMessage | None:
    """The message, or None once it is counted as removed (a notice) or rejected (unreadable)."""
    if not isinstance(raw, dict) or raw.get("type") not in ("message", "service", "unsupported"):
        counts.rejected["unknown_type"] += 1
        return None
    reason = _removed_reason(raw, bot)
    if reason:
        counts.removed[reason] += 1
        return None
    speaker = clean_name(raw["from"]) if isinstance(raw.get("from"), str) else ""
    if not speaker:
        counts.rejected["no_sender"] += 1
        return None
    return ExportMessage(speaker, _text(raw), _time(raw, where), where)


def _removed_reason(raw: dict, bot: set[str]) -> str | None:
    if raw["type"] != "message":
        return raw["type"]  # "service" or "unsupported"
    if "forwarded_from" in raw:  # present, as null, when the original sender hides their name
        return "forwarded"
    if "via_bot" in raw:
        return "via_bot"
    if str(raw.get("from_id")) in bot:
        return "bot"
    if not _text(raw).strip():
        return "media_only" if _MEDIA_KEYS & raw.keys() else "empty"
    return None


def _text(raw: dict) -> str:
    """A message's text: a string, or a list of strings and entities ``{"type": "bold", "text": ...}``."""
    text = raw.get("text", "")
    if isinstance(text, list):
        return "".join(p if isinstance(p, str) else str(p.get("text", "")) for p in text if isinstance(p, (str, dict)))
    return text if isinstance(text, str) else ""


def _time(raw: dict, where: str) -> datetime | None:
    value = raw.get("date", raw.get("date_unixtime"))
    if value is None:
        return None
    try:
        if "date" in raw:
            return datetime.fromisoformat(value)
        return datetime.fromtimestamp(int(value), tz=timezone.utc)
    except (TypeError, ValueError, OverflowError, OSError):
        raise PipelineError(f"{where}: date {value!r} is not a date as Telegram Desktop writes it "
                            "(2023-12-31T21:15:02, or seconds since 1970 in date_unixtime); the export "
                            "is damaged: export the chat again (data.path)") from None
