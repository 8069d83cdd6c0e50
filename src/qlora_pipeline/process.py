"""Settings of the Python process itself, made once at start by every stage and command (plumbing: no output depends on them)."""

from __future__ import annotations

import ctypes
import ctypes.util

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
