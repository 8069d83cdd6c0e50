"""Chat-app exports (``data.source``: whatsapp, telegram, discord, messenger) -> canonical conversations.

``data.path`` names one export file, or a folder whose matching files are all read (sorted by
path): ``data/source/`` by default, so dropping an export there is enough. Each reader module
(``whatsapp.py``, ...) turns a file into threads (see ``common``); here every thread is cut into
conversations at pauses longer than ``data.session_gap_minutes`` and given an id that names no one.

Threads are skipped, and counted, when nothing is left of them after the app's notices are
removed, or when one person alone speaks in them (a channel, notes to self): there is no reply to
learn. An export in which every thread is such a thread stops fetch with a message naming the
file and line.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

from qlora_pipeline.config import DataConfig
from qlora_pipeline.data.exports import discord, messenger, telegram, whatsapp
from qlora_pipeline.data.exports.common import ExportCounts, NotThisExport, Thread
from qlora_pipeline.errors import PipelineError

# data.source -> the app's name as users know it
APPS = {"whatsapp": "WhatsApp", "telegram": "Telegram", "discord": "Discord", "messenger": "Messenger/Instagram"}
READERS = {"whatsapp": whatsapp, "telegram": telegram, "discord": discord, "messenger": messenger}


def reader(source: str):
    """The reader module of one app (``read``, ``matches``, ``looks_like``)."""
    return READERS[source]


def export_files(cfg: DataConfig, root: Path) -> list[tuple[Path, str]]:
    """``(path, label)`` of each file to read: ``data.path`` itself, or its folder's matching files."""
    path = Path(cfg.path)
    path = path if path.is_absolute() else root / path
    app = APPS[cfg.source]
    if path.is_file():
        return [(path, cfg.path)]
    if not path.is_dir():
        raise PipelineError(
            f"data.path: {cfg.path} is not a file or folder in {root.resolve()}; point data.path at your {app} "
            f"export (a file, or the folder holding it). A queued experiment sees only tracked files: "
            f"`git add {cfg.path}` or `dvc add {cfg.path}`, then queue it again")
    module = reader(cfg.source)
    found = sorted(p for p in path.rglob("*") if p.is_file() and module.matches(p))
    if not found:
        raise PipelineError(f"data.path: the folder {cfg.path} holds no {app} export ({module.EXPECTED}); "
                            f"put the export there, or point data.path at the file")
    return [(p, f"{cfg.path.rstrip('/')}/{p.relative_to(path).as_posix()}") for p in found]


def read_threads(cfg: DataConfig, files: list[tuple[Path, str]], counts: ExportCounts) -> list[Thread]:
    module = reader(cfg.source)
    threads: list[Thread] = []
    for path, label in files:
        if path.stat().st_size == 0:
            raise PipelineError(f"{label}: file is empty; export the chat again (data.path)")
        try:
            threads += module.read(path, label, cfg, counts)
        except NotThisExport as err:
            raise PipelineError(f"{err}{_guess(path, cfg.source)}") from None
    if module is whatsapp:  # who is a contact is known only from the whole export (speakers join across chats)
        whatsapp.contact_names(threads)
    return merge_threads(drop_repeats_across_files(threads, counts))


def drop_repeats_across_files(threads: list[Thread], counts: ExportCounts) -> list[Thread]:
    """Messages another file already gave (same speaker, time and text) removed, counted as ``in_earlier_file``.

    People export a chat again months later and keep both files: without this, the overlap would be
    learned twice and could sit in train and test at once. Only timed messages are compared, and
    only across files: one person may well write "ok" twice in a minute of one chat.
    """
    first_file: dict[tuple, str] = {}
    for thread in threads:
        kept = []
        for message in thread.messages:
            key = (message.speaker, message.time, message.text)
            if message.time is not None and first_file.setdefault(key, thread.where) != thread.where:
                counts.removed["in_earlier_file"] += 1
                continue
            kept.append(message)
        thread.messages = kept
    return threads


def merge_threads(threads: list[Thread]) -> list[Thread]:
    """One thread per key: Messenger splits a long thread over message_1.json, message_2.json, ...

    The parts are joined in time order (a stable sort, so messages of one moment keep the order
    their file gives them); a part without times keeps file order.
    """
    merged: dict[str, Thread] = {}
    for thread in threads:
        if thread.key not in merged:
            merged[thread.key] = Thread(thread.key, thread.where, list(thread.messages))
            continue
        into = merged[thread.key]
        into.messages += thread.messages
        if all(m.time is not None for m in into.messages):
            kinds = {m.time.tzinfo is None for m in into.messages}
            if len(kinds) == 1:
                into.messages.sort(key=lambda m: m.time)
    return list(merged.values())


def _guess(path: Path, source: str) -> str:
    """"; it looks like a Telegram export: set data.source: telegram" where another reader claims the file."""
    head = path.read_bytes()[:1 << 16]
    for other in APPS:
        if other != source and reader(other).looks_like(head, path.name):
            return f"; it looks like a {APPS[other]} export: set data.source: {other}"
    return f"; check data.source ({source}) and data.path"


def sessions(messages: list, gap_minutes: float | None) -> list[list]:
    """Messages cut where the pause since the previous one exceeds ``gap_minutes``."""
    out: list[list] = []
    previous: datetime | None = None
    for message in messages:
        if not out or _gap_exceeds(previous, message.time, gap_minutes):
            out.append([])
        out[-1].append(message)
        previous = message.time or previous
    return out


def _gap_exceeds(before: datetime | None, after: datetime | None, gap_minutes: float | None) -> bool:
    if gap_minutes is None or before is None or after is None:
        return False
    if (before.tzinfo is None) != (after.tzinfo is None):
        return False
    return (after - before).total_seconds() > gap_minutes * 60


def thread_id(source: str, thread: Thread) -> str:
    """A stable id that does not carry the chat's name (file names say "WhatsApp Chat with Bob")."""
    return f"{source}-{hashlib.sha256(thread.key.encode()).hexdigest()[:10]}"


def conversations_of(threads: list[Thread], cfg: DataConfig, skipped: Counter) -> list[dict]:
    conversations = []
    for thread in threads:
        reason = _skip_reason(thread)
        if reason:
            skipped[reason] += 1
            continue
        base = thread_id(cfg.source, thread)
        for number, part in enumerate(sessions(thread.messages, cfg.session_gap_minutes), start=1):
            messages = [{"speaker": m.speaker, "text": m.text, "time": m.time.isoformat() if m.time else None}
                        for m in part]
            conversations.append({"id": f"{base}-{number:04d}", "messages": messages,
                                  "meta": {"thread": base, "session": number}})
    return conversations


def _skip_reason(thread: Thread) -> str | None:
    if not thread.messages:
        return "empty"
    if len({m.speaker for m in thread.messages}) < 2:
        return "one_speaker"
    return None


def _no_conversations(threads: list[Thread], files: list[tuple[Path, str]], cfg: DataConfig,
                      counts: ExportCounts) -> PipelineError:
    """Why nothing is left, naming the file and line of the first thread and the param to look at."""
    app = APPS[cfg.source]
    if not threads or all(not t.messages for t in threads):
        where = threads[0].where if threads else files[0][1]
        return PipelineError(f"{where}: the {app} export holds no messages{_left_out(counts)}; export a chat that "
                             "has messages and point data.path at it")
    thread = next(t for t in threads if t.messages)
    first = thread.messages[0]
    return PipelineError(
        f"{first.where}: every message of the {app} export is from one speaker ({first.speaker}); a persona needs "
        "someone to reply to: export a chat with two or more people and point data.path at it")


def _left_out(counts: ExportCounts) -> str:
    """" (2 app notice(s) removed: {...}; 3 message(s) not read: {...})", or "" where nothing was left out."""
    parts = [f"{sum(counter.values())} {what}: {dict(counter)}"
             for what, counter in (("app notice(s) removed", counts.removed), ("message(s) not read", counts.rejected))
             if counter]
    return f" ({'; '.join(parts)})" if parts else ""


def fetch_export(cfg: DataConfig, root: Path) -> tuple[list[dict], dict[str, Any], Counter]:
    """Conversations, the manifest's description of a chat-app export, and the rows it could not read."""
    files = export_files(cfg, root)
    counts = ExportCounts()
    threads = read_threads(cfg, files, counts)
    skipped: Counter = Counter()
    conversations = conversations_of(threads, cfg, skipped)
    if not conversations:
        raise _no_conversations(threads, files, cfg, counts)
    digest = hashlib.sha256()
    for path, label in files:
        digest.update(label.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    description = {
        "source": cfg.source,
        "location": cfg.path,
        "version": None,
        "sha256": digest.hexdigest(),
        "shape": "chat_log",
        "export": {
            "files": len(files),
            "threads": len(threads),
            "threads_skipped": dict(sorted(skipped.items())),
            "session_gap_minutes": cfg.session_gap_minutes,
            "rows_removed": dict(sorted(counts.removed.items())),
        },
    }
    return conversations, description, counts.rejected
