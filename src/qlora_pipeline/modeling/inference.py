"""Faster CPU inference for processes that never save the model (evaluate, chat, serve).

On the CPU, bitsandbytes computes a 4-bit layer by dequantizing its whole weight to the compute
dtype and then calling ``linear``, on every call. Training needs that (it is what keeps the base
small), but generation calls every layer once per new token, so a 48-token reply dequantizes the
whole model 48 times. Here each frozen 4-bit layer is dequantized once, with the same bitsandbytes
ops, into a dense weight that gives bit-identical outputs.

The dense weights cost memory (4 bytes per parameter in float32), so ``auto`` only does it on a
CPU when they fit in a quarter of the free memory. A GPU runs bitsandbytes' fused kernels instead.
After :func:`dequantize_for_inference` the 4-bit weights are gone: a model converted so must never be
saved. :func:`dequantized` converts for the length of a block and puts the 4-bit layers back (export's
reference, which is merged afterwards).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from qlora_pipeline import hardware
from qlora_pipeline.modeling.quantization import linear4bit_modules
from qlora_pipeline.modeling.stacked_lora import cast_shared

_MEMORY_SHARE = 0.25


class DequantizedLinear4bit(torch.nn.Module):
    """A frozen ``bnb.nn.Linear4bit`` dequantized once; computes exactly what the layer computes on the CPU."""

    def __init__(self, layer: Any):
        super().__init__()
        self.compute_dtype = layer.compute_dtype or torch.float32
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.weight = torch.nn.Parameter(dequantize_weight(layer.weight, self.compute_dtype), requires_grad=False)
        self.bias = None if layer.bias is None else torch.nn.Parameter(
            layer.bias.detach().to(self.compute_dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(cast_shared(x, self.compute_dtype), self.weight, self.bias).to(x.dtype)


def dequantize_weight(weight: Any, dtype: torch.dtype) -> torch.Tensor:
    """The weight as bitsandbytes' CPU ``gemm_4bit`` dequantizes it, op for op (nested absmax included)."""
    state = weight.quant_state
    absmax = state.absmax
    if state.nested:
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
            state.absmax, state.state2.absmax, state.state2.code, state.state2.blocksize, torch.float32) + state.offset
    return torch.ops.bitsandbytes.dequantize_4bit.default(
        weight.data.view(-1, 1), absmax, state.blocksize, state.quant_type, state.shape, dtype)


def dense_bytes(model: Any) -> int:
    """Memory the dequantized weights would take."""
    total = 0
    for layer in linear4bit_modules(model):
        dtype = layer.compute_dtype or torch.float32
        total += layer.weight.quant_state.shape.numel() * torch.finfo(dtype).bits // 8
    return total


def should_dequantize(setting: bool | str, model: Any) -> bool:
    """``auto``: on a CPU, when the dense weights fit in a quarter of the free memory."""
    if setting != hardware.AUTO:
        return bool(setting)
    if torch.cuda.is_available() or not linear4bit_modules(model):
        return False
    return dense_bytes(model) <= _MEMORY_SHARE * hardware.free_memory_bytes()


def dequantize_for_inference(model: Any) -> int:
    """Replace every 4-bit layer (also inside LoRA wrappers) by its :class:`DequantizedLinear4bit`; return how many."""
    return sum(1 for _ in _swap_in_dequantized(model))


@contextmanager
def dequantized(model: Any, setting: bool | str = hardware.AUTO) -> Iterator[int]:
    """:func:`dequantize_for_inference` for the length of a block, when ``setting`` says so (:func:`should_dequantize`);
    yields how many layers it replaced.

    The 4-bit layers are put back after it, so that the model can still be merged, copied or saved: what
    export does with its reference (the 4-bit base with the adapter) once it has the reference's logits
    and greedy replies, which the dense layers give bit for bit and faster on a CPU.
    """
    swapped: list[tuple[Any, str, Any]] = []
    try:
        if should_dequantize(setting, model):
            for swap in _swap_in_dequantized(model):  # kept as each is made
                swapped.append(swap)
        yield len(swapped)
    finally:  # also when the swap itself failed midway (out of memory): every layer swapped so far goes back
        for parent, name, layer in swapped:
            setattr(parent, name, layer)


def _swap_in_dequantized(model: Any) -> Iterator[tuple[Any, str, Any]]:
    """Every 4-bit layer replaced by its dense twin, one at a time; yields (parent, name, the 4-bit layer) of each
    once it is swapped."""
    import bitsandbytes as bnb

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                setattr(parent, name, DequantizedLinear4bit(child))
                yield parent, name, child
