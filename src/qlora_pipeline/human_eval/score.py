"""Score a rater's ``ratings.csv`` against the sheet's key: win rate, broken rates, intervals.

The formats are in :mod:`qlora_pipeline.human_eval.formats`. Files edited by hand are accepted:
header names and values are matched case-insensitively after trimming spaces, extra columns are
ignored, a UTF-8 byte-order mark is tolerated, and rows may be in any order.

Intervals
---------
All are **Wilson score intervals** at the level ``confidence``.

* The tuned model's win rate counts each tie as half a win (``successes = tuned_wins + ties / 2``,
  ``n = n_rated``). That is the usual convention for pairwise preference rates; ties carry less
  variance than a coin flip, so the interval is slightly conservative when there are many ties.
* A system's broken rate is the share of its replies ticked "loops or breaks" among the rated
  items (``n = n_rated``: a rater who chose A, B or tie has read both replies, so an unticked
  box means "fine"). A tick on an item left unrated is not counted, for the same reason.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.intervals import two_sided_z, wilson_interval
from qlora_pipeline.human_eval.formats import BROKEN_COLUMNS, CHOICES, KEY_COLUMNS, SIDES, SYSTEMS

RATINGS_FIX = "pass the ratings.csv downloaded from the sheet with its 'Download ratings (CSV)' button."
KEY_FIX = ("pass --key the key evaluate wrote beside the sheet the ratings came from "
           "(reports/evaluate/human_eval_key.csv for the workspace's).")
# A key edited by hand: DVC holds evaluate's own (a new sheet would not match the ratings already made).
KEY_RESTORE = ("Fix: take evaluate's key back with `dvc checkout --force reports/evaluate` (it also undoes other "
               "edits in that folder).")
# Each system's entry of a result's "broken"; logged as NaN where the ratings file has no marks.
BROKEN_FIELDS = ("count", "rate", "ci_low", "ci_high")
MARKS = {"": False, "0": False, "1": True}  # empty: a hand-edited file left the cell blank


class RatingsError(PipelineError, ValueError):
    """A ratings or key file that cannot be scored; the message names the file, line and fix."""


@dataclass(frozen=True)
class Rating:
    """One row of a ratings file."""

    line: int
    sample_id: str
    choice: str  # "A", "B", "tie", or "" when the rater left the item unrated
    broken: dict[str, bool] | None  # per side; None when the file has no broken columns


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Table:
    header: list[str]  # trimmed cells of the first non-blank row
    header_line: int
    rows: list[tuple[int, list[str]]]  # (line where the row starts, cells); blank rows dropped


def _read_table(path: Path, what: str, fix: str) -> _Table:
    """The CSV at ``path``, each row with the line it starts on (a quoted comment may span lines)."""
    rows = [(start, row) for start, row in _csv_rows(path, _read_text(path, what, fix)) if any(c.strip() for c in row)]
    if not rows:  # only separators, e.g. ",,"
        raise RatingsError(f"{path}: {what} file has no header. Fix: {fix}")
    (header_line, header), *body = rows
    return _Table([cell.strip() for cell in header], header_line, body)


def _csv_rows(path: Path, text: str) -> list[tuple[int, list[str]]]:
    """Every row of ``text`` with the line it starts on, read strictly: a quote never closed took every later row
    into one cell, and they were counted as missing, not refused. A row of one line whose only fault is text after
    a closing quote (``"A" ,``, as a hand edit leaves it) is read as the lenient reader reads it, trimmed later."""
    lines = io.StringIO(text, newline="").readlines()  # split as the csv module splits them
    source, rows, consumed = iter(lines), [], 0
    while True:
        reader, before = csv.reader(source, strict=True), 0
        try:
            while (row := next(reader, None)) is not None:
                rows.append((consumed + before + 1, row))
                before = reader.line_num
            return rows
        except csv.Error as exc:
            start, line = consumed + before + 1, consumed + reader.line_num
            if line > start or "unexpected end of data" in str(exc):
                raise RatingsError(_csv_error(path, start, line, exc)) from None
            rows.append((start, next(csv.reader([lines[start - 1]]))))
            consumed = line


def _csv_error(path: Path, start: int, line: int, exc: csv.Error) -> str:
    """The message for a row the strict reader refused: a quote never closed, or a quoted cell run over lines
    (its opening quote the likely culprit); named from the line the row starts on."""
    quoting = "a quote inside a cell is written twice (\"\")"
    if "unexpected end of data" in str(exc):
        return (f"{path}:{start}: a quoted cell starts on this line and its closing quote never comes (every later "
                f"line would be read into it). Fix: close the quote on line {start}, or remove it; {quoting}.")
    return (f"{path}:{start}: malformed CSV in the row starting on this line ({exc}, on line {line}). "
            f"Fix: close the quote opened on line {start} where its cell ends; {quoting}.")


def _read_text(path: Path, what: str, fix: str) -> str:
    if not path.exists():
        raise RatingsError(f"{path}: {what} file not found. Fix: {fix}")
    if not path.is_file():
        raise RatingsError(f"{path}: {what} path is not a file. Fix: {fix}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RatingsError(f"{path}: {what} file is not UTF-8 text ({exc}). Fix: save it as UTF-8 CSV.") from None
    if not text.strip():
        raise RatingsError(f"{path}: {what} file is empty. Fix: {fix}")
    return text


def _column_index(path: Path, table: _Table, needed: tuple[str, ...], hint: str) -> dict[str, int]:
    lowered = [h.lower() for h in table.header]
    missing = [col for col in needed if col.lower() not in lowered]
    if missing:
        found = ", ".join(repr(h) for h in table.header) or "(none)"
        raise RatingsError(
            f"{path}:{table.header_line}: missing column{'s' if len(missing) > 1 else ''} "
            f"{', '.join(repr(m) for m in missing)} in the header; columns found: {found}. Fix: {hint}"
        )
    return {col: _only_index(path, table, lowered, col) for col in needed}


def _only_index(path: Path, table: _Table, lowered: list[str], column: str) -> int:
    """Where ``column`` is in the header; a column read that is there twice is refused (the first one won)."""
    places = [number for number, name in enumerate(lowered, 1) if name == column.lower()]
    if len(places) > 1:
        listed = ", ".join(map(str, places[:-1])) + f" and {places[-1]}"
        raise RatingsError(
            f"{path}:{table.header_line}: column {column!r} appears {len(places)} times in the header "
            f"(columns {listed}). Fix: keep one {column!r} column, the one holding the values to score."
        )
    return places[0] - 1


def _cell(row: list[str], index: int) -> str:
    return row[index].strip() if index < len(row) else ""


def read_key(key_path: str | os.PathLike) -> dict[str, dict[str, str]]:
    """Read a key CSV (``id,A,B``) into ``{id: {"A": system, "B": system}}``; raises RatingsError."""
    path = Path(key_path)
    table = _read_table(path, "key", KEY_FIX)
    cols = _column_index(path, table, KEY_COLUMNS, "the key header must be 'id,A,B'.")
    key: dict[str, dict[str, str]] = {}
    first_line: dict[str, int] = {}
    for line, row in table.rows:
        sid = _cell(row, cols["id"])
        a, b = _cell(row, cols["A"]).lower(), _cell(row, cols["B"]).lower()
        if not sid:
            raise RatingsError(f"{path}:{line}: empty id. Fix: every key row needs an id.")
        if sorted((a, b)) != sorted(SYSTEMS):
            raise RatingsError(
                f"{path}:{line}: id {sid!r} has A={a!r}, B={b!r}; they must be 'base' and 'tuned' "
                f"in some order. {KEY_RESTORE}"
            )
        if sid in key:
            raise RatingsError(
                f"{path}:{line}: duplicate id {sid!r} (first on line {first_line[sid]}). {KEY_RESTORE}"
            )
        key[sid] = {"A": a, "B": b}
        first_line[sid] = line
    if not key:
        raise RatingsError(f"{path}: key file has a header but no rows. Fix: {KEY_FIX}")
    return key


def _broken_columns(path: Path, table: _Table) -> dict[str, int] | None:
    """Index of each side's "loops or breaks" column; None for a file from a sheet without them."""
    lowered = [h.lower() for h in table.header]
    present = {side: column for side, column in BROKEN_COLUMNS.items() if column in lowered}
    if not present:
        return None
    if len(present) < len(SIDES):
        (has,) = present.values()
        (lacks,) = (column for column in BROKEN_COLUMNS.values() if column != has)
        raise RatingsError(
            f"{path}:{table.header_line}: column {has!r} without {lacks!r}. Fix: keep both columns as "
            "downloaded from the sheet, or remove both (then no broken rate is scored)."
        )
    return {side: _only_index(path, table, lowered, column) for side, column in present.items()}


def _choice(path: Path, line: int, sid: str, raw: str) -> str:
    canonical = {c.lower(): c for c in CHOICES}
    if raw and raw.lower() not in canonical:
        raise RatingsError(
            f"{path}:{line}: choice {raw!r} for id {sid!r} is not one of A, B, tie "
            "(or empty for unrated). Fix: correct that line."
        )
    return canonical.get(raw.lower(), "")


def _mark(path: Path, line: int, sid: str, column: str, raw: str) -> bool:
    if raw not in MARKS:
        raise RatingsError(
            f"{path}:{line}: {column} {raw!r} for id {sid!r} is not 0 or 1. Fix: write 1 where that "
            "reply loops or breaks and 0 (or nothing) where it does not."
        )
    return MARKS[raw]


def read_ratings(ratings_path: str | os.PathLike) -> list[Rating]:
    """Every row of a ratings CSV, checked; raises RatingsError naming the file, line and fix."""
    path = Path(ratings_path)
    table = _read_table(path, "ratings", RATINGS_FIX)
    cols = _column_index(path, table, ("id", "choice"),
                         "the ratings header must be 'id,choice,...' as downloaded from the sheet.")
    marks = _broken_columns(path, table)
    if not table.rows:
        raise RatingsError(f"{path}: ratings file has a header but no rows. Fix: {RATINGS_FIX}")
    ratings: list[Rating] = []
    seen: dict[str, int] = {}
    for line, row in table.rows:
        sid = _cell(row, cols["id"])
        if not sid:
            raise RatingsError(f"{path}:{line}: empty id. Fix: every row needs the item id from the sheet.")
        if sid in seen:
            raise RatingsError(
                f"{path}:{line}: duplicate id {sid!r} (first on line {seen[sid]}). "
                "Fix: keep one row per item (merge ratings from different raters into separate files)."
            )
        seen[sid] = line
        choice = _choice(path, line, sid, _cell(row, cols["choice"]))
        broken = None if marks is None else {
            side: _mark(path, line, sid, BROKEN_COLUMNS[side], _cell(row, index)) for side, index in marks.items()}
        ratings.append(Rating(line, sid, choice, broken))
    return ratings


def _check_ids_in_key(path: Path, key_path: str | os.PathLike, ratings: list[Rating], key: dict) -> None:
    unknown = [r for r in ratings if r.sample_id not in key]
    if unknown:
        shown = ", ".join(f"{r.sample_id!r} (line {r.line})" for r in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise RatingsError(
            f"{path}: {len(unknown)} id(s) not in the key {key_path}: {shown}{more}. "
            "Fix: score the ratings against the key written with the same sheet."
        )


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def _wins(rated: list[Rating], key: dict) -> dict[str, int]:
    wins = {"tuned_wins": 0, "base_wins": 0, "ties": 0}
    for rating in rated:
        name = "ties" if rating.choice == "tie" else f"{key[rating.sample_id][rating.choice]}_wins"
        wins[name] += 1
    return wins


def _broken_rates(rated: list[Rating], key: dict, confidence: float) -> dict[str, dict] | None:
    """Per system: replies marked "loops or breaks" among the rated items, rate and interval."""
    if not rated or rated[0].broken is None:  # a file from a sheet without the mark
        return None
    counts = dict.fromkeys(SYSTEMS, 0)
    for rating in rated:
        for side, broken in rating.broken.items():
            counts[key[rating.sample_id][side]] += broken
    rates = {}
    for system, count in counts.items():
        low, high = wilson_interval(count, len(rated), confidence)
        rates[system] = dict(zip(BROKEN_FIELDS, (count, count / len(rated), low, high)))
    return rates


def score_ratings(
    ratings_path: str | os.PathLike,
    key_path: str | os.PathLike,
    confidence: float = 0.95,
) -> dict:
    """Un-blind a ratings CSV with the key CSV and score it.

    Returns:
        ``{"n_rated", "n_skipped", "n_missing", "tuned_wins", "base_wins", "ties",
        "tuned_win_rate", "ci_low", "ci_high", "broken", "confidence", "method"}``.
        ``tuned_win_rate = (tuned_wins + ties / 2) / n_rated`` with its Wilson interval
        ``[ci_low, ci_high]``. ``broken`` is ``{"base": {"count", "rate", "ci_low", "ci_high"},
        "tuned": {...}}`` (see the module docstring), or None for a file without the
        ``a_broken``/``b_broken`` columns: unknown, not zero. ``n_skipped`` counts rows with an
        empty choice; ``n_missing`` counts key ids with no row in the ratings file at all.

    Raises :class:`RatingsError` (a ``ValueError``) naming the file, line and fix for a missing
    or empty file, malformed CSV (a quote never closed is named from the line it opens on), a
    missing ``id``/``choice`` column or one read twice, one broken column without the other, ids
    not in the key, a choice other than A/B/tie, a broken mark other than 0/1, a duplicate id,
    or a file with no rated rows; ValueError for a ``confidence`` with no finite interval.
    """
    if not (isinstance(confidence, (int, float)) and 0.0 < float(confidence) < 1.0):
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence!r}")
    confidence = float(confidence)
    two_sided_z(confidence)  # before any file is read: a level too near 1 fails here, not mid-scoring
    key = read_key(key_path)
    path = Path(ratings_path)
    ratings = read_ratings(path)
    _check_ids_in_key(path, key_path, ratings, key)
    rated = [r for r in ratings if r.choice]
    if not rated:
        raise RatingsError(
            f"{path}: no rated rows (all {len(ratings)} rows have an empty choice). "
            "Fix: rate at least one item in the sheet, then download the ratings again."
        )
    wins = _wins(rated, key)
    successes = wins["tuned_wins"] + 0.5 * wins["ties"]
    low, high = wilson_interval(successes, len(rated), confidence)
    listed = {r.sample_id for r in ratings}
    return {
        "n_rated": len(rated),
        "n_skipped": len(ratings) - len(rated),
        "n_missing": sum(1 for sid in key if sid not in listed),
        **wins,
        "tuned_win_rate": successes / len(rated),
        "ci_low": low,
        "ci_high": high,
        "broken": _broken_rates(rated, key, confidence),
        "confidence": confidence,
        "method": "wilson (ties count as half a win)",
    }
