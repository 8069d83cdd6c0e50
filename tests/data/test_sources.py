"""fetch: every source and both file shapes become the same canonical conversations."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import CHAT_FIELDS, CHAT_ROWS, write_chat_jsonl
from qlora_pipeline.data.sources import chitchat_path, fetch
from qlora_pipeline.errors import PipelineError

PAIR_ROWS = [
    {"uid": "d1", "dialogue": "A: lunch?\nB: sure, noon", "summary": "They agree to lunch at noon."},
    {"uid": "d2", "dialogue": "A: is the report done?\nB: tomorrow", "summary": "The report is due tomorrow."},
]
PAIR_FIELDS = {"data.shape": "pairs", "data.fields.prompt": "dialogue", "data.fields.response": "summary",
               "data.fields.id": "uid", "data.prompt_template": "Summarize this dialogue:\n{dialogue}"}


def write_rows(path: Path, rows: list[dict], fmt: str) -> Path:
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "csv":
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_chitchat_default_reads_the_whole_wheel(params_factory):
    result = fetch(params_factory().data)
    counts = result.manifest["counts"]
    assert (counts["conversations"], counts["messages"], counts["speakers"]) == (7168, 258145, 1315)
    assert result.manifest["version"] == "0.9.0"
    assert result.manifest["sha256"] == hashlib.sha256(chitchat_path().read_bytes()).hexdigest()
    first = result.conversations[0]
    assert set(first) == {"id", "messages", "meta"}
    assert set(first["messages"][0]) == {"speaker", "text", "time"}
    assert first["meta"]["prompt"]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_chat_log_groups_rows_into_conversations(fmt, tmp_path, params_factory):
    path = write_rows(tmp_path / f"chat.{fmt}", CHAT_ROWS, fmt)
    result = fetch(params_factory({"data.source": fmt, "data.path": str(path), **CHAT_FIELDS}).data)
    assert [c["id"] for c in result.conversations] == ["c1", "c2"]
    c1 = result.conversations[0]["messages"]
    assert [m["speaker"] for m in c1] == ["alice", "bob", "alice", "bob", "alice"]
    assert c1[1] == {"speaker": "bob", "text": "great, thanks! we hiked a lot", "time": "2020-01-01T10:00:05Z"}
    assert result.manifest["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert result.manifest["counts"] == {"conversations": 2, "messages": 9, "speakers": 3, "rows_rejected": {}}


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_pairs_become_user_assistant_conversations(fmt, tmp_path, params_factory):
    path = write_rows(tmp_path / f"pairs.{fmt}", PAIR_ROWS, fmt)
    result = fetch(params_factory({"data.source": fmt, "data.path": str(path), **PAIR_FIELDS}).data)
    conv = result.conversations[1]
    assert conv["id"] == "d2"
    assert conv["meta"] == {"persona": "assistant"}
    assert conv["messages"] == [
        {"speaker": "user", "text": "Summarize this dialogue:\nA: is the report done?\nB: tomorrow", "time": None},
        {"speaker": "assistant", "text": "The report is due tomorrow.", "time": None},
    ]


def chat(*turns) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


MESSAGE_ROWS = [
    chat(("system", "You are Sam."), ("user", "hey, back from the trip?"), ("assistant", "yes! the alps were great"),
         ("user", [{"type": "text", "text": "photos?"}, {"type": "text", "text": "pls"}]),
         ("assistant", "later tonight")),
    chat(("user", "coffee?"), ("assistant", "always")),
    chat(("user", "hi"), ("assistant", "hello"), ("tool", '{"weather": "sunny"}')),
    # each rejected whole, by its reason
    chat(("user", "hi"), ("assistant", None)),
    chat(("user", "hi"), ("narrator", "meanwhile")),
    chat(("user", [{"type": "image_url", "image_url": {"url": "x"}}]), ("assistant", "nice")),
    {"messages": [{"role": "user"}]},
    {"messages": "hi there"},
    {"messages": []},
    chat(("system", "only an instruction")),
]


def test_message_lists_become_conversations_between_the_roles(tmp_path, params_factory):
    """OpenAI's chat fine-tuning format: a row's messages, each {role, content} (it was a missing conversation_id)."""
    path = write_rows(tmp_path / "chats.jsonl", MESSAGE_ROWS, "jsonl")
    result = fetch(params_factory({"data.source": "jsonl", "data.path": str(path), "data.shape": "messages"}).data)
    assert [c["id"] for c in result.conversations] == ["row-1", "row-2", "row-3"]
    assert all(c["meta"] == {"persona": "assistant"} for c in result.conversations)
    assert [(m["speaker"], m["text"]) for m in result.conversations[0]["messages"]] == [
        ("user", "hey, back from the trip?"), ("assistant", "yes! the alps were great"), ("user", "photos?\npls"),
        ("assistant", "later tonight")]
    assert result.manifest["counts"]["rows_rejected"] == {
        "not_text_content": 2, "unknown_role": 1, "message_without_role_or_content": 1, "not_a_message_list": 1,
        "null_messages": 1, "no_user_or_assistant_message": 1}
    assert result.manifest["counts"]["messages_left_out"] == {"system": 1, "tool": 1}  # of rows kept
    # under the default shape, the file is told which shape reads it
    with pytest.raises(PipelineError, match=r"chats\.jsonl:1: missing field 'conversation_id' .*a column of \{role, "
                                            r"content\} lists \('messages'\) is read with data\.shape: messages"):
        fetch(params_factory({"data.source": "jsonl", "data.path": str(path)}).data)


@pytest.mark.parametrize("shape", ["chat_log", "pairs"])
def test_hf_source_loads_a_local_dataset_folder(shape, tmp_path, params_factory):
    folder = tmp_path / "hf_dataset"
    folder.mkdir()
    rows, fields = (CHAT_ROWS, CHAT_FIELDS) if shape == "chat_log" else (PAIR_ROWS, PAIR_FIELDS)
    write_rows(folder / "train.jsonl", rows, "jsonl")
    overrides = {"data.source": "hf", "data.hf.path": str(folder), "data.hf.split": "train", **fields}
    result = fetch(params_factory(overrides).data)
    assert result.manifest["source"] == "hf"
    assert [c["id"] for c in result.conversations] == (["c1", "c2"] if shape == "chat_log" else ["d1", "d2"])
    assert result.manifest["counts"]["messages"] == (9 if shape == "chat_log" else 4)
    assert len(result.manifest["sha256"]) == 64
    again = fetch(params_factory(overrides).data)
    assert again.manifest["sha256"] == result.manifest["sha256"]


def test_hf_missing_split_names_the_params(tmp_path, params_factory):
    folder = tmp_path / "hf_dataset"
    folder.mkdir()
    write_rows(folder / "train.jsonl", CHAT_ROWS, "jsonl")
    params = params_factory({"data.source": "hf", "data.hf.path": str(folder), "data.hf.split": "nope", **CHAT_FIELDS})
    with pytest.raises(PipelineError, match=r"data\.hf: load_dataset\(.*split='nope'"):
        fetch(params.data)


def test_null_values_are_counted_not_silently_dropped(tmp_path, params_factory):
    rows = CHAT_ROWS + [{"conv": "c2", "who": "alice", "msg": None, "ts": None}]
    path = write_rows(tmp_path / "chat.jsonl", rows, "jsonl")
    result = fetch(params_factory({"data.source": "jsonl", "data.path": str(path), **CHAT_FIELDS}).data)
    assert result.manifest["counts"]["rows_rejected"] == {"null_text": 1}
    assert result.manifest["counts"]["messages"] == 9


def test_values_that_are_no_text_are_counted_not_written_as_python_text(tmp_path, params_factory):
    """A JSON array, object or boolean became "['hi', 'there']", "{'a': 1}" or "True" in the messages, uncounted;
    a number is text enough (speaker ids often are)."""
    rows = CHAT_ROWS + [{"conv": "c2", "who": "alice", "msg": ["hi", "there"], "ts": None},
                        {"conv": "c2", "who": "alice", "msg": {"a": 1}, "ts": None},
                        {"conv": "c2", "who": True, "msg": "yes", "ts": None},
                        {"conv": ["c2"], "who": "bob", "msg": "no", "ts": None},
                        {"conv": "c2", "who": 7, "msg": 42, "ts": None}]
    path = write_rows(tmp_path / "chat.jsonl", rows, "jsonl")
    result = fetch(params_factory({"data.source": "jsonl", "data.path": str(path), **CHAT_FIELDS}).data)
    assert result.manifest["counts"]["rows_rejected"] == {"not_text_conversation_id": 1, "not_text_speaker": 1,
                                                          "not_text_text": 2}
    assert {"speaker": "7", "text": "42", "time": None} in next(c for c in result.conversations
                                                                if c["id"] == "c2")["messages"]
    rows = [{**r, "topic": "plans"} for r in PAIR_ROWS] + [{"uid": "d3", "dialogue": "A: hi", "summary": [1]},
                                                            {"uid": "d4", "dialogue": "A: hi", "summary": "Hi.",
                                                             "topic": ["greeting"]},
                                                            {"uid": "d5", "dialogue": "A: yo", "summary": "Yo.",
                                                             "topic": None}]
    fields = {**PAIR_FIELDS, "data.prompt_template": "{topic}: {dialogue}"}
    result = fetch(params_factory({"data.source": "jsonl", "data.path": str(write_rows(tmp_path / "pairs.jsonl", rows,
                                                                                       "jsonl")), **fields}).data)
    assert result.manifest["counts"]["rows_rejected"] == {"not_text_response": 1, "not_text_topic": 1}
    assert [c["messages"][0]["text"] for c in result.conversations][-1] == ": A: yo"  # a null fills in as empty


def test_a_binary_column_is_no_text(tmp_path, params_factory):
    """Parquet's binary values became "b'...'" in the messages."""
    path = write_rows(tmp_path / "pairs.parquet", [{**r, "summary": r["summary"].encode()} for r in PAIR_ROWS],
                      "parquet")
    with pytest.raises(PipelineError, match=r"\{'not_text_response': 2\}"):
        fetch(params_factory({"data.source": "parquet", "data.path": str(path), **PAIR_FIELDS}).data)


# ------------------------------------------------------------------------- bad input


def test_malformed_jsonl_line_names_file_and_line(tmp_path, params_factory):
    path = write_chat_jsonl(tmp_path / "chat.jsonl")
    path.write_text(path.read_text() + '{"conv": "c3", "who": \n')
    with pytest.raises(PipelineError, match=r"chat\.jsonl:10: malformed JSON .*one complete JSON object"):
        fetch(params_factory({"data.source": "jsonl", "data.path": str(path), **CHAT_FIELDS}).data)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_missing_mapped_field_names_key_and_fix(fmt, tmp_path, params_factory):
    path = write_rows(tmp_path / f"chat.{fmt}", CHAT_ROWS, fmt)
    overrides = {"data.source": fmt, "data.path": str(path), **CHAT_FIELDS, "data.fields.text": "body"}
    with pytest.raises(PipelineError) as err:
        fetch(params_factory(overrides).data)
    message = str(err.value)
    assert "missing field 'body' (mapped by data.fields.text)" in message
    assert f"chat.{fmt}" in message and "fields found: conv, who, msg, ts" in message


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_undecodable_byte_names_line(fmt, tmp_path, params_factory):
    path = write_rows(tmp_path / f"chat.{fmt}", CHAT_ROWS, fmt)
    data = path.read_bytes().replace(b"zermatt", b"zerm\xe4tt")
    path.write_bytes(data)
    line = data[: data.index(b"\xe4")].count(b"\n") + 1
    with pytest.raises(PipelineError, match=rf"chat\.{fmt}:{line}: .*not valid UTF-8; re-encode the file as UTF-8"):
        fetch(params_factory({"data.source": fmt, "data.path": str(path), **CHAT_FIELDS}).data)


@pytest.mark.parametrize("source, fmt", [("jsonl", "zip"), ("csv", "gz"), ("telegram", "zip"), ("discord", "zip"),
                                         ("whatsapp", "gz")])
def test_a_compressed_download_is_named_as_one(source, fmt, tmp_path, params_factory):
    """A zipped Telegram export was called "byte 0xb9 is not valid UTF-8; ... re-encode the file as UTF-8"."""
    import gzip
    import zipfile

    path = tmp_path / f"export.{fmt}"
    if fmt == "zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("result.json", '{"name": "a chat", "messages": []}' * 50)
    else:
        path.write_bytes(gzip.compress(b'{"conv": "c1", "who": "a", "msg": "hi"}\n' * 50))
    with pytest.raises(PipelineError, match=rf"export\.{fmt}: a (zip archive|gzip file), not a text file; extract it "
                                            "and point data.path at the file inside"):
        fetch(params_factory({"data.source": source, "data.path": str(path), **CHAT_FIELDS}).data)


def test_json_infinity_where_text_belongs_is_rejected_not_read_as_inf(tmp_path, params_factory):
    path = tmp_path / "chat.jsonl"
    path.write_text('{"conv": "c1", "who": "a", "msg": Infinity, "ts": "t"}\n'
                    '{"conv": "c1", "who": "b", "msg": "hi", "ts": "t"}\n', encoding="utf-8")
    result = fetch(params_factory({"data.source": "jsonl", "data.path": str(path), **CHAT_FIELDS}).data)
    assert [m["text"] for m in result.conversations[0]["messages"]] == ["hi"]
    assert result.manifest["counts"]["rows_rejected"] == {"not_text_text": 1}


def test_a_json_array_is_told_what_json_lines_holds(tmp_path, params_factory):
    path = tmp_path / "chat.jsonl"
    path.write_text('[{"conv": "c1", "who": "a", "msg": "hi"}]\n', encoding="utf-8")
    with pytest.raises(PipelineError, match=r"chat\.jsonl:1: expected a JSON object, got list; JSON Lines holds one "
                                            r"object \(one row\) on each line, not one array of them"):
        fetch(params_factory({"data.source": "jsonl", "data.path": str(path), **CHAT_FIELDS}).data)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_empty_file_is_refused(fmt, tmp_path, params_factory):
    path = tmp_path / f"chat.{fmt}"
    path.write_bytes(b"")
    with pytest.raises(PipelineError, match=rf"chat\.{fmt}: file is empty"):
        fetch(params_factory({"data.source": fmt, "data.path": str(path), **CHAT_FIELDS}).data)


def test_missing_file_names_the_key_the_folder_and_the_fix(tmp_path, params_factory, monkeypatch):
    """As a queued experiment's copy of the repository lacks a file never git added or dvc added."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError) as raised:
        fetch(params_factory({"data.source": "jsonl", "data.path": "data/source/chat.jsonl"}).data)
    assert str(raised.value).startswith(f"data.path: data/source/chat.jsonl is not a file in {tmp_path.resolve()};")
    assert "`git add data/source/chat.jsonl`" in str(raised.value)
    assert "`dvc add data/source/chat.jsonl`" in str(raised.value)


def test_the_default_folder_is_refused_for_a_file_source(tmp_path, params_factory, monkeypatch):
    """params.yaml's data.path is the folder for your files, not a file: a file source needs one named."""
    (tmp_path / "data/source").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError, match=r"^data\.path: data/source is a folder; .* e\.g\. data/source/chat\.csv$"):
        fetch(params_factory({"data.source": "csv"}).data)


def test_template_field_missing_from_row(tmp_path, params_factory):
    path = write_rows(tmp_path / "pairs.jsonl", PAIR_ROWS, "jsonl")
    overrides = {"data.source": "jsonl", "data.path": str(path), **PAIR_FIELDS,
                 "data.prompt_template": "{topic}: {dialogue}"}
    with pytest.raises(PipelineError, match=r"pairs\.jsonl:1: data\.prompt_template uses \{topic\}"):
        fetch(params_factory(overrides).data)


def test_pairs_ids_must_be_unique_and_null_ids_are_counted(tmp_path, params_factory):
    rows = PAIR_ROWS + [{"uid": None, "dialogue": "A: hi", "summary": "A greets."}]
    path = write_rows(tmp_path / "pairs.jsonl", rows, "jsonl")
    result = fetch(params_factory({"data.source": "jsonl", "data.path": str(path), **PAIR_FIELDS}).data)
    assert result.manifest["counts"]["rows_rejected"] == {"null_id": 1}
    path = write_rows(tmp_path / "dup.jsonl", PAIR_ROWS + [PAIR_ROWS[0]], "jsonl")
    with pytest.raises(PipelineError, match=r"dup\.jsonl:3: id 'd1' \(data\.fields\.id\) already used"):
        fetch(params_factory({"data.source": "jsonl", "data.path": str(path), **PAIR_FIELDS}).data)


def test_hub_dataset_needs_a_pinned_revision(params_factory):
    params = params_factory({"data.source": "hf", "data.hf.path": "someone/chats", **CHAT_FIELDS})
    with pytest.raises(PipelineError, match=r"data\.hf\.revision: hub data set someone/chats needs a pinned revision"
                                            r".*; if data\.hf\.path names a folder here, there is none: someone/chats "
                                            r"does not exist"):  # a local folder's typo was told to pin a revision
        fetch(params.data)


# --------------------------------------------------------- BOM, CRLF and blank lines

BOM = b"\xef\xbb\xbf"


def jsonl_lines(rows: list[dict]) -> list[bytes]:
    return [json.dumps(r).encode() for r in rows]


def csv_lines(rows: list[dict]) -> list[bytes]:
    """One CSV line per row (the rows here hold no line breaks), header first."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return [line.encode() for line in text.getvalue().splitlines()]


# How editors save a file: each variant joins the lines differently, the rows stay the same.
LAYOUTS = {
    "bom_crlf": lambda lines: BOM + b"".join(line + b"\r\n" for line in lines),
    "crlf_blank_lines": lambda lines: b"\r\n" + b"\r\n\r\n".join(lines) + b"\r\n\r\n",
    "no_final_newline": lambda lines: b"\n".join(lines),
    "lone_trailing_cr": lambda lines: b"\r\n".join(lines) + b"\r",
    "bom_blank_first_line": lambda lines: BOM + b"\r\n" + b"\r\n".join(lines),
}


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_windows_files_read_as_the_text_they_hold(fmt, layout, tmp_path, params_factory):
    lines = jsonl_lines(CHAT_ROWS) if fmt == "jsonl" else csv_lines(CHAT_ROWS)
    path = tmp_path / f"chat.{fmt}"
    path.write_bytes(LAYOUTS[layout](lines))
    result = fetch(params_factory({"data.source": fmt, "data.path": str(path), **CHAT_FIELDS}).data)
    read = [dict(m) for c in result.conversations for m in c["messages"]]
    assert read == [{"speaker": r["who"], "text": r["msg"], "time": r["ts"]} for r in CHAT_ROWS]
    assert [c["id"] for c in result.conversations] == ["c1", "c2"]
    assert result.manifest["counts"]["rows_rejected"] == {}


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_malformed_line_after_bom_and_crlf_blank_lines_names_its_line(fmt, tmp_path, params_factory):
    # Line 1: BOM + blank; 2-3: rows; 4: blank; 5: the bad line (json cut short / an unclosed quote).
    if fmt == "jsonl":
        head, rows, bad = b"", jsonl_lines(CHAT_ROWS[:2]), b'{"conv": "c1", "who": '
    else:
        head, *rows = csv_lines(CHAT_ROWS[:2])
        head, rows, bad = head + b"\r\n", rows, b'c1,bob,"never closed,2020\r\nc1,bob,fine,2020'
    path = tmp_path / f"chat.{fmt}"
    path.write_bytes(BOM + head + b"\r\n" + rows[0] + b"\r\n" + rows[1] + b"\r\n\r\n" + bad + b"\r\n")
    line = 5 + (fmt == "csv")  # the CSV header takes a line of its own
    with pytest.raises(PipelineError, match=rf"^{re.escape(str(path))}:{line}: (malformed JSON|not valid CSV)"):
        fetch(params_factory({"data.source": fmt, "data.path": str(path), **CHAT_FIELDS}).data)


def test_csv_line_breaks_inside_quoted_cells_are_text_and_lines(tmp_path, params_factory):
    path = tmp_path / "chat.csv"
    path.write_bytes(BOM + b"conv,who,msg,ts\r\n"
                     b'c1,alice,"two\r\nlines",t1\r\n'
                     b'c1,bob,"three\r\nlong\r\nlines",t2\r\n'
                     b'c1,alice,"a lone\rCR",t3\r\n'  # in a quoted cell a CR alone is text, not a line end
                     b"c1,bob,,\r\n"  # line 8: no text -> counted as empty text, not null
                     b"c1,alice\r\n")  # line 9: the row stops early -> text is missing -> counted
    result = fetch(params_factory({"data.source": "csv", "data.path": str(path), **CHAT_FIELDS}).data)
    texts = [m["text"] for m in result.conversations[0]["messages"]]
    assert texts == ["two\r\nlines", "three\r\nlong\r\nlines", "a lone\rCR", ""]
    assert result.manifest["counts"]["rows_rejected"] == {"null_text": 1}
    path.write_bytes(path.read_bytes() + b"c1,bob,hi,t3,surplus\r\n")
    with pytest.raises(PipelineError, match=rf"^{re.escape(str(path))}:10: more cells than header columns"):
        fetch(params_factory({"data.source": "csv", "data.path": str(path), **CHAT_FIELDS}).data)


@pytest.mark.parametrize("sep", [";", "\t"])
def test_a_csv_separated_by_semicolons_or_tabs_is_read_as_a_spreadsheet_wrote_it(sep, tmp_path, params_factory):
    """A spreadsheet saved in a European locale separates by ";": it was told to quote its commas."""
    path = tmp_path / "chat.csv"
    path.write_text(sep.join(["conv", "who", "msg", "ts"]) + "\n" + f"c1{sep}alice{sep}hallo, wie gehts{sep}t1\n"
                    f'c1{sep}bob{sep}"gut; danke"{sep}t2\n', encoding="utf-8")
    result = fetch(params_factory({"data.source": "csv", "data.path": str(path), **CHAT_FIELDS}).data)
    assert [(m["speaker"], m["text"]) for m in result.conversations[0]["messages"]] == [
        ("alice", "hallo, wie gehts"), ("bob", "gut; danke")]
    path.write_text(path.read_text() + f"c1{sep}alice{sep}a{sep}t3{sep}surplus\n", encoding="utf-8")
    name = {";": "semicolons", "\t": "tabs"}[sep]
    with pytest.raises(PipelineError, match=rf":4: more cells than header columns; quote fields that contain {name}"):
        fetch(params_factory({"data.source": "csv", "data.path": str(path), **CHAT_FIELDS}).data)


def test_the_separator_is_read_from_the_header_as_csv_reads_it(tmp_path, params_factory):
    """Semicolons inside a quoted header cell of a comma file, and a blank first line, chose the wrong separator."""
    from qlora_pipeline.data.csv_records import separator_of

    assert separator_of('"a;b;c",text,x\n1,2,3\n') == ","
    assert separator_of("\nconv;who;msg\n") == ";"
    assert separator_of("conv\thas, a comma\twho\n") == "\t"


def test_text_that_starts_like_an_archives_name_is_text(tmp_path, params_factory):
    from qlora_pipeline.io import refuse_archive

    refuse_archive(b"BZh, said Bob\n", "chat.jsonl")  # bzip2's first three bytes, as text: no archive
    with pytest.raises(PipelineError, match="a bzip2 file"):
        refuse_archive(b"BZh91AY&SY\x00\x01", "chat.jsonl")


def test_a_csv_header_naming_a_column_twice_is_refused(tmp_path, params_factory):
    """The last 'msg' column won, silently."""
    path = tmp_path / "chat.csv"
    path.write_text("conv,who,msg,ts,msg\nc1,alice,hi,t1,bye\n")
    with pytest.raises(PipelineError, match=rf"^{re.escape(str(path))}:1: the header names 'msg' more than once; "
                                            r"give each column its own name$"):
        fetch(params_factory({"data.source": "csv", "data.path": str(path), **CHAT_FIELDS}).data)
    path.write_text("conv,who,msg,ts,,\nc1,alice,hi,t1,,\nc1,bob,yo,t2,,\n")  # a spreadsheet's empty columns
    result = fetch(params_factory({"data.source": "csv", "data.path": str(path), **CHAT_FIELDS}).data)
    assert [m["text"] for m in result.conversations[0]["messages"]] == ["hi", "yo"]


def test_csv_unquoted_lone_cr_is_refused_not_split_into_rows(tmp_path, params_factory):
    # Splitting at the CR would make "hi" a message and "there,t1" a row of its own.
    path = tmp_path / "chat.csv"
    path.write_bytes(b"conv,who,msg,ts\r\nc1,alice,hello,t0\r\nc1,bob,hi\rthere,t1\r\n")
    with pytest.raises(PipelineError, match=rf"^{re.escape(str(path))}:3: not valid CSV \(new-line character "
                                            r"seen in unquoted field\); end lines with LF or CRLF"):
        fetch(params_factory({"data.source": "csv", "data.path": str(path), **CHAT_FIELDS}).data)


def test_csv_unclosed_quote_names_where_its_record_starts(tmp_path, params_factory):
    # A lenient reader would read every later row into the one open cell, and count nothing.
    path = tmp_path / "chat.csv"
    path.write_bytes(b"conv,who,msg,ts\nc1,alice,hi,t1\nc1,bob,\"oops,t2\nc1,alice,bye,t3\nc1,bob,ok,t4\n")
    with pytest.raises(PipelineError, match=rf"^{re.escape(str(path))}:3: not valid CSV \(unexpected end of data\)"):
        fetch(params_factory({"data.source": "csv", "data.path": str(path), **CHAT_FIELDS}).data)


def test_csv_cell_over_the_csv_modules_default_limit_is_read_like_a_long_jsonl_line(tmp_path, params_factory):
    # A valid file: it was called "not valid CSV (field larger than field limit)". clean's max_chars drops
    # such a message, counted, as it does one from a JSONL line.
    long_text = "x" * (128 * 1024 + 1)  # the csv module's default cap on a cell
    path = tmp_path / "chat.csv"
    path.write_text(f"conv,who,msg,ts\nc1,alice,hi,t1\nc1,bob,{long_text},t2\n")
    result = fetch(params_factory({"data.source": "csv", "data.path": str(path), **CHAT_FIELDS}).data)
    assert [m["text"] for m in result.conversations[0]["messages"]] == ["hi", long_text]


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_undecodable_byte_after_bom_names_its_line_and_byte(fmt, tmp_path, params_factory):
    lines = jsonl_lines(CHAT_ROWS) if fmt == "jsonl" else csv_lines(CHAT_ROWS)
    data = BOM + b"\r\n".join(lines).replace(b"zermatt", b"zerm\xe4tt")
    line = data[: data.index(b"\xe4")].count(b"\n") + 1
    path = tmp_path / f"chat.{fmt}"
    path.write_bytes(data)
    byte = "0xe4" if fmt == "csv" else str(data.split(b"\n")[line - 1].index(b"\xe4"))
    with pytest.raises(PipelineError, match=rf"^{re.escape(str(path))}:{line}: byte {byte} is not valid UTF-8"):
        fetch(params_factory({"data.source": fmt, "data.path": str(path), **CHAT_FIELDS}).data)


JSON_LINES_PYTHON_REFUSES = {
    "huge_integer": ('{"conv": "c1", "who": "bob", "msg": "hi", "ts": ' + "9" * 5000 + "}",
                     r"a number has more than \d+ digits"),
    "deep_nesting": ('{"conv": "c1", "who": "bob", "msg": "hi", "ts": ' + "[" * 100_000 + "]" * 100_000 + "}",
                     "JSON nested too deeply"),
    "lone_surrogate": ('{"conv": "c1", "who": "bob", "msg": "half an emoji \\ud83d", "ts": null}',
                       r"a \\u escape encodes half of a UTF-16 surrogate pair"),
}


@pytest.mark.parametrize("case", list(JSON_LINES_PYTHON_REFUSES))
def test_json_lines_python_cannot_hold_name_their_line(case, tmp_path, params_factory):
    bad, message = JSON_LINES_PYTHON_REFUSES[case]
    path = write_chat_jsonl(tmp_path / "chat.jsonl")
    path.write_text(path.read_text() + bad + "\n")
    with pytest.raises(PipelineError, match=rf"^{re.escape(str(path))}:10: {message}"):
        fetch(params_factory({"data.source": "jsonl", "data.path": str(path), **CHAT_FIELDS}).data)


def test_escaped_surrogate_pair_is_one_character(tmp_path, params_factory):
    path = write_chat_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS[:2])
    path.write_text(path.read_text() + '{"conv": "c1", "who": "alice", "msg": "\\ud83d\\ude00", "ts": null}\n')
    result = fetch(params_factory({"data.source": "jsonl", "data.path": str(path), **CHAT_FIELDS}).data)
    assert result.conversations[0]["messages"][-1]["text"] == "\U0001F600"
