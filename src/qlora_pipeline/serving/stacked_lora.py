"""Mixed-adapter batches in two matmuls per layer, instead of PEFT's loop over the adapters in the batch.

PEFT's mixed-batch forward (``adapter_names=[...]``) runs, in every LoRA layer, one gather, two
small matmuls and one scatter per adapter present in the batch, with row indices rebuilt from
Python lists each time. With a small model or short decode steps that overhead dominates: mixed
traffic over 3 adapters ran at 0.60x the single-adapter rate on a CPU and 0.32-0.38x on an H100
(``bench/serve_bench.py``, ``bench/gpu_serve.py``).

Here every adapter's A matrices of a layer are stacked into one ``[sum r, in]`` matrix and its B
matrices into one ``[sum r, out]`` matrix (the adapters' own weights become views into them, so
memory is not doubled). A mixed batch then computes, per layer, ``h = x @ A_all.T``, zeroes the
columns of other adapters' blocks row by row (multiplying in each adapter's ``scaling``), and adds
``h @ B_all``: the same sum as ``B_a(A_a(x)) * scaling_a`` for each row's adapter ``a``, in a fixed
number of kernels whatever the number of adapters. PEFT's own path stays the reference it is
tested against, and what runs when an adapter uses a LoRA variant (DoRA, ...) this does not cover.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch


@dataclass
class _Stack:
    a: torch.Tensor  # [sum r, in]
    bt: torch.Tensor  # [sum r, out]
    blocks: dict[str, tuple[int, int, float]]  # adapter -> (first column, rank, scaling)


def lora_layers(model: Any) -> list[Any]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def supported(model: Any) -> bool:
    """Plain LoRA on linear layers only (no DoRA or other variants, no LoRA on embeddings)."""
    for layer in lora_layers(model):
        if getattr(layer, "lora_variant", None) or layer.lora_embedding_A or not layer.lora_A:
            return False
        for name in layer.lora_A:
            if not isinstance(layer.lora_A[name], torch.nn.Linear) or layer.lora_A[name].bias is not None:
                return False
    return True


class StackedLoRA:
    """The stacked A/B matrices of every LoRA layer of ``model``; rebuild after loading or deleting an adapter."""

    def __init__(self, model: Any):
        self.model = model
        self.stacks: dict[Any, _Stack] = {}
        self.rebuild()

    def rebuild(self) -> None:
        self.stacks = {}
        for layer in lora_layers(self.model):
            names = list(layer.lora_A)
            a = torch.cat([layer.lora_A[n].weight.detach() for n in names])
            bt = torch.cat([layer.lora_B[n].weight.detach().t() for n in names])
            blocks, start = {}, 0
            for name in names:
                rank = layer.lora_A[name].weight.shape[0]
                blocks[name] = (start, rank, float(layer.scaling[name]))
                # The adapter's own weights become views into the stack: one copy in memory.
                layer.lora_A[name].weight.data = a[start:start + rank]
                layer.lora_B[name].weight.data = bt[start:start + rank].t()
                start += rank
            self.stacks[layer] = _Stack(a, bt, blocks)

    def _masks(self, adapter_names: list[str], device: torch.device) -> dict[Any, torch.Tensor]:
        masks = {}
        for layer, stack in self.stacks.items():
            mask = torch.zeros(len(adapter_names), stack.a.shape[0], dtype=torch.float32)
            for row, name in enumerate(adapter_names):
                if name in stack.blocks:  # the base, or an adapter that skips this layer: no columns
                    start, rank, scaling = stack.blocks[name]
                    mask[row, start:start + rank] = scaling
            masks[layer] = mask.unsqueeze(1).to(device)  # [batch, 1, sum r]: broadcast over positions
        return masks

    @contextlib.contextmanager
    def mixed(self, adapter_names: list[str]) -> Iterator[None]:
        """Within the block, each batch row ``i`` of a forward pass goes through adapter ``adapter_names[i]``."""
        device = next(iter(self.stacks.values())).a.device if self.stacks else torch.device("cpu")
        masks = self._masks(adapter_names, device)

        def add_rows_lora(layer: Any, args: tuple, output: torch.Tensor) -> torch.Tensor:
            stack, x = self.stacks[layer], args[0]
            if not torch.is_autocast_enabled():  # as PEFT: LoRA runs in the adapter's dtype without autocast
                x = x.to(stack.a.dtype)
            hidden = torch.nn.functional.linear(x, stack.a)
            mask = masks[layer]
            if mask.dtype != hidden.dtype:  # once per layer and batch (autocast's type), not once per step
                mask = masks[layer] = mask.to(hidden.dtype)
            hidden = hidden * mask
            return output + torch.matmul(hidden, stack.bt).to(output.dtype)

        hooks = [layer.register_forward_hook(add_rows_lora) for layer in self.stacks]
        try:
            with self.model.disable_adapter():  # each LoRA layer computes its base alone; the hook adds the rest
                yield
        finally:
            for hook in hooks:
                hook.remove()


def release_freed_memory() -> None:
    """Hand the adapters' former weights back to the system: freed small blocks otherwise stay in the process.

    glibc keeps freed heap memory for reuse (so resident memory would count every adapter twice
    after a rebuild); ``malloc_trim`` returns it. On CUDA the caching allocator's free blocks go back.
    """
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    libc = ctypes.util.find_library("c")
    if libc:
        try:
            ctypes.CDLL(libc).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
            pass
