"""MLflow: one run per pipeline execution, which every stage of that execution joins.

A "pipeline execution" is one ``dvc repro`` or one ``dvc exp run`` experiment. Stages are
separate processes, so they find their shared run by a key tagged on it: the nearest ``dvc``
process above the stage (its pid and start time) plus DVC's experiment name. A stage run by
hand, outside DVC, gets a run of its own. ``QLORA_PIPELINE_RUN_KEY`` overrides the key.

The default store is a SQLite file at the repository root. DVC runs queued and temporary
experiments in copies under ``.dvc/tmp/exps/``; there ``DVC_ROOT`` points at the main
repository, so every experiment lands in the one store.

A server (``mlflow.tracking_uri: http://...``, e.g. from ``make mlflow-server``) can be away. A
stage then still runs: every logging call goes through ``_record``, which keeps what the server
could not take in ``.mlflow-spool/`` at the repository root, and ``qlora-pipeline mlflow-sync``
(``sync_spool``) sends it later, to the run the execution key names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

from qlora_pipeline.config import MlflowConfig, flatten
from qlora_pipeline.errors import PipelineError

KEY_TAG = "qlora_pipeline.execution"
STORE_FILE = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
SPOOL_DIR = ".mlflow-spool"
SERVER_SCHEMES = ("http", "https")
PROBE_SECONDS = 5.0
# A server gone mid-stage then costs seconds of retries, not the ~4 minutes of MLflow's defaults
# (7 retries, backoff factor 2). Values set in the environment win.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
_WRITING = ".part"
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


def mlflow_client(uri: str) -> Any:
    """MLflow's client for ``uri``, a SQLite store first made whole (see ``ensure_sqlite_store``)."""
    import mlflow

    ensure_sqlite_store(uri)
    return mlflow.MlflowClient(uri)


def ensure_sqlite_store(uri: str) -> None:
    """Create a missing SQLite store under a temporary name and move it into place once migrated.

    MLflow builds a new store by running its schema migrations one by one, for seconds; a stage
    killed meanwhile (kill -9, Ctrl-C) left a store at a middle version that every later stage
    refused ("out-of-date database schema"). The finished store is linked into place only if none
    is there yet (two queued experiments starting together both build one; the first link wins), and
    what a killed creator left (its pid no longer alive) is deleted.
    """
    parsed = urlparse(uri)
    if parsed.scheme != "sqlite" or parsed.path in ("", "/", "/:memory:"):
        return
    store = Path(parsed.path[1:] if parsed.path.startswith("//") else parsed.path)
    if store.exists():
        return
    import secrets

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    import psutil

    store.parent.mkdir(parents=True, exist_ok=True)
    for stale in store.parent.glob(f".{store.name}.*.tmp"):  # .<store>.<pid>.<random>.tmp
        pid = stale.name.split(".")[-3]
        if not (pid.isdigit() and psutil.pid_exists(int(pid))):
            stale.unlink(missing_ok=True)
    partial = store.with_name(f".{store.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        made = SqlAlchemyStore(f"sqlite:///{partial}", (store.parent / ARTIFACT_DIR).as_uri())
        made.engine.dispose()
        with contextlib.suppress(FileExistsError):  # another process's store is already in place
            os.link(partial, store)
    finally:
        partial.unlink(missing_ok=True)


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


# ------------------------------------------------------------------------ a run, and its stand-in


def _experiment_id(client: Any, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # A server keeps artifacts where it was started to (--artifacts-destination, served to clients);
    # a local store keeps them beside it, also for DVC's temporary workspaces.
    location = None if is_server(uri) else (repo_root() / ARTIFACT_DIR).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:
        # Two queued experiments starting together both found none; the second one's create fails.
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _run_with_key(client: Any, experiment_id: str, key: str) -> Any:
    found = client.search_runs([experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{key}'", max_results=1)
    return found[0] if found else None


def _create_run(client: Any, experiment_id: str, opening: dict) -> Any:
    return client.create_run(experiment_id, start_time=opening["timestamp"], tags=opening["tags"],
                             run_name=opening["run_name"])


def _opening(params: Any, uri: str, stage: str) -> dict:
    """What opening this execution's run takes: the spool's first line, should the server be away."""
    from mlflow.tracking.context.registry import resolve_tags

    key = execution_key()
    flat = {name: value for section, values in dataclasses.asdict(params).items()
            for name, value in _flat_params(section, values).items()}
    # resolve_tags adds what mlflow.start_run would (user, source): taken now, not at sync time.
    return {"op": "open", "tracking_uri": uri, "experiment": params.mlflow.experiment_name, "key": key,
            "stage": stage, "run_name": os.environ.get("DVC_EXP_NAME") or None, "tags": resolve_tags(_run_tags(key)),
            "params": flat, "timestamp": _now_ms()}


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
    spool: _Spool | None = None
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
        experiment_id = _experiment_id(client, self.experiment, self.uri)
        found = _run_with_key(client, experiment_id, self.opening["key"])
        if found is not None:
            self.run_id = found.info.run_id
            client.update_run(self.run_id, status="RUNNING")
            return found
        run = _create_run(client, experiment_id, self.opening)
        self.run_id = run.info.run_id
        # Every param, whichever stage opens the run: runs compare side by side in MLflow even
        # when DVC re-ran only the last stages.
        _record({"op": "params", "values": self.opening["params"]})
        return run

    def server_away(self) -> bool:
        return is_server(self.uri) and not reachable(self.uri)

    def go_offline(self) -> None:
        self.spool = _Spool(spool_dir(), {**self.opening, "run_id": self.run_id})
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
    if is_server(uri):
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
    _link = link = _StageLink(uri, params.mlflow.experiment_name, _opening(params, uri, stage))
    try:
        run = link.open()
        _record({"op": "tags", "values": {f"stage.{stage}": "ran"}})
        try:
            yield run
        except BaseException:
            _record({"op": "tags", "values": {f"stage.{stage}": "failed"}})
            _record({"op": "end", "status": "FAILED", "timestamp": _now_ms()})
            raise
        _record({"op": "end", "status": "FINISHED", "timestamp": _now_ms()})
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
    """Numbers go in as metrics ``stage.key``; text (e.g. the persona id) as tags."""
    flat = flatten(metrics, prefix=f"{stage}.")
    numbers = {k: float(v) for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    texts = {k: str(v) for k, v in flat.items() if k not in numbers and v is not None}
    if numbers:
        _record({"op": "metrics", "values": numbers, "step": step or 0, "timestamp": _now_ms()})
    if texts:
        _record({"op": "tags", "values": texts})


def log_artifact(path: Path, artifact_path: str | None = None) -> None:
    """A file, or every file of a folder, into the run (under ``artifact_path``)."""
    _record({"op": "artifact", "path": str(path), "artifact_path": artifact_path})


def _now_ms() -> int:
    return int(time.time() * 1000)


def _record(op: dict) -> None:
    """Send one logging call to the stage's run; once the server is found away, keep it in the spool."""
    link = _link
    if link is None:  # outside pipeline_run (a notebook, a test): MLflow's active run, as mlflow.log_* does
        import mlflow

        run = mlflow.active_run() or mlflow.start_run()
        _send(mlflow.MlflowClient(), run.info.run_id, op)
        return
    if link.spool is None:
        try:
            _send(link.client(), link.run_id, op)
            return
        except Exception:
            if not link.server_away():  # the server answered: a real error, e.g. a param changing value
                raise
            link.go_offline()
    link.spool.keep(op)


def _send(client: Any, run_id: str, op: dict, base: Path = Path()) -> None:
    """One logging call (one spool line) to run ``run_id``; a relative artifact path is under ``base``."""
    from mlflow.entities import Metric, Param, RunTag

    kind, values = op["op"], op.get("values", {})
    if kind == "params":
        client.log_batch(run_id, params=[Param(k, v) for k, v in values.items()])
    elif kind == "metrics":
        client.log_batch(run_id, metrics=[Metric(k, v, op["timestamp"], op["step"]) for k, v in values.items()])
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in values.items()])
    elif kind == "artifact":
        path = base / op["path"]
        log = client.log_artifacts if path.is_dir() else client.log_artifact
        log(run_id, str(path), op["artifact_path"])
    elif kind == "end":
        client.set_terminated(run_id, op["status"], end_time=op["timestamp"])
    else:
        raise PipelineError(f"unknown MLflow spool record {op!r}; update qlora_pipeline or remove the line")


# --------------------------------------------------------------------- a server, and when it is away


def is_server(uri: str) -> bool:
    """A tracking server (http/https) can be away; a SQLite file or a folder store cannot."""
    return urlparse(uri).scheme in SERVER_SCHEMES


def reachable(uri: str, timeout: float = PROBE_SECONDS) -> bool:
    """Whether the server answers at all, without MLflow's retries (a 5xx from a proxy is no answer)."""
    import requests

    try:
        return requests.get(f"{uri.rstrip('/')}/health", timeout=timeout).status_code < 500
    except requests.RequestException:
        return False


def spool_dir() -> Path:
    """Where stages keep what an unreachable server could not take; one folder for every experiment."""
    return repo_root() / SPOOL_DIR


class _Spool:
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


# ------------------------------------------------------------------------------- mlflow-sync


def sync_spool(uri: str | None = None, folder: Path | None = None) -> list[str]:
    """Send every spool file to its store (or to ``uri``), oldest first, removing each once sent.

    Each file joins the run its execution key names, made if none has it yet (with every param).
    A second sync, or one after a sync cut short, adds nothing twice: a metric point sent again
    with its own timestamp is the same point, and params and tags keep their values. A file a
    running stage still writes is left for the next sync; one whose stage was killed is sent.

    Returns:
        One line per file: sent where, or why it was left.
    """
    folder = folder or spool_dir()
    lines = []
    for path in sorted(folder.glob("*.jsonl*")):
        if path.name.endswith(_WRITING) and _writer_alive(path):
            lines.append(f"{path.name}: a running stage still writes it; left for the next sync")
            continue
        lines.append(_sync_file(path, uri))
    return lines


def _writer_alive(path: Path) -> bool:
    import psutil

    return psutil.pid_exists(int(path.name.split(".")[0].split("-")[1]))


def _sync_file(path: Path, uri: str | None) -> str:
    opening, ops = _read_spool(path)
    target = uri or opening["tracking_uri"]
    if is_server(target):
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        if not reachable(target):
            raise PipelineError(f"{target} unreachable: {path.name} and later files stay in {path.parent}; "
                                "start the server (make mlflow-server) or name another with --tracking-uri")
    client = mlflow_client(target)
    run_id = _run_for(client, opening, target)
    for op in ops:
        _send(client, run_id, op, path.parent)
    path.unlink()
    shutil.rmtree(path.parent / f"{path.name.split('.')[0]}.files", ignore_errors=True)
    return f"{path.name}: {len(ops)} records of stage {opening['stage']} -> run {run_id} ({target})"


def _run_for(client: Any, opening: dict, uri: str) -> str:
    """The run of the spool's execution: the one the stage had joined, else the one with its key, else a new one."""
    known = opening.get("run_id")
    if known:
        try:
            if client.get_run(known).data.tags.get(KEY_TAG) == opening["key"]:
                return known
        except Exception:  # another store than the stage's (--tracking-uri): found by key below
            pass
    experiment_id = _experiment_id(client, opening["experiment"], uri)
    found = _run_with_key(client, experiment_id, opening["key"])
    if found is not None:
        return found.info.run_id
    run_id = _create_run(client, experiment_id, opening).info.run_id
    _send(client, run_id, {"op": "params", "values": opening["params"]})
    return run_id


def _read_spool(path: Path) -> tuple[dict, list[dict]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # the last line of a stage killed mid-write
                break
            raise PipelineError(f"{path}:{number}: not a spool record; remove that line and sync again") from None
    if not records or records[0].get("op") != "open":
        raise PipelineError(f"{path}: no opening record (the run's identity); it cannot be sent, remove it")
    return records[0], records[1:]


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
