"""What every bench script measures the same way, CPU or GPU: the machine's matmul peak and its software.

Imported by the scripts beside it (``python bench/<script>.py`` puts this folder on the path).
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def matmul_peak_flops(dtype_name: str, device: str = "cpu", size: int = 2048, repeats: int = 10,
                      inner: int = 1) -> float:
    """Dense matmul FLOP/s in ``dtype_name``, best of ``repeats`` runs of ``inner`` GEMMs: the MFU denominator.

    Random operands (zeros run faster at lower power); one untimed run first warms up clocks and
    kernel heuristics; on a GPU each run is bracketed by a synchronize.
    """
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    best = float("inf")
    for attempt in range(repeats + 1):
        sync()
        started = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b)
        sync()
        if attempt:
            best = min(best, time.perf_counter() - started)
    return 2 * size**3 * inner / best


def environment() -> dict:
    """Library versions, the CPU's capability line and, with CUDA, the GPU: the line every result carries.

    A library that fails to import is named with its error rather than raised, so a script can
    decide whether it needs it.
    """
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from qlora_pipeline import hardware

    env = {"python": platform.python_version(), "torch": torch.__version__, "machine": hardware.capability_line(),
           "cuda": torch.cuda.is_available()}
    for name in ("transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            env[name] = __import__(name).__version__
        except Exception as err:  # reported, not fatal here
            env[name] = f"missing: {err}"
    if env["cuda"]:
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), cuda_runtime=torch.version.cuda,
                   compute_capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return env
