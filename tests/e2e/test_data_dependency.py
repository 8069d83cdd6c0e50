"""Your data file is a DVC dependency, queued experiments included; and the README's one command trains on a chat
app's export. That test also sets `evaluate.max_new_tokens` and two risk keys beside the README's own, and checks
what they do to the experiment's MLflow run and risk report. (That editing the data file in the workspace re-runs
fetch and every stage after it, not the base, is test_mlflow_server.py's first test, which runs the pipeline once
for both.)

Runs in a copy of the session's tiny pipeline run (conftest's tiny_baseline), a throwaway git + DVC repository
with its chat log in data/source/ (git-tracked, as the README tells users).
"""

from __future__ import annotations

import io
import json
import re
import shlex
import zipfile
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from conftest import BASELINE_RUN, ROOT, TINY_DATA, copy_baseline, jsonl, raw_ids, run_queue, sh, sqlite_runs

pytestmark = pytest.mark.slow

DATA = TINY_DATA


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_baseline) -> Path:
    """The session's baseline run, copied: its data file is DATA, holding chat_rows() (24 conversations)."""
    return copy_baseline(tiny_baseline, tmp_path_factory.mktemp("data-dep") / "repo")


def test_a_queued_experiment_reads_the_edit_and_names_a_file_it_lacks(repo):
    """Queued: an uncommitted edit of the git-tracked file reaches fetch; a file never added stops it with the fix."""
    committed = (repo / DATA).read_text()
    (repo / DATA).write_text(committed + jsonl([{"conv": "queued", "who": "pat", "msg": "an edit nobody committed",
                                                 "ts": "2020-02-01T10:00:00Z"}, {"conv": "queued", "who": "friend0",
                                                               "msg": "and the queue still saw it", "ts": "2020-02-01T10:01:00Z"}]))
    # fetch and clean: what follows re-runs as in the workspace (test_mlflow_server.py's edited data file), so the
    # queue is not asked to; two stages, to see them join one MLflow run.
    sh(["dvc", "exp", "run", "--queue", "-n", "edited", "clean"], repo)
    # The queue keeps its own copy of the workspace: reverting the edit now must not matter.
    (repo / DATA).write_text(committed)
    (repo / "data/source/extra.jsonl").write_text(committed)  # never git added nor dvc added
    sh(["dvc", "exp", "run", "--queue", "-n", "never-added", "-S", "data.path=data/source/extra.jsonl", "fetch"], repo)

    status = run_queue(repo, timeout=600)
    assert re.search(r"\bedited\b.*\bSuccess\b", status) and re.search(r"\bnever-added\b.*\bFailed\b", status), status

    log = sh(["dvc", "queue", "logs", "never-added"], repo)
    assert "Running stage 'fetch'" in log  # fetch itself ran and refused, not DVC before it
    message = re.search(r"data\.path: data/source/extra\.jsonl is not a file in (\S+); .*", log)
    assert message and ".dvc/tmp/exps/" in message.group(1), log[-2000:]
    assert "`git add data/source/extra.jsonl`" in message.group(0)
    assert "`dvc add data/source/extra.jsonl`" in message.group(0)

    sh(["dvc", "exp", "apply", "edited"], repo)
    assert raw_ids(repo)[-1] == "queued"
    assert "and the queue still saw it" in (repo / "data/raw/conversations.jsonl").read_text()

    # The queued experiment's stages logged into one run of the repository's own SQLite store, not into a store
    # in DVC's copy of the workspace (under .dvc/tmp/exps, gone when the experiment ends).
    table = sqlite_runs(repo)
    edited = table[table["tags.dvc.exp_name"] == "edited"]
    assert len(edited) == 1, table.filter(like="tags.").to_string()
    assert (edited.iloc[0]["tags.stage.fetch"], edited.iloc[0]["tags.stage.clean"]) == ("ran", "ran")
    assert edited.iloc[0]["metrics.fetch.conversations"] == 25  # the 24 committed and the queued edit's
    assert edited.iloc[0]["metrics.clean.messages_out"] == json.loads(
        (repo / "metrics/clean.json").read_text())["messages_out"]  # applied above: the experiment's clean


# --------------------------------------------------------------- the README's own-chats command

FRIENDS = ("Ana Lima", "Joe Park")
ME = "Sam Rivera"
REPLIES = ["saturday works for me", "I can bring the snacks this time", "haha no way, that was years ago",
           "running late, save me a seat", "just finished the book, loved the ending",
           "trying the new ramen place on friday", "my bike is finally fixed", "did you see the storm last night"]


def whatsapp_export(sessions: int = 14) -> bytes:
    """An iOS "Export chat" zip: a group chat of 3 people over `sessions` evenings, as the app writes it."""
    nnbsp, lrm = "\u202f", "\u200e"
    start = datetime(2024, 1, 3, 19, 0)
    lines = [f"{lrm}[1/3/24, 6:59:00{nnbsp}PM] Book Club: {lrm}Messages and calls are end-to-end encrypted."]
    for day in range(sessions):
        t = start + timedelta(days=day)
        for minute, (who, text) in enumerate([
                (FRIENDS[0], f"hey {ME.split()[0]}, {FRIENDS[1].split()[0]}, evening {day}?"),
                (ME, f"{REPLIES[day % len(REPLIES)]} ({day})"),
                (FRIENDS[1], f"ask {FRIENDS[0]}, she knows {day}"),
                (ME, f"{REPLIES[(day + 3) % len(REPLIES)]}, {FRIENDS[1].split()[0].lower()} {day}")]):
            stamp = (t + timedelta(minutes=minute)).strftime("%-m/%-d/%y, %-I:%M:%S") + nnbsp + t.strftime("%p")
            lines.append(f"[{stamp}] {who}: {text}")
        lines.append(f"{lrm}[{stamp}] {FRIENDS[0]}: {lrm}image omitted")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("_chat.txt", "\n".join(lines) + "\n")
        archive.writestr("00000042-PHOTO-2024-01-03-19-04-00.jpg", b"\xff\xd8 not really a photo")
    return buffer.getvalue()


def readme_command(persona: str) -> list[str]:
    """The README's "Train on your own chats" command, with this test's persona for "Your Name"."""
    command = re.search(r"^dvc exp run -S data\.source=whatsapp .*$", (ROOT / "README.md").read_text(), re.M)
    assert command, "the README's own-chats command is missing"
    return shlex.split(command.group(0).replace("Your Name", persona))


# Set with the README's command: a generation key and two of risk's own, whose effect is checked here (which stages
# they make stale is test_dvc_pipeline.py's).
GENERATION_AND_RISK_KEYS = {"evaluate.max_new_tokens": 3, "risk.memorization_min_words": 6, "risk.power_watts": 30}


def test_the_readmes_command_trains_on_a_whatsapp_export_with_friends_pseudonymized(repo):
    command = readme_command(ME.lower())  # as the README says: case does not matter
    data_path = next(a.split("=", 1)[1] for a in command if a.startswith("data.path="))
    (repo / data_path).write_bytes(whatsapp_export())
    sh(["git", "add", data_path], repo)  # a small export: git keeps it, as the README says

    before = set(sqlite_runs(repo)["run_id"])
    extra = [arg for key, value in GENERATION_AND_RISK_KEYS.items() for arg in ("-S", f"{key}={value}")]
    out = sh([*command, *extra], repo, timeout=900)
    for stage in ("fetch", "clean", "split", "train-adapter", "choose-decoding", "evaluate", "risk"):
        assert f"Running stage '{stage}'" in out, stage
    # the experiment is one new MLflow run, beside the baseline's, with the keys' new values
    table = sqlite_runs(repo)
    (new,) = [row for _, row in table.iterrows() if row["run_id"] not in before]
    assert {key: float(new[f"params.{key}"]) for key in GENERATION_AND_RISK_KEYS} == GENERATION_AND_RISK_KEYS
    baseline = table[table["tags.dvc.exp_name"] == "workspace"]
    assert set(baseline["params.evaluate.max_new_tokens"]) == {str(BASELINE_RUN["evaluate.max_new_tokens"])}
    risk = json.loads((repo / "metrics/risk.json").read_text())
    assert risk["memorization"]["min_words"] == 6 and risk["cost"]["energy_assumption"].startswith("30 W x")

    manifest = json.loads((repo / "data/raw/manifest.json").read_text())
    assert (manifest["source"], manifest["counts"]["conversations"], manifest["counts"]["speakers"]) == ("whatsapp", 14, 3)
    assert manifest["export"]["rows_removed"] == {"media_omitted": 14, "system": 1}
    split = json.loads((repo / "metrics/split.json").read_text())
    assert split["persona"] == ME and split["train"]["examples"] > 0
    clean = json.loads((repo / "metrics/clean.json").read_text())
    assert clean["pseudonymized"]["speakers"] == 2 and clean["pseudonymized"]["names_in_text"] >= 14 * 3
    trained_on = "".join((repo / f"data/splits/{name}.jsonl").read_text() for name in ("train", "val", "test"))
    for word in (*FRIENDS, "Ana", "Lima", "Joe", "joe", "Park"):
        assert word not in trained_on, word
    assert "Friend 1" in trained_on and "Friend 2" in trained_on and ME.split()[0] in trained_on
    evaluated = json.loads((repo / "metrics/eval.json").read_text())
    assert {"rouge1", "perplexity", "chosen", "persona_score"} <= set(evaluated)
    assert evaluated["samples"] >= 1 and 0 <= evaluated["rouge1"]["tuned"] <= 1
    assert "Book Club" not in (repo / "data/raw/conversations.jsonl").read_text()  # the chat's name is no id
