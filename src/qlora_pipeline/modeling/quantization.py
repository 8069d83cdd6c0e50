"""bitsandbytes quantization from params, and what a quantized model costs.

CPU trap, guarded by a test: on CPU a bitsandbytes ``Linear4bit`` repacks its weight in place on
its first forward pass in eval mode under no-grad when ``support_avx512bf16_for_cpu`` is set.
Any later ``state_dict()`` (``save_pretrained``, a PEFT adapter save, a Trainer checkpoint)
converts it back with loss, and the model's outputs change. Every loader here turns the repack
off right after loading, at some generation speed, so saved weights stay bit-exact.
"""

from __future__ import annotations

from typing import Any

from qlora_pipeline.config import QuantizationConfig
from qlora_pipeline.hardware import resolve_dtype


def is_quantized(cfg: QuantizationConfig) -> bool:
    return cfg.load_in_4bit or cfg.load_in_8bit


def bnb_config(cfg: QuantizationConfig) -> Any:
    """``BitsAndBytesConfig`` from the params section (its keys are the library's), or None."""
    if not is_quantized(cfg):
        return None
    import torch
    from transformers import BitsAndBytesConfig

    kwargs = cfg.model_dump()
    kwargs["bnb_4bit_compute_dtype"] = getattr(torch, resolve_dtype(cfg.bnb_4bit_compute_dtype))
    return BitsAndBytesConfig(**kwargs)


def apply_compute_dtype(model: Any, name: str) -> str:
    """Set the matmul dtype of every 4-bit layer to ``name`` resolved on this machine; return it.

    A saved 4-bit base remembers the compute dtype of the machine that quantized it. With ``auto``
    the machine that loads it decides again: the packed weights do not depend on it.
    """
    import torch

    resolved = resolve_dtype(name)
    for module in linear4bit_modules(model):
        module.compute_dtype = getattr(torch, resolved)
    return resolved


def linear4bit_modules(model: Any) -> list[Any]:
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def disable_cpu_repack(model: Any) -> int:
    """Turn off the in-place CPU repack of every ``Linear4bit`` (see module docstring)."""
    modules = linear4bit_modules(model)
    for module in modules:
        module.support_avx512bf16_for_cpu = False
    return len(modules)


def logical_parameters(model: Any) -> int:
    """Parameters as the unquantized model counts them (a packed 4-bit tensor holds two per byte)."""
    total = 0
    for param in model.parameters():
        quant_state = getattr(param, "quant_state", None)
        total += quant_state.shape.numel() if quant_state is not None else param.numel()
    return total


def footprint(model: Any) -> dict[str, float]:
    """Parameter count, bytes held (weights, quantization constants, buffers) and bits per parameter."""
    params = logical_parameters(model)
    memory = model.get_memory_footprint()
    quantized = {type(m).__name__ for m in model.modules() if type(m).__module__.startswith("bitsandbytes")}
    return {
        "parameters": params,
        "memory_footprint_bytes": memory,
        "memory_footprint_mb": round(memory / 2**20, 2),
        "bits_per_parameter": round(memory * 8 / params, 3),
        "quantized_layers": sum(1 for m in model.modules() if type(m).__name__ in quantized),
    }
