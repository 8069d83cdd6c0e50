"""Settings of the Python process itself, made once at start by every stage and command.

Plumbing: no output depends on them. The memory allocator's (``keep_freed_memory``) and the garbage
collector's (``import_quietly``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import importlib
from typing import Iterable

# glibc's mallopt parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP = 1 << 30


def keep_freed_memory() -> bool:
    """Keep large freed blocks in the process for reuse instead of handing them back to the system.

    glibc serves an allocation above its mmap threshold (32 MB at most) with fresh pages from the
    system and returns them on free, so every such tensor (a prefill's MLP activations, a validation
    batch on a CPU) pays a page fault per 4 KB again: a 65 MB SiLU took 105 ms that way and 12 ms
    with the blocks kept (AVX2, 2 cores). Memory stays at its peak instead of falling back between
    batches. False where the C library is not glibc (musl, macOS): nothing changes there.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _KEEP) and libc.mallopt(_M_TRIM_THRESHOLD, _KEEP))
    except (OSError, AttributeError):
        return False


# What stages and commands import, by what they do, for ``import_quietly`` (each stage script's ``imports``): the
# libraries that make a process's start-up (``python -X importtime`` on the tiny pipeline's stages). A name missing
# from a list is imported later, as before; a name a process would not have imported costs its whole import.
# (The store of a database tracking URI is added by ``tracking_imports``.)
TRACKING = ("mlflow", "mlflow.tracking")
# MLflow's store for a database URI (the default SQLite one, PostgreSQL, MySQL, SQL Server).
DATABASE_STORE = "mlflow.store.tracking.sqlalchemy_store"
_DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
QUANTIZED_MODEL = ("torch", "transformers", "transformers.modeling_utils", "bitsandbytes")
ADAPTERS = (*QUANTIZED_MODEL, "peft")
TRAINING = (*ADAPTERS, "transformers.trainer", "datasets", "accelerate")
JUDGE = ("sklearn.feature_extraction.text", "sklearn.linear_model")
ROUGE = ("rouge_score.rouge_scorer",)


def tracking_imports(uri: str | None) -> tuple[str, ...]:
    """MLflow, and its database store where ``uri`` (``mlflow.tracking_uri``; None = the default SQLite) names a
    database: a server's or a folder's store needs none of it."""
    scheme = (uri or "sqlite:").split(":", 1)[0].split("+", 1)[0].lower()
    return (*TRACKING, DATABASE_STORE) if scheme in _DATABASE_SCHEMES else TRACKING


# A generation-2 threshold no import reaches: CPython counts young collections up to it before a full one.
_NO_FULL_COLLECTION = 1 << 30
# Whether this process's first call has been made, and so has frozen (or found a freeze made before it). A fork
# inherits it: ``gc.get_freeze_count`` walks the whole frozen list, reading every object's header, and a warm
# process's fork holds ~840,000 (50 ms a call, once in every stage's fork).
_frozen = False


def import_quietly(modules: Iterable[str]) -> list[str]:
    """Import ``modules`` with CPython's full garbage collections held off, then freeze what stays in memory.

    Nearly every object torch, transformers with PEFT, bitsandbytes and MLflow make while they import lives as
    long as the process. CPython 3.11 still walks them all in a full collection each time a quarter more have
    survived, and once more at exit, where it frees them one by one. Frozen (``gc.freeze``), they are skipped
    by both (``bench/startup_bench.py``: a stage's start-up and exit about 1.6x faster). The young
    generations keep collecting meanwhile, and the thresholds are restored on return: what the process
    allocates later is collected as before.

    Only a process's first call freezes: a freeze keeps everything alive at that moment, garbage not yet
    collected included, and a later call (a command run in a test worker) would keep the garbage of what ran
    before it. A module that is not installed is skipped (its names are returned): the code that needs it
    says so in its own words (a missing ``gguf`` names its fix). Any other error is raised, as importing it
    plainly would.
    """
    thresholds = gc.get_threshold()
    missing = []
    gc.set_threshold(thresholds[0], thresholds[1], _NO_FULL_COLLECTION)
    try:
        for name in modules:
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as err:
                if err.name is None or not (name == err.name or name.startswith(err.name + ".")):
                    raise  # the module is there and an import inside it failed: its own error
                missing.append(name)
        global _frozen
        if not _frozen:
            if not gc.get_freeze_count():
                gc.freeze()
            _frozen = True
    finally:
        gc.set_threshold(*thresholds)
    return missing


def pid_running(pid: int) -> bool:
    """Whether process ``pid`` still runs (the writer of a file named after it, a warm process just started). A
    killed one that nobody has reaped yet (a zombie) does not: an orphan waits for init to reap it, and some inits
    take seconds (1.5 s seen on a VM whose init is not systemd), long enough for the next run of a killed stage to
    find it "alive"."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # another user's process, /proc mounted with hidepid: there, so taken as running
        return True
