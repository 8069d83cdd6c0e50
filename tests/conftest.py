"""Shared fixtures: the real params.yaml as a dict to override, and small source files."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

# Under pytest-xdist (`make test` runs two workers) each worker, and every stage process it starts,
# gets its share of the cores: two torch thread pools as wide as the machine fight over two cores,
# and the run took longer than one worker alone. Set before anything imports torch; a value the
# user set wins.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))

# Python writes the bytecode of what the tests import into .venv and src/, as `make test` lets it (the
# Makefile unexports PYTHONDONTWRITEBYTECODE): where a shell sets it and pytest is run directly, every stage
# process, server and kernel the tests start would compile again every module it imports (docs/testing.md).
if os.environ.pop("PYTHONDONTWRITEBYTECODE", None) is not None:
    sys.dont_write_bytecode = False

import pytest  # noqa: E402
import yaml  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from qlora_pipeline.config import Params, params_from_dict  # noqa: E402
from qlora_pipeline.process import ADAPTERS, JUDGE, ROUGE, import_quietly, tracking_imports  # noqa: E402

# What the tests import anyway, imported first in each pytest-xdist worker with full garbage collections held
# off and then frozen, as a stage does (process.import_quietly): the full collections the tests' own objects set
# off no longer walk the libraries' objects, and a worker leaves at once. Not in the controller, which runs no
# test, nor in a run without workers, which may need none of it.
# On a fresh clone nothing is compiled yet (set-up compiles no bytecode, Makefile): a worker importing these
# compiles ~17 s of modules. Every other worker takes the lists in the other order, so that each compiles one
# half and finds the other's half written by the time it gets there, where both compiled everything side by side
# (pytest's start-up, two workers, cold: 35.5 -> 23.3 s; warm 10.7 s either way; docs/testing.md).
if os.environ.get("PYTEST_XDIST_WORKER"):
    _model = [*ADAPTERS, "accelerate"]
    _the_rest = [*tracking_imports(None), *JUDGE, *ROUGE, "fastapi", "datasets"]  # none of them imports torch
    if int(os.environ["PYTEST_XDIST_WORKER"].removeprefix("gw") or 0) % 2:
        _model, _the_rest = _the_rest, _model
    import_quietly([*_model, *_the_rest])

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # this environment's bin: dvc, and the `python` the stages call

# Property tests (hypothesis) run fixed examples, so a red run is a bug, not luck; the thorough
# profile searches at random: DATA_PROPERTIES_PROFILE=thorough pytest tests/data/...
settings.register_profile("data-properties", max_examples=100, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROPERTIES_PROFILE = settings.get_profile(os.environ.get("DATA_PROPERTIES_PROFILE", "data-properties"))

# The modules that take longest, longest first. Workers take whole modules (--dist loadfile) in
# collection order (--no-loadscope-reorder), so starting with these lets the two finish together; a
# serial run is unchanged but for the order (longest by the slowest tests `make test` lists, and by each
# module's CPU time, bench/suite_cpu_by_test.py; docs/testing.md). The first builds tiny_baseline
# (built_once), which the end-to-end modules after it copy or read; the notebook, which needs none of
# it, comes second so that the other worker has work meanwhile instead of waiting for the build.
SLOWEST_FIRST = ("e2e/test_mlflow_server.py", "test_notebook.py", "e2e/test_failures.py", "serving/test_export_gguf.py",
                 "e2e/test_data_dependency.py", "serving/test_server_load.py",
                 "e2e/test_dvc_remote.py", "e2e/test_dvc_pipeline.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: index for index, name in enumerate(SLOWEST_FIRST)}
    tests = Path(__file__).parent
    items.sort(key=lambda item: rank.get(item.path.relative_to(tests).as_posix(), len(rank)))


# No hub is reachable; tests must never wait on one.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def base_params_dict() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def default_params_file(folder: Path) -> Path:
    """A params file of the defaults in ``folder``: a command given it reads no params of this checkout's."""
    from qlora_pipeline.config import Params

    path = folder / "default-params.yaml"
    path.write_text(yaml.safe_dump(Params().model_dump(mode="json")), encoding="utf-8")
    return path


def set_dotted(raw: dict, overrides: dict) -> dict:
    """``raw`` with each dotted key (``train.lora.r``) set to its value, in place."""
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return raw


def make_params(base: dict, overrides: dict | None = None, tmp_path: Path | None = None) -> Params:
    """The repository's params with dotted-key overrides, and MLflow pointed into tmp_path."""
    raw = set_dotted(copy.deepcopy(base), overrides or {})
    if tmp_path is not None:
        raw["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return params_from_dict(raw)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """torch on one thread for a module whose tests hold float32 rows to the same tokens alone and batched.

    A CPU matmul's kernel, and with it the bits of a row's logits, changes with the batch's shape and the
    number of threads (bench/batch_invariance.py: other bits for batches of 1 or 2 rows, and of 7 on two
    threads). Tokens agree but on a near-tie, and one of these tests' prompts meets one on two threads: where
    a `make test` worker gets two or more (four cores or more), or a module is run alone on two cores.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def params_factory(base_params_dict, tmp_path, empty_store):
    place_store(empty_store, tmp_path)
    return lambda overrides=None: make_params(base_params_dict, overrides, tmp_path)


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store as the stages create one (``mlflow_store.ensure_sqlite_store``), made once per test run.

    Creating a store runs MLflow's schema migrations, about a second of CPU; the ~40 tests whose stages log
    into a store of their own each paid it. They get a copy of this one instead (``place_store``). How a store
    is created, killed midway included, is test_tracking.py's, on stores of its own.
    """
    from qlora_pipeline import mlflow_store

    def build(folder: Path) -> None:
        mlflow_store.ensure_sqlite_store(f"sqlite:///{folder / 'mlflow.db'}")

    return built_once(tmp_path_factory, "mlflow-store", build) / "mlflow.db"


def place_store(template: Path, folder: Path) -> str:
    """``template`` copied to ``folder``/mlflow.db, as ensure_sqlite_store would have made it there: MLflow's Default
    experiment keeps its artifacts beside the store. Returns the store's URI."""
    import sqlite3

    store = folder / "mlflow.db"
    shutil.copyfile(template, store)
    with sqlite3.connect(store) as db:
        db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                   ((folder / "mlartifacts" / "0").as_uri(),))
    db.close()
    return f"sqlite:///{store}"


CHAT_ROWS = [
    # conversation c1: alice and bob, alice is the most active speaker overall
    {"conv": "c1", "who": "alice", "msg": "hi bob, how was the trip?", "ts": "2020-01-01T10:00:00Z"},
    {"conv": "c1", "who": "bob", "msg": "great, thanks! we hiked a lot", "ts": "2020-01-01T10:00:05Z"},
    {"conv": "c1", "who": "alice", "msg": "nice, where did you go?", "ts": "2020-01-01T10:00:09Z"},
    {"conv": "c1", "who": "bob", "msg": "the alps, mostly around zermatt", "ts": "2020-01-01T10:00:15Z"},
    {"conv": "c1", "who": "alice", "msg": "i have always wanted to go there", "ts": "2020-01-01T10:00:20Z"},
    {"conv": "c2", "who": "carol", "msg": "alice are you coming tonight?", "ts": "2020-01-02T18:00:00Z"},
    {"conv": "c2", "who": "alice", "msg": "yes! mail me at alice@example.com", "ts": "2020-01-02T18:01:00Z"},
    {"conv": "c2", "who": "carol", "msg": "done, see you at 8:30", "ts": "2020-01-02T18:02:00Z"},
    {"conv": "c2", "who": "alice", "msg": "see you then", "ts": "2020-01-02T18:03:00Z"},
]


def write_chat_jsonl(path: Path, rows=CHAT_ROWS) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


CHAT_FIELDS = {"data.fields.conversation_id": "conv", "data.fields.speaker": "who",
               "data.fields.text": "msg", "data.fields.time": "ts"}


# The tiny real pipeline the e2e tests run under DVC: every stage for real, in seconds, on a tiny
# random Llama (add "model.name_or_path": the tiny_llama fixture) and a chat_rows() file (add "data.path").
TINY_RUN = {"data.source": "jsonl", **CHAT_FIELDS,
            "model.gguf_file": None, "model.dtype": "float32",
            "model.smoke_prompts": ["hi"], "model.smoke_max_new_tokens": 2,
            "train.max_steps": 2, "train.eval_steps": 1, "train.save_steps": 1,
            "train.per_device_train_batch_size": 4, "evaluate.max_samples": 4, "evaluate.max_new_tokens": 4,
            "evaluate.bootstrap_samples": 100, "evaluate.human_eval_samples": 2,
            "risk.max_new_tokens": 3, "risk.canary_candidates": 100, "risk.bootstrap_samples": 50,
            "decoding.max_samples": 4, "decoding.grid": [
                {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
                 "exponential_decay_length_penalty": None},
                {"temperature": 0.8, "top_p": 0.9, "top_k": 0, "repetition_penalty": 1.1,
                 "no_repeat_ngram_size": 3, "exponential_decay_length_penalty": None}]}


LINES = ["hey, got a minute?", "sure, what's up", "did you watch the match last night",
         "no, I was stuck at work until ten", "we won three to one, great game", "nice, I'll catch the replay"]


def chat_rows(n_conversations: int = 24) -> list[dict]:
    """Two-person chats (CHAT_FIELDS columns) whose lines differ enough that cleaning keeps every turn."""
    rows = []
    for c in range(n_conversations):
        for t, line in enumerate(LINES):
            who = "pat" if t % 2 else f"friend{c % 3}"
            rows.append({"conv": f"c{c:02d}", "who": who, "msg": f"{line} (chat {c})",
                         "ts": f"2020-01-{c % 28 + 1:02d}T10:{t:02d}:00Z"})
    return rows


# ------------------------------------------------------------------- the real pipeline


def pipeline_env() -> dict[str, str]:
    """The environment DVC and its stages run in: this environment's bin first, no hub, no inherited run key, and
    no MLFLOW_TRACKING_URI: mlflow.set_tracking_uri() sets it in the worker for the in-process tests' stores, and
    the stages take theirs from params; handed on, it differed from module to module, and each value started a warm
    process of its own (warm.py keys them by the environment: nine in one `make test` where four served)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    for name in ("QLORA_PIPELINE_RUN_KEY", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    return env


def sh(cmd: list[str], cwd: Path, timeout: int = 600, again_on: re.Pattern | None = None, tries: int = 3) -> str:
    """``cmd`` in the pipeline's environment; its output, or the test fails with it. ``again_on``: a failure whose
    output matches it is tried again a second later, ``tries`` times at most (a race of the tool's own)."""
    for attempt in range(1, tries + 1):
        proc = subprocess.run(cmd, cwd=cwd, env=pipeline_env(), capture_output=True, text=True, timeout=timeout)
        raced = proc.returncode != 0 and again_on is not None and again_on.search(proc.stdout + proc.stderr)
        if not raced or attempt == tries:
            break
        time.sleep(1)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


# DVC's own race: `dvc queue status` reads a running task's info file (its executor's JSON), which the executor
# rewrites in place; caught empty or half written, the command exits 255 with "unexpected error" and a JSON
# decoding message (as in treeverse/dvc#8014). Seen once in a fresh clone's `make test`.
DVC_STATUS_RACE = re.compile(r"ERROR: unexpected error - (Expecting value|Extra data|Unterminated string)")


QUEUE_ENDS = ("Success", "Failed")


def tasks(status: str) -> dict[str, str]:
    """`dvc queue status`'s table: each task's id (its first column, the same while queued, running and ended) and
    status (its last)."""
    rows = [line.split() for line in status.split("\n\n")[0].splitlines()[1:]]
    return {row[0]: row[-1] for row in rows if row}


def run_queue(repo: Path, jobs: int = 1, timeout: int = 900) -> str:
    """`dvc queue start --jobs N`, then wait until nothing is queued or running; the final status.

    The workers DVC starts keep the files they inherit open, so `queue start` writes to a file, not
    a pipe (a pipe would block the test until the workers end). A worker that went away with
    tasks still queued (DVC issue 10562) is started again; at the deadline the workers are
    stopped and what the running tasks logged is shown.

    `dvc queue status` costs about a second of a core (DVC's start-up), so it is not polled every few
    seconds: it runs when the experiment refs change (a result or a failure recorded, the last queued
    task taken: `git for-each-ref`, milliseconds, every second), every 3 s for 12 s after a change (DVC
    records a task's end after it has written its refs and removed its workspace), and every 15 s
    besides, which the check for a vanished worker needs.
    """
    def start() -> None:
        with (repo.parent / f"{repo.name}-queue-start.log").open("a") as log:
            proc = subprocess.run(["dvc", "queue", "start", "--jobs", str(jobs)], cwd=repo, env=pipeline_env(),
                                  stdout=log, stderr=subprocess.STDOUT, timeout=120)
        assert proc.returncode == 0, f"dvc queue start failed: see {log.name}"

    def experiment_refs() -> str:
        return subprocess.run(["git", "for-each-ref", "refs/exps"], cwd=repo, capture_output=True, text=True,
                              check=True).stdout

    # A task DVC has taken off the queue but not yet marked running is missing from the status a moment (the
    # worker active, no task Queued or Running): the tasks queued now are waited for by id until each has ended.
    waited = tasks(sh(["dvc", "queue", "status"], repo, again_on=DVC_STATUS_RACE))
    start()
    deadline = time.time() + timeout
    stalled_since = None
    refs, next_status, changed_at = None, 0.0, 0.0
    while time.time() < deadline:
        seen = experiment_refs()
        if seen == refs and time.time() < next_status:
            time.sleep(1)
            continue
        if seen != refs:
            refs, changed_at = seen, time.time()
        next_status = time.time() + (3 if time.time() - changed_at < 12 else 15)
        status = sh(["dvc", "queue", "status"], repo, again_on=DVC_STATUS_RACE)
        ended = tasks(status)
        if all(ended.get(task) in QUEUE_ENDS for task in waited) and "Queued" not in status and "Running" not in status:
            return status
        if "Running" in status or "Worker status: 0 active" not in status:
            stalled_since = None
        elif stalled_since is None:
            stalled_since = time.time()
        elif time.time() - stalled_since > 30:  # no worker for 30 s with work queued
            start()
            stalled_since = None
        time.sleep(1)
    running = [line.split()[0] for line in status.splitlines() if " Running" in line]
    logs = "\n".join(subprocess.run(["dvc", "queue", "logs", task], cwd=repo, env=pipeline_env(),
                                    capture_output=True, text=True).stdout[-3000:] for task in running)
    subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=repo, env=pipeline_env(), capture_output=True)
    raise AssertionError(f"the queue did not finish in {timeout} s:\n{status}\n{logs}")


def copy_repository(repo: Path, params_overrides: dict | None = None, extra_files: dict[str, str] | None = None
                    ) -> Path:
    """A throwaway git + DVC repository of this working tree, committed, for DVC to run in.

    Every file git would commit (tracked or new, not ignored) is copied but tests, metrics and
    dvc.lock, so every stage runs. ``params_overrides`` (dotted keys) are written into its
    params.yaml, ``extra_files`` (name -> text) beside it.
    """
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        if name.startswith(("tests/", "metrics/")) or name == "dvc.lock" or not (ROOT / name).exists():
            continue
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, repo / name)
    for name, text in (extra_files or {}).items():
        (repo / name).write_text(text, encoding="utf-8")
    if params_overrides:
        set_params(repo, params_overrides)
    sh(["git", "init", "-q"], repo)
    # Queued experiments commit inside DVC's workspace: a fresh machine may lack a git identity.
    sh(["git", "config", "user.email", "e2e@example.com"], repo)
    sh(["git", "config", "user.name", "e2e"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "tiny pipeline"], repo)
    return repo


def set_params(repo: Path, overrides: dict) -> None:
    """``overrides`` (dotted keys) written into ``repo``'s params.yaml."""
    params = set_dotted(yaml.safe_load((repo / "params.yaml").read_text()), overrides)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def stale_stages(status: str) -> set[str]:
    """The stages `dvc status` names (its unindented lines)."""
    return {line.rstrip(":") for line in status.splitlines() if line and not line.startswith((" ", "\t"))}


def stage_status(status: str, stage: str) -> str:
    """What `dvc status` says under ``stage`` (its indented lines; empty if the stage is not named)."""
    found = re.search(rf"^{re.escape(stage)}:\n((?:[ \t].*\n?)*)", status, re.M)
    return found.group(1) if found else ""


def dvc_paths(entries) -> Iterator[str]:
    """The paths of a dvc.yaml deps, outs, metrics or plots list (an entry is a path, or a path with its options)."""
    for entry in entries or []:
        yield next(iter(entry)) if isinstance(entry, dict) else entry


def sqlite_runs(repo: Path):
    """The runs of ``repo``'s own SQLite MLflow store (a pandas table, mlflow.search_runs')."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["qlora-pipeline"])


def raw_ids(repo: Path) -> list[str]:
    """The conversation ids fetch wrote, in order."""
    lines = (repo / "data/raw/conversations.jsonl").read_text().splitlines()
    return [json.loads(line)["id"] for line in lines]


# ------------------------------------------------------------------ built once per test run


def built_once(tmp_path_factory, name: str, build) -> Path:
    """The folder ``build(folder)`` filled, built once per test run whichever pytest-xdist worker asks first.

    A session fixture alone is built once per worker: under `make test`'s two workers the real model
    was quantized twice and the tiny pipeline's baseline run twice (each about two minutes of a core
    on the AVX2 machine). The workers share the run's base temporary folder; a file lock makes the
    second wait for the first's build. The builds here are read only: tests copy what they change.
    """
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # popen-gwN's parent: the run's base temporary folder
    folder = root / f"built-once-{name}"
    with FileLock(f"{folder}.lock"):
        if not (folder / ".built").exists():  # a worker whose build failed leaves no mark: the next tries again
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / ".built").touch()
    return folder


# ------------------------------------------------------------------ the tiny pipeline's baseline

# Where the end-to-end repositories keep their chat log (git-tracked, as a user's small export).
TINY_DATA = "data/source/chat.jsonl"


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


# The baseline's run: the tiny run, float32 throughout (no autocast, so no rounding differs from one run of
# it to the next), trained long enough for test_failures.py's kill test to checkpoint and resume (that test
# reruns it in a copy, killed, and compares with the baseline), and within one epoch (the train split holds
# ~60 examples, 15 batches of 4). A run resumed in a later epoch is not bit-identical with the default
# group_by_length sampling: transformers' LengthGroupedSampler draws each epoch's order from the global
# generator, whose state on resume is the checkpoint's, not the epoch start's (seen: resumed at step 20
# of 30, final validation loss 10.78249 against 10.78244). docs/failures.md, "What survives a failure".
BASELINE_RUN = {**TINY_RUN, "data.path": TINY_DATA,
                "model.quantization.bnb_4bit_compute_dtype": "float32", "train.bf16": False, "train.fp16": False,
                "train.max_steps": 14, "train.eval_steps": 2, "train.save_steps": 2, "train.logging_steps": 1,
                "train.early_stopping_patience": None}


def tiny_repo(root: Path, tiny_llama: Path) -> Path:
    """A fresh repository of the baseline's params and data, nothing run yet."""
    return copy_repository(root, {**BASELINE_RUN, "model.name_or_path": str(tiny_llama)},
                           {TINY_DATA: jsonl(chat_rows())})


@dataclass(frozen=True)
class Baseline:
    """The tiny pipeline run once under DVC and committed (`dvc repro`'s output kept for the tests that read it),
    with each stage's seconds in that run, from its "Running stage" line to the next (to the end, for the last)."""

    repo: Path
    repro_output: str
    durations: dict[str, float]


def timed_repro(repo: Path, timeout: float = 600) -> tuple[str, dict[str, float]]:
    """`dvc repro` in ``repo``: its output, and each stage's seconds as DVC ran them (the stage and DVC's commit
    of its outputs). Fails, with the output, if the run fails or takes over ``timeout`` seconds."""
    import threading

    proc = subprocess.Popen(["dvc", "repro"], cwd=repo, env=pipeline_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = threading.Timer(timeout, proc.kill)  # a hung run fails instead of blocking the read
    deadline.start()
    lines, started = [], {}
    try:
        for line in proc.stdout:
            lines.append(line)
            found = re.match(r"Running stage '([^']+)'", line)
            if found:
                started[found.group(1)] = time.monotonic()
    finally:
        deadline.cancel()
    ended = time.monotonic()
    out = "".join(lines)
    assert proc.wait() == 0, f"dvc repro failed:\n{out[-3000:]}"
    order = list(started)
    ends = [*(started[stage] for stage in order[1:]), ended]
    return out, {stage: end - started[stage] for stage, end in zip(order, ends)}


@pytest.fixture(scope="session")
def tiny_baseline(tmp_path_factory, tiny_llama) -> Baseline:
    """Built once per `make test` (built_once); the end-to-end modules each start from a copy (copy_baseline),
    not a run of their own, and the kill test compares its killed run with it."""
    def build(folder: Path) -> None:
        repo = tiny_repo(folder / "repo", tiny_llama)
        out, durations = timed_repro(repo)
        sh(["git", "add", "-A"], repo)  # dvc.lock and the metrics (cache: false: git carries them)
        sh(["git", "commit", "-qm", "baseline results"], repo)
        (folder / "repro-output.txt").write_text(out)
        (folder / "durations.json").write_text(json.dumps(durations))

    folder = built_once(tmp_path_factory, "tiny-baseline", build)
    return Baseline(folder / "repo", (folder / "repro-output.txt").read_text(),
                    json.loads((folder / "durations.json").read_text()))


def copy_baseline(baseline: Baseline, repo: Path) -> Path:
    """A copy of the baseline repository (git history, DVC cache, outputs and MLflow store) at ``repo``.

    The MLflow store names its artifact folder by absolute path: the copy's is pointed at its own
    folder, so nothing a test logs lands in the baseline or another copy.
    """
    import sqlite3

    shutil.copytree(baseline.repo, repo, symlinks=True)
    old, new = baseline.repo.as_uri(), repo.as_uri()
    with sqlite3.connect(repo / "mlflow.db") as db:
        db.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)", (old, new))
        db.execute("UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (old, new))
    db.close()
    return repo


# ------------------------------------------------------------------------------ models


@pytest.fixture(scope="session")
def quantized_base(tmp_path_factory, base_params_dict) -> Path:
    """The real SmolLM2-135M GGUF, quantized to NF4 by the quantize-load stage (built once per test run)."""
    def build(tmp: Path) -> None:
        quantize_load(make_params(base_params_dict, {"model.smoke_prompts": ["hi, how are you?"],
                                                     "model.smoke_max_new_tokens": 8}, tmp), tmp, "tests-quantized-base")

    return built_once(tmp_path_factory, "quantized-base", build) / "base"


def quantize_load(params: Params, folder: Path, run_key: str) -> None:
    """The quantize-load stage into ``folder``/base, logging to the params' store under its own run key."""
    from qlora_pipeline.pipeline.quantize_load import run_quantize_load

    os.environ["QLORA_PIPELINE_RUN_KEY"] = run_key
    try:
        run_quantize_load(params, folder / "base", folder / "base.json")
    finally:
        del os.environ["QLORA_PIPELINE_RUN_KEY"]


def random_llama(folder: Path, tokenizer_source: Path, final_norm: float = 1.0, **sizes) -> Path:
    """A random Llama with the real tokenizer (and so the real chat template and end token), saved to ``folder``.

    ``final_norm`` scales the logits alone (the last norm's weight): at 1 a random Llama's logits are nearly
    uniform, where a trained model's few likely tokens stand far above the rest.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    config = LlamaConfig(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         **{"tie_word_embeddings": True, **sizes})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.norm.weight.fill_(final_norm)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, quantized_base) -> Path:
    """A tiny random Llama with the real tokenizer: for tests where only shapes matter.

    One folder per test run (built_once), as tiny_baseline's repository names it by path.
    """
    def build(root: Path) -> None:
        random_llama(root / "tiny-llama", quantized_base, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

    return built_once(tmp_path_factory, "tiny-llama", build) / "tiny-llama"


PERSONAS = ("alice", "bob", "carol")


def random_adapters(base: Path, base_params_dict: dict, folder: Path) -> dict[str, Path]:
    """Three LoRA adapters on the 4-bit ``base``, as train-adapter saves them, with distinct random weights.

    Random (not trained) so that they are made in seconds and differ clearly from each other and
    from the base. Their ``training_config.json`` carries what chat and serve read: the base's
    fingerprint, the system prompt, and float32 precision (no autocast), so outputs are exact.
    """
    import torch
    from peft import get_peft_model

    from qlora_pipeline import training
    from qlora_pipeline.layout import RESOLVED_CONFIG
    from qlora_pipeline.modeling.preparation import base_fingerprint, prepare_4bit_base

    params = make_params(base_params_dict, {"train.bf16": False, "train.fp16": False,
                                            "model.quantization.bnb_4bit_compute_dtype": "float32"})
    made = {}
    for index, name in enumerate(PERSONAS):
        model, tokenizer = prepare_4bit_base(base, "float32")
        config = training.lora_config(params.train)
        config.init_lora_weights = False  # random A and B: the adapter changes the outputs
        torch.manual_seed(100 + index)
        model = get_peft_model(model, config)
        with torch.no_grad():  # large enough that each persona's greedy reply differs from the base's
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.mul_(4.0)
        out = folder / name
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        resolved = {"method": "qlora", "base_model": str(base), "seed": params.seed,
                    "base_fingerprint": base_fingerprint("qlora", base, {}),
                    "model": params.model.model_dump(), "train": params.train.model_dump(),
                    "split": {"system_prompt": f"You are {name}. Reply in your own voice.", "context_turns": 4}}
        (out / RESOLVED_CONFIG).write_text(json.dumps(resolved, indent=2))
        made[name] = out
    return made


def adapters_built_once(tmp_path_factory, name: str, base: Path, base_params_dict: dict) -> dict[str, Path]:
    """``random_adapters`` on ``base``, made once per test run (``built_once``; both workers used to make them)."""
    folder = built_once(tmp_path_factory, name, lambda root: random_adapters(base, base_params_dict, root))
    return {persona: folder / persona for persona in PERSONAS}


@pytest.fixture(scope="session")
def persona_adapters(tmp_path_factory, quantized_base, base_params_dict) -> dict[str, Path]:
    """Three random LoRA adapters on the real 4-bit base (``random_adapters``)."""
    return adapters_built_once(tmp_path_factory, "persona-adapters", quantized_base, base_params_dict)


@pytest.fixture(scope="session")
def small_base(tmp_path_factory, quantized_base, base_params_dict) -> Path:
    """A random Llama of the real model's tokenizer, layout and 4-bit quantization at a nineteenth of its size
    (7.1M weights), quantized by the quantize-load stage (built once per test run).

    For the tests that hold the engine's rows to generate()'s tokens and the server's replies to the engine's:
    what they check (scheduling, padding, caches, per-row adapters and decoding) is the same code on any Llama,
    and on the real model a float32 forward pass on one thread reads 540 MB of weights (~60 ms), most of those
    modules' time (SMALL_LLAMA says how it is drawn).
    """
    def build(root: Path) -> None:
        llama = random_llama(root / "small-llama", quantized_base, final_norm=5.7, **SMALL_LLAMA)
        quantize_load(make_params(base_params_dict, {"model.name_or_path": str(llama), "model.gguf_file": None,
                                                     "model.dtype": "float32", "model.smoke_prompts": ["hi"],
                                                     "model.smoke_max_new_tokens": 2}, root), root, "tests-small-base")

    return built_once(tmp_path_factory, "small-base", build) / "base"


# Drawn at 3.5x the usual scale: at the usual scale a random Llama's attention is near-uniform and its residual
# stream its last token's embedding, so every prompt gets the same reply, one token repeated; at 5x no reply
# repeats a token, so the repetition controls would change nothing. At 3.5x each prompt of the tests gets its
# own reply and about half the greedy tokens repeat one before them (a small trained model's loops).
# final_norm spreads the logits (standard deviation ~4.5): a sampled token's probability is ~0.4 at the median.
SMALL_LLAMA = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 2, "max_position_embeddings": 8192, "initializer_range": 0.07}


@pytest.fixture(scope="session")
def small_adapters(tmp_path_factory, small_base, base_params_dict) -> dict[str, Path]:
    """Three random LoRA adapters on ``small_base`` (``random_adapters``)."""
    return adapters_built_once(tmp_path_factory, "small-adapters", small_base, base_params_dict)


@pytest.fixture(scope="session")
def trained_size_adapters(tmp_path_factory, persona_adapters) -> dict[str, Path]:
    """The session's persona adapters with updates of the size training makes (lora_B / 20).

    The session's random adapters add updates twice the norm of the base weights, where the model
    turns chaotic: float32 summation order alone moves a logit by 0.16, and bfloat16 rounding
    changes every prediction (mean KL 8 against the reference). At 1/20 the updates are ~10% of
    the weights and move the outputs as much as a trained adapter does (mean KL 0.8 from the base
    without adapter; the real trained adapter: 0.5).
    """
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("trained-size")
    scaled = {}
    for name in ("alice", "bob"):
        scaled[name] = folder / name
        shutil.copytree(persona_adapters[name], scaled[name])
        weights = scaled[name] / "adapter_model.safetensors"
        tensors = {k: v / 20 if "lora_B" in k else v for k, v in load_file(weights).items()}
        save_file(tensors, weights, metadata={"format": "pt"})
    return scaled


SAMPLED = {"temperature": 0.9, "top_p": 0.95, "top_k": 0, "repetition_penalty": 1.1, "no_repeat_ngram_size": 3,
           "exponential_decay_length_penalty": None}


@pytest.fixture(scope="session")
def tiny_run(tiny_llama, base_params_dict, tmp_path_factory):
    """quantize-load -> train-adapter (2 steps) -> style-judge -> choose-decoding -> evaluate on a tiny 4-bit Llama
    and synthetic splits, built once per session for test_evaluation and test_decoding.

    The grid holds one sampled setting, so evaluate's chosen row runs two seeded passes.
    """
    import os

    from qlora_pipeline.pipeline.choose_decoding import run_choose_decoding
    from qlora_pipeline.pipeline.evaluate import run_evaluate
    from qlora_pipeline.pipeline.quantize_load import run_quantize_load
    from qlora_pipeline.pipeline.style_judge import run_style_judge
    from qlora_pipeline.pipeline.train_adapter import run_train_adapter

    tmp = tmp_path_factory.mktemp("tiny_run")
    params = make_params(base_params_dict, {
        "model.name_or_path": str(tiny_llama), "model.gguf_file": None, "model.dtype": "float32",
        "model.smoke_prompts": ["hi"], "model.smoke_max_new_tokens": 2,
        "train.max_steps": 2, "train.eval_steps": 1, "train.save_steps": 1, "train.per_device_train_batch_size": 4,
        "evaluate.max_samples": 6, "evaluate.max_new_tokens": 6, "evaluate.batch_size": 4,
        "evaluate.bootstrap_samples": 200, "evaluate.human_eval_samples": 4, "evaluate.samples_per_prompt": 2,
        "decoding.grid": [SAMPLED], "decoding.max_samples": 4}, tmp)
    os.environ["QLORA_PIPELINE_RUN_KEY"] = "tiny-run"
    try:
        from test_training import synthetic_splits

        splits = synthetic_splits(tmp / "splits", n_train=16, n_val=8)
        run_quantize_load(params, tmp / "base", tmp / "base.json")
        run_train_adapter(params, tmp / "base", splits, tmp / "adapter", tmp / "ckpt", tmp / "train.json",
                          tmp / "train_log.csv")
        run_style_judge(params, splits / "train.jsonl", splits / "val.jsonl", tmp / "base", tmp / "judge",
                        tmp / "judge.json")
        run_choose_decoding(params, tmp / "base", tmp / "adapter", splits / "val.jsonl", tmp / "judge",
                            tmp / "decoding.json", tmp / "decoding_metrics.json")
        extra = tmp / "params.yaml"
        extra.write_text("seed: 1\n")
        metrics = run_evaluate(params, tmp / "base", tmp / "adapter", splits / "test.jsonl", tmp / "eval.json",
                               tmp / "reports", tmp / "eval_rouge.csv", [extra, tmp / "train_log.csv"],
                               train_path=splits / "train.jsonl", log_csv=tmp / "train_log.csv",
                               decoding_path=tmp / "decoding.json", judge_dir=tmp / "judge")
    finally:
        del os.environ["QLORA_PIPELINE_RUN_KEY"]
    return params, tmp, metrics
