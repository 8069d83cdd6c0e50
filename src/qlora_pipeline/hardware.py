"""What this machine computes fast, and the float types and memory trade-offs that follow from it.

Every float type in params can be ``auto``. It resolves here, from the hardware the stage runs on:
- CUDA with compute capability >= 8.0 (Ampere and later): bfloat16, which the tensor cores run natively;
- older CUDA GPUs (T4, V100): float16, their fast type (they emulate bfloat16);
- a CPU where oneDNN runs bfloat16 natively (AVX-512 BF16 or AMX): bfloat16;
- any other CPU (AVX2 laptops): float32. There bfloat16 has no hardware path and the 4-bit backward
  ran 32x slower than in float32 (measured: 4.8 vs 153 tokens/s on a 2-core AVX2 EPYC).

The capability checks are small functions so tests can fake each kind of machine.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

AUTO = "auto"
# Bytes of activations kept per token, per layer and per hidden unit in 16-bit training without
# recomputation (Korthikanti et al. 2022, "Reducing Activation Recomputation", s*b*h*34).
_ACTIVATION_BYTES_PER_TOKEN_LAYER_HIDDEN = 34
# Activation checkpointing goes on when the activations alone would take more than this share of
# the memory free on the device: the rest is for weights, optimizer state, logits and the OS.
_ACTIVATION_MEMORY_SHARE = 0.25


def cuda_capability() -> tuple[int, int] | None:
    """(major, minor) of this process's GPU, or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability()


def cpu_bf16_native() -> bool:
    """oneDNN runs bfloat16 natively here (AVX-512 BF16 or AMX), as PyTorch itself decides."""
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_amx() -> bool:
    """AMX tiles (Sapphire Rapids and later): bfloat16 matmuls in hardware."""
    import torch

    # torch.cpu's check (its capabilities dict), else torch._C._cpu's, where older torch kept it. Looking only
    # in torch._C._cpu read False on every machine under torch 2.13, AMX ones included.
    check = getattr(torch.cpu, "_is_amx_tile_supported", None) or getattr(torch._C._cpu, "_is_amx_tile_supported", None)
    return bool(check()) if check else False


def native_dtype() -> str:
    """The fastest float type this machine trains in without losing range (see module docstring).

    On a CPU, bfloat16 only where oneDNN runs it: AMX tiles alone do not decide it. With oneDNN
    capped below bfloat16 (``ONEDNN_MAX_CPU_ISA=AVX2``, how docs/benchmarks.md estimates an AVX2
    machine on an AMX one) the CPUID still reports AMX, and bfloat16 matmuls fell back to ATen's
    plain loops: training's first step took 167 s against 4.4 s.
    """
    capability = cuda_capability()
    if capability is not None:
        return "bfloat16" if capability >= (8, 0) else "float16"
    return "bfloat16" if cpu_bf16_native() else "float32"


def resolve_dtype(name: str) -> str:
    """``auto`` -> :func:`native_dtype`; an explicit dtype name wins."""
    return native_dtype() if name == AUTO else name


def resolve_mixed_precision(bf16: bool | str, fp16: bool | str) -> tuple[bool, bool]:
    """The Trainer's ``bf16``/``fp16`` (autocast): ``auto`` follows :func:`native_dtype`.

    An explicit ``true`` decides, and the other key's ``auto`` then stays off.
    """
    if bf16 is True or fp16 is True:
        return bf16 is True, fp16 is True
    native = native_dtype()
    return bf16 == AUTO and native == "bfloat16", fp16 == AUTO and native == "float16"


def free_memory_bytes() -> int:
    """Memory free for this process: on its GPU with CUDA, else the host's available memory."""
    import torch

    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def activation_bytes(num_layers: int, hidden_size: int, tokens_per_step: int, dtype_bytes: int) -> int:
    """Activations one micro-batch keeps for the backward pass without checkpointing."""
    return int(num_layers * hidden_size * tokens_per_step * _ACTIVATION_BYTES_PER_TOKEN_LAYER_HIDDEN
               * dtype_bytes / 2)


def resolve_activation_checkpointing(setting: bool | str, model_config: Any, tokens_per_step: int,
                                     dtype: str) -> bool:
    """``auto``: recompute activations only when keeping them would not fit comfortably.

    Checkpointing trades ~30% more compute for memory. A 135M model on a CPU keeps a few GB of
    activations, which the host has: off. A 7B model on a GPU keeps tens of GB: on.
    """
    if setting != AUTO:
        return bool(setting)
    dtype_bytes = 4 if dtype == "float32" else 2
    needed = activation_bytes(model_config.num_hidden_layers, model_config.hidden_size, tokens_per_step,
                              dtype_bytes)
    return needed > _ACTIVATION_MEMORY_SHARE * free_memory_bytes()


def cpu_model() -> str:
    """The CPU's marketing name (``model name`` in /proc/cpuinfo), or what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def capability() -> dict[str, Any]:
    """The machine line every metric file and benchmark records, so runs on different machines can be told apart."""
    import torch

    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_native": cpu_bf16_native(),
        "cpu_amx": cpu_amx(),
        "cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "native_dtype": native_dtype(),
        "gpu": None,
    }
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        info["gpu"] = f"{torch.cuda.get_device_name()} (compute capability {major}.{minor})"
    return info


def capability_line(info: dict[str, Any] | None = None) -> str:
    """One human-readable line of :func:`capability`."""
    info = info or capability()
    cpu = (f"{info['cpu_model']}, {info['cores']} cores, {info['cpu_capability']}, "
           f"bf16 native {'yes' if info['cpu_bf16_native'] else 'no'}, AMX {'yes' if info['cpu_amx'] else 'no'}")
    return f"{cpu}; GPU {info['gpu'] or 'none'}; auto dtype {info['native_dtype']}; torch {info['torch']}"


# Cumulative energy counters of CPU packages (Intel RAPL, also exposed on recent AMD) in microjoules.
_RAPL = Path("/sys/class/powercap")


def energy_joules() -> float | None:
    """Energy the machine's counters have recorded so far (CPU packages + GPUs), or None without counters.

    Only differences of two readings mean anything. CPU: the RAPL package domains (readable by root
    or where the admin allowed it; VMs rarely expose them). GPU: NVML's total energy since the driver
    loaded (Volta and later). Counter wrap-around within one stage is not handled.
    """
    total, found = 0.0, False
    for counter in sorted(_RAPL.glob("intel-rapl:[0-9]*/energy_uj")):  # packages, not their sub-domains
        try:
            total += int(counter.read_text()) / 1e6
            found = True
        except (OSError, ValueError):
            continue
    try:
        import pynvml  # shipped with torch's CUDA builds (nvidia-ml-py); absent on CPU builds

        pynvml.nvmlInit()
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            total += pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1e3
            found = True
    except Exception:  # no NVML, no GPU or an old one: nothing measured
        pass
    return total if found else None
