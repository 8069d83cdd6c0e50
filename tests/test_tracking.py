"""Where the MLflow store is, how stages find their execution's run, and what a server that is away costs."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import make_params, place_store
from qlora_pipeline import mlflow_store, process, tracking
from qlora_pipeline import spool as spooling
from qlora_pipeline.config import MlflowConfig
from qlora_pipeline.errors import PipelineError


def test_store_is_at_the_main_repo_root_inside_a_dvc_temp_workspace(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    workspace = repo / ".dvc/tmp/exps/tmpabc123"
    (workspace / ".dvc").mkdir(parents=True)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(workspace)
    assert mlflow_store.repo_root() == repo
    assert tracking.tracking_uri(MlflowConfig(tracking_uri=None, experiment_name="x")) == f"sqlite:///{repo}/mlflow.db"


def test_dvc_root_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert mlflow_store.repo_root(Path("/")) == tmp_path


def test_explicit_uri_is_kept():
    assert tracking.tracking_uri(MlflowConfig(tracking_uri="http://127.0.0.1:5000", experiment_name="x")) == "http://127.0.0.1:5000"


def test_execution_key_follows_the_dvc_experiment(monkeypatch):
    monkeypatch.delenv("QLORA_PIPELINE_RUN_KEY", raising=False)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-one")
    one = tracking.execution_key()
    monkeypatch.setenv("DVC_EXP_NAME", "exp-two")
    assert tracking.execution_key() != one
    assert tracking.execution_key().endswith("exp-two")


def test_flattened_params_and_text_metrics_are_logged(params_factory, monkeypatch):
    import mlflow

    monkeypatch.setenv("QLORA_PIPELINE_RUN_KEY", "k1")
    params = params_factory()
    with tracking.pipeline_run(params, "demo"):
        tracking.log_params("sec", {"a": {"b": 1}, "c": None, "d": [1, 2]})
        tracking.log_metrics("demo", {"n": 3, "nested": {"x": 0.5}, "who": "p1"})
    with tracking.pipeline_run(params, "again"):
        tracking.log_metrics("again", {"n": 4})
    runs = mlflow.search_runs(experiment_names=[params.mlflow.experiment_name])
    assert len(runs) == 1
    row = runs.iloc[0]
    # every section's params, whichever stage opened the run
    assert row["params.seed"] == "42" and row["params.train.lora.r"] == "16"
    assert row["params.evaluate.max_new_tokens"] == "40" and row["params.clean.pii"].startswith("['email'")
    assert row["params.sec.a.b"] == "1" and row["params.sec.c"] == "null" and row["params.sec.d"] == "[1, 2]"
    assert row["metrics.demo.nested.x"] == 0.5 and row["metrics.again.n"] == 4
    assert row["tags.demo.who"] == "p1" and row["tags.stage.demo"] == "ran"


# ------------------------------------------------------------- a server that is away, and the spool


def closed_port() -> int:
    """A port nothing listens on: bound, then released."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def away(base_params_dict, tmp_path, monkeypatch):
    """Params pointing MLflow at a server that is not there, and the spool inside tmp_path/repo."""
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo"))
    monkeypatch.setenv("QLORA_PIPELINE_RUN_KEY", "k-away")
    for name in mlflow_store.HTTP_DEFAULTS:  # unset, so pipeline_run sets its own; removed again after the test
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return make_params(base_params_dict, {"mlflow.tracking_uri": f"http://127.0.0.1:{closed_port()}"})


# A stage's metrics record, as a spool keeps it.
SPOOLED_METRICS = {"op": "metrics", "values": {"train.loss": 2.0}, "step": 1, "timestamp": 2_000}


def spool_opening(away, key: str) -> tuple[Path, dict]:
    """The spool folder, made, and the opening record of a train stage of execution ``key`` that never reached its
    run (the away store's)."""
    spool = spooling.spool_dir()
    spool.mkdir(parents=True)
    return spool, {"op": "open", "tracking_uri": away.mlflow.tracking_uri, "experiment": "qlora-pipeline",
                   "key": key, "stage": "train", "run_name": None, "tags": {mlflow_store.KEY_TAG: key},
                   "params": {"seed": "42"}, "timestamp": 1_000, "run_id": None}


def synced_run(store: str):
    import mlflow

    client = mlflow.MlflowClient(store)
    experiment = client.get_experiment_by_name("qlora-pipeline")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_unreachable_server_spools_every_call_and_sync_sends_it_once(away, params_factory, tmp_path, capsys):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"  # params_factory's store: the "server" synced into
    with tracking.pipeline_run(params_factory(), "fetch"):  # the first stage reached it
        tracking.log_metrics("fetch", {"conversations": 7})
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter/weights.txt").write_text("w1")
    (tmp_path / "report.md").write_text("first")
    started = time.perf_counter()
    with tracking.pipeline_run(away, "train") as run:
        assert run.info.run_id is None  # no run to name until the sync makes or finds it
        tracking.log_params("decoding.chosen", {"top_p": 0.9})
        tracking.log_metrics("train", {"best_val_loss": 1.25, "persona": "pat", "curve": {"x": 0.5}})
        for step, loss in ((1, 2.0), (2, 1.5)):
            tracking.log_metrics("train", {"loss": loss}, step=step)
        tracking.log_artifact(tmp_path / "adapter", artifact_path="adapter")
        tracking.log_artifact(tmp_path / "report.md")
    (tmp_path / "report.md").write_text("changed after the stage")  # the spool kept the stage's copy
    with tracking.pipeline_run(away, "evaluate"):
        tracking.log_metrics("eval", {"rouge1": {"tuned": 0.3}})
    assert time.perf_counter() - started < 20  # a probe per stage, not MLflow's minutes of retries
    said = [line for line in capsys.readouterr().err.splitlines() if "unreachable" in line]
    assert len(said) == 2 and all(line.startswith(f"mlflow: {away.mlflow.tracking_uri} unreachable; this stage's "
                                                  "params and metrics kept in ") and
                                  line.endswith("; send them with qlora-pipeline mlflow-sync") for line in said)
    spool = tmp_path / "repo" / spooling.SPOOL_DIR
    assert len(list(spool.glob("*.jsonl"))) == 2 and not list(spool.glob("*.part"))
    kept = tmp_path / "kept"
    shutil.copytree(spool, kept)

    sent = spooling.sync_spool(store)
    assert len(sent) == 2 and all("-> run " in line for line in sent)
    assert list(spool.iterdir()) == []
    client, run = synced_run(store)  # the run the first stage opened, joined by the execution key
    assert run.data.tags[mlflow_store.KEY_TAG] == "k-away" and run.info.status == "FINISHED"
    assert run.data.tags["stage.fetch"] == run.data.tags["stage.train"] == run.data.tags["stage.evaluate"] == "ran"
    assert run.data.metrics == {"fetch.conversations": 7.0, "train.best_val_loss": 1.25, "train.curve.x": 0.5,
                                "train.loss": 1.5, "eval.rouge1.tuned": 0.3}
    assert run.data.tags["train.persona"] == "pat" and run.data.params["decoding.chosen.top_p"] == "0.9"
    assert run.data.params["seed"] == "42"  # logged by the stage that opened the run
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train.loss")]
    assert sorted(history) == [(1, 2.0), (2, 1.5)]
    artifacts = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "down")))
    assert (artifacts / "adapter/weights.txt").read_text() == "w1" and (artifacts / "report.md").read_text() == "first"

    assert spooling.sync_spool(store) == []  # nothing left: a second sync sends nothing
    shutil.rmtree(spool)
    shutil.copytree(kept, spool)  # as if the first sync had been cut short before removing its files
    assert len(spooling.sync_spool(store)) == 2
    client, again = synced_run(store)
    assert again.data.metrics == run.data.metrics and again.data.params == run.data.params
    assert len(client.get_metric_history(run.info.run_id, "train.loss")) == 2


def test_a_spool_without_its_run_makes_the_run_with_every_param(away, tmp_path):
    store = f"sqlite:///{tmp_path / 'other.db'}"
    with tracking.pipeline_run(away, "split"):
        tracking.log_metrics("split", {"train": {"examples": 12}})
    spooling.sync_spool(store)
    _, run = synced_run(store)
    assert run.data.tags[mlflow_store.KEY_TAG] == "k-away" and run.data.tags["dvc.exp_name"] == "workspace"
    assert run.data.tags["mlflow.user"]  # what mlflow.start_run adds, taken when the stage ran
    assert run.data.params["seed"] == "42" and run.data.params["train.lora.r"] == "16"
    assert run.data.params["mlflow.tracking_uri"] == away.mlflow.tracking_uri
    assert run.data.metrics == {"split.train.examples": 12.0} and run.info.status == "FINISHED"


def test_a_server_gone_after_the_probe_costs_seconds(away, monkeypatch, capsys):
    """The probe said yes, then the first REST call finds nobody: retried briefly, then the spool."""
    real = tracking.reachable
    answers = iter([True])
    monkeypatch.setattr(tracking, "reachable", lambda uri: next(answers, None) or real(uri))
    started = time.perf_counter()
    with tracking.pipeline_run(away, "evaluate"):
        tracking.log_metrics("eval", {"n": 1})
    assert time.perf_counter() - started < 30  # MLflow's own defaults retry for about four minutes
    assert capsys.readouterr().err.count("unreachable;") == 1
    (spool,) = spooling.spool_dir().glob("*.jsonl")
    records = [json.loads(line) for line in spool.read_text().splitlines()]
    assert [r["op"] for r in records] == ["open", "tags", "metrics", "end"] and records[0]["run_id"] is None


def test_a_killed_stage_spool_is_sent_and_a_running_one_left(away, tmp_path):
    spool, opening = spool_opening(away, "k9")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lines = json.dumps(opening) + "\n" + json.dumps(SPOOLED_METRICS) + "\n" + '{"op": "metr'  # killed mid-line
    (spool / f"1-{dead.stdout.strip()}.jsonl.part").write_text(lines)
    (spool / f"2-{os.getpid()}.jsonl.part").write_text(json.dumps({**opening, "key": "k10"}) + "\n")
    store = f"sqlite:///{tmp_path / 'store.db'}"
    sent, left = spooling.sync_spool(store)
    assert "1 records of stage train" in sent and "still writes it" in left
    _, run = synced_run(store)
    assert run.data.metrics == {"train.loss": 2.0} and run.data.params == {"seed": "42"}
    assert [p.name for p in spool.iterdir()] == [f"2-{os.getpid()}.jsonl.part"]


def test_sync_tells_each_file_sent_before_one_it_refuses_and_leaves_what_no_stage_wrote(away, tmp_path, capsys):
    """A file refused stopped the sync with its error alone: the files sent (and removed) before it went unsaid.
    A folder or another program's file under the spool's names was a traceback (IsADirectoryError, IndexError)."""
    from qlora_pipeline.cli import main

    spool, opening = spool_opening(away, "k1")
    (spool / "1000-1.jsonl").write_text(json.dumps(opening) + "\n" + json.dumps(SPOOLED_METRICS) + "\n")
    (spool / "1500-1.jsonl").mkdir()
    (spool / "0-notes.jsonl.part").write_text("mine")  # not Spool's name: its writer cannot be told
    (spool / "2000-1.jsonl").write_text("")
    store = f"sqlite:///{tmp_path / 'store.db'}"
    assert main(["mlflow-sync", "--tracking-uri", store]) == 1
    out, err = capsys.readouterr()
    assert "mlflow-sync: 1000-1.jsonl: 1 records of stage train -> run " in out
    assert "mlflow-sync: 1500-1.jsonl: not a spool file" in out and "0-notes.jsonl.part: not a spool file" in out
    assert "2000-1.jsonl: no opening record" in err and "Traceback" not in err
    assert sorted(p.name for p in spool.iterdir()) == ["0-notes.jsonl.part", "1500-1.jsonl", "2000-1.jsonl"]


def test_a_spool_artifact_outside_the_spool_folder_is_refused_before_anything_is_sent(away, tmp_path):
    """'/etc/hostname' in an artifact record was uploaded to the store: a spool logs copies in its own folder."""
    spool, opening = spool_opening(away, "k2")
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the store")
    for path in (str(secret), f"../{secret.name}", "1-1.files/../../secret.txt"):
        (spool / "1-1.jsonl").write_text(json.dumps(opening) + "\n" + json.dumps(
            {"op": "artifact", "path": path, "artifact_path": "leak"}) + "\n")
        with pytest.raises(PipelineError, match=r"1-1\.jsonl:2: the artifact .* is not a copy in "):
            spooling.sync_spool(f"sqlite:///{tmp_path / 'store.db'}")
    assert (spool / "1-1.jsonl").exists() and not (tmp_path / "store.db").exists()


@pytest.mark.parametrize("record, says", [
    ({"op": "metrics", "values": {"a": "high"}, "step": 0, "timestamp": 1}, "needs numbers as values"),
    ({"op": "metrics", "values": {"a": 1.0}, "step": "x", "timestamp": 1}, "whole numbers >= 0 as step"),
    ({"op": "metrics", "values": {"a": True}, "step": 0, "timestamp": -1}, "needs numbers as values"),
    ({"op": "params", "values": {"seed": 7}}, "a spool 'params' record holds text values only"),
    (None, "not a spool record"),  # a cut last line in a file its stage closed: damage, not a kill
])
def test_a_record_mlflow_would_refuse_is_named_before_anything_is_sent(away, tmp_path, record, says):
    """MLflow's refusal was a traceback after the lines before had been sent, leaving a run RUNNING; a cut last line
    of a .jsonl (renamed only when its stage ended) was dropped without a word."""
    spool, opening = spool_opening(away, "k3")
    last = '{"op": "metrics", "values": {"a": 1.0}, "st' if record is None else json.dumps(record)
    (spool / "1-1.jsonl").write_text(json.dumps(opening) + "\n" + json.dumps(SPOOLED_METRICS) + "\n" + last + "\n")
    with pytest.raises(PipelineError, match=rf"1-1\.jsonl:3: .*{re.escape(says)}"):
        spooling.sync_spool(f"sqlite:///{tmp_path / 'store.db'}")
    assert (spool / "1-1.jsonl").exists() and not (tmp_path / "store.db").exists()


@pytest.mark.parametrize("target, says", [
    ("new/dir/store.db", "new/dir/store.db: no such folder as "),  # a mistyped --tracking-uri
    ("folder.db", "folder.db: a folder, not an MLflow store file"),
    ("notes.db", "notes.db: not an MLflow store (no MLflow tables in it; an empty file)"),
])
def test_sync_into_a_file_that_is_no_store_sends_nothing_and_makes_nothing(away, tmp_path, target, says, capsys):
    """A mistyped --tracking-uri made its folders and a new store holding the runs sent, and removed the spool;
    another program's database got MLflow's tables built into it."""
    from qlora_pipeline.cli import main

    spool, opening = spool_opening(away, "k4")
    (spool / "1-1.jsonl").write_text(json.dumps(opening) + "\n" + json.dumps(SPOOLED_METRICS) + "\n")
    (tmp_path / "folder.db").mkdir()
    (tmp_path / "notes.db").write_bytes(b"")  # empty: MLflow would have made it a store
    before = sorted(tmp_path.rglob("*"))
    assert main(["mlflow-sync", "--tracking-uri", f"sqlite:///{tmp_path / target}"]) == 1
    err = capsys.readouterr().err
    assert says in err and f": 1-1.jsonl and later files stay in {spool}; name another with --tracking-uri" in err
    assert sorted(tmp_path.rglob("*")) == before and (tmp_path / "notes.db").read_bytes() == b""


def test_a_spool_for_a_store_mlflow_cannot_open_is_named_and_kept(away, empty_store, tmp_path, capsys):
    """A spool whose store MLflow has no client for (an ftp:// URI), or whose store is damaged past its table
    list: a traceback, the spool kept."""
    import contextlib
    import sqlite3

    from conftest import place_store
    from qlora_pipeline.cli import main

    spool, opening = spool_opening(away, "k5")
    (spool / "1-1.jsonl").write_text(json.dumps({**opening, "tracking_uri": "ftp://127.0.0.1/store"}) + "\n")
    assert main(["mlflow-sync"]) == 1
    err = capsys.readouterr().err
    assert "error: ftp://127.0.0.1/store: MLflow could not read or write this store (" in err
    assert "Traceback" not in err and (spool / "1-1.jsonl").exists()

    store = place_store(empty_store, tmp_path)
    with contextlib.closing(sqlite3.connect(tmp_path / "mlflow.db")) as db:
        db.execute("DROP TABLE experiment_tags")
        db.commit()
    assert main(["mlflow-sync", "--tracking-uri", store]) == 1
    err = capsys.readouterr().err
    assert f"error: {store}: MLflow could not read or write this store (" in err and "experiment_tags" in err
    assert "Traceback" not in err and (spool / "1-1.jsonl").exists()


def test_sync_keeps_the_spool_while_the_server_is_still_away(away):
    with tracking.pipeline_run(away, "clean"):
        tracking.log_metrics("clean", {"messages_out": 5})
    with pytest.raises(PipelineError, match="unreachable: .* stay in .*make mlflow-server"):
        spooling.sync_spool()
    assert len(list(spooling.spool_dir().glob("*.jsonl"))) == 1


def test_a_second_process_creating_the_experiment_reads_the_first_ones(tmp_path):
    """Two queued experiments start together: both find no experiment, the second create fails."""
    import mlflow

    store = f"sqlite:///{tmp_path / 'race.db'}"
    first = mlflow.MlflowClient(store).create_experiment("qlora-pipeline")

    class LateClient(mlflow.MlflowClient):
        looked = False

        def get_experiment_by_name(self, name):
            if not self.looked:  # what this process saw just before the other one's create landed
                self.looked = True
                return None
            return super().get_experiment_by_name(name)

    assert mlflow_store.experiment_for(LateClient(store), "qlora-pipeline", store) == first


def test_a_server_keeps_its_own_artifact_root_and_a_local_store_a_local_one(monkeypatch, tmp_path):
    created = {}

    class Recorder:
        def get_experiment_by_name(self, name):
            return None

        def create_experiment(self, name, artifact_location=None):
            created[name] = artifact_location
            return "1"

    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    mlflow_store.experiment_for(Recorder(), "server", "http://127.0.0.1:5000")
    mlflow_store.experiment_for(Recorder(), "local", f"sqlite:///{tmp_path}/mlflow.db")
    assert created == {"server": None, "local": (tmp_path / "mlartifacts").as_uri()}


def test_a_repository_copied_or_moved_with_its_store_keeps_its_runs_artifacts_to_itself(
        base_params_dict, empty_store, tmp_path, monkeypatch, capsys):
    """MLflow keeps artifact locations as absolute paths: a copy's stages wrote into the original's mlartifacts,
    and a moved checkout's made the old path again. The store at the repository root follows its repository."""
    import mlflow

    first, copy, moved = tmp_path / "first", tmp_path / "copy", tmp_path / "moved"
    first.mkdir()
    place_store(empty_store, first)

    def stage(repo: Path, key: str) -> str:
        (repo / "report.txt").write_text(f"{key}\n")
        monkeypatch.setenv("DVC_ROOT", str(repo))
        monkeypatch.setenv("QLORA_PIPELINE_RUN_KEY", key)
        capsys.readouterr()
        with tracking.pipeline_run(make_params(base_params_dict, None, repo), "demo"):
            tracking.log_artifact(repo / "report.txt")
        return capsys.readouterr().out

    def reports(repo: Path) -> list[str]:
        return sorted(path.read_text() for path in (repo / "mlartifacts").rglob("report.txt"))

    def artifacts_read_back(repo: Path) -> dict[str, str]:
        client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name("qlora-pipeline").experiment_id])
        assert all(run.info.artifact_uri.startswith(f"{(repo / 'mlartifacts').as_uri()}/") for run in runs), runs
        return {run.data.tags[mlflow_store.KEY_TAG]: Path(client.download_artifacts(
            run.info.run_id, "report.txt", str(tmp_path / "down" / run.info.run_id))).read_text() for run in runs}

    assert "copied or moved" not in stage(first, "k1")
    shutil.copytree(first, copy)
    said = stage(copy, "k2")
    assert reports(first) == ["k1\n"] and reports(copy) == ["k1\n", "k2\n"]
    assert f"mlflow.db was copied or moved here from {first}: " in said, said
    assert artifacts_read_back(first) == {"k1": "k1\n"}
    assert artifacts_read_back(copy) == {"k1": "k1\n", "k2": "k2\n"}  # the earlier run read from the copy's
    assert "copied or moved" not in stage(copy, "k3")  # said once: the store follows the copy now

    shutil.move(copy, moved)
    assert f"here from {copy}: " in stage(moved, "k4")
    assert not copy.exists()  # the old path is not made again
    assert artifacts_read_back(moved) == {key: f"{key}\n" for key in ("k1", "k2", "k3", "k4")}


def creating_store(uri: str, folder: Path) -> subprocess.Popen:
    """A process creating the SQLite store at ``uri`` in ``folder``, once its temporary is seen (or it ended)."""
    creator = subprocess.Popen([sys.executable, "-c", "import sys; from qlora_pipeline import mlflow_store; "
                                "mlflow_store.ensure_sqlite_store(sys.argv[1])", uri])
    deadline = time.monotonic() + 120
    while not list(folder.glob(".mlflow.db.*.tmp")) and creator.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    return creator


def test_a_store_creation_killed_mid_migration_leaves_no_store_and_the_next_stage_makes_it(tmp_path):
    """kill -9 while MLflow migrates a new SQLite store: nothing at the store's path, so the next
    stage builds it whole instead of refusing a store stuck at a middle schema version."""
    store = tmp_path / "mlflow.db"
    uri = f"sqlite:///{store}"
    creator = creating_store(uri, tmp_path)
    creator.kill()
    creator.wait()
    assert list(tmp_path.glob(".mlflow.db.*.tmp")), "the creator ended before its migration was seen"
    assert not store.exists()

    client = mlflow_store.mlflow_client(uri)
    experiment = client.create_experiment("after-the-kill")
    assert client.get_experiment(experiment).name == "after-the-kill"
    assert store.exists() and not list(tmp_path.glob(".mlflow.db.*.tmp"))  # what the killed one left, removed


def test_a_creator_killed_and_not_yet_reaped_counts_as_gone(tmp_path):
    """A killed stage's process that nobody has reaped yet is a zombie, its pid still listed: an orphan waits for
    init, which takes seconds on some machines. Its store temporary is stale all the same."""
    store = tmp_path / "mlflow.db"
    uri = f"sqlite:///{store}"
    creator = creating_store(uri, tmp_path)
    creator.send_signal(signal.SIGKILL)  # and not reaped: our child stays a zombie until wait()
    try:
        deadline = time.monotonic() + 30
        while psutil.Process(creator.pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.01)
        assert psutil.pid_exists(creator.pid) and not process.pid_running(creator.pid)
        assert list(tmp_path.glob(".mlflow.db.*.tmp")), "the creator ended before its migration was seen"
        mlflow_store.mlflow_client(uri)
        assert store.exists() and not list(tmp_path.glob(".mlflow.db.*.tmp"))  # the zombie's, removed
    finally:
        creator.wait()
    assert process.pid_running(os.getpid()) and not process.pid_running(creator.pid)


def test_a_relative_sqlite_store_is_made_where_sqlalchemy_reads_it(tmp_path, monkeypatch):
    """sqlite:///rel.db is relative to the working folder; read as a URL path it was /rel.db, and the store was
    built at the filesystem's root while MLflow used another."""
    monkeypatch.chdir(tmp_path)
    name = f"relative-{os.getpid()}.db"
    assert mlflow_store.sqlite_store_path(f"sqlite:///{name}") == Path(name)
    assert mlflow_store.sqlite_store_path(f"sqlite:///{tmp_path}/x.db") == tmp_path / "x.db"
    assert mlflow_store.sqlite_store_path("sqlite:///:memory:") is None
    assert mlflow_store.sqlite_store_path("http://127.0.0.1:5000") is None
    mlflow_store.ensure_sqlite_store(f"sqlite:///{name}")
    assert (tmp_path / name).is_file() and not (Path("/") / name).exists()


def test_metric_values_name_numbers_intervals_and_words_and_leave_lists_of_text_out():
    """One flattening for every stage: memorized examples (people's words) never become tags."""
    numbers, texts = tracking.metric_values({"a": 1, "ci": [0.1, 0.2], "who": "pat", "ok": True, "auc": None,
                                             "examples": ["my own words"], "nested": {"x": 2.5, "empty": {}}}, "s.")
    assert numbers == {"s.a": 1.0, "s.ci_low": 0.1, "s.ci_high": 0.2, "s.nested.x": 2.5}
    assert texts == {"s.who": "pat", "s.ok": "True"}


def test_logging_into_a_known_run_with_the_server_away_waits_in_the_spool(away, tmp_path):
    """human-eval score's path: calls into evaluate's run are spooled, and mlflow-sync sends them to that run."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow_store.mlflow_client(store)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    with tracking.existing_run(away.mlflow.tracking_uri, run_id, "human_eval"):
        tracking.log_metrics("human_eval", {"n_rated": 3, "broken": {"base": {"rate": 0.5, "ci": [0.1, 0.9]}},
                                            "tuned_win_rate": None})
    assert client.get_run(run_id).data.metrics == {}
    (sent,) = spooling.sync_spool(store)
    assert f"records of stage human_eval -> run {run_id}" in sent
    assert client.get_run(run_id).data.metrics == {"human_eval.n_rated": 3.0, "human_eval.broken.base.rate": 0.5,
                                                   "human_eval.broken.base.ci_low": 0.1,
                                                   "human_eval.broken.base.ci_high": 0.9}
    # A store without that run refuses, and the file stays for the right one.
    with tracking.existing_run(away.mlflow.tracking_uri, run_id, "human_eval"):
        tracking.log_metrics("human_eval", {"n_rated": 4})
    with pytest.raises(PipelineError, match=f"run {run_id} is not in sqlite:///.*other.db; sync to the store"):
        spooling.sync_spool(f"sqlite:///{tmp_path / 'other.db'}")
    assert len(list(spooling.spool_dir().glob("*.jsonl"))) == 1


@pytest.mark.parametrize("line, expected", [
    ("[1]", r"2: not a spool record \(an object whose op is one of params, metrics, tags, artifact, end\); remove "
            "that line and sync again"),
    ('{"op": "metrics", "values": {"train.loss": 1.0}, "timestamp": 5}', r"2: a spool 'metrics' record without "
                                                                          "step; remove that line"),
    ('{"op": "tags", "values": ["a"]}', r"2: a spool 'tags' record whose values are no object"),
    ('{"op": "artifact", "path": "9.files/1/report.md", "artifact_path": "reports"}',
     r"2: the copy of the artifact, .*9\.files/1/report\.md, is gone; remove that line"),
])
def test_a_damaged_spool_line_is_named_and_nothing_is_sent(line, expected, tmp_path):
    """A record damaged or edited by hand was a KeyError's traceback, after the lines before it had been sent."""
    spool = tmp_path / "spool"
    spool.mkdir()
    opening = {"op": "open", "tracking_uri": "unused", "experiment": "qlora-pipeline", "key": "k1", "stage": "train",
               "run_name": None, "tags": {}, "params": {"seed": "42"}, "timestamp": 1_000, "run_id": None}
    metrics = {"op": "metrics", "values": {"train.loss": 2.0}, "step": 1, "timestamp": 2_000}
    path = spool / "1-1.jsonl"
    path.write_text("\n".join([json.dumps(opening), line, json.dumps(metrics)]) + "\n")
    store = f"sqlite:///{tmp_path / 'store.db'}"
    with pytest.raises(PipelineError, match=rf"{re.escape(str(path))}:{expected}"):
        spooling.sync_spool(store, spool)
    assert path.exists() and not (tmp_path / "store.db").exists()
    path.write_text(json.dumps({**opening, "op": "metrics"}) + "\n")
    with pytest.raises(PipelineError, match=r"1-1\.jsonl:1: the first record must open the run \(op 'open'\); the "
                                            "file cannot be sent; remove it"):
        spooling.sync_spool(store, spool)
    path.write_text(json.dumps({k: v for k, v in opening.items() if k != "params"}) + "\n")
    with pytest.raises(PipelineError, match=r"1-1\.jsonl:1: a spool 'open' record without params"):
        spooling.sync_spool(store, spool)


def test_a_store_held_by_another_programs_write_is_said_to_be_unreadable_now_not_no_store(
        empty_store, tmp_path, monkeypatch):
    """A lock, or a file this user may not read, was reported as "not an MLflow store"."""
    import contextlib
    import sqlite3

    from conftest import place_store

    store = place_store(empty_store, tmp_path)
    monkeypatch.setattr(mlflow_store, "STORE_LOCK_SECONDS", 0.1)
    with contextlib.closing(sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None)) as db:
        db.execute("BEGIN EXCLUSIVE")
        assert mlflow_store.store_problem(store) == f"{tmp_path / 'mlflow.db'}: cannot be read now (database is locked)"
    assert mlflow_store.store_problem(store) is None


def test_a_sqlite_uri_is_read_as_sqlalchemy_reads_it_percent_escapes_decoded(empty_store, tmp_path):
    """sqlite:////a/my%20dir/mlflow.db opens "my dir": the check said there was no such folder as "my%20dir"."""
    from conftest import place_store

    (tmp_path / "my dir").mkdir()
    place_store(empty_store, tmp_path / "my dir")
    uri = f"sqlite:///{tmp_path}/my%20dir/mlflow.db"
    assert mlflow_store.sqlite_store_path(uri) == tmp_path / "my dir" / "mlflow.db"
    assert mlflow_store.store_problem(uri) is None


def test_store_errors_name_a_missing_driver_a_server_that_is_no_mlflow_one_and_leave_other_errors_alone():
    from mlflow.exceptions import MlflowException

    with pytest.raises(PipelineError, match=r"^sqlite:///x\.db: this store's database driver is not installed "
                                            r"\(the module 'psycopg2'\); install it \(\.venv/bin/pip install "
                                            r"psycopg2-binary\), or name another$"):
        with mlflow_store.store_errors("sqlite:///x.db", "name another"):
            raise ModuleNotFoundError("No module named 'psycopg2'", name="psycopg2")
    with pytest.raises(ModuleNotFoundError):  # not a database driver: the environment's own problem, as it was
        with mlflow_store.store_errors("sqlite:///x.db"):
            raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")
    with pytest.raises(PipelineError, match=r"\(API request failed with 404\); check that it is an MLflow tracking "
                                            r"server and read its log, or set mlflow.tracking_uri to another store"):
        with mlflow_store.store_errors("http://127.0.0.1:5000"):
            raise MlflowException("API request failed with 404\nbody")
