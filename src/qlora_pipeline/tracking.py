"""MLflow: one run per pipeline execution, which every stage of that execution joins.

A "pipeline execution" is one ``dvc repro`` or one ``dvc exp run`` experiment. Stages are
separate processes, so they find their shared run by a key tagged on it: the nearest ``dvc``
process above the stage (its pid and start time) plus DVC's experiment name. A stage run by
hand, outside DVC, gets a run of its own. ``QLORA_PIPELINE_RUN_KEY`` overrides the key.

The default store is a SQLite file at the repository root. DVC runs queued and temporary
experiments in copies under ``.dvc/tmp/exps/``; there ``DVC_ROOT`` points at the main
repository, so every experiment lands in the one store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

from qlora_pipeline.config import MlflowConfig, flatten

KEY_TAG = "qlora_pipeline.execution"
STORE_FILE = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
_MAX_PARAM_CHARS = 6000


def repo_root(start: Path | None = None) -> Path:
    """The main repository's root, also from inside a DVC temporary experiment workspace."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = (start or Path.cwd()).resolve()
    parts = here.parts
    if ".dvc" in parts:  # .../repo/.dvc/tmp/exps/<name>/...: the repository is above .dvc
        return Path(*parts[: parts.index(".dvc")])
    for candidate in (here, *here.parents):
        if (candidate / ".dvc").is_dir():
            return candidate
    return here


def tracking_uri(cfg: MlflowConfig) -> str:
    return resolve_tracking_uri(cfg.tracking_uri)


def resolve_tracking_uri(configured: str | None) -> str:
    """``mlflow.tracking_uri`` as configured, or (null) the SQLite store at the repository root."""
    return configured or f"sqlite:///{repo_root() / STORE_FILE}"


def execution_key() -> str:
    """Identify the pipeline execution this process belongs to (see module docstring)."""
    if os.environ.get("QLORA_PIPELINE_RUN_KEY"):
        return os.environ["QLORA_PIPELINE_RUN_KEY"]
    import psutil

    owner = next((p for p in psutil.Process().parents() if _is_dvc(p)), psutil.Process())
    exp = os.environ.get("DVC_EXP_NAME", "")
    return f"{owner.pid}-{owner.create_time():.3f}-{exp}"


def _is_dvc(process: Any) -> bool:
    try:
        argv = process.cmdline()
    except Exception:  # a parent that exited or is not ours to inspect
        return False
    names = [Path(arg).name for arg in argv[:3]]
    return "dvc" in names or ("-m" in names and "dvc" in argv[:4])


def git_commit(cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def params_hash(path: Path = Path("params.yaml")) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else None


def _experiment_id(client: Any, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifacts = (repo_root() / ARTIFACT_DIR).as_uri()
    return client.create_experiment(name, artifact_location=artifacts)


@contextlib.contextmanager
def pipeline_run(params: Any, stage: str) -> Iterator[Any]:
    """Join (or open) this execution's MLflow run for the duration of one stage.

    A new run gets every param of ``params`` (flattened), whichever stage opens it, so runs
    compare side by side in MLflow even when DVC re-ran only the last stages.
    """
    import mlflow

    cfg = params.mlflow
    mlflow.set_tracking_uri(tracking_uri(cfg))
    client = mlflow.MlflowClient()
    experiment_id = _experiment_id(client, cfg.experiment_name)
    key = execution_key()
    found = client.search_runs([experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{key}'", max_results=1)
    if found:
        run = mlflow.start_run(run_id=found[0].info.run_id)
    else:
        run = mlflow.start_run(experiment_id=experiment_id, run_name=os.environ.get("DVC_EXP_NAME") or None)
        mlflow.set_tags(_run_tags(key))
        for section, values in dataclasses.asdict(params).items():
            log_params(section, values)
    mlflow.set_tag(f"stage.{stage}", "ran")
    try:
        yield run
    except BaseException:
        mlflow.set_tag(f"stage.{stage}", "failed")
        mlflow.end_run(status="FAILED")
        raise
    mlflow.end_run()


def _run_tags(key: str) -> dict[str, str]:
    tags = {KEY_TAG: key, "dvc.exp_name": os.environ.get("DVC_EXP_NAME", "workspace")}
    commit = git_commit()
    if commit:
        tags["git.commit"] = commit
        tags["mlflow.source.git.commit"] = commit
    digest = params_hash()
    if digest:
        tags["params.hash"] = digest
    return tags


def log_params(section: str, values: Any) -> None:
    """Log a params section, flattened as ``section.key`` (a scalar such as ``seed`` as itself)."""
    import mlflow

    flat = flatten(values, prefix=f"{section}.") if isinstance(values, dict) else {section: values}
    mlflow.log_params({k: _param_value(v) for k, v in flat.items()})


def _param_value(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text if len(text) <= _MAX_PARAM_CHARS else text[: _MAX_PARAM_CHARS - 3] + "..."


def log_metrics(stage: str, metrics: dict, step: int | None = None) -> None:
    """Numbers go in as metrics ``stage.key``; text (e.g. the persona id) as tags."""
    import mlflow

    flat = flatten(metrics, prefix=f"{stage}.")
    numbers = {k: float(v) for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    texts = {k: str(v) for k, v in flat.items() if k not in numbers and v is not None}
    if numbers:
        mlflow.log_metrics(numbers, step=step)
    if texts:
        mlflow.set_tags(texts)


def scalar_metrics(metrics: dict, prefix: str = "") -> dict:
    """Scalars only, nested keys dotted (two-number lists, the intervals, as _low/_high), for MLflow."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(scalar_metrics(value, name + "."))
        elif isinstance(value, (list, tuple)) and len(value) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            flat[f"{name}_low"], flat[f"{name}_high"] = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):  # None (one-class AUC) is no metric
            flat[name] = value
    return flat
