"""The MLflow store: where it is, its client, and the calls a run's logging is made of.

The default store is a SQLite file at the repository root. DVC runs queued and temporary
experiments in copies under ``.dvc/tmp/exps/``; there ``DVC_ROOT`` points at the main
repository, so every experiment lands in the one store. A server (``http(s)://``) can be away:
``reachable`` asks it without MLflow's retries.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.process import pid_running

KEY_TAG = "qlora_pipeline.execution"
STORE_FILE = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
SERVER_SCHEMES = ("http", "https")
PROBE_SECONDS = 5.0
# A server gone mid-stage then costs seconds of retries, not the ~4 minutes of MLflow's defaults
# (7 retries, backoff factor 2). Values set in the environment win.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}


def use_http_defaults(uri: str) -> None:
    """For a server's URI, MLflow's HTTP retries as ``HTTP_DEFAULTS`` says, unless the environment sets them."""
    if is_server(uri):
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)


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


def resolve_tracking_uri(configured: str | None) -> str:
    """``mlflow.tracking_uri`` as configured, or (null) the SQLite store at the repository root."""
    return configured or f"sqlite:///{repo_root() / STORE_FILE}"


def mlflow_client(uri: str) -> Any:
    """MLflow's client for ``uri``, a SQLite store first made whole (see ``ensure_sqlite_store``)."""
    import mlflow

    ensure_sqlite_store(uri)
    return mlflow.MlflowClient(uri)


def sqlite_store_path(uri: str) -> Path | None:
    """The file of a SQLite store URI, as SQLAlchemy reads it (``sqlite:///rel.db`` relative, ``sqlite:////abs.db``
    absolute); None for another store or an in-memory one. Read as a URL path, the relative one was taken for
    ``/rel.db``, and the store was built at the filesystem's root."""
    if not uri.startswith("sqlite:///"):
        return None
    path = unquote(uri.removeprefix("sqlite:///").split("?", 1)[0])  # SQLAlchemy decodes %20 and the like
    return Path(path) if path not in ("", ":memory:") else None


def ensure_sqlite_store(uri: str) -> None:
    """Create a missing SQLite store under a temporary name and move it into place once migrated.

    MLflow builds a new store by running its schema migrations one by one, for seconds; a stage
    killed meanwhile (kill -9, Ctrl-C) left a store at a middle version that every later stage
    refused ("out-of-date database schema"). The finished store is linked into place only if none
    is there yet (two queued experiments starting together both build one; the first link wins), and
    what a killed creator left (its pid no longer alive) is deleted.
    """
    store = sqlite_store_path(uri)
    if store is None or store.exists():
        return
    import secrets

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store.parent.mkdir(parents=True, exist_ok=True)
    for stale in store.parent.glob(f".{store.name}.*.tmp"):  # .<store>.<pid>.<random>.tmp
        pid = stale.name.split(".")[-3]
        if not (pid.isdigit() and pid_running(int(pid))):
            stale.unlink(missing_ok=True)
    partial = store.with_name(f".{store.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        made = SqlAlchemyStore(f"sqlite:///{partial}", (store.parent.resolve() / ARTIFACT_DIR).as_uri())
        made.engine.dispose()
        with contextlib.suppress(FileExistsError):  # another process's store is already in place
            os.link(partial, store)
    finally:
        partial.unlink(missing_ok=True)


def is_server(uri: str) -> bool:
    """A tracking server (http/https) can be away; a SQLite file or a folder store cannot."""
    return urlparse(uri).scheme in SERVER_SCHEMES


# What ``runs`` and ``compare`` say to do about a store they cannot use.
STORE_FIX = "run the pipeline first (make run), or set mlflow.tracking_uri to the store your stages log to"


def require_store(uri: str, what: str = " (mlflow.tracking_uri)", fix: str = STORE_FIX,
                  missing_ok: bool = False) -> None:
    """For a command that reads or syncs the store: a server that does not answer is named at once (``runs`` and
    ``compare`` waited through MLflow's minutes of retries, then gave a traceback), and so is a SQLite file that is
    no MLflow store (``store_problem``: missing too, unless ``missing_ok``). ``what`` follows the problem in the
    message, ``fix`` ends it."""
    use_http_defaults(uri)
    if is_server(uri) and not reachable(uri):
        raise PipelineError(f"{uri} unreachable{what}; start the server (make mlflow-server), or {fix}")
    problem = store_problem(uri, missing_ok)
    if problem:
        raise PipelineError(f"{problem}{what}; {fix}")


# How long the check waits for another program's write to the store to end (sqlite3's default).
STORE_LOCK_SECONDS = 5.0
# Tables every MLflow SQLite store has, its migrations' own among them.
STORE_TABLES = frozenset({"experiments", "runs", "metrics", "alembic_version"})


def store_problem(uri: str, missing_ok: bool = False) -> str | None:
    """Why the SQLite store ``uri`` names is no MLflow store, found without writing to it; None where it is one,
    where ``uri`` names a server or another kind of store, and (``missing_ok``) where no file is there yet in a
    folder that is.

    MLflow makes a store of a missing file, folders and all, and builds its tables into any SQLite file, an empty
    one too: a mistyped path to ``runs`` became a new empty store, and one to ``mlflow-sync --tracking-uri`` new
    folders holding the runs sent; any other file was a traceback.
    """
    import sqlite3

    store = sqlite_store_path(uri)
    if store is None:
        return None
    if store.is_dir():
        return f"{store}: a folder, not an MLflow store file"
    if not store.parent.is_dir():
        return f"{store}: no such folder as {store.parent} (a mistyped path?)"
    if not store.exists():
        return None if missing_ok else f"{store}: no MLflow store here (no stage has logged to it, or a mistyped path)"
    try:
        with contextlib.closing(sqlite3.connect(f"{store.resolve().as_uri()}?mode=ro", uri=True,
                                                timeout=STORE_LOCK_SECONDS)) as db:
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.OperationalError as err:  # held by another program's write, or not readable by this user
        return f"{store}: cannot be read now ({err})"
    except sqlite3.Error as err:  # "file is not a database"
        return f"{store}: not an MLflow store ({err}; {store.stat().st_size} bytes)"
    if not STORE_TABLES <= tables:
        empty = "; an empty file" if store.stat().st_size == 0 else ""
        return f"{store}: not an MLflow store (no MLflow tables in it{empty})"
    return None


# The Python package SQLAlchemy's database drivers come in, by the module it imports.
DRIVER_PACKAGES = {"psycopg2": "psycopg2-binary", "psycopg": "psycopg[binary]", "MySQLdb": "mysqlclient",
                   "pymysql": "PyMySQL", "mysql": "mysql-connector-python", "pyodbc": "pyodbc", "pymssql": "pymssql"}


@contextlib.contextmanager
def store_errors(uri: str, fix: str = "set mlflow.tracking_uri to another store"):
    """MLflow's and the database's errors from reading or writing the store ``uri``, raised as a PipelineError that
    names the store, how to look into it and ``fix``: a damaged store (a run row MLflow cannot read, a table
    missing), a database without its driver, a server that is no MLflow server, a scheme MLflow has no store for.
    They were tracebacks from ``runs``, ``compare`` and ``mlflow-sync``."""
    import logging

    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    # MLflow logs a database error with its whole traceback before raising it; the reason is in the message below.
    database_log = logging.getLogger("mlflow.store.db.utils")
    level = database_log.level
    database_log.setLevel(logging.CRITICAL)
    try:
        yield
    except ModuleNotFoundError as err:  # SQLAlchemy imports a database's driver when it first connects
        module = (err.name or "").split(".")[0]
        if module not in DRIVER_PACKAGES:
            raise  # not a driver: a broken environment says so itself
        raise PipelineError(f"{uri}: this store's database driver is not installed (the module {module!r}); "
                            f"install it (.venv/bin/pip install {DRIVER_PACKAGES[module]}), or {fix}") from None
    except (MlflowException, SQLAlchemyError) as err:
        reason = str(getattr(err, "orig", None) or err).strip().splitlines() or [type(err).__name__]
        look = ("check that it is an MLflow tracking server and read its log" if is_server(uri) else
                f"check it with `mlflow ui --backend-store-uri {uri}`")
        raise PipelineError(f"{uri}: MLflow could not read or write this store ({reason[0][:300]}); {look}, or "
                            f"{fix}") from None
    finally:
        database_log.setLevel(level)


def reachable(uri: str, timeout: float = PROBE_SECONDS) -> bool:
    """Whether the server answers at all, without MLflow's retries (a 5xx from a proxy is no answer)."""
    import requests

    try:
        return requests.get(f"{uri.rstrip('/')}/health", timeout=timeout).status_code < 500
    except requests.RequestException:
        return False


def experiment_for(client: Any, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        follow_a_copied_store(uri, experiment.experiment_id, experiment.artifact_location)
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


def follow_a_copied_store(uri: str, experiment_id: str, location: str) -> None:
    """The repository's own store, copied or moved with it (``cp -r``, ``mv``): its artifacts pointed at again.

    MLflow keeps an experiment's artifact location, and each run's, as absolute paths: in a copy every later run
    wrote its adapter and reports into the original checkout's ``mlartifacts``, and ``mlflow ui`` read the copy's
    earlier runs from there (or from nowhere, once it was moved or deleted). Where the store is the one at the
    repository root and the location is that of another checkout's ``mlartifacts``, the experiment's and its
    runs' locations are moved to this repository's (MLflow has no call to change them; their columns have kept
    these names since MLflow 1). A store set elsewhere (``mlflow.tracking_uri``), a server's, or a location of the
    user's own is left as it is.
    """
    store = sqlite_store_path(uri)
    root = repo_root()
    here = (root / ARTIFACT_DIR).as_uri()
    if (store is None or location == here or not str(experiment_id).isdigit()
            or store.resolve() != (root / STORE_FILE).resolve()):
        return
    parsed = urlparse(location)
    former = Path(unquote(parsed.path))
    if parsed.scheme != "file" or former.name != ARTIFACT_DIR:
        return
    import sqlite3

    with contextlib.closing(sqlite3.connect(store, timeout=STORE_LOCK_SECONDS)) as db, db:
        moved = db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ? "
                           "AND artifact_location = ?", (here, int(experiment_id), location)).rowcount
        # A run's artifact URI is the experiment's location, then /<experiment id>/<run id>/artifacts.
        db.execute("UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) WHERE experiment_id = ? "
                   "AND substr(artifact_uri, 1, ?) = ?", (here, len(location) + 1, int(experiment_id),
                                                           len(location) + 1, f"{location}/"))
    if moved:  # else another process (a queued experiment starting beside this one) moved them first
        print(f"mlflow: {store.name} was copied or moved here from {former.parent}: its runs' artifacts are now "
              f"read from and written to {root / ARTIFACT_DIR}")


def run_with_key(client: Any, experiment_id: str, key: str) -> Any:
    found = client.search_runs([experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{key}'", max_results=1)
    return found[0] if found else None


def create_run(client: Any, experiment_id: str, opening: dict) -> Any:
    return client.create_run(experiment_id, start_time=opening["timestamp"], tags=opening["tags"],
                             run_name=opening["run_name"])


def now_ms() -> int:
    return int(time.time() * 1000)


def send(client: Any, run_id: str, op: dict, base: Path = Path()) -> None:
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
