"""fetch: read any supported source into canonical conversations plus a manifest.

Canonical conversation (one JSON object per line)::

    {"id": "...", "messages": [{"speaker": "...", "text": "...", "time": "... or null"}], "meta": {...}}

A chat log (one message per row) is grouped by conversation id, keeping row order. A
prompt/response data set becomes two-message conversations between ``user`` and
``assistant``, with ``meta.persona = "assistant"`` so the split stage knows whose voice to learn. A data set of
message lists (OpenAI's chat fine-tuning format: a row's ``messages``, each ``{"role", "content"}``) is a
conversation per row between its roles, the persona ``assistant`` too.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import math
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from qlora_pipeline.config import EXPORT_SOURCES, DataConfig
from qlora_pipeline.data.csv_records import SEPARATORS, csv_records, separator_of
from qlora_pipeline.data.exports import fetch_export
from qlora_pipeline.data.exports.common import read_text
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.io import read_jsonl

PAIRS_PERSONA = "assistant"


@dataclass
class Row:
    """One source record and where it came from (for error messages)."""

    where: str
    values: dict[str, Any]


@dataclass
class RawSource:
    """Rows of a source, plus what the manifest needs to identify exactly what was read."""

    rows: Iterable[Row]
    description: dict[str, Any]
    digest: "hashlib._Hash" = field(default_factory=hashlib.sha256)


@dataclass
class FetchResult:
    conversations: list[dict]
    manifest: dict[str, Any]


# ------------------------------------------------------------------------ entry point


def fetch(cfg: DataConfig, root: Path = Path(".")) -> FetchResult:
    """Read the source chosen by ``cfg`` into canonical conversations and a manifest."""
    if cfg.source == "chitchat":
        return _fetch_chitchat()
    if cfg.source in EXPORT_SOURCES:
        conversations, manifest, rejected = fetch_export(cfg, root)
        manifest["counts"] = _counts(conversations, rejected)
        return FetchResult(conversations, manifest)
    source = _open_source(cfg, root)
    rejected: Counter = Counter()
    left_out: Counter = Counter()  # messages of kept rows left out (a row's system message), apart from rows rejected
    readers = {"chat_log": chat_log_conversations, "pairs": pair_conversations,
               "messages": lambda rows, cfg, rejected: message_list_conversations(rows, cfg, rejected, left_out)}
    conversations = list(readers[cfg.shape](source.rows, cfg, rejected))
    if not conversations:
        raise PipelineError(
            f"{source.description['location']}: no usable rows "
            f"(rejected: {dict(rejected) or 'none'}); check data.fields and data.shape"
        )
    manifest = {**source.description, "sha256": source.digest.hexdigest(), "shape": cfg.shape}
    manifest["counts"] = _counts(conversations, rejected)
    if cfg.shape == "messages":
        manifest["counts"]["messages_left_out"] = dict(sorted(left_out.items()))
    return FetchResult(conversations, manifest)


def _open_source(cfg: DataConfig, root: Path) -> RawSource:
    if cfg.source == "hf":
        return _hf_rows(cfg)
    path = Path(cfg.path)
    path = path if path.is_absolute() else root / path
    if path.is_dir():
        raise PipelineError(f"data.path: {cfg.path} is a folder; point data.path at the {cfg.source} file in it, "
                            f"e.g. {cfg.path.rstrip('/')}/chat.{cfg.source}")
    if not path.is_file():
        # A queued experiment runs in a copy of the repository that holds only what git and DVC track:
        # a file the workspace has can be missing there. The folder named shows which copy this is.
        raise PipelineError(
            f"data.path: {cfg.path} is not a file in {root.resolve()}; point data.path at your {cfg.source} file. "
            f"A queued experiment sees only tracked files: `git add {cfg.path}` (small files) or "
            f"`dvc add {cfg.path}` and `git add` the .dvc file it writes (large ones), then queue it again")
    if path.stat().st_size == 0:
        raise PipelineError(f"{cfg.path}: file is empty; point data.path at a file with data")
    readers = {"jsonl": _jsonl_rows, "csv": _csv_rows, "parquet": _parquet_rows}
    digest = hashlib.sha256(path.read_bytes())
    description = {"source": cfg.source, "location": cfg.path, "version": None}
    return RawSource(readers[cfg.source](path, cfg.path), description, digest)


def _counts(conversations: list[dict], rejected: Counter) -> dict[str, Any]:
    speakers = {m["speaker"] for c in conversations for m in c["messages"]}
    return {
        "conversations": len(conversations),
        "messages": sum(len(c["messages"]) for c in conversations),
        "speakers": len(speakers),
        "rows_rejected": dict(sorted(rejected.items())),
    }


# --------------------------------------------------------------------------- chitchat


def chitchat_path() -> Path:
    """The data file inside the installed ``chitchat-dataset`` wheel (found without importing it)."""
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError(
            "data.source: chitchat needs the chitchat-dataset wheel; "
            "run `make setup` (pip install --no-deps chitchat-dataset==0.9.0)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "dataset.json"


def _fetch_chitchat() -> FetchResult:
    path = chitchat_path()
    raw = path.read_bytes()
    data = json.loads(raw)
    conversations = [chitchat_conversation(cid, conv) for cid, conv in data.items()]
    manifest = {
        "source": "chitchat",
        "location": "chitchat-dataset wheel: chitchat_dataset/dataset.json",
        "version": importlib.metadata.version("chitchat-dataset"),
        "sha256": hashlib.sha256(raw).hexdigest(),
        "shape": "chat_log",
        "counts": _counts(conversations, Counter()),
    }
    return FetchResult(conversations, manifest)


def chitchat_conversation(conversation_id: str, conv: dict) -> dict:
    """One chitchat conversation: its turns are lists of utterances; each utterance is a message."""
    messages = [
        {"speaker": utt["sender"], "text": utt["text"], "time": utt.get("timestamp")}
        for turn in conv["messages"]
        for utt in turn
    ]
    meta = {key: conv[key] for key in ("prompt", "start", "ratings") if key in conv}
    return {"id": conversation_id, "messages": messages, "meta": meta}


# ------------------------------------------------------------------------ row readers


def _jsonl_rows(path: Path, label: str) -> Iterator[Row]:
    for number, values in read_jsonl(path, label):
        yield Row(f"{label}:{number}", values)


def _csv_rows(path: Path, label: str) -> Iterator[Row]:
    text = read_text(path.read_bytes(), label, fix="re-encode the file as UTF-8")
    delimiter = separator_of(text)  # a spreadsheet saved in a European locale separates by ";"
    records = csv_records(text, label, delimiter)
    header_line, header = next(records, (0, []))
    if not header:
        raise PipelineError(f"{label}: no header row; the first line must name the columns")
    twice = sorted({name for name in header if name and header.count(name) > 1})
    if twice:  # the last column of a name silently won (columns without a name, a spreadsheet's, are read by none)
        raise PipelineError(f"{label}:{header_line}: the header names {', '.join(map(repr, twice))} more than once; "
                            "give each column its own name")
    for line, cells in records:
        if len(cells) > len(header):
            raise PipelineError(f"{label}:{line}: more cells than header columns; quote fields that contain "
                                f"{SEPARATORS[delimiter]}")
        # A short row lacks its last cells: None, so the missing value is counted as a null.
        values = dict(zip(header, cells + [None] * (len(header) - len(cells))))
        yield Row(f"{label}:{line}", values)


def _parquet_rows(path: Path, label: str) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a non-parquet file
        raise PipelineError(f"{label}: not a readable Parquet file ({err}); check data.source and data.path") from None
    for number, values in enumerate(table.to_pylist(), start=1):
        yield Row(f"{label}: row {number}", values)


def _hf_rows(cfg: DataConfig) -> RawSource:
    """``datasets.load_dataset`` on a hub id (pinned by ``revision``) or a local dataset folder."""
    import datasets

    hub = cfg.hf
    if not Path(hub.path).exists() and not hub.revision:
        # A typo in a local folder's path reads as a hub id: say so, or the user pins a revision of nothing.
        raise PipelineError(f"data.hf.revision: hub data set {hub.path} needs a pinned revision (a commit sha or tag) "
                            "so the same params always read the same data; if data.hf.path names a folder here, "
                            f"there is none: {hub.path} does not exist")
    try:
        dataset = datasets.load_dataset(hub.path, hub.name, revision=hub.revision, split=hub.split)
    except Exception as err:  # datasets raises many types: missing split, no network, bad folder
        raise PipelineError(
            f"data.hf: load_dataset({hub.path!r}, name={hub.name!r}, revision={hub.revision!r}, "
            f"split={hub.split!r}) failed: {err}"
        ) from None
    description = {
        "source": "hf",
        "location": hub.path,
        "name": hub.name,
        "split": hub.split,
        "version": hub.revision,
        "fingerprint": dataset._fingerprint,
    }
    source = RawSource([], description)

    def rows() -> Iterator[Row]:
        for number, values in enumerate(dataset, start=1):
            # No single file to hash: hash the records in read order instead.
            source.digest.update(json.dumps(values, sort_keys=True, default=str).encode())
            yield Row(f"{hub.path} [{hub.split}] row {number}", values)

    source.rows = rows()
    return source


# ---------------------------------------------------------------- rows -> conversations


def _field(row: Row, key: str, column: str | None) -> Any:
    if column not in row.values:
        found = ", ".join(map(str, row.values)) or "none"
        lists = [name for name, value in row.values.items() if isinstance(value, list) and value
                 and all(isinstance(m, dict) and "role" in m for m in value)]
        raise PipelineError(
            f"{row.where}: missing field '{column}' (mapped by data.fields.{key}); "
            f"fields found: {found}. Fix data.fields.{key} or the file"
            + (f"; a column of {{role, content}} lists ('{lists[0]}') is read with data.shape: messages (and "
               f"data.fields.messages)" if lists else "")
        )
    return row.values[column]


def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and value != value):  # null or NaN
        return None
    return value if isinstance(value, str) else str(value)


def chat_log_conversations(rows: Iterable[Row], cfg: DataConfig, rejected: Counter) -> Iterator[dict]:
    """Group one-message-per-row records into conversations, in order of first appearance."""
    fmap = cfg.fields
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        values = {"conversation_id": _field(row, "conversation_id", fmap.conversation_id),
                  "speaker": _field(row, "speaker", fmap.speaker), "text": _field(row, "text", fmap.text)}
        time = _text(_field(row, "time", fmap.time)) if fmap.time else None
        reason = _reject_reason(**values)
        if reason:
            rejected[reason] += 1
            continue
        conv_id, speaker, text = (_text(value) for value in values.values())
        grouped.setdefault(conv_id, []).append({"speaker": speaker, "text": text, "time": time})
    for conv_id, messages in grouped.items():
        yield {"id": conv_id, "messages": messages, "meta": {}}


def _reject_reason(**values: Any) -> str | None:
    """Why a row's mapped values make no message, else None: a null (NaN, or a blank id or speaker), or a JSON array,
    object or boolean where text belongs (it became Python's text of it, "['a', 'b']" or "True", in the messages).
    A number is text enough (ids and speakers often are)."""
    for name, value in values.items():
        if _not_text(value):
            return f"not_text_{name}"
        text = _text(value)
        if text is None or (name in ("conversation_id", "speaker", "id") and not text.strip()):
            return f"null_{name}"
    return None


def _not_text(value: Any) -> bool:
    # JSON's Infinity too: Python reads it as a float, and its text "inf" became a message.
    return isinstance(value, (list, dict, bool, bytes)) or (isinstance(value, float) and math.isinf(value))


def pair_conversations(rows: Iterable[Row], cfg: DataConfig, rejected: Counter) -> Iterator[dict]:
    """Prompt/response records -> two-message ``user``/``assistant`` conversations."""
    fmap = cfg.fields
    placeholders = template_fields(cfg.prompt_template)
    seen_ids: set[str] = set()
    for number, row in enumerate(rows, start=1):
        values = {"id": _field(row, "id", fmap.id) if fmap.id else f"row-{number}",
                  "prompt": _field(row, "prompt", fmap.prompt), "response": _field(row, "response", fmap.response)}
        # The template's other fields may be null (left empty), not an array or object.
        reason = _reject_reason(**values) or next((f"not_text_{name}" for name in placeholders
                                                   if name != "prompt" and _not_text(row.values.get(name))), None)
        if reason:
            rejected[reason] += 1
            continue
        row_id, prompt, response = (_text(value) for value in values.values())
        if row_id in seen_ids:
            raise PipelineError(f"{row.where}: id '{row_id}' (data.fields.id) already used by an earlier row; "
                                "ids must be unique, or set data.fields.id: null to number the rows")
        seen_ids.add(row_id)
        messages = [
            {"speaker": "user", "text": render_prompt(cfg.prompt_template, placeholders, row, prompt), "time": None},
            {"speaker": PAIRS_PERSONA, "text": response, "time": None},
        ]
        yield {"id": row_id, "messages": messages, "meta": {"persona": PAIRS_PERSONA}}


# The roles of OpenAI's chat format: a system message is the data set's instruction, not a turn of the chat (split
# writes split.system_prompt); a tool's or function's is no one's words.
SPOKEN_ROLES, LEFT_ROLES = ("user", "assistant"), ("system", "developer", "tool", "function")


def message_list_conversations(rows: Iterable[Row], cfg: DataConfig, rejected: Counter,
                               left_out: Counter) -> Iterator[dict]:
    """Rows that each hold a conversation as a list of ``{"role", "content"}`` -> conversations between the roles
    ``user`` and ``assistant`` (the persona). A row with a message that is not such an object, of another role, or
    with content that is not text is rejected whole (``rejected``); system and tool messages are left out
    (``left_out``, by role), and a row with nothing else is rejected."""
    fmap = cfg.fields
    seen_ids: set[str] = set()
    for number, row in enumerate(rows, start=1):
        row_id, listed = _field(row, "id", fmap.id) if fmap.id else f"row-{number}", _field(row, "messages",
                                                                                           fmap.messages)
        reason = _reject_reason(id=row_id) or _message_list_problem(listed)
        if reason:
            rejected[reason] += 1
            continue
        row_id = _text(row_id)
        if row_id in seen_ids:
            raise PipelineError(f"{row.where}: id '{row_id}' (data.fields.id) already used by an earlier row; "
                                "ids must be unique, or set data.fields.id: null to number the rows")
        seen_ids.add(row_id)
        messages = [{"speaker": m["role"], "text": _content_text(m["content"]), "time": None}
                    for m in listed if m["role"] in SPOKEN_ROLES]
        if not messages:
            rejected["no_user_or_assistant_message"] += 1
            continue
        left_out.update(m["role"] for m in listed if m["role"] in LEFT_ROLES)
        yield {"id": row_id, "messages": messages, "meta": {"persona": PAIRS_PERSONA}}


def _message_list_problem(listed: Any) -> str | None:
    """Why a row's message list makes no conversation, else None."""
    if not isinstance(listed, list) or not listed:
        return "not_a_message_list" if listed else "null_messages"
    for message in listed:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
            return "message_without_role_or_content"
        if message["role"] not in SPOKEN_ROLES + LEFT_ROLES:
            return "unknown_role"
        if message["role"] in SPOKEN_ROLES and _content_text(message["content"]) is None:
            return "not_text_content"
    return None


def _content_text(content: Any) -> str | None:
    """A message's text: a string, or OpenAI's list of text parts joined by line breaks (as serve joins them)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(
            isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            for part in content):
        return "\n".join(part["text"] for part in content)
    return None


def template_fields(template: str) -> list[str]:
    """Placeholder names in a ``str.format`` template, e.g. ``"Summarize:\\n{dialogue}"`` -> ``["dialogue"]``."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def render_prompt(template: str, placeholders: list[str], row: Row, prompt: str) -> str:
    """Fill the template: ``{prompt}`` is the mapped prompt field, any other name a field of the row."""
    fill = {}
    for name in placeholders:
        if name == "prompt":
            fill[name] = prompt
        elif name in row.values:
            fill[name] = _text(row.values[name]) or ""
        else:
            raise PipelineError(
                f"{row.where}: data.prompt_template uses {{{name}}} but the row has no field '{name}'; "
                f"fields found: {', '.join(map(str, row.values))}"
            )
    return template.format_map(fill)
