"""WhatsApp's "Export chat" file (``data.source: whatsapp``) -> one thread per chat.

The export is a ``.txt`` (Android: "WhatsApp Chat with Bob.txt"; iOS: ``_chat.txt``), often inside
a ``.zip`` with the media; a zip's chat ``.txt`` member(s) are read, each one thread. A message
starts with a header line and runs until the next one (multi-line messages keep their "\\n")::

    [12/31/23, 9:15:02 PM] Bob: text        iOS (12 h with U+202F before PM, or 24 h)
    12/31/23, 21:15 - Bob: text              Android (also 9:15 PM, 31.12.23, 2023-12-31, p.m.)

Dates follow the phone's locale, so ``03/04/23`` is read by the whole file's evidence: a first
field above 12 means day-first, a second one month-first; when every date reads both ways, the
order under which the timestamps go backwards less often wins, and a tie asks for
``data.date_order``. ``data.date_format`` (strptime, date part only) reads any other date.

The app's own lines are removed and counted: notices (Android: a header line with no "Name: ";
iOS: text led by a left-to-right mark, sent "by" the chat), media placeholders and attachment
lines, deleted messages, call logs, view-once ("null"), undecryptable messages, locations and
polls. "<This message was edited>" is cut from the text, which is kept. The app writes these in the phone's
language: they are read in English, German, Spanish, French, Portuguese, Italian, Dutch and Russian (attachment
lines but in Russian).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date, datetime, time
from itertools import pairwise
from pathlib import Path, PurePosixPath

from qlora_pipeline.config import DataConfig
from qlora_pipeline.data.exports.common import (
    BIDI_MARKS,
    ExportCounts,
    ExportMessage,
    NotThisExport,
    Thread,
    clean_name,
    read_text,
    read_zip_member,
    zip_members,
)
from qlora_pipeline.errors import PipelineError

EXPECTED = "the .txt (or the .zip holding it) that WhatsApp's Export chat writes"
EXAMPLE = "'[12/31/23, 9:15:02 PM] Name: text' or '12/31/23, 21:15 - Name: text'"

LRM = "\u200e"  # iOS puts it before its own notices and placeholders, never before typed text
_SPACE = "[ \u00a0\u202f]"  # newer phones write a (narrow) no-break space before AM/PM
_AMPM = rf"[AaPp]\.?{_SPACE}?[Mm]\.?"
_TIME = rf"\d{{1,2}}[:.]\d{{2}}(?:[:.]\d{{2}})?(?:{_SPACE}?{_AMPM})?"
# Any header-shaped line, whatever its date looks like: the date part is checked on its own.
IOS_HEADER = re.compile(rf"\[(?P<date>[^\[\]]{{1,40}}?),?{_SPACE}(?P<time>{_TIME})\] (?P<rest>.*)")
ANDROID_HEADER = re.compile(rf"(?P<date>[^\s\[\]][^\[\]]{{0,39}}?),?{_SPACE}(?P<time>{_TIME}) - (?P<rest>.*)")
NUMERIC_DATE = re.compile(r"(\d{1,4})([./-])(\d{1,2})\2(\d{1,4})\.?")
CLOCK = re.compile(rf"(\d{{1,2}})[:.](\d{{2}})(?:[:.](\d{{2}}))?(?:{_SPACE}?({_AMPM}))?")
NON_CONTACT = re.compile(r"^~\s*")
# A WhatsApp file starts with a message; a few stray lines (a file cut mid-message) are tolerated.
HEAD_WINDOW = 10

# Marks the app adds at line starts and around mentions and numbers ("@\u2068Bob\u2069").
LINE_START_MARKS = re.compile(f"^{BIDI_MARKS.pattern}+", re.MULTILINE)
INSERTED_MARKS = re.compile("[\u202a-\u202e\u2066-\u2069]")
# The app writes its marks and notices in the phone's language: English, and as exports in German, Spanish, French,
# Portuguese, Italian, Dutch and Russian write them (a notice in another language stays text, as typed text would).
EDITED = re.compile(r"[ \u200e]*<(?:This message was edited|Diese Nachricht wurde bearbeitet|Se editó este mensaje|"
                    r"Ce message a été modifié|Mensagem editada|Questo messaggio è stato modificato|"
                    r"Dit bericht is bewerkt|Сообщение изменено)\.?>$", re.IGNORECASE)
# Android notices quote a group name that may hold ": " ('Bob changed the subject from "a: b" ...').
NOTICE_BEFORE_COLON = re.compile(r"changed the (?:subject|group name|group description)|created group|"
                                 r"changed this group's", re.IGNORECASE)
ATTACHMENT_LINE = re.compile(r".*(?:<(?:attached|anhang|adjunto|anexado|allegato|pièce jointe) ?: [^>]*>| \((?:file "
                             r"attached|datei angehängt|archivo adjunto|fichier joint|arquivo anexado|file allegato|"
                             r"bestand bijgevoegd)\))\s*", re.IGNORECASE)
NOTICES = (  # (reason, pattern of the whole text without marks), first match wins
    ("media_omitted", re.compile(
        r"<media omitted>|null|(?:image|video|audio|sticker|gif|document|photo|contact card|video note) omitted|"
        r"<medien ausgeschlossen>|(?:bild|video|audio|sticker|gif|dokument|kontaktkarte) weggelassen|"
        r"<multimedia omitido>|(?:imagen|audio|video|sticker|gif|documento) omitid[oa]|"
        r"<médias omis>|(?:image|vidéo|audio|sticker|gif|document) (?:absente?|omise?|retirée?)|"
        r"<mídia oculta>|<arquivo de mídia oculto>|<media omess[oi]>|(?:immagine|audio|video|sticker|gif) omess[oa]|"
        r"<media weggelaten>|[<‹]без медиафайлов>", re.IGNORECASE)),
    ("deleted", re.compile(
        r"(?:(?:this message was deleted|you deleted this message)(?: by .*)?|diese nachricht wurde gelöscht|"
        r"du hast diese nachricht gelöscht|se eliminó este mensaje|eliminaste este mensaje|este mensaje fue eliminado|"
        r"ce message a été supprimé|vous avez supprimé ce message|(?:esta )?mensagem (?:foi )?apagada|"
        r"você apagou esta mensagem|questo messaggio è stato eliminato|hai eliminato questo messaggio|"
        r"dit bericht is verwijderd|je hebt dit bericht verwijderd|(?:данное )?сообщение удалено|"
        r"вы удалили данное сообщение)\.?", re.IGNORECASE)),
    ("call", re.compile(
        r"(?:(?:missed|silenced) (?:group )?(?:voice|video) call|verpasster (?:sprach|video)anruf|"
        r"llamada (?:de voz |de video )?perdida|videollamada perdida|appel (?:vocal|vidéo) manqué|"
        r"chamada de (?:voz|vídeo) perdida|chiamata vocale persa|videochiamata persa|gemiste (?:spraak|video-?)oproep|"
        r"пропущенный (?:аудио|видео)звонок)(?:,.*)?|"  # iOS: "Missed voice call, Tap to call back"
        r"(?:voice|video) call, (?:\d.*|no answer|tap to call back)", re.IGNORECASE)),
    ("undecryptable", re.compile(r"waiting for this message\b.*", re.IGNORECASE | re.DOTALL)),
    ("location", re.compile(r"(?:live )?location: https?://\S+", re.IGNORECASE)),
    ("poll", re.compile(r"POLL:\n.*\nOPTION: .*", re.DOTALL)),
)


@dataclass
class _Header:
    """A message's header line, split, plus the lines that continue its text."""

    line: int
    date: str
    clock: str
    rest: str
    more: list[str] = field(default_factory=list)


def matches(path: Path) -> bool:
    """A chat export by name: .txt or .zip, but not a README, a macOS "._" shadow or an iOS attachment."""
    name = path.name
    return (path.suffix.lower() in (".txt", ".zip") and not name.startswith("._")
            and path.stem.lower() != "readme" and not re.match(r"\d{8}-", name)
            and "__MACOSX" not in path.parts)


def looks_like(head: bytes, name: str) -> bool:
    """Whether the file starts with a WhatsApp message line, or is a zip holding a WhatsApp chat."""
    if head.startswith(b"PK\x03\x04"):
        return b"_chat.txt" in head or b"WhatsApp" in head
    text = head.decode("utf-8", errors="ignore").lstrip("\ufeff")
    first = next((line for line in text.split("\n") if line.strip()), "")
    match = _header_match(first.removesuffix("\r"))
    return match is not None and NUMERIC_DATE.fullmatch(match["date"]) is not None


def read(path: Path, label: str, cfg: DataConfig, counts: ExportCounts) -> list[Thread]:
    """The chat(s) of one export file: a .txt is one thread, a .zip one per chat .txt inside."""
    if path.suffix.lower() == ".zip":
        return _read_zip(path, label, cfg, counts)
    return [read_chat(read_text(path.read_bytes(), label), label, cfg, counts)]


def _read_zip(path: Path, label: str, cfg: DataConfig, counts: ExportCounts) -> list[Thread]:
    """Each chat .txt of a zip: ``_chat.txt`` or "WhatsApp Chat ….txt" (other .txt are attachments)."""
    members = [m for m in zip_members(path, label, (".txt",)) if matches(Path(m.filename))]
    chats = [m for m in members if _is_chat_name(PurePosixPath(m.filename).name)] or members
    if not chats:
        raise NotThisExport(f"{label}: not a WhatsApp export (the zip holds no .txt chat; WhatsApp's zip "
                            "holds _chat.txt or 'WhatsApp Chat with ….txt' beside the media)")
    return [read_chat(read_text(read_zip_member(path, m, label), f"{label}/{m.filename}"), f"{label}/{m.filename}",
                      cfg, counts) for m in chats]


def _is_chat_name(name: str) -> bool:
    # Android names the file in the phone's language ("WhatsApp-Chat mit Bob.txt"); iOS "_chat.txt".
    return name == "_chat.txt" or "whatsapp" in name.lower()


def read_chat(text: str, label: str, cfg: DataConfig, counts: ExportCounts) -> Thread:
    """One exported chat's text -> its thread (``label`` names it in messages and keys it)."""
    headers = _scan(text.split("\n"), label, cfg, counts)
    thread = Thread(key=label, where=label)
    read = [(h, m) for h in headers if (m := _message(h, None, f"{label}:{h.line}", counts)) is not None]
    thread.messages = [m for _, m in read]
    contact_names([thread])
    try:
        order = _date_order(headers, label, cfg)
    except PipelineError:
        if len({m.speaker for m in thread.messages}) >= 2:
            raise
        # Nothing to learn from: fetch skips the chat or says it is empty or one person's. Asking
        # for data.date_order first would send the user to fix dates of a chat that cannot be used.
        return thread
    for header, message in read:
        message.time = datetime.combine(_calendar_date(header, order, cfg, message.where),
                                        _clock(header.clock, message.where))
    return thread


# ------------------------------------------------------------------------ lines -> headers


def _header_match(line: str) -> re.Match | None:
    """The header split of a line that looks like a message header (its date may still be unreadable)."""
    line = LINE_START_MARKS.sub("", line)  # iOS starts the line of an attachment with an LRM
    match = IOS_HEADER.fullmatch(line) or ANDROID_HEADER.fullmatch(line)
    return match if match and any(ch.isdigit() for ch in match["date"]) else None


def _scan(lines: list[str], label: str, cfg: DataConfig, counts: ExportCounts) -> list[_Header]:
    """The file's message headers with their continuation lines; stray lines before the first are rejected."""
    headers: list[_Header] = []
    stray: list[int] = []
    for number, raw in enumerate(lines, start=1):
        line = raw.removesuffix("\r")
        match = _header_match(line)
        if match and _date_readable(match["date"], headers[0].date if headers else None, cfg, f"{label}:{number}"):
            headers.append(_Header(number, match["date"], match["time"], match["rest"]))
        elif headers:
            headers[-1].more.append(line)
        elif line.strip():
            stray.append(number)
            if len(stray) == HEAD_WINDOW:
                break
    if stray and not headers:
        snippet = lines[stray[0] - 1].strip()[:40]
        raise NotThisExport(f"{label}:{stray[0]}: not a WhatsApp export (expected a message line like {EXAMPLE}, "
                            f"found '{snippet}')")
    if stray:
        counts.rejected["before_first_message"] += len(stray)
    return headers


def _date_readable(text: str, first: str | None, cfg: DataConfig, where: str) -> bool:
    """Whether a header-shaped line's date reads; before the first message (``first``: its date), an unreadable
    date is an error.

    After the first message a line whose date does not read is text (a message quoting another chat, an itinerary's
    "Day 1, 09:00 - Arrival"), not a header; but under data.date_format one shaped as the dates read so far is an
    error: a format that read the first dates but not a later one (month and day swapped, "Sept" for "%b") had
    glued the rest of the chat into one message.
    """
    if cfg.date_format:
        try:
            datetime.strptime(text, cfg.date_format)
            return True
        except ValueError:
            if first is not None and _shape(text) != _shape(first):
                return False
            raise PipelineError(f"{where}: the date '{text}' does not match data.date_format "
                                f"'{cfg.date_format}'{' (the lines before matched it)' if first else ''}; set "
                                "data.date_format to the strptime format of the date part, or null to detect a "
                                "numeric date") from None
    if NUMERIC_DATE.fullmatch(text):
        return True
    if first is not None:
        return False
    raise PipelineError(f"{where}: cannot read the date '{text}' of this message line; set data.date_format "
                        "to its strptime format (e.g. '%b %d, %Y' for 'Dec 31, 2023', '%Y年%m月%d日')")


def _shape(date: str) -> str:
    """A date's shape: runs of digits 9, of letters a ("31 Aug 2023" and "1 Sept 2023": "9 a 9"; "Day 1": "a 9")."""
    return re.sub(r"[^\W\d_]+", "a", re.sub(r"\d+", "9", date))


# ------------------------------------------------------------------------ dates and times


def _date_order(headers: list[_Header], label: str, cfg: DataConfig) -> str:
    """How to read the file's numeric dates: day_first, month_first, year_first, or "format"."""
    if cfg.date_format:
        return "format"
    if cfg.date_order != "auto":
        return cfg.date_order
    two_way = [h for h in headers if len(_fields(h.date)[0]) <= 2]  # day and month before the year
    day = next((h for h in two_way if _is_day_month(*_fields(h.date)[:2])), None)
    month = next((h for h in two_way if _is_day_month(*reversed(_fields(h.date)[:2]))), None)
    if day and month:
        raise PipelineError(
            f"{label}:{day.line}: the date '{day.date}' is day-first but '{month.date}' on {label}:{month.line} "
            "is month-first; one export has one date order: check that the file is one export, or set "
            "data.date_order: day_first or month_first")
    if day or month:
        return "day_first" if day else "month_first"
    return _order_from_sequence(two_way, label)


def _is_day_month(first: str, second: str) -> bool:
    return int(first) > 12 >= int(second)


def _order_from_sequence(headers: list[_Header], label: str) -> str:
    """When every date reads both ways: the order under which time goes backwards less often."""
    unclear = next((h for h in headers if _fields(h.date)[0] != _fields(h.date)[1]), None)
    if unclear is None:
        return "day_first"  # 01/01, 02/02 ...: both orders give the same dates
    steps = {order: _backward_steps(headers, order, label) for order in ("day_first", "month_first")}
    if steps["day_first"] != steps["month_first"]:
        return min(steps, key=steps.get)
    raise PipelineError(
        f"{label}:{unclear.line}: cannot tell whether '{unclear.date}' is day-first or month-first (every date "
        "in the file reads both ways, in order either way); set data.date_order: day_first or month_first")


def _backward_steps(headers: list[_Header], order: str, label: str) -> int:
    stamps = [datetime.combine(_calendar_date(h, order, None, f"{label}:{h.line}"),
                               _clock(h.clock, f"{label}:{h.line}")) for h in headers]
    return sum(later < earlier for earlier, later in pairwise(stamps))


def _fields(text: str) -> tuple[str, str, str]:
    match = NUMERIC_DATE.fullmatch(text)
    return match[1], match[3], match[4]


def _calendar_date(header: _Header, order: str, cfg: DataConfig | None, where: str) -> date:
    """The header's date read in ``order``; a 4-digit first field is always the year (2023-12-31)."""
    if order == "format":
        return datetime.strptime(header.date, cfg.date_format).date()
    first, second, third = _fields(header.date)
    if len(first) > 2 or order == "year_first":
        year, month, day = first, second, third
    elif order == "day_first":
        day, month, year = first, second, third
    else:
        month, day, year = first, second, third
    try:
        return date(int(year) + (2000 if len(year) <= 2 else 0), int(month), int(day))
    except ValueError:
        raise PipelineError(
            f"{where}: '{header.date}' is not a date when read {order.replace('_', '-')}; set data.date_order "
            "(day_first, month_first or year_first) or data.date_format to how this export writes dates") from None


def _clock(text: str, where: str) -> time:
    """A header's time of day: 24 h, or 12 h with AM/PM (12:05 AM is 00:05, 12:05 PM is 12:05)."""
    hour, minute, second, half = CLOCK.fullmatch(text).groups()
    hours = int(hour)
    if half:
        if not 1 <= hours <= 12:
            raise PipelineError(f"{where}: '{text}' is not a time of day (a 12-hour clock runs 1 to 12)")
        hours = hours % 12 + (12 if half[0] in "Pp" else 0)
    try:
        return time(hours, int(minute), int(second or 0))
    except ValueError:
        raise PipelineError(f"{where}: '{text}' is not a time of day; is this file an edited export?") from None


# ------------------------------------------------------------------------ headers -> messages


def _message(header: _Header, stamp: datetime, where: str, counts: ExportCounts) -> ExportMessage | None:
    """The message a header starts, or None when it is the app's notice (counted) or unreadable (counted)."""
    parts = _sender_and_text(header.rest)
    if parts is None:
        counts.removed["system"] += 1
        return None
    sender, first_line = parts
    written = [first_line, *header.more]
    lines = [line for line in written if not ATTACHMENT_LINE.fullmatch(line)]  # a caption stays
    text = _typed_text(lines)
    reason = "media_omitted" if len(lines) < len(written) and not text.strip() else _notice(text, lines)
    if reason:
        counts.removed[reason] += 1
        return None
    written = clean_name(sender)
    speaker = NON_CONTACT.sub("", written)  # "~ Carol": a member not in the phone's contacts (contact_names)
    if not speaker or not text.strip():
        counts.rejected["no_sender" if not speaker else "empty_text"] += 1
        return None
    return ExportMessage(speaker=speaker, text=text, time=stamp, where=where, non_contact=written != speaker)


def contact_names(threads: list[Thread]) -> None:
    """A member not in the phone's contacts is written "~ Carol", by the name she gave herself: she is Carol, unless
    a contact named Carol writes in the export too (this chat or another: speakers are joined by name across
    chats). Then they are two people, and the stranger is "~ Carol" (one name made them one speaker, and
    split.persona learned the stranger's words as the contact's). Run per file and again over the whole export."""
    messages = [m for thread in threads for m in thread.messages]
    contacts = {m.speaker for m in messages if not m.non_contact}
    for message in messages:
        bare = NON_CONTACT.sub("", message.speaker)
        message.speaker = f"~ {bare}" if message.non_contact and bare in contacts else bare


def _sender_and_text(rest: str) -> tuple[str, str] | None:
    """``rest`` of a header split at the sender's ": "; None for a notice with no sender."""
    cut = rest.find(": " + LRM)  # iOS notices: "<chat name>: \u200e<notice>", the name may hold ": "
    if cut < 0:
        cut = rest.find(": ")
    if cut < 0 or NOTICE_BEFORE_COLON.search(rest[:cut]):
        return None
    return rest[:cut], rest[cut + 2:]


def _typed_text(lines: list[str]) -> str:
    """The message text without the app's marks and its "<This message was edited>" tail."""
    text = "\n".join(lines).rstrip("\n")
    text = INSERTED_MARKS.sub("", LINE_START_MARKS.sub("", text))
    return EDITED.sub("", text)


def _notice(text: str, lines: list[str]) -> str | None:
    """Why a message is the app's own (placeholder, deleted, call...), or None for a typed one."""
    bare = BIDI_MARKS.sub("", text).strip()
    for reason, pattern in NOTICES:
        if pattern.fullmatch(bare):
            return reason
    if lines and lines[0].startswith(LRM):  # iOS: "\u200eBob added Carol", "\u200eReport.pdf • 3 pages"
        return "media_omitted" if bare.endswith(" omitted") else "system"
    return None
