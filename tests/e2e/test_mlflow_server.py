"""The tiny pipeline against a real MLflow server (PostgreSQL store, served artifacts), started by
``scripts/mlflow_server.sh`` as ``make mlflow-server`` starts it: the server stopped between stages
of a ``dvc repro`` and the spool sent by ``qlora-pipeline mlflow-sync``, then a queued grid of two
experiments run side by side (``dvc queue start -j 2``).
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import BIN, TINY_RUN, chat_rows, copy_repository, pipeline_env, run_queue, sh
from qlora_pipeline.launching import free_port
from qlora_pipeline.mlflow_store import KEY_TAG
from qlora_pipeline.spool import SPOOL_DIR
from qlora_pipeline.tracking import metric_values

pytestmark = pytest.mark.slow

STAGES = ("fetch", "clean", "split", "quantize_load", "train_adapter", "choose-decoding", "evaluate", "risk")
# The stages that read the base alone: an experiment that changes training re-runs neither.
BASE_STAGES = ("style-judge", "zero-shot")
UNREACHABLE = re.compile(r"^mlflow: (\S+) unreachable; this stage's params and metrics kept in (\S+); "
                         r"send them with qlora-pipeline mlflow-sync$", re.MULTILINE)
TINY = {**TINY_RUN, "data.path": "chat.jsonl"}


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
def server(tmp_path_factory, tiny_llama):
    """The tiny repository copy, its mlflow.tracking_uri pointing at a server on a free port.

    The server's folder is outside pytest's own (mode 700): as root, PostgreSQL runs as
    `postgres`, which must reach it. Stopped, and the folder removed, however the tests end.
    """
    folder = Path(tempfile.mkdtemp(prefix="qlora-mlflow-server-"))
    folder.chmod(0o711)
    port = free_port()
    chat = "".join(json.dumps(r) + "\n" for r in chat_rows())
    overrides = {**TINY, "model.name_or_path": str(tiny_llama), "mlflow.tracking_uri": f"http://127.0.0.1:{port}"}
    repo = copy_repository(tmp_path_factory.mktemp("server") / "repo", overrides, {"chat.jsonl": chat})
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


def test_a_server_stopped_between_stages_loses_nothing_after_mlflow_sync(server, tmp_path):
    repo = server.repo
    env = {**pipeline_env(), "QLORA_PIPELINE_RUN_KEY": "e2e-stopped"}  # one execution over both repros

    def run(*cmd: str) -> str:
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout + proc.stderr

    assert not UNREACHABLE.search(run("dvc", "repro", "split"))
    server.script("stop")
    out = run("dvc", "repro")
    said = UNREACHABLE.findall(out)
    assert len(said) == 7 and {uri for uri, _ in said} == {server.uri}, out  # one line per stage left
    for path in ("models/adapter/adapter_config.json", "metrics/train.json", "metrics/decoding.json",
                 "metrics/eval.json", "metrics/risk.json", "reports/risk.md", "reports/evaluate/samples.csv"):
        assert (repo / path).is_file(), path
    assert len(list((repo / SPOOL_DIR).glob("*.jsonl"))) == 7

    server.start()  # the same folder: the cluster and the runs in it are kept
    sent = run(str(BIN / "python"), "-m", "qlora_pipeline.cli", "mlflow-sync")
    assert sent.count("-> run ") == 7, sent
    client = server.client()
    (name, synced), = runs_of(client).items()  # the run fetch opened, joined by the seven stages after it
    assert name == "workspace" and synced.data.tags[KEY_TAG] == "e2e-stopped" and synced.info.status == "FINISHED"
    assert all(synced.data.tags.get(f"stage.{stage}") == "ran" for stage in STAGES + BASE_STAGES), synced.data.tags
    assert synced.data.params["train.lora.r"] == "16" and "decoding.chosen.top_p" in synced.data.params
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
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "baseline results"], repo)


def test_a_queued_grid_of_two_lands_whole_on_the_server(server):
    """Two experiments side by side, each re-running train-adapter and what follows into its own run.

    A new experiment name: both create it at once on their first stage (the race _experiment_id rides).
    """
    repo = server.repo
    sh(["dvc", "exp", "run", "--queue", "-S", "train.lora.r=2,4", "-S", "mlflow.experiment_name=grid"], repo)
    status = run_queue(repo, jobs=2)
    assert "Failed" not in status and status.count("Success") == 2, status
    client = server.client()
    grid = runs_of(client, "grid")
    assert len(grid) == 2 and {run.data.params["train.lora.r"] for run in grid.values()} == {"2", "4"}
    (sequential,) = runs_of(client).values()  # the previous test's run
    ran = ("train.", "decoding.", "eval.", "risk.")
    reference = {key for key in sequential.data.metrics if key.startswith(ran)}
    for run in grid.values():
        assert all(run.data.tags.get(f"stage.{stage}") == "ran" for stage in STAGES[4:]), run.data.tags
        assert run.info.status == "FINISHED"
        assert set(run.data.params) == set(sequential.data.params)
        assert set(run.data.metrics) == reference  # nothing lost to the other run's writes
        for curve in ("train.loss", "train.val_loss"):
            assert len(client.get_metric_history(run.info.run_id, curve)) == len(
                client.get_metric_history(sequential.info.run_id, curve)), curve
        assert top_artifacts(client, run.info.run_id) == top_artifacts(client, sequential.info.run_id)
    assert not (repo / SPOOL_DIR).exists() or not list((repo / SPOOL_DIR).iterdir())  # the server took it all
