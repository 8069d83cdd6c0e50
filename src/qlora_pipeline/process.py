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


# What stages and commands import, by what they do, for ``import_quietly`` (``stage_main(imports=...)``): the
# libraries that make a process's start-up (``python -X importtime`` on the tiny pipeline's stages). A name missing
# from a list is imported later, as before; a name a process would not have imported costs its whole import.
TRACKING = ("mlflow", "mlflow.tracking")
# The store of a database URI (the default SQLite one, PostgreSQL): a server's (http) needs none of it.
DATABASE_STORE = "mlflow.store.tracking.sqlalchemy_store"
TORCH = ("torch",)
QUANTIZED_MODEL = (*TORCH, "transformers", "transformers.modeling_utils", "bitsandbytes")
ADAPTERS = (*QUANTIZED_MODEL, "peft")
TRAINING = (*ADAPTERS, "transformers.trainer", "datasets", "accelerate")
JUDGE = ("sklearn.feature_extraction.text", "sklearn.linear_model")
ROUGE = ("rouge_score.rouge_scorer",)

# A generation-2 threshold no import reaches: CPython counts young collections up to it before a full one.
_NO_FULL_COLLECTION = 1 << 30


def import_quietly(modules: Iterable[str]) -> list[str]:
    """Import ``modules`` with CPython's full garbage collections held off, then freeze what stays in memory.

    Nearly every object torch, transformers with PEFT, bitsandbytes and MLflow make while they import lives as
    long as the process. CPython 3.11 still walks them all in a full collection each time a quarter more have
    survived, and once more at exit, where it frees them one by one. Frozen (``gc.freeze``), they are skipped
    by both: on the Xeon machine, the tiny pipeline's evaluate stage went from 10.4 to 6.7 s, train-adapter
    from 10.6 to 6.8 s, fetch from 2.5 to 1.7 s; leaving a process that imported PEFT, MLflow and
    scikit-learn took 2.1 s, 0.3 s frozen. The young generations keep collecting meanwhile, and the
    thresholds are restored on return: what the process allocates later is collected as before.

    A module that fails to import, whatever it raises, is skipped (its names are returned): Python keeps no
    half-imported module, so whoever needs it imports it again later and meets the error there, as without
    this, with that code's own message (a missing ``gguf`` names its fix).
    """
    thresholds = gc.get_threshold()
    failed = []
    gc.set_threshold(thresholds[0], thresholds[1], _NO_FULL_COLLECTION)
    try:
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:  # raised again, in context, where the module is imported for use
                failed.append(name)
    finally:
        gc.freeze()
        gc.set_threshold(*thresholds)
    return failed
