"""The tiny pipeline against a real MLflow server (PostgreSQL store, served artifacts), started by
``scripts/mlflow_server.sh`` as ``make mlflow-server`` starts it: the server stopped between stages
of a ``dvc repro`` and the spool sent by ``qlora-pipeline mlflow-sync``, then a queued grid of two
experiments (QLoRA and full fine-tuning) run side by side (``dvc queue start -j 2``).
"""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import (BIN, TINY_DATA, chat_rows, copy_baseline, jsonl, pipeline_env, raw_ids, run_queue, set_params,
                      sh, stale_stages, stage_status)
from qlora_pipeline.launching import free_port
from qlora_pipeline.mlflow_store import KEY_TAG
from qlora_pipeline.spool import SPOOL_DIR
from qlora_pipeline.tracking import metric_values

pytestmark = pytest.mark.slow

STAGES_AFTER_SPLIT = ("train-adapter", "style-judge", "choose-decoding", "zero-shot", "evaluate", "risk")
STAGES = ("fetch", "clean", "split", "quantize_load", "train_adapter", "choose-decoding", "evaluate", "risk")
# The stages that read the base alone: an experiment that changes how training trains re-runs neither (its
# method, which decides how they load the base, re-runs both).
BASE_STAGES = ("style-judge", "zero-shot")
STAGE_METRICS = {"style-judge": "judge.", "zero-shot": "zero_shot."}  # what each logs under
UNREACHABLE = re.compile(r"^mlflow: (\S+) unreachable; this stage's params and metrics kept in (\S+); "
                         r"send them with qlora-pipeline mlflow-sync$", re.MULTILINE)


class Server:
    """``scripts/mlflow_server.sh`` of the repository copy, with its own folder and port."""

    def __init__(self, repo: Path, folder: Path, port: int):
        self.repo = repo
        self.env = {**pipeline_env(), "MLFLOW_SERVER_DIR": str(folder), "MLFLOW_SERVER_PORT": str(port)}
        self.uri = f"http://127.0.0.1:{port}"

    def script(self, command: str, check: bool = True) -> str:
        proc = subprocess.run(["bash", "scripts/mlflow_server.sh", command], cwd=self.repo, env=self.env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 or not check, f"mlflow_server.sh {command}:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    def start(self) -> None:
        assert f"tracking URI {self.uri}\n" in self.script("start")

    def client(self):
        import mlflow

        return mlflow.MlflowClient(self.uri)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_baseline):
    """A copy of the session's baseline run (conftest's tiny_baseline), its mlflow.tracking_uri pointing at a
    server on a free port (MLflow's settings are no stage's params: nothing is stale yet).

    The server's folder is outside pytest's own (mode 700): as root, PostgreSQL runs as
    `postgres`, which must reach it. Stopped, and the folder removed, however the tests end.
    """
    folder = Path(tempfile.mkdtemp(prefix="qlora-mlflow-server-"))
    folder.chmod(0o711)
    port = free_port()
    repo = copy_baseline(tiny_baseline, tmp_path_factory.mktemp("server") / "repo")
    set_params(repo, {"mlflow.tracking_uri": f"http://127.0.0.1:{port}"})
    assert "Data and pipelines are up to date" in sh(["dvc", "status"], repo)
    sh(["git", "commit", "-qam", "the team's MLflow server"], repo)
    running = Server(repo, folder / "srv", port)
    try:
        running.start()
        yield running
    finally:
        running.script("stop", check=False)
        shutil.rmtree(folder, ignore_errors=True)


def runs_of(client, experiment_name: str = "qlora-pipeline") -> dict:
    """The experiment's runs by DVC experiment name ("workspace" for dvc repro)."""
    experiment = client.get_experiment_by_name(experiment_name)
    return {run.data.tags["dvc.exp_name"]: run for run in client.search_runs([experiment.experiment_id])}


def top_artifacts(client, run_id: str) -> set[str]:
    return {item.path for item in client.list_artifacts(run_id)}


def logged_metrics(repo: Path) -> dict[str, float]:
    """Every number of the metrics files, named and shaped as each stage logs it."""
    def read(name: str) -> dict:
        return json.loads((repo / "metrics" / name).read_text())

    logged = {"train": {k: v for k, v in read("train.json").items() if k != "examples"},
              "decoding": {k: v for k, v in read("decoding.json").items() if k != "chosen"},
              "eval": read("eval.json"), "risk": read("risk.json")}
    return {key: value for stage, metrics in logged.items()
            for key, value in metric_values(metrics, prefix=f"{stage}.")[0].items()}


def test_an_edited_data_file_reruns_everything_after_fetch_and_a_server_stopped_between_stages_loses_nothing(
        server, tmp_path):
    """Your data file is a DVC dependency: two more conversations make fetch stale, and what follows it, not
    the base. Then the run, with the server stopped after split: every later stage keeps its logging in the
    spool, and ``qlora-pipeline mlflow-sync`` sends it into the one run.

    A quantize-load param changes too (the smoke replies' length), so that every stage runs and logs, and so
    do split's canary and context params, whose effect on the data and the risk report is checked here
    (test_dvc_pipeline.py checks that they make split stale and nothing before it).
    """
    repo = server.repo
    env = {**pipeline_env(), "QLORA_PIPELINE_RUN_KEY": "e2e-stopped"}  # one execution over both repros

    def run(*cmd: str) -> str:
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout + proc.stderr

    with (repo / TINY_DATA).open("a") as handle:  # two more conversations, c24 and c25
        handle.write(jsonl(chat_rows(26)[24 * 6:]))
    status = sh(["dvc", "status"], repo)
    assert re.search(r"^fetch:\n\s+changed deps:\n\s+modified:\s+data/source\n", status, re.M), status
    assert stale_stages(status) == {"fetch"}, status  # the base model reads no data; the stages after fetch read its output

    # The params before the first stage runs: the stage that opens the MLflow run logs every param, once.
    set_params(repo, {"model.smoke_max_new_tokens": 3, "risk.canaries": 1, "risk.canary_repeats": 3,
                      "split.context_turns": 2,  # and two training steps, as the tiny run, for the grid after
                      "train.max_steps": 2, "train.eval_steps": 1, "train.save_steps": 1})
    out = run("dvc", "repro", "clean")
    assert not UNREACHABLE.search(out)
    for stage in ("fetch", "clean"):
        assert f"Running stage '{stage}'" in out, stage
    assert raw_ids(repo)[-3:] == ["c23", "c24", "c25"]
    assert json.loads((repo / "data/raw/manifest.json").read_text())["counts"]["conversations"] == 26
    # the edit reached what split reads: its input, not only its params, has changed
    status = sh(["dvc", "status"], repo)
    assert re.search(r"^\s+modified:\s+data/clean$", stage_status(status, "split"), re.M), status
    out = run("dvc", "repro", "split")
    assert not UNREACHABLE.search(out) and "Running stage 'split'" in out, out
    server.script("stop")
    out = run("dvc", "repro")
    for stage in ("quantize-load", *STAGES_AFTER_SPLIT):
        assert f"Running stage '{stage}'" in out, stage
    said = UNREACHABLE.findall(out)
    assert len(said) == 7 and {uri for uri, _ in said} == {server.uri}, out  # one line per stage left
    for path in ("models/adapter/adapter_config.json", "metrics/train.json", "metrics/decoding.json",
                 "metrics/eval.json", "metrics/risk.json", "reports/risk.md", "reports/evaluate/samples.csv"):
        assert (repo / path).is_file(), path
    assert len(list((repo / SPOOL_DIR).glob("*.jsonl"))) == 7
    # split's params: one canary inserted 3 times and one fresh to compare with; two context turns
    record = json.loads((repo / "data/canaries.json").read_text())["canaries"]
    assert sorted(c["repeats"] for c in record) == [0, 3]
    inserted = next(c for c in record if c["repeats"])
    assert (repo / "data/splits/train.jsonl").read_text().count(inserted["secret"]) == 3
    canaries = json.loads((repo / "metrics/risk.json").read_text())["canaries"]
    assert canaries["enabled"] and canaries["inserted"] == 1
    assert canaries["items"][inserted["id"]]["tuned"]["exposure_extrapolated"] is not None
    assert json.loads((repo / "data/splits/manifest.json").read_text())["split"]["context_turns"] == 2

    server.start()  # the same folder: the cluster and the runs in it are kept
    sent = run(str(BIN / "python"), "-m", "qlora_pipeline.cli", "mlflow-sync")
    assert sent.count("-> run ") == 7, sent
    client = server.client()
    (name, synced), = runs_of(client).items()  # the run fetch opened, joined by the seven stages after it
    assert name == "workspace" and synced.data.tags[KEY_TAG] == "e2e-stopped" and synced.info.status == "FINISHED"
    assert all(synced.data.tags.get(f"stage.{stage}") == "ran" for stage in STAGES + BASE_STAGES), synced.data.tags
    assert synced.data.params["train.lora.r"] == "16" and "decoding.chosen.top_p" in synced.data.params
    assert synced.data.params["split.context_turns"] == "2"
    for stage in ("fetch", "clean", "split", "base"):  # logged while the server was up
        assert any(key.startswith(f"{stage}.") for key in synced.data.metrics), stage
    expected = logged_metrics(repo)  # every number the later stages' files hold, with its value
    assert len(expected) > 100
    assert {key: synced.data.metrics.get(key) for key in expected} == pytest.approx(expected)
    with (repo / "metrics/train_log.csv").open() as handle:  # the step curves, point by point
        rows = list(csv.DictReader(handle))
    for curve, column in (("train.loss", "train_loss"), ("train.val_loss", "val_loss")):
        points = {m.step: m.value for m in client.get_metric_history(synced.info.run_id, curve)}
        assert points == pytest.approx({int(r["step"]): float(r[column]) for r in rows if r[column]}, abs=1e-5)
    assert top_artifacts(client, synced.info.run_id) >= {"adapter", "evaluate", "risk", "decoding.json",
                                                         "eval.json", "eval_rouge.csv"}
    report = Path(client.download_artifacts(synced.info.run_id, "risk/risk.md", str(tmp_path)))
    assert report.read_text() == (repo / "reports/risk.md").read_text()  # through the server

    history = client.get_metric_history(synced.info.run_id, "train.loss")
    assert "nothing to send" in run(str(BIN / "python"), "-m", "qlora_pipeline.cli", "mlflow-sync")
    assert list((repo / SPOOL_DIR).iterdir()) == []
    assert client.get_metric_history(synced.info.run_id, "train.loss") == history
    assert "Data and pipelines are up to date" in sh(["dvc", "status"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "two more conversations"], repo)


def test_a_queued_grid_of_qlora_and_full_lands_whole_on_the_server(server):
    """A grid of QLoRA and full fine-tuning at a new rank, from one grid flag and one plain one, queued and run
    side by side (``-j 2``), each re-running train-adapter and what follows into its own run.

    A new experiment name: both create it at once on their first stage (the race _experiment_id rides).
    The lora method (qlora without the 4-bit base) is left out to keep make test short: its model
    preparation is tested in test_training.py, and the queue treats it as any other params change.
    That queued experiments find the SQLite store at the repository's root (not in DVC's copy of the
    workspace) is test_data_dependency.py's queued-experiment test.
    """
    repo = server.repo
    sh(["dvc", "exp", "run", "--queue", "-S", "train.method=qlora,full", "-S", "train.lora.r=4",
        "-S", "mlflow.experiment_name=grid"], repo)
    status = run_queue(repo, jobs=2)
    assert "Failed" not in status and status.count("Success") == 2, status
    client = server.client()
    grid = runs_of(client, "grid")
    assert len(grid) == 2 and "workspace" not in grid
    assert sorted((run.data.params["train.method"], run.data.params["train.lora.r"]) for run in grid.values()) == [
        ("full", "4"), ("qlora", "4")]
    (sequential,) = runs_of(client).values()  # the previous test's run: every stage ran into it
    assert {"eval.rouge1.tuned", "train.best_val_loss"} <= set(sequential.data.metrics)
    for run in grid.values():
        assert all(math.isfinite(run.data.metrics[key]) for key in ("eval.rouge1.tuned", "train.best_val_loss"))
        assert all(run.data.tags.get(f"stage.{stage}") == "ran" for stage in STAGES[4:]), run.data.tags
        # style-judge and zero-shot load the base as training's method does: they re-run for full fine-tuning
        again = {stage: run.data.tags.get(f"stage.{stage}") == "ran" for stage in BASE_STAGES}
        assert again == {stage: run.data.params["train.method"] == "full" for stage in BASE_STAGES}, run.data.tags
        assert run.info.status == "FINISHED"
        assert set(run.data.params) == set(sequential.data.params)
        ran = ("train.", "decoding.", "eval.", "risk.", *(STAGE_METRICS[stage] for stage in again if again[stage]))
        # nothing lost to the other run's writes: every key the stages it ran logged in the sequential run
        assert set(run.data.metrics) == {key for key in sequential.data.metrics if key.startswith(ran)}
        for curve in ("train.loss", "train.val_loss"):
            assert len(client.get_metric_history(run.info.run_id, curve)) == len(
                client.get_metric_history(sequential.info.run_id, curve)), curve
        assert top_artifacts(client, run.info.run_id) == top_artifacts(client, sequential.info.run_id)
    assert not (repo / SPOOL_DIR).exists() or not list((repo / SPOOL_DIR).iterdir())  # the server took it all
    shown = sh(["dvc", "exp", "show", "--no-pager", "--csv"], repo)
    header, *rows = shown.strip().splitlines()
    assert "best_val_loss" in header and "train.method" in header
    assert len(rows) >= 4  # workspace, the committed run and the two experiments
