"""Blind A/B human evaluation: a self-contained rating sheet, its answer key, and the scorer.

Workflow
--------
1. ``write_sheet(samples, seed, html_path, key_path)`` writes

   * ``html_path`` -- one self-contained HTML page (inline CSS + JS, no external resources)
     to give to raters. For each sample it shows the conversation context, reply **A** and
     reply **B**, and radio buttons *A / B / Tie* plus an optional comment. Which side is the
     base model and which the tuned one is decided per item by a seeded coin flip and appears
     nowhere in the page (not in text, ids, classes, data attributes or the embedded JSON;
     the seed is not embedded either). The reference reply is hidden behind a per-item
     "Show reference" toggle so it does not bias raters by default.
   * ``key_path`` -- the answer key, a CSV ``id,A,B`` with values ``base`` / ``tuned``.
     Keep it away from the raters.

2. The rater opens the page in a browser (works from ``file://``), rates, and clicks
   "Download ratings (CSV)", which saves ``ratings.csv``. Ratings are also kept in the
   browser's ``localStorage`` under a key derived from the sheet's visible content, so a
   reload or a closed tab does not lose work.

3. ``score_ratings(ratings_path, key_path)`` un-blinds the ratings and returns win counts,
   the tuned model's win rate and a confidence interval.

File formats
------------
Key CSV (written by :func:`write_sheet`)::

    id,A,B
    ex-001,tuned,base
    ex-002,base,tuned

Ratings CSV (downloaded from the sheet)::

    id,choice,comment
    ex-001,A,
    ex-002,tie,"both fine, ""B"" a bit stiff"
    ex-003,,

One row per item, in sheet order. ``choice`` is ``A``, ``B`` or ``tie``; an item the rater
did not rate is *kept* with an empty choice (so the file always lists the whole sheet), and
:func:`score_ratings` skips such rows and reports them as ``n_skipped``. Fields are quoted per
RFC 4180 when needed; lines end with CRLF. :func:`score_ratings` also accepts files edited by
hand: header names and choices are matched case-insensitively after trimming spaces, extra
columns are ignored, a UTF-8 byte-order mark is tolerated, and rows may be in any order.

Interval
--------
``ci_low`` / ``ci_high`` are a **Wilson score interval** for the tuned model's win rate, with
each tie counted as half a win for the tuned model (``successes = tuned_wins + ties / 2``,
``n = n_rated``). Counting ties as half-wins is the usual convention for pairwise preference
rates; it is an approximation (ties carry less variance than a coin flip), which makes the
interval slightly conservative when there are many ties.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import math
import os
import random
import statistics
from pathlib import Path
from typing import Any, Iterable

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.io import write_text

__all__ = [
    "RatingsError",
    "SYSTEMS",
    "CHOICES",
    "assign_sides",
    "render_sheet",
    "write_sheet",
    "read_key",
    "score_ratings",
]

SYSTEMS = ("base", "tuned")
CHOICES = ("A", "B", "tie")
DEFAULT_TITLE = "Blind A/B human evaluation"
DEFAULT_INSTRUCTIONS = (
    "Read each conversation, then pick the reply that better continues it the way the "
    "person would actually write: natural, in character, and fitting the context. "
    "Choose Tie if neither is clearly better. Your choices are saved in this browser as "
    "you go; when you are done, click \u201cDownload ratings (CSV)\u201d and send the file back."
)


class RatingsError(PipelineError, ValueError):
    """A ratings or key file that cannot be scored; the message names the file, line and fix."""


# --------------------------------------------------------------------------------------------
# Side assignment
# --------------------------------------------------------------------------------------------


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
        if rng.random() < 0.5:
            a, b = "base", "tuned"
        else:
            a, b = "tuned", "base"
        rows.append({"id": sample_id, "A": a, "B": b})
    return rows


# --------------------------------------------------------------------------------------------
# Sheet rendering
# --------------------------------------------------------------------------------------------

_ROLE_LABELS = {"user": "User", "assistant": "Assistant", "system": "System"}

_CSS = """
:root {
  --bg: #f4f5f7; --card: #ffffff; --ink: #1f2328; --muted: #656d76; --line: #d0d7de;
  --accent: #0b63ce; --accent-soft: #e7f0fb; --ok: #1a7f37; --ok-soft: #e6f4ea;
  --user: #eef1f4; --assistant: #e3edfb; --system: #fff5d6;
}
* { box-sizing: border-box; }
html { -webkit-text-size-adjust: 100%; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Liberation Sans", "DejaVu Sans", sans-serif; }
header.bar { position: sticky; top: 0; z-index: 10; background: var(--card);
  border-bottom: 1px solid var(--line); box-shadow: 0 1px 4px rgba(0,0,0,.05); }
.bar-inner { max-width: 1100px; margin: 0 auto; padding: 10px 20px; display: flex;
  gap: 16px; align-items: center; flex-wrap: wrap; }
.bar h1 { font-size: 18px; margin: 0; flex: 1 1 auto; }
#progress { font-weight: 600; white-space: nowrap; }
#progress.done { color: var(--ok); }
.meter { width: 140px; height: 8px; background: var(--line); border-radius: 4px; overflow: hidden; }
.meter > div { height: 100%; width: 0; background: var(--accent); transition: width .2s; }
button { font: inherit; cursor: pointer; border-radius: 6px; }
#download { background: var(--accent); color: #fff; border: 1px solid var(--accent);
  padding: 7px 14px; font-weight: 600; }
#download:hover { filter: brightness(1.08); }
#status { width: 100%; color: var(--muted); font-size: 13px; min-height: 1em; }
#status:empty { display: none; }
main { max-width: 1100px; margin: 0 auto; padding: 16px 20px 60px; }
.intro { background: var(--card); border: 1px solid var(--line); border-radius: 10px;
  padding: 12px 16px; margin-bottom: 16px; }
.intro p { margin: 0; }
.warn { background: #fff1e6; border: 1px solid #f3c29b; border-radius: 8px; padding: 8px 12px;
  margin-bottom: 16px; }
.warn[hidden] { display: none; }
article.item { background: var(--card); border: 1px solid var(--line); border-left: 5px solid var(--line);
  border-radius: 10px; padding: 14px 18px 16px; margin-bottom: 18px; }
article.item.rated { border-left-color: var(--ok); }
.item-head { display: flex; justify-content: space-between; align-items: center; gap: 12px;
  margin-bottom: 8px; }
.item-head h2 { font-size: 16px; margin: 0; }
.item-id { color: var(--muted); font-size: 12px; font-family: ui-monospace, "DejaVu Sans Mono", monospace;
  overflow-wrap: anywhere; }
.section-label { font-size: 12px; text-transform: uppercase; letter-spacing: .06em; color: var(--muted);
  margin: 10px 0 6px; font-weight: 600; }
.transcript { display: flex; flex-direction: column; gap: 6px; max-height: 420px; overflow-y: auto;
  padding: 8px; background: #fafbfc; border: 1px solid var(--line); border-radius: 8px; }
.msg { max-width: 85%; padding: 6px 10px; border-radius: 10px; }
.msg .role { display: block; font-size: 11px; font-weight: 700; color: var(--muted);
  text-transform: uppercase; letter-spacing: .05em; }
.msg .text, .reply .text, .reference .text { white-space: pre-wrap; overflow-wrap: anywhere; }
.msg.user { align-self: flex-start; background: var(--user); }
.msg.assistant { align-self: flex-end; background: var(--assistant); }
.msg.system, .msg.other { align-self: center; background: var(--system); max-width: 95%; font-size: 13px; }
.empty { color: var(--muted); font-style: italic; }
.replies { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
@media (max-width: 760px) { .replies { grid-template-columns: 1fr; } }
.reply { border: 1px solid var(--line); border-radius: 8px; padding: 8px 12px; }
.reply h3 { margin: 0 0 4px; font-size: 14px; }
.reply.picked { border-color: var(--accent); background: var(--accent-soft); }
.rate { display: flex; flex-wrap: wrap; gap: 10px; align-items: center; margin-top: 12px; }
.rate .q { font-weight: 600; margin-right: 4px; }
.choice { display: inline-flex; align-items: center; gap: 6px; border: 1px solid var(--line);
  border-radius: 999px; padding: 4px 14px 4px 10px; cursor: pointer; user-select: none; background: #fff; }
.choice:hover { border-color: var(--accent); }
.choice input { margin: 0; accent-color: var(--accent); }
.choice:has(input:checked) { border-color: var(--accent); background: var(--accent-soft); font-weight: 600; }
.comment { flex: 1 1 240px; min-width: 200px; font: inherit; padding: 5px 9px;
  border: 1px solid var(--line); border-radius: 6px; }
details.reference { margin-top: 10px; }
details.reference summary { cursor: pointer; color: var(--muted); font-size: 13px; }
details.reference .text { margin-top: 6px; padding: 8px 12px; background: #f6f8fa;
  border: 1px dashed var(--line); border-radius: 8px; }
footer { color: var(--muted); font-size: 12px; text-align: center; margin-top: 24px; }
"""

# The script never names a system; it only knows items by position and by their sample id.
_JS = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("sheet-data").textContent);
  var ids = data.ids;
  var total = ids.length;
  var storageKey = "human-eval-sheet:" + data.sheet;
  var ratings = {};   // sample id -> {choice: "A"|"B"|"tie", comment: string}
  var storageOk = true;

  function load() {
    try {
      var raw = window.localStorage.getItem(storageKey);
      if (raw) {
        var parsed = JSON.parse(raw);
        if (parsed && typeof parsed === "object" && parsed.ratings) { ratings = parsed.ratings; }
      }
    } catch (e) { storageOk = false; }
  }
  function save() {
    try {
      window.localStorage.setItem(storageKey, JSON.stringify({ratings: ratings, saved: new Date().toISOString()}));
    } catch (e) { storageOk = false; showStorageWarning(); }
  }
  function showStorageWarning() {
    var w = document.getElementById("storage-warning");
    if (w && !storageOk) { w.hidden = false; }
  }
  function entry(id) {
    if (!Object.prototype.hasOwnProperty.call(ratings, id)) { ratings[id] = {choice: "", comment: ""}; }
    return ratings[id];
  }
  function isChoice(c) { return c === "A" || c === "B" || c === "tie"; }
  function countRated() {
    var n = 0;
    for (var i = 0; i < total; i++) {
      var r = ratings[ids[i]];
      if (r && isChoice(r.choice)) { n++; }
    }
    return n;
  }
  function paintItem(index) {
    var item = document.getElementById("item-" + index);
    var r = ratings[ids[index]];
    var choice = r && isChoice(r.choice) ? r.choice : "";
    item.classList.toggle("rated", choice !== "");
    var replies = item.querySelectorAll(".reply");
    for (var k = 0; k < replies.length; k++) {
      replies[k].classList.toggle("picked", replies[k].getAttribute("data-side") === choice);
    }
  }
  function paintProgress() {
    var n = countRated();
    var p = document.getElementById("progress");
    p.textContent = "Rated " + n + " of " + total;
    p.classList.toggle("done", n === total);
    document.getElementById("meter-fill").style.width = (total ? (100 * n / total) : 0) + "%";
  }
  function csvField(value) {
    var s = value == null ? "" : String(value);
    if (/[",\r\n]/.test(s) || /^\s|\s$/.test(s)) { s = '"' + s.replace(/"/g, '""') + '"'; }
    return s;
  }
  function buildCsv() {
    var lines = ["id,choice,comment"];
    for (var i = 0; i < total; i++) {
      var r = ratings[ids[i]] || {};
      var choice = isChoice(r.choice) ? r.choice : "";
      lines.push([csvField(ids[i]), csvField(choice), csvField(r.comment || "")].join(","));
    }
    return lines.join("\r\n") + "\r\n";
  }
  function download() {
    var csv = buildCsv();
    var blob = new Blob([csv], {type: "text/csv;charset=utf-8"});
    var url = URL.createObjectURL(blob);
    var a = document.createElement("a");
    a.href = url;
    a.download = "ratings.csv";
    a.style.display = "none";
    document.body.appendChild(a);
    a.click();
    document.body.removeChild(a);
    setTimeout(function () { URL.revokeObjectURL(url); }, 10000);
    var missing = total - countRated();
    document.getElementById("status").textContent = missing
      ? "Downloaded ratings.csv \u2014 " + missing + " of " + total + " items are still unrated (saved with an empty choice)."
      : "Downloaded ratings.csv with all " + total + " items rated. Thank you!";
  }

  load();
  showStorageWarning();
  for (var i = 0; i < total; i++) {
    (function (index) {
      var id = ids[index];
      var item = document.getElementById("item-" + index);
      var radios = item.querySelectorAll("input[type=radio]");
      var comment = item.querySelector("input.comment");
      var r = ratings[id];
      if (r) {
        for (var k = 0; k < radios.length; k++) { radios[k].checked = radios[k].value === r.choice; }
        comment.value = r.comment || "";
      }
      for (var j = 0; j < radios.length; j++) {
        radios[j].addEventListener("change", function (ev) {
          if (ev.target.checked) { entry(id).choice = ev.target.value; save(); paintItem(index); paintProgress(); }
        });
      }
      comment.addEventListener("input", function () { entry(id).comment = comment.value; save(); });
      paintItem(index);
    })(i);
  }
  paintProgress();
  document.getElementById("download").addEventListener("click", download);
  // Saved ratings are restored and painted: tools (and tests) wait for this before reading the page.
  document.documentElement.setAttribute("data-sheet-ready", "true");
})();
"""


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _text_block(text: str, css_class: str = "text") -> str:
    if text.strip() == "":
        return f'<div class="{css_class} empty">(empty)</div>'
    return f'<div class="{css_class}">{_esc(text)}</div>'


def _json_for_script(obj: Any) -> str:
    """JSON that is safe inside <script>: no `</script>`, `<!--`, or JS-breaking line separators."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return (
        text.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def _check_samples(samples: list[dict]) -> None:
    seen: set[str] = set()
    for i, sample in enumerate(samples):
        where = f"sample #{i}"
        if not isinstance(sample, dict):
            raise ValueError(f"{where}: expected a dict, got {type(sample).__name__}")
        missing = [k for k in ("id", "context", "reference", "base", "tuned") if k not in sample]
        if missing:
            raise ValueError(f"{where} (id={sample.get('id')!r}): missing field(s) {', '.join(missing)}")
        sid = sample["id"]
        if not isinstance(sid, str) or not sid:
            raise ValueError(f"{where}: 'id' must be a non-empty string, got {sid!r}")
        where = f"sample {sid!r}"
        if sid in seen:
            raise ValueError(f"{where}: duplicate id; sample ids must be unique")
        seen.add(sid)
        for field in ("reference", "base", "tuned"):
            if not isinstance(sample[field], str):
                raise ValueError(f"{where}: {field!r} must be a string, got {type(sample[field]).__name__}")
        context = sample["context"]
        if not isinstance(context, list):
            raise ValueError(f"{where}: 'context' must be a list of {{role, content}} messages")
        for j, msg in enumerate(context):
            if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(
                msg.get("content"), str
            ):
                raise ValueError(
                    f"{where}: context[{j}] must be a dict with string 'role' and 'content', got {msg!r}"
                )


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


def _render_message(msg: dict) -> str:
    role = msg["role"]
    css = role if role in _ROLE_LABELS else "other"
    label = _ROLE_LABELS.get(role, role.capitalize() or "Message")
    return (
        f'<div class="msg {css}"><span class="role">{_esc(label)}</span>'
        f'{_text_block(msg["content"])}</div>'
    )


def _sheet_fingerprint(title: str, shown: list[tuple[str, list, str, str, str]]) -> str:
    """Identify the sheet for localStorage from what the page shows anyway (never the key/seed)."""
    blob = json.dumps([title, shown], ensure_ascii=False, sort_keys=True).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:20]


def render_sheet(
    samples: list[dict],
    key: list[dict],
    title: str = DEFAULT_TITLE,
    *,
    instructions: str = DEFAULT_INSTRUCTIONS,
) -> str:
    """Return one self-contained HTML rating page for ``samples`` with sides per ``key``.

    ``samples``: ``[{"id", "context": [{"role", "content"}...], "reference", "base", "tuned"}]``.
    ``key``: rows from :func:`assign_sides` (``{"id", "A", "B"}``), one per sample id.
    All text is HTML-escaped; the embedded JSON holds only the sample ids and a fingerprint of
    the visible content (for the localStorage key), never the side assignment.
    """
    samples = list(samples)
    _check_samples(samples)
    sample_ids = [s["id"] for s in samples]
    key_by_id = _key_by_id(list(key), sample_ids)

    total = len(samples)
    items_html = []
    shown = []
    for index, sample in enumerate(samples):
        sides = key_by_id[sample["id"]]
        text_a = sample[sides["A"]]
        text_b = sample[sides["B"]]
        shown.append((sample["id"], sample["context"], sample["reference"], text_a, text_b))
        if sample["context"]:
            transcript = "\n".join(_render_message(m) for m in sample["context"])
        else:
            transcript = '<div class="empty">(no earlier messages)</div>'
        radios = "".join(
            f'<label class="choice"><input type="radio" name="choice-{index}" value="{value}"'
            f' id="choice-{index}-{value}"> {label}</label>'
            for value, label in (("A", "A"), ("B", "B"), ("tie", "Tie"))
        )
        items_html.append(
            f"""<article class="item" id="item-{index}" data-index="{index}" data-sample-id="{_esc(sample["id"])}">
  <div class="item-head"><h2>Item {index + 1} of {total}</h2><span class="item-id">{_esc(sample["id"])}</span></div>
  <div class="section-label">Conversation so far</div>
  <div class="transcript">
{transcript}
  </div>
  <div class="section-label">Candidate next replies</div>
  <div class="replies">
    <div class="reply" data-side="A"><h3>Reply A</h3>{_text_block(text_a)}</div>
    <div class="reply" data-side="B"><h3>Reply B</h3>{_text_block(text_b)}</div>
  </div>
  <div class="rate" role="radiogroup" aria-label="Which reply is better for item {index + 1}?">
    <span class="q">Better reply:</span>{radios}
    <input type="text" class="comment" id="comment-{index}" maxlength="500" placeholder="Optional comment" aria-label="Comment for item {index + 1}">
  </div>
  <details class="reference"><summary>Show reference (the real reply)</summary>{_text_block(sample["reference"])}</details>
</article>"""
        )

    data = {"sheet": _sheet_fingerprint(title, shown), "ids": sample_ids}
    csp = (
        "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
        "img-src data:; form-action 'none'"
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{_esc(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<header class="bar"><div class="bar-inner">
  <h1>{_esc(title)}</h1>
  <div class="meter" aria-hidden="true"><div id="meter-fill"></div></div>
  <span id="progress" aria-live="polite">Rated 0 of {total}</span>
  <button type="button" id="download">Download ratings (CSV)</button>
  <div id="status" aria-live="polite"></div>
</div></header>
<main>
  <div class="intro"><p>{_esc(instructions)}</p></div>
  <div class="warn" id="storage-warning" hidden>This browser is not letting the page save your progress
    (local storage is blocked). Keep this tab open and download your ratings before closing it.</div>
  <noscript><div class="warn">This sheet needs JavaScript to record and download ratings.</div></noscript>
{chr(10).join(items_html)}
  <footer>{total} items &middot; replies are shown in random order per item</footer>
</main>
<script type="application/json" id="sheet-data">{_json_for_script(data)}</script>
<script>{_JS}</script>
</body>
</html>
"""


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _key_csv(key: Iterable[dict]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "A", "B"])
    for row in key:
        writer.writerow([row["id"], row["A"], row["B"]])
    return buf.getvalue()


def write_sheet(
    samples: list[dict],
    seed: int,
    html_path: str | os.PathLike,
    key_path: str | os.PathLike,
    title: str = DEFAULT_TITLE,
    *,
    instructions: str = DEFAULT_INSTRUCTIONS,
) -> list[dict]:
    """Assign sides with ``seed``, then write the rating page and the key CSV (``id,A,B``).

    Each file is written atomically (temp file in the same folder, then ``os.replace``); the
    key is written first so a sheet never exists without its key. Returns the key rows.
    """
    html_path, key_path = Path(html_path), Path(key_path)
    if html_path.resolve() == key_path.resolve():
        raise ValueError(f"write_sheet: html_path and key_path are the same file ({html_path})")
    samples = list(samples)
    _check_samples(samples)
    key = assign_sides([s["id"] for s in samples], seed)
    page = render_sheet(samples, key, title, instructions=instructions)
    write_text(key_path, _key_csv(key))
    write_text(html_path, page)
    return key


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def _read_csv(path: Path, what: str, fix_missing: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Return (normalised header, [(line_number, row), ...]); blank lines are dropped."""
    if not path.exists():
        raise RatingsError(f"{path}: {what} file not found. Fix: {fix_missing}")
    if not path.is_file():
        raise RatingsError(f"{path}: {what} path is not a file. Fix: {fix_missing}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RatingsError(
            f"{path}: {what} file is not UTF-8 text ({exc}). Fix: save it as UTF-8 CSV."
        ) from None
    if not text.strip():
        raise RatingsError(
            f"{path}: {what} file is empty. Fix: {fix_missing}"
        )
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[tuple[int, list[str]]] = []
    header: list[str] | None = None
    header_line = 1
    try:
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            if not row or all(cell.strip() == "" for cell in row):
                continue
            if header is None:
                header = [cell.strip() for cell in row]
                header_line = start
            else:
                rows.append((start, row))
    except csv.Error as exc:
        raise RatingsError(
            f"{path}:{reader.line_num}: malformed CSV ({exc}). Fix: check the quoting on that line."
        ) from None
    assert header is not None
    return header, [(header_line, header)] + rows


def _column_index(path: Path, header: list[str], line: int, needed: tuple[str, ...], hint: str) -> dict[str, int]:
    lowered = [h.lower() for h in header]
    missing = [col for col in needed if col.lower() not in lowered]
    if missing:
        found = ", ".join(repr(h) for h in header) or "(none)"
        raise RatingsError(
            f"{path}:{line}: missing column{'s' if len(missing) > 1 else ''} "
            f"{', '.join(repr(m) for m in missing)} in the header; columns found: {found}. "
            f"Fix: {hint}"
        )
    return {col: lowered.index(col.lower()) for col in needed}


def _cell(row: list[str], index: int) -> str:
    return row[index].strip() if index < len(row) else ""


def read_key(key_path: str | os.PathLike) -> dict[str, dict[str, str]]:
    """Read a key CSV (``id,A,B``) into ``{id: {"A": system, "B": system}}``; raises RatingsError."""
    path = Path(key_path)
    fix = "pass the key CSV that write_sheet() wrote next to the sheet (its key_path)."
    header, rows = _read_csv(path, "key", fix)
    header_line, _ = rows[0]
    cols = _column_index(path, header, header_line, ("id", "A", "B"), "the key header must be 'id,A,B'.")
    key: dict[str, dict[str, str]] = {}
    first_line: dict[str, int] = {}
    for line, row in rows[1:]:
        sid = _cell(row, cols["id"])
        a, b = _cell(row, cols["A"]).lower(), _cell(row, cols["B"]).lower()
        if not sid:
            raise RatingsError(f"{path}:{line}: empty id. Fix: every key row needs an id.")
        if sorted((a, b)) != sorted(SYSTEMS):
            raise RatingsError(
                f"{path}:{line}: id {sid!r} has A={a!r}, B={b!r}; they must be 'base' and 'tuned' "
                "in some order. Fix: regenerate the key with write_sheet()."
            )
        if sid in key:
            raise RatingsError(
                f"{path}:{line}: duplicate id {sid!r} (first on line {first_line[sid]}). "
                "Fix: regenerate the key with write_sheet()."
            )
        key[sid] = {"A": a, "B": b}
        first_line[sid] = line
    if not key:
        raise RatingsError(f"{path}: key file has a header but no rows. Fix: {fix}")
    return key


def _wilson(successes: float, n: int, confidence: float) -> tuple[float, float]:
    z = statistics.NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0)
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2.0 * n)) / denom
    half = (z / denom) * math.sqrt(max(p * (1.0 - p) / n + z2 / (4.0 * n * n), 0.0))
    return max(0.0, centre - half), min(1.0, centre + half)


def score_ratings(
    ratings_path: str | os.PathLike,
    key_path: str | os.PathLike,
    confidence: float = 0.95,
) -> dict:
    """Un-blind a ratings CSV (``id,choice,comment``) with the key CSV (``id,A,B``) and score it.

    Returns ``{"n_rated", "n_skipped", "n_missing", "tuned_wins", "base_wins", "ties",
    "tuned_win_rate", "ci_low", "ci_high", "confidence", "method"}`` where
    ``tuned_win_rate = (tuned_wins + ties / 2) / n_rated`` and ``[ci_low, ci_high]`` is the
    Wilson score interval for it (ties as half wins). ``n_skipped`` counts rows with an empty
    choice; ``n_missing`` counts key ids with no row in the ratings file at all.

    Raises :class:`RatingsError` (a ``ValueError``) naming the file, line and fix for a missing
    or empty file, a missing ``id``/``choice`` column, ids not in the key, a choice other than
    A/B/tie, a duplicate id, or a file with no rated rows.
    """
    if not (isinstance(confidence, (int, float)) and 0.0 < float(confidence) < 1.0):
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence!r}")
    key = read_key(key_path)
    path = Path(ratings_path)
    fix_missing = "pass the ratings.csv downloaded from the sheet with its 'Download ratings (CSV)' button."
    header, rows = _read_csv(path, "ratings", fix_missing)
    header_line, _ = rows[0]
    cols = _column_index(
        path, header, header_line, ("id", "choice"),
        "the ratings header must be 'id,choice,comment' as downloaded from the sheet.",
    )
    data_rows = rows[1:]
    if not data_rows:
        raise RatingsError(f"{path}: ratings file has a header but no rows. Fix: {fix_missing}")

    unknown: list[tuple[str, int]] = []
    seen: dict[str, int] = {}
    parsed: list[tuple[int, str, str]] = []
    canonical = {c.lower(): c for c in CHOICES}
    for line, row in data_rows:
        sid = _cell(row, cols["id"])
        raw_choice = _cell(row, cols["choice"])
        if not sid:
            raise RatingsError(
                f"{path}:{line}: empty id. Fix: every row needs the item id from the sheet."
            )
        if sid in seen:
            raise RatingsError(
                f"{path}:{line}: duplicate id {sid!r} (first on line {seen[sid]}). "
                "Fix: keep one row per item (merge ratings from different raters into separate files)."
            )
        seen[sid] = line
        choice = canonical.get(raw_choice.lower(), None) if raw_choice else ""
        if choice is None:
            raise RatingsError(
                f"{path}:{line}: choice {raw_choice!r} for id {sid!r} is not one of A, B, tie "
                "(or empty for unrated). Fix: correct that line."
            )
        if sid not in key:
            unknown.append((sid, line))
            continue
        parsed.append((line, sid, choice))
    if unknown:
        shown = ", ".join(f"{sid!r} (line {line})" for sid, line in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise RatingsError(
            f"{path}: {len(unknown)} id(s) not in the key {key_path}: {shown}{more}. "
            "Fix: score the ratings against the key written with the same sheet."
        )

    tuned_wins = base_wins = ties = skipped = 0
    for _line, sid, choice in parsed:
        if choice == "":
            skipped += 1
        elif choice == "tie":
            ties += 1
        elif key[sid][choice] == "tuned":
            tuned_wins += 1
        else:
            base_wins += 1
    n_rated = tuned_wins + base_wins + ties
    if n_rated == 0:
        raise RatingsError(
            f"{path}: no rated rows (all {skipped} rows have an empty choice). "
            "Fix: rate at least one item in the sheet, then download the ratings again."
        )
    rate = (tuned_wins + 0.5 * ties) / n_rated
    low, high = _wilson(tuned_wins + 0.5 * ties, n_rated, float(confidence))
    return {
        "n_rated": n_rated,
        "n_skipped": skipped,
        "n_missing": sum(1 for sid in key if sid not in seen),
        "tuned_wins": tuned_wins,
        "base_wins": base_wins,
        "ties": ties,
        "tuned_win_rate": rate,
        "ci_low": low,
        "ci_high": high,
        "confidence": float(confidence),
        "method": "wilson (ties count as half a win)",
    }
