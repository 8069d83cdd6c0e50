"""Properties of fetch, clean and regex PII scrubbing, checked on generated input (hypothesis).

Whatever a source file holds (any bytes, any row shapes, any text), ``fetch`` either raises a
``PipelineError`` naming the file, and the line when it names one, or turns every row into a
message or a counted rejection. ``clean`` accounts for every message it drops. The regex
scrubber leaves nothing to scrub in its own output (below ``MAX_SWEEPS`` glued hits) and never
eats a placeholder.

Examples are derandomized, so every run tries the same ones and a red run is a bug, not luck.
For a longer random search: ``DATA_PROPERTIES_PROFILE=thorough pytest tests/data/test_properties.py``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import unicodedata
from pathlib import Path

import pytest
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from conftest import PROPERTIES_PROFILE, CHAT_FIELDS, make_params
from qlora_pipeline.data.cleaning import clean_conversations, normalize_text
from qlora_pipeline.data.pii import MAX_SWEEPS, PII_TYPES, PLACEHOLDERS, find_pii, scrub
from qlora_pipeline.data.sources import fetch
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.pipeline.common import read_conversations

PROFILE = PROPERTIES_PROFILE  # tests/conftest.py: fixed examples unless DATA_PROPERTIES_PROFILE=thorough
# Tests of one function on one string take a millisecond an example: they can afford more.
PROFILE_CHEAP = settings(PROFILE, max_examples=5 * PROFILE.max_examples)

BOM = b"\xef\xbb\xbf"
PAIR_FIELDS = {"data.shape": "pairs", "data.fields.prompt": "dialogue", "data.fields.response": "summary",
               "data.fields.id": None}

# ----------------------------------------------------------------------------- strategies

# Text no UTF-8 file can hold (lone surrogates) only where a JSON escape can carry it.
ANY_CHAR = st.characters(exclude_categories=())
UTF8_CHAR = st.characters(codec="utf-8")
ODD_PIECES = ["", " ", "\x00", "\r", "\n", "\r\n", "\t", "\x0b", "\x1f", "\x7f", "\x85", "\x9b", "\u2028", "\ufeff",
              "\u200b", "\u202e", "e\u0301", "\U0001F600", "\U0010FFFF", "\ufdfa", "ｆｕｌｌ", '"', "'", ",", "{}",
              "\\", "<EMAIL>", "@", "1"]
HUGE = st.builds(lambda char, size: char * size, st.sampled_from(["x", "é", "\ufdfa"]), st.integers(1000, 4000))


def odd_text(chars: st.SearchStrategy[str] = UTF8_CHAR) -> st.SearchStrategy[str]:
    """Short runs of any characters mixed with the ones that break naive code, now and then a huge one."""
    pieces = st.one_of(st.text(chars, max_size=10), st.sampled_from(ODD_PIECES), HUGE)
    return st.lists(pieces, max_size=5).map("".join)


JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), odd_text(ANY_CHAR))
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6)
# Ids and speakers from a few values, so rows share conversations; sometimes anything at all.
IDS = st.one_of(st.sampled_from(["c1", "c2", "alice", "bob", "", "  ", "0"]), JSON_VALUES)
TEXTS = st.one_of(odd_text(ANY_CHAR), JSON_VALUES)


def json_rows(shape: str, complete: bool) -> st.SearchStrategy[dict]:
    """Rows of the mapped fields with values of any type; with ``complete=False`` any may be absent."""
    if shape == "chat_log":
        values = {"conv": IDS, "who": IDS, "msg": TEXTS, "ts": JSON_VALUES}
    else:
        values = {"dialogue": TEXTS, "summary": TEXTS}
    extra = {"extra": JSON_VALUES}
    if complete:
        return st.fixed_dictionaries(values, optional=extra)
    return st.fixed_dictionaries({}, optional={**values, **extra})


LINE_ENDS = st.sampled_from([b"\n", b"\r\n"])
LAST_LINE_ENDS = st.sampled_from([b"\n", b"\r\n", b"", b"\r"])
BLANK_LINES = st.lists(st.sampled_from([b"\n", b"\r\n", b" \t\r\n"]), max_size=2).map(b"".join)


@st.composite
def laid_out(draw, lines: list[bytes]) -> tuple[bytes, list[int]]:
    """``lines`` as an editor might save them: BOM or not, LF or CRLF, blank lines between.

    Returns the file's bytes and the line number each of ``lines`` starts on.
    """
    data, starts = BOM if draw(st.booleans()) else b"", []
    for index, line in enumerate(lines):
        data += draw(BLANK_LINES)
        starts.append(data.count(b"\n") + 1)
        data += line + draw(LAST_LINE_ENDS if index == len(lines) - 1 else LINE_ENDS)
    return data, starts


def jsonl_bytes(row: dict) -> st.SearchStrategy[bytes]:
    """The row as one JSON line, escaped to ASCII or not."""
    def encode(ascii_only: bool) -> bytes:
        # surrogatepass: a lone surrogate written raw is invalid UTF-8, which the reader must name too.
        return json.dumps(row, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")

    return st.booleans().map(encode)


CSV_HEADER = ["conv", "who", "msg", "ts"]
# Cells the CSV format itself has to quote or escape, and a CR alone (which Python's writer leaves unquoted).
CSV_ODD_CELLS = ["a,b", 'say "hi"', '"', "two\r\nlines", "line\n", "lone\rCR", "\r", " ", ""]


@st.composite
def csv_file(draw) -> tuple[bytes, list[int], int]:
    """A CSV chat log written by Python's csv module; returns (bytes, each record's first line, rows)."""
    cell = st.one_of(st.sampled_from(["c1", "c2", "alice", "bob"]), st.sampled_from(CSV_ODD_CELLS), odd_text())
    # Not one cell of CRs alone: Python's writer leaves it unquoted after LF line ends, and then
    # the row is, byte for byte, a blank CRLF line, which no reader can count as a row.
    row = st.lists(cell, min_size=1, max_size=len(CSV_HEADER)).filter(
        lambda cells: not (len(cells) == 1 and cells[0] and not cells[0].strip("\r")))
    rows = draw(st.lists(row, min_size=1, max_size=8))
    buffer = io.StringIO(newline="")
    # QUOTE_MINIMAL with LF endings leaves a lone CR in a cell unquoted: the reader must refuse that row.
    writer = csv.writer(buffer, lineterminator=draw(st.sampled_from(["\n", "\r\n"])),
                        quoting=draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL])))
    writer.writerow(CSV_HEADER)
    starts = []
    for row in rows:
        buffer.write(draw(st.sampled_from(["", "\n", "\r\n"])))  # blank lines between records
        starts.append(buffer.getvalue().count("\n") + 1)
        writer.writerow(row)
    data = buffer.getvalue().encode("utf-8")
    return (BOM + data if draw(st.booleans()) else data), starts, len(rows)


BYTE_PIECES = [BOM, b"\n", b"\r\n", b"\r", b"", b",", b'"', b"\x00", b"\xff", b"\xed\xa0\x80", b"\xe4",
               b'{"conv": "c1", "who": "a", "msg": "hi", "ts": null}', b'{"conv": 1, "who": [], "msg": {}}',
               b"conv,who,msg,ts\n", b"c1,a,hi,t\r\n", b'c1,b,"x\r\ny",t\n', b"PAR1", b"[1, 2]", b'"\\ud800"']
ANY_BYTES = st.lists(st.one_of(st.binary(max_size=12), st.sampled_from(BYTE_PIECES)), max_size=10).map(b"".join)


# ------------------------------------------------------------------------ fetch: the readers


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("properties")


@pytest.fixture(scope="module")
def data_cfg(base_params_dict, folder):
    """``data`` params reading ``folder/data.<fmt>`` in ``shape`` (the test rewrites the file each example)."""
    def build(fmt: str, shape: str = "chat_log"):
        fields = CHAT_FIELDS if shape == "chat_log" else PAIR_FIELDS
        return make_params(base_params_dict, {"data.source": fmt, "data.path": str(folder / f"data.{fmt}"),
                                              **fields}).data
    return build


def fetch_bytes(cfg, data: bytes):
    """``fetch`` of a file holding ``data``: the result, or the PipelineError it raised."""
    Path(cfg.path).write_bytes(data)
    try:
        result = fetch(cfg)
    except PipelineError as err:
        event(f"refused: {str(err)[len(cfg.path):].split(';')[0][:40]}")  # see --hypothesis-show-statistics
        return err
    event("read")
    return result


def assert_names_file_and_line(err: PipelineError, cfg, lines: list[int] | None = None) -> None:
    """The message starts with the file (or a data.* key); a line it names is in the file (or in ``lines``)."""
    message = str(err)
    assert message.startswith((f"{cfg.path}:", "data.")), message
    named = re.match(rf"{re.escape(cfg.path)}:(\d+): ", message)
    if named:
        line = int(named[1])
        last_line = Path(cfg.path).read_bytes().count(b"\n") + 1
        assert 1 <= line <= last_line, message
        if lines is not None:
            assert line in lines, f"line {line} holds no row ({lines}): {message}"


def assert_every_row_counted(result, rows_in: int, shape: str) -> None:
    """Rows in = messages (pairs: conversations) + rejected rows; and what was read can be written."""
    # The fetch stage writes the conversations as UTF-8 next: a lone surrogate read from a
    # "\ud800" escape would crash it there, with a traceback and no line number.
    json.dumps(result.conversations, ensure_ascii=False).encode("utf-8")
    counts = result.manifest["counts"]
    rejected = sum(counts["rows_rejected"].values())
    if shape == "chat_log":
        assert counts["messages"] + rejected == rows_in, counts
    else:  # one conversation of two messages per accepted row
        assert counts["conversations"] + rejected == rows_in, counts
        assert counts["messages"] == 2 * counts["conversations"], counts


@PROFILE
@given(st.data())
@pytest.mark.parametrize("shape", ["chat_log", "pairs"])
@pytest.mark.parametrize("complete", [True, False], ids=["all_fields", "fields_missing"])
def test_jsonl_rows_of_any_shape_are_read_or_counted_or_named(data_cfg, shape, complete, data):
    cfg = data_cfg("jsonl", shape)
    rows = data.draw(st.lists(json_rows(shape, complete), min_size=1, max_size=8))
    lines = [data.draw(jsonl_bytes(row)) for row in rows]
    raw, starts = data.draw(laid_out(lines))
    result = fetch_bytes(cfg, raw)
    if isinstance(result, PipelineError):
        assert_names_file_and_line(result, cfg, starts)
    else:
        assert_every_row_counted(result, len(rows), shape)


@PROFILE
@given(csv_file())
def test_csv_rows_are_read_or_counted_or_named(data_cfg, written):
    cfg = data_cfg("csv")
    raw, starts, rows_in = written
    result = fetch_bytes(cfg, raw)
    if isinstance(result, PipelineError):
        assert_names_file_and_line(result, cfg, starts)
    else:
        assert_every_row_counted(result, rows_in, "chat_log")


@PROFILE
@given(ANY_BYTES, st.sampled_from(["jsonl", "csv", "parquet"]))
def test_any_bytes_are_read_or_refused_by_name(data_cfg, raw, fmt):
    cfg = data_cfg(fmt)
    result = fetch_bytes(cfg, raw)
    if isinstance(result, PipelineError):
        assert_names_file_and_line(result, cfg)
    elif fmt == "jsonl":  # every line with more than whitespace is a row
        rows_in = sum(1 for line in raw.removeprefix(BOM).split(b"\n") if line.strip())
        assert_every_row_counted(result, rows_in, "chat_log")


# ----------------------------------------------------------------------------------- clean


@st.composite
def clean_configs(draw, base):
    min_chars = draw(st.integers(0, 4))
    # Validated as params.yaml is: only configs params.yaml could hold.
    cfg = type(base).model_validate(dict(
        base.model_dump(),
        unicode_normalization=draw(st.sampled_from(["NFC", "NFKC", "none"])),
        min_chars=min_chars,
        max_chars=draw(st.integers(min_chars, min_chars + 40)),
        dedup=draw(st.sampled_from(["none", "exact", "near"])),
        near_dup_ratio=draw(st.floats(0.3, 1.0)),
        near_dup_window=draw(st.integers(1, 4)),
        dedup_min_chars=draw(st.integers(0, 12)),
        min_messages=draw(st.integers(0, 3)),
        min_speakers=draw(st.integers(0, 2)),
        pii=draw(st.lists(st.sampled_from(PII_TYPES), unique=True)),
        exclude_speakers=draw(st.lists(st.sampled_from(["alice", "bob", "x"]), max_size=2)),
    ))
    return cfg


SPEAKERS = st.one_of(st.sampled_from(["alice", "bob", "carol"]), odd_text())
MESSAGES = st.fixed_dictionaries({"speaker": SPEAKERS, "text": odd_text(ANY_CHAR),
                                  "time": st.none() | st.text(max_size=5)})
CONVERSATIONS = st.lists(
    st.builds(lambda index, messages: {"id": f"c{index}", "messages": messages, "meta": {}},
              st.integers(0, 10**6), st.lists(MESSAGES, max_size=6)),
    max_size=5)


def assert_clean_accounts_for_every_message(conversations: list[dict], kept: list[dict], metrics: dict) -> None:
    messages_in = sum(len(c["messages"]) for c in conversations)
    messages_out = sum(len(c["messages"]) for c in kept)
    assert (metrics["messages_in"], metrics["messages_out"]) == (messages_in, messages_out)
    assert messages_in == messages_out + metrics["messages_removed"]["total"], metrics
    assert (metrics["conversations_in"], metrics["conversations_out"]) == (len(conversations), len(kept))
    assert len(conversations) == len(kept) + metrics["conversations_removed"]["total"], metrics


@pytest.fixture(scope="module")
def base_clean(base_params_dict):
    return make_params(base_params_dict).clean


@PROFILE
@given(st.data(), CONVERSATIONS)
def test_clean_counts_every_message_it_drops(base_clean, data, conversations):
    cfg = data.draw(clean_configs(base_clean))
    kept, metrics = clean_conversations(conversations, cfg)
    assert_clean_accounts_for_every_message(conversations, kept, metrics)
    for message in (m for c in kept for m in c["messages"]):
        assert message["speaker"] not in cfg.exclude_speakers
        assert cfg.min_chars <= len(message["text"]) <= cfg.max_chars
        assert normalize_text(message["text"], cfg.unicode_normalization) == message["text"]


CONVERSATION_SHAPES = st.one_of(
    st.fixed_dictionaries({"id": IDS, "messages": st.lists(MESSAGES, max_size=4)}, optional={"meta": JSON_VALUES}),
    st.fixed_dictionaries({}, optional={"id": IDS, "messages": st.lists(st.one_of(
        st.fixed_dictionaries({}, optional={"speaker": IDS, "text": TEXTS, "time": JSON_VALUES}), JSON_VALUES))}),
    st.dictionaries(st.text(max_size=4), JSON_VALUES, max_size=3),
)


@PROFILE
@given(st.lists(CONVERSATION_SHAPES, min_size=1, max_size=5), st.data())
def test_clean_stage_input_of_any_shape_is_cleaned_or_named(base_clean, folder, shapes, data):
    """What the clean stage reads: conversations.jsonl edited by hand, any shape, any text."""
    lines = [data.draw(jsonl_bytes(shape)) for shape in shapes]
    raw, starts = data.draw(laid_out(lines))
    path = folder / "conversations.jsonl"
    path.write_bytes(raw)
    try:
        conversations = read_conversations(path)
    except PipelineError as err:
        named = re.match(rf"{re.escape(str(path))}(?::(\d+))?: ", str(err))
        assert named, str(err)
        assert named[1] is None or int(named[1]) in starts, str(err)
        return
    kept, metrics = clean_conversations(conversations, base_clean)
    assert_clean_accounts_for_every_message(conversations, kept, metrics)


@PROFILE_CHEAP
@given(odd_text(ANY_CHAR), st.sampled_from(["NFC", "NFKC", "none"]))
def test_normalized_text_is_stable_and_has_no_controls(text, form):
    normalized = normalize_text(text, form)
    assert normalize_text(normalized, form) == normalized
    assert normalized == normalized.strip()
    assert "\n\n\n" not in normalized
    # The docstring's promise: no control characters, C0 and C1 alike; newlines stay.
    assert not [c for c in normalized if unicodedata.category(c) == "Cc" and c != "\n"], repr(normalized)


# ------------------------------------------------------------------------ PII (regex engine)

PII_PIECES = ["alice@example.com", "a.b+c@mail.example.co.uk", "@bob", "@alice@mastodon.social", "555-123-4567",
              "(555) 123-4567", "+44 20 7946 0958", "5551234567", "https://example.com/p?q=1", "http://localhost",
              "www.example.org", "example.com/page", "192.168.0.1", "::1", "2001:db8::1", "4111 1111 1111 1111",
              "4111111111111111", "123-45-6789", "v1.2.3.4", "٣", "１", *PLACEHOLDERS.values()]
PII_GLUE = [" ", "", "\n", ",", ".", "(", ")", "[", "@", "/", "-", ":", "<", ">", "\x00", "0", "7", "a", "_"]
PII_TEXT = st.lists(st.one_of(st.sampled_from(PII_PIECES), st.sampled_from(PII_GLUE), st.text(ANY_CHAR, max_size=4)),
                    max_size=10).map("".join)
REGEX_PLACEHOLDERS = {pii_type: PLACEHOLDERS[pii_type] for pii_type in PII_TYPES}


@PROFILE_CHEAP
@given(PII_TEXT, st.lists(st.sampled_from(PII_TYPES), unique=True))
def test_scrubbed_text_has_nothing_left_to_scrub(text, types):
    # Promised when the sweeps ran to the end: every sweep but the last finds a hit, so fewer
    # hits than MAX_SWEEPS guarantee it (generated texts almost never hold that many).
    assume(len(find_pii([text], PII_TYPES)[0]) < MAX_SWEEPS)
    scrubbed, _ = scrub(text, types)
    assert scrub(scrubbed, types) == (scrubbed, {})


@PROFILE_CHEAP
@given(PII_TEXT)
def test_placeholders_survive_and_each_replacement_adds_one(text):
    # A placeholder is "<", capitals, ">": no detector matches "<" or ">", so none takes one apart.
    scrubbed, counts = scrub(text, PII_TYPES)
    for pii_type, placeholder in REGEX_PLACEHOLDERS.items():
        assert scrubbed.count(placeholder) == text.count(placeholder) + counts[pii_type], pii_type
    assert scrubbed.count("<NAME>") == text.count("<NAME>")  # a presidio type: regex leaves it as it is


@PROFILE_CHEAP
@given(st.one_of(PII_TEXT, odd_text(ANY_CHAR)).map(lambda text: re.sub(r"[\d@]", "", text)))
def test_text_without_digits_or_at_signs_loses_only_urls(text):
    # E-mails and handles need an "@"; phones, cards, SSNs and IPs need a digit. URLs need neither,
    # but every URL rule needs a "." or a ":" ("www.", "https://", "example.com/").
    hits = find_pii([text], PII_TYPES)[0]
    assert {pii_type for _, _, pii_type in hits} <= {"url"}
    if "." not in text and ":" not in text:
        assert scrub(text, PII_TYPES) == (text, {})


@PROFILE_CHEAP
@given(PII_TEXT, st.sampled_from(PII_TYPES))
def test_a_type_replaces_the_same_text_alone_as_with_all_types(text, pii_type):
    # The module's documented promise: what a type replaces does not depend on the other types chosen.
    alone = find_pii([text], [pii_type])[0]
    with_all = [hit for hit in find_pii([text], PII_TYPES)[0] if hit[2] == pii_type]
    assert alone == with_all
