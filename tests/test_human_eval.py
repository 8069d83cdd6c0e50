"""Blind A/B human evaluation: side assignment, persona examples, blinding, escaping, scoring and its errors."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import re
from pathlib import Path

import pytest
from markupsafe import escape

from qlora_pipeline.human_eval.formats import CHOICES, RATINGS_COLUMNS
from qlora_pipeline.human_eval.score import RatingsError, score_ratings
from qlora_pipeline.human_eval.sheet import assign_sides, pick_persona_examples, render_sheet, write_sheet

# Texts deliberately free of the words "base" and "tuned", so any occurrence in the page
# would have to come from the sheet leaking the side assignment.
NEUTRAL_SAMPLES = [
    {
        "id": f"conv-{i:03d}",
        "context": [
            {"role": "system", "content": "You are Sam, chatting with a friend."},
            {"role": "user", "content": f"hey, how was the trip #{i}?"},
            {"role": "assistant", "content": "pretty good! tired though"},
            {"role": "user", "content": "haha same. what did you eat?"},
        ],
        "reference": f"ramen every night lol ({i})",
        "base": f"I had a variety of local dishes, including ramen. ({i}) [first system]",
        "tuned": f"ramen. so much ramen ({i}) [second system]",
    }
    for i in range(20)
]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _embedded_json(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="sheet-data">(.*?)</script>', page, re.S)
    assert m, "embedded sheet data not found"
    return json.loads(m.group(1))


# ---------------------------------------------------------------------------------------------
# assign_sides
# ---------------------------------------------------------------------------------------------


def test_assign_sides_is_deterministic_per_seed_and_uses_both_orders():
    ids = [f"id-{i}" for i in range(20)]
    first = assign_sides(ids, seed=123)
    assert first == assign_sides(ids, seed=123)
    assert [row["id"] for row in first] == ids
    for row in first:
        assert {row["A"], row["B"]} == {"base", "tuned"}
    orders = {(row["A"], row["B"]) for row in first}
    assert orders == {("base", "tuned"), ("tuned", "base")}
    # A different seed gives a different assignment (for 20 items a collision is ~1e-6).
    assert [r["A"] for r in assign_sides(ids, seed=124)] != [r["A"] for r in first]


def test_assign_sides_does_not_touch_global_random_state():
    import random

    random.seed(7)
    expected = random.random()
    random.seed(7)
    assign_sides(["a", "b", "c"], seed=1)
    assert random.random() == expected


def test_assign_sides_rejects_duplicate_ids():
    with pytest.raises(ValueError, match="duplicate id 'x'"):
        assign_sides(["x", "y", "x"], seed=0)


# ---------------------------------------------------------------------------------------------
# render_sheet: blinding and content
# ---------------------------------------------------------------------------------------------


def test_sheet_never_names_the_systems():
    key = assign_sides([s["id"] for s in NEUTRAL_SAMPLES], seed=5)
    page = render_sheet(NEUTRAL_SAMPLES, key, title="Trip chat eval")
    # Neither system name appears anywhere: not in text, ids, classes, data-*, JSON or script.
    assert re.search(r"base", page, re.I) is None
    assert re.search(r"tune", page, re.I) is None
    assert '"tuned"' not in page and '"base"' not in page
    # The embedded JSON holds only ids and a fingerprint; no seed, no sides.
    data = _embedded_json(page)
    assert set(data) == {"sheet", "ids"}
    assert data["ids"] == [s["id"] for s in NEUTRAL_SAMPLES]
    assert re.fullmatch(r"[0-9a-f]{20}", data["sheet"])  # a content hash, not the seed
    # The fingerprint does not depend on the seed except through what the page shows:
    # the same visible content gives the same storage key.
    same = render_sheet(NEUTRAL_SAMPLES, key, title="Trip chat eval")
    assert _embedded_json(same)["sheet"] == data["sheet"]


def test_sheet_shows_replies_per_key_and_hides_reference_by_default():
    samples = NEUTRAL_SAMPLES[:6]
    key = assign_sides([s["id"] for s in samples], seed=11)
    page = render_sheet(samples, key, title="t")
    for i, (sample, sides) in enumerate(zip(samples, key)):
        block = page.split(f'id="item-{i}"')[1].split("</article>")[0]
        text_a = str(escape(sample[sides["A"]]))
        text_b = str(escape(sample[sides["B"]]))
        assert block.index("Reply A") < block.index(text_a) < block.index("Reply B") < block.index(text_b)
        # A "loops or breaks" tick under each reply, after its text and before the next reply.
        mark_a, mark_b = block.index(f'id="broken-{i}-A"'), block.index(f'id="broken-{i}-B"')
        assert block.index(text_a) < mark_a < block.index("Reply B") < block.index(text_b) < mark_b
        assert re.findall(r'type="checkbox" class="broken" id="broken-\d+-(\w)" value="(\w)"', block) == [
            ("A", "A"), ("B", "B")]
        # Context rendered as a transcript, every message present.
        for msg in sample["context"]:
            assert str(escape(msg["content"])) in block
        # Reference only inside a closed <details> toggle.
        ref = str(escape(sample["reference"]))
        details = re.search(r"<details class=\"reference\">(.*?)</details>", block, re.S)
        assert details and ref in details.group(1)
        assert "<details class=\"reference\" open" not in block
        assert block.count(ref) == 1
        # Three radio choices, one group per item.
        values = re.findall(rf'name="choice-{i}" value="([^"]+)"', block)
        assert values == list(CHOICES)
    assert "Rated 0 of 6" in page
    assert "Download ratings (CSV)" in page
    assert "ratings.csv" in page and "localStorage" in page
    # The script writes the header the scorer reads.
    columns = re.search(r"var columns = (\[[^\]]*\]);", page)
    assert columns and json.loads(columns.group(1)) == list(RATINGS_COLUMNS)


def test_sheet_is_self_contained():
    key = assign_sides([s["id"] for s in NEUTRAL_SAMPLES[:3]], seed=1)
    page = render_sheet(NEUTRAL_SAMPLES[:3], key, title="t")
    assert re.search(r"<(script|link|img|iframe)[^>]*\s(src|href)=", page, re.I) is None
    assert "http://" not in page and "https://" not in page
    assert "@import" not in page and "url(" not in page


def test_sheet_escapes_hostile_text():
    evil = "</script><script>alert(1)</script><b>bold</b> & \"quotes\" 'single'"
    samples = [
        {
            "id": "x</script><script>alert(2)</script>",
            "context": [{"role": "user", "content": "<img src=x onerror=alert(3)>" + evil}],
            "reference": evil,
            "base": evil,
            "tuned": "<b>not bold</b>\u2028line sep",
        }
    ]
    key = assign_sides([samples[0]["id"]], seed=0)
    page = render_sheet(samples, key, title="<i>title</i></title><script>alert(4)</script>")
    # Exactly two <script> elements (the JSON data block and the code), none injected.
    assert page.count("<script") == 2
    assert page.count("</script>") == 2
    assert "<b>" not in page and "<img" not in page and "<i>" not in page
    assert "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;&lt;b&gt;bold&lt;/b&gt;" in page
    assert "&lt;b&gt;not bold&lt;/b&gt;" in page
    assert "&lt;i&gt;title&lt;/i&gt;&lt;/title&gt;" in page
    # The embedded JSON has no raw '<' at all, and still round-trips the id exactly.
    raw_json = re.search(r'id="sheet-data">(.*?)</script>', page, re.S).group(1)
    assert "<" not in raw_json and ">" not in raw_json
    assert json.loads(raw_json)["ids"] == [samples[0]["id"]]
    # Attribute values are quoted-escaped too.
    assert 'data-sample-id="x&lt;/script&gt;&lt;script&gt;alert(2)&lt;/script&gt;"' in page


def test_render_sheet_validates_inputs():
    sample = dict(NEUTRAL_SAMPLES[0])
    with pytest.raises(ValueError, match="no entry for 1 sample id"):
        render_sheet([sample], [], title="t")
    with pytest.raises(ValueError, match="must be 'base' and 'tuned'"):
        render_sheet([sample], [{"id": sample["id"], "A": "base", "B": "base"}], title="t")
    bad = {k: v for k, v in sample.items() if k != "tuned"}
    with pytest.raises(ValueError, match="missing field"):
        render_sheet([bad], assign_sides([sample["id"]], 0), title="t")


def test_write_sheet_writes_html_and_key_atomically(tmp_path):
    samples = NEUTRAL_SAMPLES[:8]
    html_path = tmp_path / "out" / "sheet.html"
    key_path = tmp_path / "private" / "key.csv"
    key = write_sheet(samples, 42, html_path, key_path, title="My eval")
    assert key == assign_sides([s["id"] for s in samples], 42)
    page = html_path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<title>My eval</title>" in page
    with key_path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["id", "A", "B"]
    assert rows[1:] == [[r["id"], r["A"], r["B"]] for r in key]
    # No temp files left behind.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["sheet.html"]
    assert sorted(p.name for p in (tmp_path / "private").iterdir()) == ["key.csv"]
    # Same seed, same files.
    write_sheet(samples, 42, tmp_path / "again.html", tmp_path / "again.csv", title="My eval")
    assert (tmp_path / "again.html").read_text(encoding="utf-8") == page
    assert (tmp_path / "again.csv").read_bytes() == key_path.read_bytes()


def test_write_sheet_refuses_same_path_for_html_and_key(tmp_path):
    with pytest.raises(ValueError, match="same file"):
        write_sheet(NEUTRAL_SAMPLES[:2], 0, tmp_path / "x", tmp_path / "x")


# ---------------------------------------------------------------------------------------------
# The persona's own replies atop the sheet
# ---------------------------------------------------------------------------------------------


def _train_row(number: int, target: str, said: str | None = None) -> dict:
    return {"id": f"train-{number}", "target": target, "messages": [
        {"role": "system", "content": "You are Sam."},
        {"role": "user", "content": f"earlier {number}"},
        {"role": "assistant", "content": f"my earlier line {number}"},
        {"role": "user", "content": said if said is not None else f"question {number}?"},
    ]}


MODERATE_ROWS = [_train_row(i, f"moderate reply number {i}") for i in range(30)]
ODD_ROWS = [_train_row(100, ""), _train_row(101, "k"), _train_row(102, "   "), _train_row(103, "ok"),
            _train_row(104, "x" * 300)]


def test_pick_persona_examples_is_seeded_and_prefers_moderate_replies():
    rows = ODD_ROWS[:2] + MODERATE_ROWS + ODD_ROWS[2:]
    picks = pick_persona_examples(rows, 5, seed=3)
    assert picks == pick_persona_examples(rows, 5, seed=3)
    assert len(picks) == 5 and len({p["reply"] for p in picks}) == 5
    # Moderate replies exist in plenty, so no short or long one is picked.
    assert all(p["reply"].startswith("moderate reply number ") for p in picks)
    # Each reply comes with the message it answered: the last one before it, not the system prompt.
    for pick in picks:
        number = pick["reply"].rsplit(" ", 1)[1]
        assert pick["context"] == f"question {number}?"
    # Another seed, other picks (5 of 30 in the same order again: about 1 in 17 million).
    assert [p["reply"] for p in pick_persona_examples(rows, 5, seed=4)] != [p["reply"] for p in picks]


def test_pick_persona_examples_fills_in_only_when_too_few_and_never_with_empty_replies():
    rows = MODERATE_ROWS[:3] + ODD_ROWS + [_train_row(200, MODERATE_ROWS[0]["target"], said="again")]
    picks = pick_persona_examples(rows, 10, seed=0)
    replies = [p["reply"] for p in picks]
    # The three moderate ones first; then the two-character and the long reply. The empty,
    # blank and one-character replies never appear, and a repeated reply appears once.
    assert sorted(replies[:3]) == sorted(r["target"] for r in MODERATE_ROWS[:3])
    assert sorted(replies[3:]) == sorted(["ok", "x" * 300])
    assert pick_persona_examples(rows, 0, seed=0) == []
    assert pick_persona_examples([], 4, seed=0) == []


def test_pick_persona_examples_context_and_bad_rows():
    only_system = {"id": "s", "target": "hello there friend", "messages": [{"role": "system", "content": "x"}]}
    assert pick_persona_examples([only_system], 1, seed=0) == [{"context": "", "reply": "hello there friend"}]
    with pytest.raises(ValueError, match=r"train row 2 \(id 'bad'\): expected 'messages'.*Fix:"):
        pick_persona_examples([MODERATE_ROWS[0], {"id": "bad", "messages": []}], 1, seed=0)
    with pytest.raises(ValueError, match="count must be an integer >= 0"):
        pick_persona_examples(MODERATE_ROWS, -1, seed=0)


PERSONA_EXAMPLES = [
    {"context": "mail me at <EMAIL>", "reply": "</script><script>alert(5)</script> lol"},
    {"context": "", "reply": "sure thing, <PERSON>!"},
]


def _persona_section(page: str) -> str | None:
    found = re.search(r'<details class="persona" id="persona-examples" open>(.*?)</details>', page, re.S)
    return found.group(1) if found else None


def test_sheet_shows_persona_examples_escaped_above_the_items(tmp_path):
    samples = NEUTRAL_SAMPLES[:2]
    write_sheet(samples, 1, tmp_path / "s.html", tmp_path / "k.csv", title="t", persona_examples=PERSONA_EXAMPLES)
    page = (tmp_path / "s.html").read_text(encoding="utf-8")
    section = _persona_section(page)
    assert section is not None
    assert "How this person talks: 2 real replies from the training chats" in section
    first, second = (section.index(text) for text in (
        "mail me at &lt;EMAIL&gt;", "&lt;/script&gt;&lt;script&gt;alert(5)&lt;/script&gt; lol"))
    assert first < second < section.index("(start of the chat)") < section.index("sure thing, &lt;PERSON&gt;!")
    assert page.count("<script") == 2 and "<EMAIL>" not in page
    assert page.index('id="persona-examples"') < page.index('id="item-0"')
    # The examples are no item: the storage key and the rated ids stay those of the samples.
    plain = render_sheet(samples, assign_sides([s["id"] for s in samples], 1), title="t")
    assert _embedded_json(page) == _embedded_json(plain)


def test_sheet_without_persona_examples_has_no_section():
    key = assign_sides([NEUTRAL_SAMPLES[0]["id"]], 0)
    assert "persona-examples" not in render_sheet(NEUTRAL_SAMPLES[:1], key, title="t")
    assert "How this person talks" not in render_sheet(NEUTRAL_SAMPLES[:1], key, title="t", persona_examples=[])
    one = render_sheet(NEUTRAL_SAMPLES[:1], key, title="t", persona_examples=PERSONA_EXAMPLES[1:])
    assert "How this person talks: 1 real reply from the training chats" in one
    with pytest.raises(ValueError, match=r"persona example #0.*pick_persona_examples"):
        render_sheet(NEUTRAL_SAMPLES[:1], key, title="t", persona_examples=[{"reply": "no context"}])


# ---------------------------------------------------------------------------------------------
# score_ratings
# ---------------------------------------------------------------------------------------------

KEY_CSV = """id,A,B
q1,tuned,base
q2,base,tuned
q3,tuned,base
q4,base,tuned
q5,tuned,base
q6,base,tuned
q7,tuned,base
q8,base,tuned
"""


def _wilson_reference(successes: float, n: int, z: float) -> tuple[float, float]:
    # Textbook form: (p + z^2/2n +- z*sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)
    p = successes / n
    lo = (p + z * z / (2 * n) - z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n)
    hi = (p + z * z / (2 * n) + z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n)
    return lo, hi


def test_score_ratings_counts_and_wilson_interval(tmp_path):
    key = _write(tmp_path / "key.csv", KEY_CSV)
    ratings = _write(
        tmp_path / "ratings.csv",
        "id,choice,comment\r\n"
        "q1,A,sounds like him\r\n"   # A=tuned -> tuned win
        "q2,A,\r\n"                  # A=base  -> base win
        "q3,tie,\"meh, both ok\"\r\n"  # tie
        "q4,B,\r\n"                  # B=tuned -> tuned win
        "q5,B,\"too \"\"formal\"\"\"\r\n"  # B=base -> base win
        "q6,b,lower-case ok\r\n"     # B=tuned -> tuned win
        "q7,,\r\n"                   # unrated -> skipped
        "q8, Tie ,\r\n",             # tie (spaces/case tolerated)
    )
    result = score_ratings(ratings, key)
    assert result["tuned_wins"] == 3
    assert result["base_wins"] == 2
    assert result["ties"] == 2
    assert result["n_rated"] == 7
    assert result["n_skipped"] == 1
    assert result["n_missing"] == 0
    assert result["confidence"] == 0.95
    assert result["tuned_win_rate"] == pytest.approx((3 + 1) / 7)
    lo, hi = _wilson_reference(4.0, 7, 1.959963984540054)
    assert result["ci_low"] == pytest.approx(lo, abs=1e-9)
    assert result["ci_high"] == pytest.approx(hi, abs=1e-9)
    assert 0.0 <= result["ci_low"] < result["tuned_win_rate"] < result["ci_high"] <= 1.0

    narrower = score_ratings(ratings, key, confidence=0.80)
    lo80, hi80 = _wilson_reference(4.0, 7, 1.2815515655446004)
    assert narrower["ci_low"] == pytest.approx(lo80, abs=1e-9)
    assert narrower["ci_high"] == pytest.approx(hi80, abs=1e-9)
    assert narrower["confidence"] == 0.80
    # A file without the "loops or breaks" columns (a sheet from before them): unknown, not zero.
    assert result["broken"] is None


def test_score_ratings_extreme_rates_and_missing_rows(tmp_path):
    key = _write(tmp_path / "key.csv", KEY_CSV)
    # Rows in any order, extra columns ignored, UTF-8 BOM tolerated, some key ids absent.
    ratings = _write(tmp_path / "r.csv", "\ufeffrater,choice,id\nann,B,q2\nann,A,q1\n")
    result = score_ratings(ratings, key)
    assert (result["tuned_wins"], result["base_wins"], result["ties"]) == (2, 0, 0)
    assert result["tuned_win_rate"] == 1.0
    assert result["n_missing"] == 6
    lo, hi = _wilson_reference(2.0, 2, 1.959963984540054)
    assert result["ci_low"] == pytest.approx(lo) and result["ci_high"] == pytest.approx(1.0)


def test_score_ratings_broken_rate_per_system_through_the_key(tmp_path):
    key = _write(tmp_path / "key.csv", KEY_CSV)
    # Ticks by side: A 3, B 2. Through the key: tuned 4, base 1 (so counting by side would fail).
    ratings = _write(
        tmp_path / "ratings.csv",
        "id,choice,a_broken,b_broken,comment\r\n"
        "q1,A,1,0,\r\n"    # A=tuned broken
        "q2,tie,1,0,\r\n"  # A=base broken
        "q3,B,1,0,\r\n"    # A=tuned broken
        "q4,A,0,1,\r\n"    # B=tuned broken
        "q5,,1,0,\r\n"     # unrated: its tick (A=tuned) is not counted
        "q6,tie,0,1,\r\n"  # B=tuned broken
        "q7,B,0,0,\r\n"
        "q8,A, , ,\r\n",   # blank marks (edited by hand) are unmarked
    )
    result = score_ratings(ratings, key)
    assert result["n_rated"] == 7 and result["n_skipped"] == 1
    broken = result["broken"]
    assert (broken["tuned"]["count"], broken["base"]["count"]) == (4, 1)
    assert broken["tuned"]["rate"] == pytest.approx(4 / 7) and broken["base"]["rate"] == pytest.approx(1 / 7)
    for system, count in (("tuned", 4), ("base", 1)):
        lo, hi = _wilson_reference(count, 7, 1.959963984540054)
        assert broken[system]["ci_low"] == pytest.approx(lo, abs=1e-9)
        assert broken[system]["ci_high"] == pytest.approx(hi, abs=1e-9)
    # The win rate is scored as before beside it.
    assert (result["tuned_wins"], result["base_wins"], result["ties"]) == (1, 4, 2)


def test_error_bad_broken_mark_names_line_column_and_fix(tmp_path):
    key = _write(tmp_path / "key.csv", KEY_CSV)
    ratings = _write(tmp_path / "ratings.csv", "id,choice,a_broken,b_broken\nq1,A,0,0\nq2,,yes,0\n")
    with pytest.raises(RatingsError) as err:
        score_ratings(ratings, key)
    msg = str(err.value)
    assert f"{ratings}:3: a_broken 'yes' for id 'q2' is not 0 or 1" in msg and "Fix:" in msg
    ratings2 = _write(tmp_path / "ratings2.csv", "id,choice,a_broken,b_broken\nq1,A,0,2\n")
    with pytest.raises(RatingsError, match=rf"{re.escape(str(ratings2))}:2: b_broken '2' for id 'q1'"):
        score_ratings(ratings2, key)


def test_error_one_broken_column_without_the_other(tmp_path):
    key = _write(tmp_path / "key.csv", KEY_CSV)
    ratings = _write(tmp_path / "ratings.csv", "id,choice,B_Broken\nq1,A,1\n")
    with pytest.raises(RatingsError, match=rf"{re.escape(str(ratings))}:1: column 'b_broken' without 'a_broken'. "
                                           r"Fix: keep both columns"):
        score_ratings(ratings, key)


def test_score_ratings_rejects_bad_confidence(tmp_path):
    key = _write(tmp_path / "key.csv", KEY_CSV)
    ratings = _write(tmp_path / "r.csv", "id,choice\nq1,A\n")
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match="confidence"):
            score_ratings(ratings, key, confidence=bad)


def test_error_missing_column_names_column_and_found_columns(tmp_path):
    key = _write(tmp_path / "key.csv", KEY_CSV)
    ratings = _write(tmp_path / "ratings.csv", "item,choice,comment\nq1,A,\n")
    with pytest.raises(RatingsError) as err:
        score_ratings(ratings, key)
    msg = str(err.value)
    assert str(ratings) in msg and ":1:" in msg
    assert "missing column 'id'" in msg
    assert "'item', 'choice', 'comment'" in msg
    assert "Fix:" in msg

    ratings2 = _write(tmp_path / "ratings2.csv", "id,verdict\nq1,A\n")
    with pytest.raises(RatingsError, match=r"missing column 'choice'.*columns found: 'id', 'verdict'"):
        score_ratings(ratings2, key)


def test_error_ids_not_in_key_names_up_to_five(tmp_path):
    key = _write(tmp_path / "key.csv", KEY_CSV)
    bogus = [f"zz{i}" for i in range(7)]
    ratings = _write(
        tmp_path / "ratings.csv",
        "id,choice,comment\nq1,A,\n" + "".join(f"{b},B,\n" for b in bogus),
    )
    with pytest.raises(RatingsError) as err:
        score_ratings(ratings, key)
    msg = str(err.value)
    assert str(ratings) in msg and str(key) in msg
    assert "7 id(s) not in the key" in msg
    for b in bogus[:5]:
        assert repr(b) in msg
    assert "'zz0' (line 3)" in msg
    assert "'zz5'" not in msg and "and 2 more" in msg


def test_error_bad_choice_names_line(tmp_path):
    key = _write(tmp_path / "key.csv", KEY_CSV)
    ratings = _write(tmp_path / "ratings.csv", "id,choice,comment\nq1,A,\nq2,tuned,\n")
    with pytest.raises(RatingsError) as err:
        score_ratings(ratings, key)
    msg = str(err.value)
    assert f"{ratings}:3:" in msg
    assert "'tuned'" in msg and "not one of A, B, tie" in msg and "Fix:" in msg


def test_error_line_numbers_count_multiline_quoted_comments(tmp_path):
    key = _write(tmp_path / "key.csv", KEY_CSV)
    ratings = _write(
        tmp_path / "ratings.csv",
        'id,choice,comment\nq1,A,"two\nlines"\n\nq2,C,\n',
    )
    with pytest.raises(RatingsError, match=rf"{re.escape(str(ratings))}:5: choice 'C'"):
        score_ratings(ratings, key)


def test_error_duplicate_id_names_both_lines(tmp_path):
    key = _write(tmp_path / "key.csv", KEY_CSV)
    ratings = _write(tmp_path / "ratings.csv", "id,choice,comment\nq1,A,\nq2,B,\nq1,tie,\n")
    with pytest.raises(RatingsError) as err:
        score_ratings(ratings, key)
    msg = str(err.value)
    assert f"{ratings}:4:" in msg and "duplicate id 'q1'" in msg and "first on line 2" in msg


def test_a_bad_key_says_which_command_and_file_fix_it(tmp_path):
    """The fix named write_sheet(), a function no user runs, and its key_path."""
    ratings = _write(tmp_path / "ratings.csv", "id,choice,comment\nq1,A,\n")
    with pytest.raises(RatingsError, match=r"Fix: pass --key the key evaluate wrote beside the sheet the ratings came "
                                           r"from \(reports/evaluate/human_eval_key.csv"):
        score_ratings(ratings, _write(tmp_path / "key.csv", "id,A,B\n"))
    with pytest.raises(RatingsError, match=r"key.csv:3: duplicate id 'q1' \(first on line 2\). Fix: take evaluate's "
                                           r"key back with `dvc checkout --force reports/evaluate`"):
        score_ratings(ratings, _write(tmp_path / "key.csv", "id,A,B\nq1,base,tuned\nq1,tuned,base\n"))


@pytest.mark.parametrize("content", ["", "\n\n  \n", "id,choice,comment\n"])
def test_error_empty_ratings_file(tmp_path, content):
    key = _write(tmp_path / "key.csv", KEY_CSV)
    ratings = _write(tmp_path / "ratings.csv", content)
    with pytest.raises(RatingsError) as err:
        score_ratings(ratings, key)
    msg = str(err.value)
    assert str(ratings) in msg and ("empty" in msg or "no rows" in msg) and "Fix:" in msg


def test_error_no_rated_rows(tmp_path):
    key = _write(tmp_path / "key.csv", KEY_CSV)
    ratings = _write(tmp_path / "ratings.csv", "id,choice,comment\nq1,,\nq2,,\n")
    with pytest.raises(RatingsError, match=r"no rated rows \(all 2 rows have an empty choice\)"):
        score_ratings(ratings, key)


def test_error_missing_files(tmp_path):
    key = _write(tmp_path / "key.csv", KEY_CSV)
    missing = tmp_path / "nope" / "ratings.csv"
    with pytest.raises(RatingsError) as err:
        score_ratings(missing, key)
    assert str(missing) in str(err.value) and "not found" in str(err.value) and "Fix:" in str(err.value)
    ratings = _write(tmp_path / "ratings.csv", "id,choice\nq1,A\n")
    with pytest.raises(RatingsError, match=r"key\.missing\.csv: key file not found"):
        score_ratings(ratings, tmp_path / "key.missing.csv")


def test_error_bad_key_file(tmp_path):
    ratings = _write(tmp_path / "ratings.csv", "id,choice\nq1,A\n")
    key = _write(tmp_path / "key.csv", "id,A,B\nq1,tuned,tuned\n")
    with pytest.raises(RatingsError, match=rf"{re.escape(str(key))}:2: id 'q1' has A='tuned', B='tuned'"):
        score_ratings(ratings, key)
    key2 = _write(tmp_path / "key2.csv", "id,left,right\nq1,tuned,base\n")
    with pytest.raises(RatingsError, match=r"missing columns 'A', 'B'.*columns found: 'id', 'left', 'right'"):
        score_ratings(ratings, key2)


def test_ratings_error_is_a_value_error():
    assert issubclass(RatingsError, ValueError)


def test_score_command_logs_to_the_repository_store_when_the_run_file_names_none(tmp_path, monkeypatch):
    """reports/evaluate/run.json from a default run holds no machine path; the score goes to the repo's own store."""
    import mlflow

    from qlora_pipeline.cli import main

    repo = tmp_path / "moved-repo"
    (repo / ".dvc").mkdir(parents=True)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(repo)
    store = f"sqlite:///{repo / 'mlflow.db'}"
    client = mlflow.MlflowClient(store)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    key = write_sheet(NEUTRAL_SAMPLES[:3], seed=1, html_path=repo / "reports/evaluate/human_eval.html",
                      key_path=repo / "reports/evaluate/human_eval_key.csv", title="t")
    _write(repo / "reports/evaluate/run.json", json.dumps({"mlflow_run_id": run_id, "tracking_uri": None}))
    # The tuned reply always picked; the base reply of the first item ticked "loops or breaks".
    ratings = _write(repo / "ratings.csv", "id,choice,a_broken,b_broken\n" + "".join(
        f"{row['id']},{'A' if row['A'] == 'tuned' else 'B'},{int(i == 0 and row['A'] == 'base')},"
        f"{int(i == 0 and row['B'] == 'base')}\n" for i, row in enumerate(key)))

    assert main(["human-eval", "score", str(ratings)]) == 0
    metrics = client.get_run(run_id).data.metrics
    assert metrics["human_eval.tuned_win_rate"] == 1.0 and metrics["human_eval.n_rated"] == 3
    # Nested values reach MLflow, dotted.
    assert metrics["human_eval.broken.base.count"] == 1 and metrics["human_eval.broken.tuned.count"] == 0
    assert metrics["human_eval.broken.base.rate"] == pytest.approx(1 / 3)
    assert metrics["human_eval.broken.base.ci_low"] < 1 / 3 < metrics["human_eval.broken.base.ci_high"]

    # An older ratings file, without the marks: every broken metric NaN (unknown, not zero).
    second_run = client.create_run(client.get_run(run_id).info.experiment_id).info.run_id
    _write(repo / "reports/evaluate/run.json", json.dumps({"mlflow_run_id": second_run, "tracking_uri": None}))
    old = _write(repo / "old.csv", "id,choice,comment\n" + "".join(f"{row['id']},A,\n" for row in key))
    assert main(["human-eval", "score", str(old)]) == 0
    logged = client.get_run(second_run).data.metrics
    broken = [value for name, value in logged.items() if ".broken" in name]
    assert "human_eval.n_rated" in logged and len(broken) == 8 and all(map(math.isnan, broken))


def test_score_command_says_why_nothing_was_logged_where_the_run_is_not_in_the_store(tmp_path, monkeypatch, capsys):
    """A fresh clone (no store), a run id the store lacks, a run file cut short: tracebacks before, and an empty
    store made where there was none."""
    import mlflow

    from qlora_pipeline.cli import main

    repo = tmp_path / "clone"
    (repo / ".dvc").mkdir(parents=True)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(repo)
    key = write_sheet(NEUTRAL_SAMPLES[:3], seed=1, html_path=repo / "reports/evaluate/human_eval.html",
                      key_path=repo / "reports/evaluate/human_eval_key.csv", title="t")
    ratings = _write(repo / "ratings.csv", "id,choice\n" + "".join(f"{row['id']},A\n" for row in key))
    run_file = repo / "reports/evaluate/run.json"

    _write(run_file, json.dumps({"mlflow_run_id": "2824abc", "tracking_uri": None}))
    assert main(["human-eval", "score", str(ratings)]) == 0
    assert ("mlflow.db: no MLflow store here (no stage has logged to it, or a mistyped path): result not logged to "
            "run 2824abc") in capsys.readouterr().out
    assert not (repo / "mlflow.db").exists()

    mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}").create_experiment("e")
    assert main(["human-eval", "score", str(ratings)]) == 0
    out = capsys.readouterr().out
    assert '"n_rated": 3' in out and "result not logged to MLflow: sqlite:///" in out and "refused run 2824abc" in out

    for broken in ("{bad", "[1]"):
        _write(run_file, broken)
        assert main(["human-eval", "score", str(ratings)]) == 0
        assert "run.json: no MLflow run id in it" in capsys.readouterr().out


def test_error_unterminated_quote_names_the_line_it_starts_on(tmp_path):
    """An opening quote never closed swallowed every later row into one comment: 2 rated, the rest "missing"."""
    from qlora_pipeline.cli import main

    key = _write(tmp_path / "key.csv", KEY_CSV)
    rows = ["id,choice,a_broken,b_broken,comment"] + [f"q{i},A,0,0," for i in range(1, 9)]
    rows[2] += '"too stiff'
    ratings = tmp_path / "ratings.csv"
    ratings.write_bytes(("\r\n".join(rows) + "\r\n").encode())
    with pytest.raises(RatingsError, match=rf"{re.escape(str(ratings))}:3: a quoted cell starts on this line and "
                                           r"its closing quote never comes.*Fix: close the quote on line 3"):
        score_ratings(ratings, key)
    assert main(["human-eval", "score", str(ratings), "--key", str(key),
                 "--run-file", str(tmp_path / "none.json")]) == 1

    # Closed on a later line by another stray quote followed by text: named from the line the cell starts on.
    rows[6] += '"ugh'
    ratings.write_bytes(("\r\n".join(rows) + "\r\n").encode())
    with pytest.raises(RatingsError, match=rf"{re.escape(str(ratings))}:3: malformed CSV in the row starting on "
                                           r"this line \(.* on line 7\)"):
        score_ratings(ratings, key)

    # A hand edit's space after a closing quote is no fault, before or after such a row; the unclosed quote still is.
    rows = ["id,choice", 'q1,"A" ,', "q2,B", 'q3,"tie"  ']
    ratings.write_bytes(("\r\n".join(rows) + "\r\n").encode())
    assert score_ratings(ratings, key)["n_rated"] == 3
    ratings.write_bytes(("\r\n".join([*rows, 'q4,"A', "q5,B"]) + "\r\n").encode())
    with pytest.raises(RatingsError, match=rf"{re.escape(str(ratings))}:5: a quoted cell starts on this line"):
        score_ratings(ratings, key)

    bad_key = _write(tmp_path / "bad_key.csv", 'id,A,B\nq1,tuned,base\nq2,"base,tuned\nq3,tuned,base\n')
    with pytest.raises(RatingsError, match=rf"{re.escape(str(bad_key))}:3: a quoted cell starts on this line"):
        score_ratings(_write(tmp_path / "r.csv", "id,choice\nq1,A\n"), bad_key)


@pytest.mark.parametrize("header", ["id,choice,choice", "id,Choice, choice ,a_broken,b_broken",
                                    "id,choice,a_broken,b_broken,A_Broken", "ID,choice,id"])
def test_error_ratings_column_named_twice(tmp_path, header):
    key = _write(tmp_path / "key.csv", KEY_CSV)
    cells = len(header.split(","))
    ratings = _write(tmp_path / "ratings.csv", f"{header}\n" + ",".join(["q1", "A"] + ["0"] * (cells - 2)) + "\n")
    with pytest.raises(RatingsError, match=rf"{re.escape(str(ratings))}:1: column '\w+' appears 2 times in the "
                                           r"header \(columns \d+ and \d+\)\. Fix: keep one"):
        score_ratings(ratings, key)


def test_error_key_column_named_twice(tmp_path):
    ratings = _write(tmp_path / "ratings.csv", "id,choice\nq1,A\n")
    key = _write(tmp_path / "key.csv", "id,A,B,a\nq1,tuned,base,base\n")
    with pytest.raises(RatingsError, match=rf"{re.escape(str(key))}:1: column 'A' appears 2 times in the header "
                                           r"\(columns 2 and 4\)"):
        score_ratings(ratings, key)


def test_confidence_whose_interval_has_no_finite_bound_is_refused(tmp_path, capsys):
    """0.9999999999999999 passed (0, 1) and failed in wilson_interval with statistics' traceback."""
    from qlora_pipeline.cli import main

    key = _write(tmp_path / "key.csv", KEY_CSV)
    ratings = _write(tmp_path / "r.csv", "id,choice\nq1,A\n")
    with pytest.raises(SystemExit) as exit_:
        main(["human-eval", "score", str(ratings), "--key", str(key), "--confidence", "0.9999999999999999"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--confidence" in err and "'0.9999999999999999'" in err and "0.999" in err
    with pytest.raises(ValueError, match="confidence"):
        score_ratings(ratings, key, confidence=0.9999999999999999)
    assert score_ratings(ratings, key, confidence=0.999999)["ci_high"] == 1.0


def _scoring_repo(tmp_path, monkeypatch, run_file: dict) -> tuple[Path, Path, list[dict]]:
    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True, exist_ok=True)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(repo)
    key = write_sheet(NEUTRAL_SAMPLES[:3], seed=1, html_path=repo / "reports/evaluate/human_eval.html",
                      key_path=repo / "reports/evaluate/human_eval_key.csv", title="t")
    _write(repo / "reports/evaluate/run.json", json.dumps(run_file))
    ratings = _write(repo / "ratings.csv", "id,choice\n" + "".join(f"{row['id']},A\n" for row in key))
    return repo, ratings, key


@pytest.mark.parametrize("content", [b"", bytes(range(256)) * 16, b"SQLite format 3\x00" + b"\x07" * 4000])
def test_score_command_does_not_log_into_a_file_that_is_no_mlflow_store(tmp_path, monkeypatch, capsys, content):
    """Random bytes were sqlalchemy's traceback after the result; a 0-byte file was made into an MLflow store."""
    from qlora_pipeline.cli import main

    store = tmp_path / "garbage.db"
    store.write_bytes(content)
    _, ratings, _ = _scoring_repo(tmp_path, monkeypatch, {"mlflow_run_id": "abc", "tracking_uri": f"sqlite:///{store}"})
    assert main(["human-eval", "score", str(ratings)]) == 0
    out = capsys.readouterr().out
    assert '"n_rated": 3' in out
    assert f"{store}: not an MLflow store" in out and "result not logged to run abc" in out
    assert store.read_bytes() == content
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".garbage")]

    # Another program's SQLite database: not taken over either.
    import sqlite3

    other = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(other)) as db:
        db.execute("CREATE TABLE notes (body TEXT)")
        db.commit()
    before = other.read_bytes()
    _write(Path("reports/evaluate/run.json"),
           json.dumps({"mlflow_run_id": "abc", "tracking_uri": f"sqlite:///{other}"}))
    assert main(["human-eval", "score", str(ratings)]) == 0
    assert f"{other}: not an MLflow store (no MLflow tables in it)" in capsys.readouterr().out
    assert other.read_bytes() == before


def test_score_command_says_spooled_not_logged_when_the_server_is_away(tmp_path, monkeypatch, capsys):
    from qlora_pipeline.cli import main

    repo, ratings, _ = _scoring_repo(tmp_path, monkeypatch,
                                     {"mlflow_run_id": "abc", "tracking_uri": "http://127.0.0.1:9"})
    assert main(["human-eval", "score", str(ratings)]) == 0
    out = capsys.readouterr().out
    assert "logged to MLflow run" not in out
    assert f"result kept for MLflow run abc in {repo / '.mlflow-spool'}" in out and "qlora-pipeline mlflow-sync" in out
    spooled = [json.loads(line) for path in (repo / ".mlflow-spool").glob("*.jsonl")
               for line in path.read_text().splitlines()]
    assert any(op["op"] == "metrics" and "human_eval.n_rated" in op["values"] for op in spooled)


def test_score_command_says_a_run_file_folder_is_a_folder(tmp_path, monkeypatch, capsys):
    from qlora_pipeline.cli import main

    repo, ratings, _ = _scoring_repo(tmp_path, monkeypatch, {"mlflow_run_id": "abc", "tracking_uri": None})
    assert main(["human-eval", "score", str(ratings), "--run-file", "reports/evaluate"]) == 0
    out = capsys.readouterr().out
    assert "not found" not in out
    assert "reports/evaluate is a folder, not a run file: result not logged to MLflow. Fix: pass --run-file " \
           "the run.json evaluate wrote (reports/evaluate/run.json)" in out


def test_scoring_again_replaces_every_metric_of_the_earlier_scoring(tmp_path, monkeypatch, capsys):
    """A second ratings file without the broken columns left the first one's broken rates beside its win rate."""
    import mlflow

    from qlora_pipeline.cli import main

    repo = tmp_path / "repo"
    store = f"sqlite:///{repo / 'mlflow.db'}"
    (repo / ".dvc").mkdir(parents=True)
    client = mlflow.MlflowClient(store)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    _, _, key = _scoring_repo(tmp_path, monkeypatch, {"mlflow_run_id": run_id, "tracking_uri": None})
    first = _write(repo / "first.csv", "id,choice,a_broken,b_broken\n" + "".join(
        f"{row['id']},A,1,1\n" for row in key))
    assert main(["human-eval", "score", str(first)]) == 0
    run = client.get_run(run_id).data
    assert run.metrics["human_eval.broken.base.count"] == 3
    assert run.tags["human_eval.ratings_sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()
    assert "human_eval.ratings_file" not in run.tags  # a file per rater is often named after the rater

    second = _write(repo / "second.csv", "id,choice\n" + "".join(f"{row['id']},B\n" for row in key[:2]))
    assert main(["human-eval", "score", str(second)]) == 0
    run = client.get_run(run_id).data
    assert run.metrics["human_eval.n_rated"] == 2
    broken = {name: value for name, value in run.metrics.items() if ".broken." in name}
    assert len(broken) == 8 and all(math.isnan(value) for value in broken.values())
    assert run.tags["human_eval.ratings_sha256"] == hashlib.sha256(second.read_bytes()).hexdigest()
