"""The spool: what a stage logged while the MLflow server was away, and ``mlflow-sync``, which sends it.

Each stage writes its own file of logging calls (a JSON line each) under ``.mlflow-spool/`` at the
repository root, with copies of its artifacts; ``qlora-pipeline mlflow-sync`` (``sync_spool``)
sends each file later to the run its execution key names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.mlflow_store import (KEY_TAG, create_run, experiment_for, mlflow_client, repo_root,
                                         require_store, run_with_key, send, store_errors)
from qlora_pipeline.process import pid_running

SPOOL_DIR = ".mlflow-spool"
_WRITING = ".part"
_SPOOL_NAME = re.compile(r"\d+-\d+\.jsonl(?:\.part)?")  # Spool's own names: <time>-<pid>.jsonl
_OTHER_STORE = "name another with --tracking-uri"  # what mlflow-sync says to do about a store it cannot use


def spool_dir() -> Path:
    """Where stages keep what an unreachable server could not take; one folder for every experiment."""
    return repo_root() / SPOOL_DIR


class Spool:
    """One stage's logging calls (a JSON line each) and copies of its artifacts, in ``folder``.

    Written as ``<stem>.jsonl.part`` and renamed to ``<stem>.jsonl`` when the stage ends, so a sync
    does not take a file a running stage still writes. The stem (time, pid) is this process's own:
    queued experiments running side by side each write their own file.
    """

    def __init__(self, folder: Path, opening: dict):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.stem = f"{time.time_ns()}-{os.getpid()}"
        self.path = folder / f"{self.stem}.jsonl{_WRITING}"
        self.copies = 0
        self.keep(opening)

    def keep(self, op: dict) -> None:
        if op["op"] == "artifact":
            op = {**op, "path": self._copy(Path(op["path"]))}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(op) + "\n")

    def _copy(self, source: Path) -> str:
        """A copy (the stage's file may change or go before the sync); its path relative to the folder."""
        self.copies += 1
        target = Path(f"{self.stem}.files", str(self.copies), source.name)
        (self.folder / target).parent.mkdir(parents=True)
        if source.is_dir():
            shutil.copytree(source, self.folder / target)
        else:
            shutil.copy2(source, self.folder / target)
        return target.as_posix()

    def close(self) -> None:
        self.path.rename(self.path.with_suffix(""))


def sync_spool(uri: str | None = None, folder: Path | None = None,
               on_line: Callable[[str], None] | None = None) -> list[str]:
    """Send every spool file to its store (or to ``uri``), oldest first, removing each once sent.

    Each file joins the run its execution key names, made if none has it yet (with every param).
    A second sync, or one after a sync cut short, adds nothing twice: a metric point sent again
    with its own timestamp is the same point, and params and tags keep their values. A file a
    running stage still writes is left for the next sync; one whose stage was killed is sent.

    Returns:
        One line per file: sent where, or why it was left; each also given to ``on_line`` as it is made, so
        that a file refused later does not hide the files sent (and removed) before it.
    """
    folder = folder or spool_dir()
    lines: list[str] = []

    def said(line: str) -> None:
        lines.append(line)
        if on_line is not None:
            on_line(line)

    for path in sorted(folder.glob("*.jsonl*")):
        if not (path.is_file() and _SPOOL_NAME.fullmatch(path.name)):  # a folder, or a file no stage wrote
            said(f"{path.name}: not a spool file (stages write <time>-<pid>.jsonl files); left as it is")
        elif path.name.endswith(_WRITING) and _writer_alive(path):
            said(f"{path.name}: a running stage still writes it; left for the next sync")
        else:
            said(_sync_file(path, uri))
    return lines


def _writer_alive(path: Path) -> bool:
    return pid_running(int(path.name.split(".")[0].split("-")[1]))


def _sync_file(path: Path, uri: str | None) -> str:
    opening, ops = _read_spool(path)
    target = uri or opening["tracking_uri"]
    require_store(target, f": {path.name} and later files stay in {path.parent}", _OTHER_STORE,
                  missing_ok=True)  # a new store in a folder that is there, as a stage would have made it
    with store_errors(target, _OTHER_STORE):
        client = mlflow_client(target)
        run_id = _run_for(client, opening, target)
        for op in ops:
            send(client, run_id, op, path.parent)
    path.unlink()
    shutil.rmtree(path.parent / f"{path.name.split('.')[0]}.files", ignore_errors=True)
    return f"{path.name}: {len(ops)} records of stage {opening['stage']} -> run {run_id} ({target})"


def _run_for(client: Any, opening: dict, uri: str) -> str:
    """The run of the spool's execution: the one the stage had joined, else the one with its key, else a new one."""
    known = opening.get("run_id")
    if known:
        try:
            tags = client.get_run(known).data.tags
        except Exception:  # another store than the stage's (--tracking-uri): found by key below
            tags = None
        # No key: the calls were made into a known run (human-eval scores into evaluate's).
        if tags is not None and (opening["key"] is None or tags.get(KEY_TAG) == opening["key"]):
            return known
    if opening["key"] is None:
        raise PipelineError(f"run {known} is not in {uri}; sync to the store it was logged to (--tracking-uri)")
    experiment_id = experiment_for(client, opening["experiment"], uri)
    found = run_with_key(client, experiment_id, opening["key"])
    if found is not None:
        return found.info.run_id
    run_id = create_run(client, experiment_id, opening).info.run_id
    send(client, run_id, {"op": "params", "values": opening["params"]})
    return run_id


def _read_spool(path: Path) -> tuple[dict, list[dict]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            # The last line of a stage killed mid-write: only a .part file has one (a stage that ended renamed it).
            if number == len(lines) and path.name.endswith(_WRITING):
                break
            raise PipelineError(f"{path}:{number}: not a spool record; remove that line and sync again") from None
        _check_record(records[-1], f"{path}:{number}", path.parent, opening=number == 1)
    if not records or records[0].get("op") != "open":
        raise PipelineError(f"{path}: no opening record (the run's identity); it cannot be sent, remove it")
    return records[0], records[1:]


# What each record needs to be sent. A file damaged or edited by hand was a KeyError's traceback, after the records
# before the bad one had been sent: every line is checked before any is.
_RECORD_KEYS = {"open": ("tracking_uri", "experiment", "key", "stage"), "params": ("values",),
                "metrics": ("values", "step", "timestamp"), "tags": ("values",), "artifact": ("path", "artifact_path"),
                "end": ("status", "timestamp")}
_NEW_RUN_KEYS = ("run_name", "tags", "params", "timestamp")  # an opening that may have to make its run


def _check_record(record: Any, where: str, folder: Path, opening: bool) -> None:
    fix = "remove that line and sync again" if not opening else "the file cannot be sent; remove it"
    op = record.get("op") if isinstance(record, dict) else None
    if opening and op != "open":
        raise PipelineError(f"{where}: the first record must open the run (op 'open'); {fix}")
    if not opening and (op not in _RECORD_KEYS or op == "open"):
        raise PipelineError(f"{where}: not a spool record (an object whose op is one of "
                            f"{', '.join(k for k in _RECORD_KEYS if k != 'open')}); {fix}")
    needed = _RECORD_KEYS[op] + (_NEW_RUN_KEYS if opening and record.get("key") is not None else ())
    missing = [key for key in needed if key not in record]
    if missing or not isinstance(record.get("values", {}), dict):
        raise PipelineError(f"{where}: a spool '{op}' record "
                            f"{'without ' + ', '.join(missing) if missing else 'whose values are no object'}; {fix}")
    if op == "metrics" and not _metric_record(record):  # MLflow refused it after the lines before had been sent
        raise PipelineError(f"{where}: a spool 'metrics' record needs numbers as values and whole numbers >= 0 as "
                            f"step and timestamp; {fix}")
    if op in ("params", "tags") and not all(isinstance(v, str) for v in record["values"].values()):
        raise PipelineError(f"{where}: a spool '{op}' record holds text values only; {fix}")
    if op == "artifact":
        copy = folder / str(record["path"])
        # A spool keeps its own copies; a path out of its folder ("/etc/hostname") was sent to the store as it was.
        if not copy.resolve().is_relative_to(folder.resolve()):
            raise PipelineError(f"{where}: the artifact {record['path']!r} is not a copy in {folder} (a stage's "
                                f"spool keeps copies of what it logs there); {fix}")
        if not copy.exists():
            raise PipelineError(f"{where}: the copy of the artifact, {copy}, is gone; {fix}")


def _metric_record(record: dict) -> bool:
    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in record["values"].values())
    return numbers and whole(record["step"]) and whole(record["timestamp"])
