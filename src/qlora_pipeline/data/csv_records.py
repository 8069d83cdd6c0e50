"""Strict CSV with the line each record starts on: the csv source and DiscordChatExporter's CSV read it."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator

from qlora_pipeline.errors import PipelineError


# What separates the cells: commas, or what a spreadsheet in a European locale writes (semicolons), or tabs.
SEPARATORS = {",": "commas", ";": "semicolons", "\t": "tabs"}


def separator_of(text: str) -> str:
    """The separator that splits the header (the first line not blank) into the most cells, quotes read as CSV
    reads them (a quoted header cell may hold the others); commas where none does better."""
    header = next((line for line in text.split("\n") if line.strip()), "")

    def cells(sep: str) -> int:
        try:
            return len(next(csv.reader([header], delimiter=sep)))
        except (csv.Error, StopIteration):
            return 0

    return max(SEPARATORS, key=lambda sep: (cells(sep), sep == ","))


def csv_records(text: str, label: str, delimiter: str = ",") -> Iterator[tuple[int, list[str]]]:
    """``(first line, cells)`` of each CSV record; blank lines (CRLF ones too) hold none.

    Lines end at ``\\n`` (LF or CRLF), as in JSONL, so line numbers agree with editors. A lone
    CR is no line end (RFC 4180): in a quoted cell it is text; unquoted, an error. Splitting
    there instead would cut such a row in two and count the halves as rows.

    Strict parsing: a stray or unclosed quote is an error naming the line its record starts
    on, where a lenient reader would swallow the following rows into one cell, uncounted.
    """
    # The whole file is in memory already: the csv module's 128 KiB cap on a cell guards nothing here, and
    # called a valid file with one long message invalid. clean's max_chars drops such a message, counted.
    csv.field_size_limit(max(csv.field_size_limit(), min(len(text) + 1, 2**31 - 1)))  # a C long on every OS
    reader = csv.reader(io.StringIO(text, newline="\n"), strict=True, delimiter=delimiter)
    while True:
        start = reader.line_num + 1  # a record with quoted line breaks spans several lines
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            # Python's own hint after " - " (open the file in universal-newline mode) is for programmers.
            problem = str(err).split(" - ")[0]
            raise PipelineError(
                f"{label}:{start}: not valid CSV ({problem}); end lines with LF or CRLF, quote cells that hold "
                f'{SEPARATORS[delimiter]}, quotes or line breaks, double the quotes inside them ("say ""hi""") and '
                "close every quote"
            ) from None
        if cells:
            yield start, cells
