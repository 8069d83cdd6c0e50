"""MLflow: one run per pipeline execution, which every stage of that execution joins.

A "pipeline execution" is one ``dvc repro`` or one ``dvc exp run`` experiment. Stages are
separate processes, so they find their shared run by a key tagged on it: the nearest ``dvc``
process above the stage (its pid and start time) plus DVC's experiment name. A stage run by
hand, outside DVC, gets a run of its own. ``QLORA_PIPELINE_RUN_KEY`` overrides the key.

Every logging call, from a stage or from ``human-eval score``, goes one way: ``log_params``,
``log_metrics`` and ``log_artifact`` hand it to ``_record``, which sends it to the run, or, once a
server (``mlflow.tracking_uri: http://...``, e.g. from ``make mlflow-server``) is found away, keeps
it in the spool (``qlora_pipeline.spool``) for ``qlora-pipeline mlflow-sync``. Where the store is
and how a call reaches it: ``qlora_pipeline.mlflow_store``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from qlora_pipeline.config import MlflowConfig, flatten
from qlora_pipeline.mlflow_store import (KEY_TAG, create_run, experiment_for, is_server, mlflow_client, now_ms,
                                         reachable, resolve_tracking_uri, run_with_key, send, use_http_defaults)
from qlora_pipeline.spool import Spool, spool_dir

_MAX_PARAM_CHARS = 6000


def tracking_uri(cfg: MlflowConfig) -> str:
    return resolve_tracking_uri(cfg.tracking_uri)


def execution_key() -> str:
    """Identify the pipeline execution this process belongs to (see module docstring)."""
    if os.environ.get("QLORA_PIPELINE_RUN_KEY"):
        return os.environ["QLORA_PIPELINE_RUN_KEY"]
    import psutil

    from qlora_pipeline.warm import CHILD

    # A stage run in a warm fork (warm.py) looks above the process DVC started for it, which waits for the fork.
    origin = os.environ.get(CHILD, "")
    try:
        started = psutil.Process(int(origin)) if origin.isdigit() else psutil.Process()
    except psutil.NoSuchProcess:
        started = psutil.Process()
    owner = next((p for p in started.parents() if _is_dvc(p)), started)
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


# ------------------------------------------------------------------------ a run, and its stand-in


def _opening(params: Any, uri: str, stage: str) -> dict:
    """What opening this execution's run takes: the spool's first line, should the server be away."""
    from mlflow.tracking.context.registry import resolve_tags

    key = execution_key()
    flat = {name: value for section, values in params.model_dump().items()
            for name, value in _flat_params(section, values).items()}
    # resolve_tags adds what mlflow.start_run would (user, source): taken now, not at sync time.
    return {"op": "open", "tracking_uri": uri, "experiment": params.mlflow.experiment_name, "key": key,
            "stage": stage, "run_name": os.environ.get("DVC_EXP_NAME") or None, "tags": resolve_tags(_run_tags(key)),
            "params": flat, "timestamp": now_ms()}


# What pipeline_run yields when the server is away from the start: the run, and its id, do not exist
# until mlflow-sync makes them (risk's report leaves the id out; evaluate's run.json holds null).
UNLOGGED_RUN = types.SimpleNamespace(info=types.SimpleNamespace(run_id=None))


@dataclasses.dataclass
class _StageLink:
    """One stage's way to its run: the store's client, or, once the server is found away, a spool file."""

    uri: str
    experiment: str
    opening: dict
    run_id: str | None = None
    spool: Spool | None = None
    _client: Any = None

    def client(self) -> Any:
        if self._client is None:
            self._client = mlflow_client(self.uri)
        return self._client

    def open(self) -> Any:
        if not self.server_away():
            try:
                return self._open_in_store()
            except Exception:
                if not self.server_away():  # the store answered: a real error
                    raise
        self.go_offline()
        return UNLOGGED_RUN

    def _open_in_store(self) -> Any:
        client = self.client()
        experiment_id = experiment_for(client, self.experiment, self.uri)
        found = run_with_key(client, experiment_id, self.opening["key"])
        if found is not None:
            self.run_id = found.info.run_id
            client.update_run(self.run_id, status="RUNNING")
            return found
        run = create_run(client, experiment_id, self.opening)
        self.run_id = run.info.run_id
        # Every param, whichever stage opens the run: runs compare side by side in MLflow even
        # when DVC re-ran only the last stages.
        _record({"op": "params", "values": self.opening["params"]})
        return run

    def server_away(self) -> bool:
        return is_server(self.uri) and not reachable(self.uri)

    def go_offline(self) -> None:
        self.spool = Spool(spool_dir(), {**self.opening, "run_id": self.run_id})
        print(f"mlflow: {self.uri} unreachable; this stage's params and metrics kept in {self.spool.folder}; "
              "send them with qlora-pipeline mlflow-sync", file=sys.stderr, flush=True)


_link: _StageLink | None = None  # the stage this process runs (stages are processes of their own)


@contextlib.contextmanager
def pipeline_run(params: Any, stage: str) -> Iterator[Any]:
    """Join (or open) this execution's MLflow run for the duration of one stage.

    A new run gets every param of ``params`` (flattened), whichever stage opens it. With a server
    (``mlflow.tracking_uri`` http/https) that cannot be reached, at the start or midway, the stage
    runs on: what it logs from then on goes to ``spool_dir()``, one line says so, and
    ``qlora-pipeline mlflow-sync`` sends it later. The run yielded then has no id (``UNLOGGED_RUN``).
    """
    import mlflow

    global _link
    uri = tracking_uri(params.mlflow)
    mlflow.set_tracking_uri(uri)  # for callers reading runs back through mlflow's fluent API
    use_http_defaults(uri)
    _link = link = _StageLink(uri, params.mlflow.experiment_name, _opening(params, uri, stage))
    try:
        run = link.open()
        _record({"op": "tags", "values": {f"stage.{stage}": "ran"}})
        try:
            yield run
        except BaseException:
            _record({"op": "tags", "values": {f"stage.{stage}": "failed"}})
            _record({"op": "end", "status": "FAILED", "timestamp": now_ms()})
            raise
        _record({"op": "end", "status": "FINISHED", "timestamp": now_ms()})
    finally:
        _link = None
        if link.spool is not None:
            link.spool.close()


def in_run() -> bool:
    """Whether this process is inside ``pipeline_run`` (its run may be on the server or in the spool)."""
    return _link is not None


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


# -------------------------------------------------------------------------------- logging


def log_params(section: str, values: Any) -> None:
    """Log a params section, flattened as ``section.key`` (a scalar such as ``seed`` as itself)."""
    _record({"op": "params", "values": _flat_params(section, values)})


def _flat_params(section: str, values: Any) -> dict[str, str]:
    flat = flatten(values, prefix=f"{section}.") if isinstance(values, dict) else {section: values}
    return {k: _param_value(v) for k, v in flat.items()}


def _param_value(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text if len(text) <= _MAX_PARAM_CHARS else text[: _MAX_PARAM_CHARS - 3] + "..."


def log_metrics(stage: str, metrics: dict, step: int | None = None) -> None:
    """Numbers go in as metrics ``stage.key`` (an interval as ``_low``/``_high``), words (the persona id) as tags."""
    numbers, texts = metric_values(metrics, prefix=f"{stage}.")
    if numbers:
        _record({"op": "metrics", "values": numbers, "step": step or 0, "timestamp": now_ms()})
    if texts:
        _record({"op": "tags", "values": texts})


def metric_values(metrics: dict, prefix: str = "") -> tuple[dict[str, float], dict[str, str]]:
    """(metrics, tags) of a nested metrics file: keys dotted, two-number lists (intervals) as
    ``_low``/``_high``, words and flags as text. None (e.g. a one-class AUC) is unknown, not logged;
    nor are other lists: they may hold people's words (memorized examples), which stay on this machine.
    """
    numbers: dict[str, float] = {}
    texts: dict[str, str] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            more_numbers, more_texts = metric_values(value, name + ".")
            numbers.update(more_numbers)
            texts.update(more_texts)
        elif _is_number(value):
            numbers[name] = float(value)
        elif isinstance(value, (list, tuple)) and len(value) == 2 and all(map(_is_number, value)):
            numbers[f"{name}_low"], numbers[f"{name}_high"] = map(float, value)
        elif isinstance(value, (str, bool)):
            texts[name] = _param_value(value)
    return numbers, texts


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def log_artifact(path: Path, artifact_path: str | None = None) -> None:
    """A file, or every file of a folder, into the run (under ``artifact_path``)."""
    _record({"op": "artifact", "path": str(path), "artifact_path": artifact_path})


def log_artifacts(paths: Iterable[Path], under: str | None = None) -> None:
    """Each file under ``under`` (None: the top), each folder as ``<under>/<its name>``; absent ones skipped."""
    for path in paths:
        if path.is_dir():
            log_artifact(path, artifact_path="/".join(filter(None, (under, path.name))))
        elif path.is_file():
            log_artifact(path, artifact_path=under)


@contextlib.contextmanager
def existing_run(uri: str, run_id: str, stage: str) -> Iterator[Callable[[], Path | None]]:
    """Log into a run that exists (human-eval scores into evaluate's run) by the stages' path:
    straight to the store, or, with the server away, to the spool for ``mlflow-sync``. Yields a function that
    tells where the calls went, also after the block: the spool's folder, or None for the store.
    """
    global _link
    use_http_defaults(uri)
    opening = {"op": "open", "tracking_uri": uri, "experiment": None, "key": None, "stage": stage}
    _link = link = _StageLink(uri, "", opening, run_id=run_id)
    try:
        if link.server_away():
            link.go_offline()
        yield lambda: link.spool.folder if link.spool is not None else None
    finally:
        _link = None
        if link.spool is not None:
            link.spool.close()


def _record(op: dict) -> None:
    """Send one logging call to the stage's run; once the server is found away, keep it in the spool."""
    link = _link
    if link is None:  # outside pipeline_run (a notebook, a test): MLflow's active run, as mlflow.log_* does
        import mlflow

        run = mlflow.active_run() or mlflow.start_run()
        send(mlflow.MlflowClient(), run.info.run_id, op)
        return
    if link.spool is None:
        try:
            send(link.client(), link.run_id, op)
            return
        except Exception:
            if not link.server_away():  # the server answered: a real error, e.g. a param changing value
                raise
            link.go_offline()
    link.spool.keep(op)
