"""Where the MLflow store is and how stages find their execution's run."""

from __future__ import annotations

from pathlib import Path

from qlora_pipeline import tracking
from qlora_pipeline.config import MlflowConfig


def test_store_is_at_the_main_repo_root_inside_a_dvc_temp_workspace(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    workspace = repo / ".dvc/tmp/exps/tmpabc123"
    (workspace / ".dvc").mkdir(parents=True)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(workspace)
    assert tracking.repo_root() == repo
    assert tracking.tracking_uri(MlflowConfig(None, "x")) == f"sqlite:///{repo}/mlflow.db"


def test_dvc_root_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert tracking.repo_root(Path("/")) == tmp_path


def test_explicit_uri_is_kept():
    assert tracking.tracking_uri(MlflowConfig("http://127.0.0.1:5000", "x")) == "http://127.0.0.1:5000"


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
    assert row["params.evaluate.max_new_tokens"] == "48" and row["params.clean.pii"].startswith("['email'")
    assert row["params.sec.a.b"] == "1" and row["params.sec.c"] == "null" and row["params.sec.d"] == "[1, 2]"
    assert row["metrics.demo.nested.x"] == 0.5 and row["metrics.again.n"] == 4
    assert row["tags.demo.who"] == "p1" and row["tags.stage.demo"] == "ran"
