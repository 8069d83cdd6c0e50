"""The blind A/B rating sheet: side assignment, the persona's example replies, rendering, writing.

``write_sheet(samples, seed, html_path, key_path, persona_examples=...)`` writes

* ``html_path``: one self-contained HTML page (CSS and JS inlined, nothing loaded from
  elsewhere, works from ``file://``) for raters. It opens with real replies of the persona
  (:func:`pick_persona_examples`), then shows, per sample, the conversation, reply **A** and
  reply **B**, the choice *A / B / Tie*, a "loops or breaks" tick under each reply and an
  optional comment. Which side is the base model and which the tuned one is a seeded coin flip
  per item that appears nowhere in the page (not in text, ids, classes, data attributes or the
  embedded JSON; the seed is not embedded either). The reference reply sits behind a closed
  "Show reference" toggle, so it does not bias raters by default. Progress is kept in the
  browser's ``localStorage`` under a fingerprint of what the page shows, so a reload keeps it.
* ``key_path``: the answer key (``formats.KEY_COLUMNS``); keep it from the raters.

The markup lives in ``templates/`` (Jinja2, autoescaped): this module prepares plain values.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import os
import random
from pathlib import Path
from typing import Iterable

import jinja2
from markupsafe import Markup

from qlora_pipeline.human_eval.formats import KEY_COLUMNS, SIDES, SYSTEMS
from qlora_pipeline.io import write_text

DEFAULT_TITLE = "Blind A/B human evaluation"
DEFAULT_INSTRUCTIONS = (
    "Read each conversation, then pick the reply that better continues it the way the "
    "person would actually write: natural, in character, and fitting the context. "
    "Choose Tie if neither is clearly better. Tick \u201cloops or breaks\u201d under a reply that "
    "repeats itself, stops mid-sentence, is garbled, or talks as the wrong person. Your choices "
    "are saved in this browser as you go; when you are done, click \u201cDownload ratings (CSV)\u201d "
    "and send the file back."
)
# Characters of a persona reply shown atop the sheet: long enough to carry a voice, short
# enough to take in at a glance. Others fill in only when too few replies fit.
EXAMPLE_REPLY_CHARS = (8, 200)
_SAMPLE_FIELDS = ("id", "context", "reference", "base", "tuned")


def assign_sides(ids: list[str], seed: int) -> list[dict]:
    """Decide, per id, which system is shown as reply A and which as reply B.

    Returns ``[{"id": id, "A": "base"|"tuned", "B": the other}, ...]`` in the order of
    ``ids``. Deterministic for a given ``seed`` (a private ``random.Random(seed)``; the global
    random state is untouched).
    """
    ids = list(ids)
    seen: set[str] = set()
    for sample_id in ids:
        if not isinstance(sample_id, str) or not sample_id:
            raise ValueError(f"assign_sides: every id must be a non-empty string, got {sample_id!r}")
        if sample_id in seen:
            raise ValueError(f"assign_sides: duplicate id {sample_id!r}; ids must be unique")
        seen.add(sample_id)
    rng = random.Random(seed)
    rows = []
    for sample_id in ids:
        first, second = SYSTEMS if rng.random() < 0.5 else SYSTEMS[::-1]
        rows.append({"id": sample_id, "A": first, "B": second})
    return rows


# --------------------------------------------------------------------------------------------
# The persona's own replies
# --------------------------------------------------------------------------------------------


def pick_persona_examples(train_rows: Iterable[dict], count: int, seed: int) -> list[dict]:
    """Pick ``count`` of the persona's real replies, each with the message it answered.

    Args:
        train_rows: train-split rows, ``{"id", "messages": [{"role", "content"}...], "target"}``
            where ``target`` is the persona's reply to ``messages``.
        count: how many to pick; fewer when the rows hold fewer distinct replies; 0 = none.
        seed: the same seed and rows give the same picks, in the same order (a private
            ``random.Random``; the global random state is untouched).

    Returns:
        ``[{"context": the last non-system message's text ("" if none), "reply": the reply}]``.
        Replies of :data:`EXAMPLE_REPLY_CHARS` characters are preferred; shorter or longer ones
        fill in only when too few such exist. Empty and one-character replies are never picked,
        and each distinct reply at most once. The text is shown as it is in the split (already
        PII-scrubbed by the clean stage).
    """
    if not isinstance(count, int) or count < 0:
        raise ValueError(f"pick_persona_examples: count must be an integer >= 0, got {count!r}")
    low, high = EXAMPLE_REPLY_CHARS
    candidates = _distinct_examples(train_rows)
    preferred = [c for c in candidates if low <= len(c["reply"]) <= high]
    others = [c for c in candidates if not low <= len(c["reply"]) <= high]
    rng = random.Random(seed)
    picks = rng.sample(preferred, min(count, len(preferred)))
    return picks + rng.sample(others, min(count - len(picks), len(others)))


def _distinct_examples(train_rows: Iterable[dict]) -> list[dict]:
    """Every row as an example, in row order: replies of two characters or more, each once."""
    examples, seen = [], set()
    for number, row in enumerate(train_rows, start=1):
        if not (isinstance(row, dict) and isinstance(row.get("target"), str)
                and isinstance(row.get("messages"), list)):
            where = f"train row {number}" + (f" (id {row.get('id')!r})" if isinstance(row, dict) else "")
            raise ValueError(f"{where}: expected 'messages' (a list) and 'target' (a string), as the split "
                             "stage writes them. Fix: pass the rows of data/splits/train.jsonl.")
        reply = row["target"].strip()
        if len(reply) < 2 or reply in seen:
            continue
        seen.add(reply)
        examples.append({"context": _last_message(row["messages"]), "reply": reply})
    return examples


def _last_message(messages: list[dict]) -> str:
    """The message the reply answers: the last one that is not the system prompt."""
    said = [m.get("content", "") for m in messages if isinstance(m, dict) and m.get("role") != "system"]
    return said[-1].strip() if said else ""


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def _check_samples(samples: list[dict]) -> None:
    seen: set[str] = set()
    for i, sample in enumerate(samples):
        where = f"sample #{i}"
        if not isinstance(sample, dict):
            raise ValueError(f"{where}: expected a dict, got {type(sample).__name__}")
        missing = [k for k in _SAMPLE_FIELDS if k not in sample]
        if missing:
            raise ValueError(f"{where} (id={sample.get('id')!r}): missing field(s) {', '.join(missing)}")
        sid = sample["id"]
        if not isinstance(sid, str) or not sid:
            raise ValueError(f"{where}: 'id' must be a non-empty string, got {sid!r}")
        where = f"sample {sid!r}"
        if sid in seen:
            raise ValueError(f"{where}: duplicate id; sample ids must be unique")
        seen.add(sid)
        for field in ("reference", *SYSTEMS):
            if not isinstance(sample[field], str):
                raise ValueError(f"{where}: {field!r} must be a string, got {type(sample[field]).__name__}")
        _check_context(where, sample["context"])


def _check_context(where: str, context: object) -> None:
    if not isinstance(context, list):
        raise ValueError(f"{where}: 'context' must be a list of {{role, content}} messages")
    for j, msg in enumerate(context):
        if not (isinstance(msg, dict) and isinstance(msg.get("role"), str) and isinstance(msg.get("content"), str)):
            raise ValueError(f"{where}: context[{j}] must be a dict with string 'role' and 'content', got {msg!r}")


def _check_persona_examples(examples: list[dict]) -> None:
    for i, example in enumerate(examples):
        if not (isinstance(example, dict) and isinstance(example.get("context"), str)
                and isinstance(example.get("reply"), str)):
            raise ValueError(f"persona example #{i}: expected {{'context': str, 'reply': str}}, got {example!r}. "
                             "Fix: build them with pick_persona_examples().")


def _key_by_id(key: list[dict], sample_ids: list[str]) -> dict[str, dict]:
    by_id: dict[str, dict] = {}
    for row in key:
        rid = row.get("id")
        if rid in by_id:
            raise ValueError(f"key: duplicate id {rid!r}")
        if sorted((row.get("A"), row.get("B"))) != sorted(SYSTEMS):
            raise ValueError(
                f"key row for id {rid!r}: 'A' and 'B' must be 'base' and 'tuned' in some order, "
                f"got A={row.get('A')!r}, B={row.get('B')!r}"
            )
        by_id[rid] = row
    missing = [sid for sid in sample_ids if sid not in by_id]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5])
        raise ValueError(
            f"key has no entry for {len(missing)} sample id(s) ({shown}); "
            "build the key with assign_sides() over the same ids"
        )
    return by_id


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _templates() -> jinja2.Environment:
    # Autoescaping on for everything: this environment only renders HTML. StrictUndefined makes a
    # misspelt name in the template an error instead of a silently empty spot on the page.
    return jinja2.Environment(
        loader=jinja2.PackageLoader("qlora_pipeline.human_eval", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def _inline_asset(name: str) -> Markup:
    """A CSS or JS file's text as written: read raw, not rendered, so its braces stay code."""
    env = _templates()
    source, _, _ = env.loader.get_source(env, name)
    return Markup(source)


def _item(index: int, sample: dict, sides: dict) -> dict:
    """What the template shows for one sample: its replies by side, never by system."""
    return {"index": index, "id": sample["id"], "context": sample["context"], "reference": sample["reference"],
            "replies": {side: sample[sides[side]] for side in SIDES}}


def _sheet_fingerprint(title: str, items: list[dict]) -> str:
    """Identify the sheet for localStorage from what the page shows anyway (never the key/seed)."""
    shown = [(i["id"], i["context"], i["reference"], i["replies"]["A"], i["replies"]["B"]) for i in items]
    blob = json.dumps([title, shown], ensure_ascii=False, sort_keys=True).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:20]


def render_sheet(
    samples: list[dict],
    key: list[dict],
    title: str = DEFAULT_TITLE,
    *,
    instructions: str = DEFAULT_INSTRUCTIONS,
    persona_examples: Iterable[dict] = (),
) -> str:
    """Return one self-contained HTML rating page for ``samples`` with sides per ``key``.

    Args:
        samples: ``[{"id", "context": [{"role", "content"}...], "reference", "base", "tuned"}]``.
        key: rows from :func:`assign_sides` (``{"id", "A", "B"}``), one per sample id.
        persona_examples: from :func:`pick_persona_examples`, shown atop the items; none, no section.

    All text is HTML-escaped. The embedded JSON holds only the sample ids and a fingerprint of
    the items' visible content (the localStorage key), never the side assignment.
    """
    samples, persona_examples = list(samples), list(persona_examples)
    _check_samples(samples)
    _check_persona_examples(persona_examples)
    key_by_id = _key_by_id(list(key), [s["id"] for s in samples])
    items = [_item(index, sample, key_by_id[sample["id"]]) for index, sample in enumerate(samples)]
    data = {"sheet": _sheet_fingerprint(title, items), "ids": [item["id"] for item in items]}
    return _templates().get_template("sheet.html.j2").render(
        title=title, instructions=instructions, persona_examples=persona_examples, items=items, data=data,
        css=_inline_asset("sheet.css"), js=_inline_asset("sheet.js"),
    )


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _key_csv(key: Iterable[dict]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(KEY_COLUMNS)
    for row in key:
        writer.writerow([row[column] for column in KEY_COLUMNS])
    return buf.getvalue()


def write_sheet(
    samples: list[dict],
    seed: int,
    html_path: str | os.PathLike,
    key_path: str | os.PathLike,
    title: str = DEFAULT_TITLE,
    *,
    instructions: str = DEFAULT_INSTRUCTIONS,
    persona_examples: Iterable[dict] = (),
) -> list[dict]:
    """Assign sides with ``seed``, then write the rating page and the key CSV (``id,A,B``).

    ``persona_examples`` (from :func:`pick_persona_examples`) open the page. Each file is
    written atomically; the key first, so a sheet never exists without its key. Returns the key rows.
    """
    html_path, key_path = Path(html_path), Path(key_path)
    if html_path.resolve() == key_path.resolve():
        raise ValueError(f"write_sheet: html_path and key_path are the same file ({html_path})")
    samples = list(samples)
    _check_samples(samples)
    key = assign_sides([s["id"] for s in samples], seed)
    page = render_sheet(samples, key, title, instructions=instructions, persona_examples=persona_examples)
    write_text(key_path, _key_csv(key))
    write_text(html_path, page)
    return key
