"""DiscordChatExporter's JSON and CSV exports (``data.source: discord``) -> one thread per file.

DiscordChatExporter (github.com/Tyrrrz/DiscordChatExporter) writes one file per channel. Its
JSON holds ``guild``, ``channel`` and ``messages``; the thread is the channel (its id). A
speaker is the author's ``nickname`` (the server nickname or display name, as Discord shows it),
else their ``name`` (the unique user name). Removed and counted: notices (joins, pins, calls,
thread starts: every message type but Default and Reply: ``system``), bots' messages (``bot``),
messages without text (an attachment, sticker or embed alone: ``media_only``; a forward:
``forwarded``).

The CSV (``AuthorID,Author,Date,Content,Attachments,Reactions``) has no channel and no message
type: the thread is the file; a speaker is ``Author``, the unique user name (``name#1234`` for
accounts older than Discord's 2023 user names), not the nickname; notices are recognised by the
English text DiscordChatExporter writes for them ("Joined the server."); and bots cannot be told
apart: list them in ``clean.exclude_speakers``. Its dates are ISO 8601 since version 2.42.3 (November
2023); older versions wrote the date format chosen at export ("12/31/2023 9:15 PM"): set
``data.date_format`` to a strptime format for the whole Date cell to read those.

A file exported newest first (``--reverse``) is read oldest first.
"""

from __future__ import annotations

import csv
import re
from datetime import datetime, timezone
from pathlib import Path

from qlora_pipeline.config import DataConfig
from qlora_pipeline.data.csv_records import csv_records
from qlora_pipeline.data.exports.common import (
    ExportCounts,
    ExportMessage,
    NotThisExport,
    Thread,
    clean_name,
    oldest_first,
    read_json_export,
    read_text,
)
from qlora_pipeline.errors import PipelineError

EXPECTED = "the .json or .csv that DiscordChatExporter writes for a channel"
CSV_HEADER = ["AuthorID", "Author", "Date", "Content", "Attachments", "Reactions"]
_JSON_SIGNS = (re.compile(r'"guild"\s*:\s*\{'), re.compile(r'"channel"\s*:\s*\{'))
# Message types people write; the others are Discord's notices.
_SPOKEN_TYPES = {"Default", "Reply"}
# The text DiscordChatExporter writes in a CSV's Content for each notice (PlainTextMessageExtensions).
_CSV_NOTICE = re.compile(
    r"Added .+ to the group\.|Added a recipient\.|Left the group\.|Removed .+ from the group\."
    r"|Removed a recipient\.|Started a call that lasted [\d,]+ minutes\.|Changed the channel name(?:: .+|\.)"
    r"|Changed the channel icon\.|Pinned a message\.|Started a thread\.|Joined the server\.")
# .NET writes up to 7 fractional digits ("o" format) and Python 3.10's fromisoformat takes 3 or 6.
_FRACTION = re.compile(r"(?<=\d\d:\d\d)\.(\d+)")
_DATE_EXAMPLE = "2023-12-31T21:15:02.1230000+00:00"


def matches(path: Path) -> bool:
    return path.suffix.lower() in (".json", ".csv")


def looks_like(head: bytes, name: str) -> bool:
    text = head.decode("utf-8", "ignore").lstrip("\ufeff \t\r\n")
    if text.startswith("{"):
        return all(sign.search(text) for sign in _JSON_SIGNS)
    return _header(text.split("\n", 1)[0]) == CSV_HEADER


def _header(line: str) -> list[str]:
    try:
        return [cell.strip() for cell in next(csv.reader([line.rstrip("\r")]), [])]
    except csv.Error:
        return []


def read(path: Path, label: str, cfg: DataConfig, counts: ExportCounts) -> list[Thread]:
    """A file holding a JSON object is read as the JSON export, any other as the CSV (renamed files too)."""
    data = path.read_bytes()
    if data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"{":
        if not looks_like(data[:1 << 16], path.name):
            raise NotThisExport(f'{label}:1: not a DiscordChatExporter export (expected "guild" and "channel" '
                                f"at the top of {EXPECTED})")
        return [_json_thread(read_json_export(data, label), label, counts)]
    return [_csv_thread(read_text(data, label), label, cfg, counts)]


# ------------------------------------------------------------------------------ JSON


def _json_thread(export, label: str, counts: ExportCounts) -> Thread:
    if not isinstance(export, dict) or not isinstance(export.get("messages"), list):
        raise NotThisExport(f'{label}:1: not a DiscordChatExporter export (expected a "messages" list in {EXPECTED})')
    channel = export.get("channel") if isinstance(export.get("channel"), dict) else {}
    messages = []
    for index, raw in enumerate(export["messages"]):
        where = f"{label}: messages[{index}]" + (f" (id {raw['id']})" if isinstance(raw, dict) and "id" in raw else "")
        message = _json_message(raw, where, counts)
        if message is not None:
            messages.append(message)
    return Thread(str(channel.get("id") or label), label, oldest_first(messages))


def _json_message(raw, where: str, counts: ExportCounts) -> ExportMessage | None:
    """The message, or None once it is counted as removed (a notice) or rejected (unreadable)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("type", "Default"), str):
        counts.rejected["not_a_message"] += 1  # not a record DiscordChatExporter writes: damaged or edited by hand
        return None
    reason = _json_removed_reason(raw)
    if reason:
        counts.removed[reason] += 1
        return None
    author = raw.get("author") if isinstance(raw.get("author"), dict) else {}
    name = author.get("nickname") or author.get("name") or ""
    if not isinstance(raw["content"], str) or not isinstance(name, str):  # edited by hand: Python's text of it
        counts.rejected["not_text"] += 1
        return None
    speaker = clean_name(name)
    if not speaker:
        counts.rejected["no_sender"] += 1
        return None
    time = _json_time(raw.get("timestamp"), where)
    return ExportMessage(speaker, raw["content"], time, where)


def _json_removed_reason(raw: dict) -> str | None:
    if raw.get("type", "Default") not in _SPOKEN_TYPES:
        return "system"
    if isinstance(raw.get("author"), dict) and raw["author"].get("isBot"):
        return "bot"
    if not str(raw.get("content") or "").strip():
        if _is_forward(raw):
            return "forwarded"
        return "media_only" if raw.get("attachments") or raw.get("stickers") or raw.get("embeds") else "empty"
    return None


def _is_forward(raw: dict) -> bool:
    # "reference" is an object in every export; anything else is a damaged record, not a forward.
    reference = raw.get("reference")
    return bool(raw.get("forwardedMessage")) or (isinstance(reference, dict) and reference.get("type") == "Forward")


def _json_time(value, where: str) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_iso(value if isinstance(value, str) else "")
    except ValueError:
        raise PipelineError(f"{where}: timestamp {value!r} is not an ISO 8601 time as DiscordChatExporter writes "
                            f"it ({_DATE_EXAMPLE}); the export is damaged: export the channel again "
                            "(data.path)") from None


def parse_iso(value: str) -> datetime:
    """An ISO 8601 time with any number of fractional digits and a Z or offset, on Python 3.10 too."""
    value = value.strip()
    if value[-1:] in ("Z", "z"):
        value = value[:-1] + "+00:00"
    return datetime.fromisoformat(_FRACTION.sub(lambda m: "." + m[1][:6].ljust(6, "0"), value, count=1))


# ------------------------------------------------------------------------------- CSV


def _csv_thread(text: str, label: str, cfg: DataConfig, counts: ExportCounts) -> Thread:
    records = csv_records(text, label)
    line, header = next(records, (1, []))
    if [cell.strip() for cell in header] != CSV_HEADER:
        raise NotThisExport(f"{label}:{line}: not a DiscordChatExporter export (expected its CSV header "
                            f"{','.join(CSV_HEADER)}, or its JSON)")
    messages = []
    for line, cells in records:
        message = _csv_message(cells, f"{label}:{line}", cfg, counts)
        if message is not None:
            messages.append(message)
    return Thread(label, label, oldest_first(messages))


def _csv_message(cells: list[str], where: str, cfg: DataConfig, counts: ExportCounts) -> ExportMessage | None:
    if len(cells) != len(CSV_HEADER):
        counts.rejected["bad_row"] += 1  # DiscordChatExporter quotes every cell: a hand-edited row
        return None
    _, author, date, content, attachments, _ = cells
    if _CSV_NOTICE.fullmatch(content) and not attachments:
        counts.removed["system"] += 1
        return None
    if not content.strip():
        counts.removed["media_only" if attachments.strip() else "empty"] += 1
        return None
    speaker = clean_name(author)
    if not speaker:
        counts.rejected["no_sender"] += 1
        return None
    return ExportMessage(speaker, content, _csv_time(date, where, cfg.date_format), where)


def _csv_time(cell: str, where: str, date_format: str | None) -> datetime:
    """ISO 8601 (versions since 2023), seconds or milliseconds since 1970 ("unix", "unixms"), or data.date_format."""
    try:
        return parse_iso(cell)
    except ValueError:
        pass
    if cell.strip().isdecimal():  # what int() reads: isdigit() also takes "²", which it does not
        return _epoch_time(cell.strip(), where)
    if date_format:
        try:
            return datetime.strptime(cell.strip(), date_format)
        except ValueError:
            raise PipelineError(f"{where}: date {cell!r} does not match data.date_format {date_format!r}; for a "
                                "Discord CSV it is a strptime format for the whole Date cell (e.g. "
                                "\"%m/%d/%Y %I:%M %p\" for 12/31/2023 9:15 PM)") from None
    raise PipelineError(f"{where}: cannot read the date {cell!r}; DiscordChatExporter writes ISO 8601 "
                        f"({_DATE_EXAMPLE}) since version 2.42.3, older versions the format chosen at export: set "
                        "data.date_format to a strptime format for the whole Date cell (e.g. "
                        "\"%m/%d/%Y %I:%M %p\" for 12/31/2023 9:15 PM)")


def _epoch_time(digits: str, where: str) -> datetime:
    """Seconds (up to 11 digits) or milliseconds since 1970 as a UTC time; a time past year 9999 is an error."""
    try:
        return datetime.fromtimestamp(int(digits) / (1000 if len(digits) > 11 else 1), tz=timezone.utc)
    except (ValueError, OverflowError, OSError):  # beyond datetime, the C library, or int()'s digit limit
        raise PipelineError(f"{where}: date {digits[:40]!r} is no time since 1970 that a calendar holds; the export is "
                            "damaged: export the channel again (data.path)") from None
