"""The two CSV files the sheet and the scorer share: the answer key and the rater's ratings.

Key CSV (written with the sheet; keep it from the raters)::

    id,A,B
    ex-001,tuned,base
    ex-002,base,tuned

Ratings CSV (downloaded from the sheet)::

    id,choice,a_broken,b_broken,comment
    ex-001,A,0,1,
    ex-002,tie,0,0,"both fine, ""B"" a bit stiff"
    ex-003,,0,0,

One row per item, in sheet order. ``choice`` is ``A``, ``B`` or ``tie``; an item the rater did
not rate is kept with an empty choice, so the file always lists the whole sheet.
``a_broken`` / ``b_broken`` are ``1`` where the rater ticked "loops or breaks" under that reply
(it repeats itself, stops mid-sentence, is garbled, or talks as the wrong person), else ``0``.
Sheets written before that mark existed download files without the two columns; those files
still score, with no broken rate. Fields are quoted per RFC 4180 when needed; lines end with CRLF.
"""

from __future__ import annotations

SYSTEMS = ("base", "tuned")
SIDES = ("A", "B")
CHOICES = ("A", "B", "tie")

KEY_COLUMNS = ("id", *SIDES)
# The "loops or breaks" mark of each side's reply.
BROKEN_COLUMNS = {"A": "a_broken", "B": "b_broken"}
RATINGS_COLUMNS = ("id", "choice", BROKEN_COLUMNS["A"], BROKEN_COLUMNS["B"], "comment")
