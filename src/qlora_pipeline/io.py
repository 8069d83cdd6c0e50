"""File I/O that never leaves half a file behind, and JSONL reading that names the bad line."""

from __future__ import annotations

import codecs
import csv
import contextlib
import glob
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from qlora_pipeline.errors import PipelineError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; move it into place only if the block succeeds.

    Works for files and folders alike. A killed or failing stage leaves nothing at ``path``
    for DVC to hash, and nothing half-written beside it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if not target.exists():
            raise RuntimeError(f"nothing was written for {path}")
        _remove(path)
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temporaries(path: Path) -> None:
    """Delete what a killed (SIGKILL) write of ``path`` left beside it: ``finally`` never ran there.

    One process writes a given output at a time (DVC locks the stage; under several training
    processes only the first writes), so any such sibling is from a run that died.
    """
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def remove_outputs(*paths: str | Path) -> None:
    """Delete a stage's previous outputs before it starts, so a failure cannot leave stale ones."""
    for path in paths:
        _remove(Path(path))
        remove_stale_temporaries(Path(path))


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    """Write rows atomically; return how many were written."""
    count = 0
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def write_csv(path: str | Path, fieldnames: Sequence[str], rows: Iterable[dict]) -> None:
    """Write rows atomically as CSV with a header (``csv``'s defaults: what spreadsheets and ``dvc plots`` read)."""
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fieldnames))
        writer.writeheader()
        writer.writerows(rows)


# The first bytes of the archives a download comes in: read as text, they gave a UTF-8 or JSON error on line 1.
# (bzip2's "BZh" is text: its block size and block magic follow, which no text holds)
ARCHIVES = {b"PK\x03\x04": "a zip archive", b"\x1f\x8b": "a gzip file", b"7z\xbc\xaf\x27\x1c": "a 7-Zip archive",
            b"Rar!\x1a\x07": "a RAR archive", b"\xfd7zXZ\x00": "an xz file",
            **{b"BZh%d1AY&SY" % level: "a bzip2 file" for level in range(1, 10)}}


def refuse_archive(head: bytes, shown: str | Path) -> None:
    """An archive where a text file was expected is named as one, with the fix."""
    for magic, what in ARCHIVES.items():
        if head.startswith(magic):
            raise PipelineError(f"{shown}: {what}, not a text file; extract it and point data.path at the file "
                                "inside")


def read_jsonl(path: str | Path, label: str | None = None) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)``; a bad line raises an error naming the file and line.

    Lines end at ``\\n``, as the JSON Lines format says; the ``\\r`` of a CRLF ending is JSON
    whitespace, so files saved on Windows read the same. A UTF-8 byte-order mark at the start
    of the file is skipped, and blank lines hold no row.

    ``label`` is how messages name the file (e.g. the path as the user wrote it in params).
    """
    path = Path(path)
    shown = Path(label) if label else path
    if not path.exists():
        raise PipelineError(f"{shown}: file not found")
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1:
                refuse_archive(raw, shown)
                # Windows editors begin UTF-8 files with a BOM; it is an encoding mark, not text.
                raw = raw.removeprefix(codecs.BOM_UTF8)
            if raw.strip():  # blank lines hold no row; tolerate them (e.g. a trailing newline)
                yield number, _parse_json_line(shown, number, raw)


# A \u escape of a UTF-16 surrogate: only a full pair decodes to a character (checked exactly below).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _parse_json_line(path: Path, number: int, raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PipelineError(
            f"{path}:{number}: byte {err.start} is not valid UTF-8; re-encode the file as UTF-8"
        ) from None
    obj = _loads_line(path, number, text)
    if not isinstance(obj, dict):
        raise PipelineError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}; JSON Lines holds one "
                            "object (one row) on each line" + (", not one array of them" if isinstance(obj, list)
                                                                else ""))
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(obj):
        # Python reads "\ud800" as a string no UTF-8 file can hold: writing it out later would crash.
        raise PipelineError(
            f"{path}:{number}: a \\u escape encodes half of a UTF-16 surrogate pair, which is not a character; "
            "fix or remove that escape (often an emoji cut in half)"
        )
    return obj


def _loads_line(path: Path, number: int, text: str) -> Any:
    """``json.loads``, with every way it can refuse a line turned into an error naming the line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise PipelineError(
            f"{path}:{number}: malformed JSON ({err.msg} at column {err.colno}); "
            "each line must be one complete JSON object"
        ) from None
    except ValueError:  # Python refuses to convert integers this long (a guard against slow parsing)
        raise PipelineError(
            f"{path}:{number}: a number has more than {sys.get_int_max_str_digits()} digits; write it as a string"
        ) from None
    except RecursionError:
        raise PipelineError(f"{path}:{number}: JSON nested too deeply to read; flatten the object") from None


def _has_lone_surrogate(obj: Any) -> bool:
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PipelineError(f"{path}: not valid JSON ({err})") from None


def read_json_object(path: str | Path) -> dict:
    """The JSON object in ``path``, or {} where there is none (absent, unreadable, cut short, not an object): for
    state that may be missing and for hints, never an error of its own."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    import hashlib

    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
