"""bitsandbytes' CPU backend runs no kernel from the Hugging Face Hub in our processes.

bitsandbytes 0.50, when imported on a CPU with AVX512-BF16 and with the ``kernels`` package
installed (transformers requires it), fetches a fused 4-bit matmul from the Hub
(``kernels-community/quantization-bitsandbytes``) and runs it in place of its own: code from the
Hub run without asking, as ``trust_remote_code`` would run a model's, and a matmul that depends on
whether the network or the Hub cache had that kernel, so the same params and code could train
different adapters on two such machines. Offline and uncached it logs a warning in every process
that imports it. There is no switch for it; `refuse_bitsandbytes_hub_kernel` makes bitsandbytes
find no ``kernels`` while its CPU backend loads, so it keeps its own kernel, as it does wherever
``kernels`` is missing. The package installs it on import (``qlora_pipeline/__init__.py``):
imported after bitsandbytes, it comes too late for that process. While that one module loads,
another thread's ``import kernels`` would fail too: imports of the package come first, on one thread.
(bitsandbytes' MPS backend fetches a kernel of its own on recent macOS; this project runs no MPS.)

Plumbing, no stage's dep: what it keeps out was never part of an output; with it, an output
depends on the installed packages alone, not on the Hub.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
from types import ModuleType

BITSANDBYTES_CPU_BACKEND = "bitsandbytes.backends.cpu.ops"
_REFUSED_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropRefusedKernelWarning(logging.Filter):
    """bitsandbytes' warning that the Hub kernel failed to load: here the failure is the point."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_REFUSED_WARNING)


class _WithoutKernelsLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader):
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # None in sys.modules makes `from kernels import get_kernel` raise ImportError, which
        # bitsandbytes catches to fall back on its own kernel.
        missing = object()
        kernels = sys.modules.get("kernels", missing)
        sys.modules["kernels"] = None  # type: ignore[assignment]
        log = logging.getLogger(BITSANDBYTES_CPU_BACKEND)
        quiet = _DropRefusedKernelWarning()
        log.addFilter(quiet)
        try:
            self._loader.exec_module(module)
        finally:
            log.removeFilter(quiet)
            if kernels is missing:
                sys.modules.pop("kernels", None)
            else:
                sys.modules["kernels"] = kernels

    def __getattr__(self, name: str):
        # get_source, get_filename, ...: tracebacks and inspect read the module through its loader.
        # Not dunders, nor before __init__ (copy and pickle build the object without it).
        if name.startswith("__") or name == "_loader":
            raise AttributeError(name)
        return getattr(self._loader, name)


class _RefuseHubKernel(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != BITSANDBYTES_CPU_BACKEND:
            return None
        # The finders after this one only: one before it that also asks the others would ask this one again.
        after = sys.meta_path[sys.meta_path.index(self) + 1:] if self in sys.meta_path else sys.meta_path
        for finder in after:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _WithoutKernelsLoader(spec.loader)
                return spec
        return None


def refuse_bitsandbytes_hub_kernel() -> bool:
    """Keep bitsandbytes from loading a Hub kernel in this process; False if it was imported already."""
    if not any(isinstance(finder, _RefuseHubKernel) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RefuseHubKernel())
    return BITSANDBYTES_CPU_BACKEND not in sys.modules
