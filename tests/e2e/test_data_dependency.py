"""Your data file is a DVC dependency: editing it re-runs fetch and every stage after it, queued experiments included.

Runs the tiny real pipeline of test_dvc_pipeline.py in a throwaway git + DVC copy of the
repository, with its chat log in data/source/ (git-tracked, as the README tells users).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import TINY_RUN, chat_rows, copy_repository, run_queue, sh

pytestmark = pytest.mark.slow

DATA = "data/source/chat.jsonl"

TINY = {**TINY_RUN, "data.path": DATA}
STAGES_AFTER_FETCH = ("clean", "split", "train-adapter", "choose-decoding", "evaluate", "risk")


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def tiny_pipeline(folder: Path, tiny_llama: Path) -> Path:
    """A committed repository copy whose data file is DATA, holding chat_rows() (24 conversations)."""
    return copy_repository(folder, {**TINY, "model.name_or_path": str(tiny_llama)}, {DATA: jsonl(chat_rows())})


def raw_ids(repo: Path) -> list[str]:
    lines = (repo / "data/raw/conversations.jsonl").read_text().splitlines()
    return [json.loads(line)["id"] for line in lines]


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_llama) -> Path:
    repo = tiny_pipeline(tmp_path_factory.mktemp("data-dep") / "repo", tiny_llama)
    sh(["dvc", "repro"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "baseline results"], repo)
    return repo


def test_editing_the_data_file_reruns_fetch_and_everything_after(repo):
    with (repo / DATA).open("a") as handle:  # two more conversations, c24 and c25
        handle.write(jsonl(chat_rows(26)[24 * 6:]))

    status = sh(["dvc", "status"], repo)
    assert re.search(r"^fetch:\n\s+changed deps:\n\s+modified:\s+data/source\n", status, re.M), status
    assert "quantize-load:" not in status

    out = sh(["dvc", "repro"], repo)
    for stage in ("fetch", *STAGES_AFTER_FETCH):
        assert f"Running stage '{stage}'" in out, stage
    assert "Running stage 'quantize-load'" not in out  # the base model reads no data
    assert raw_ids(repo)[-3:] == ["c23", "c24", "c25"]
    assert json.loads((repo / "data/raw/manifest.json").read_text())["counts"]["conversations"] == 26
    assert "Data and pipelines are up to date" in sh(["dvc", "status"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "two more conversations"], repo)


def test_a_queued_experiment_reads_the_edit_and_names_a_file_it_lacks(repo):
    """Queued: an uncommitted edit of the git-tracked file reaches fetch; a file never added stops it with the fix."""
    committed = (repo / DATA).read_text()
    (repo / DATA).write_text(committed + jsonl([{"conv": "queued", "who": "pat", "msg": "an edit nobody committed",
                                                 "ts": "2020-02-01T10:00:00Z"}, {"conv": "queued", "who": "friend0",
                                                               "msg": "and the queue still saw it", "ts": "2020-02-01T10:01:00Z"}]))
    # fetch alone: what follows it re-runs as in the workspace (the test above), so the queue is not asked to.
    sh(["dvc", "exp", "run", "--queue", "-n", "edited", "fetch"], repo)
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
