"""Each row of a batch through its own LoRA adapter (or none), over one base: two matmuls a layer.

PEFT's mixed-batch forward (``adapter_names=[...]``) runs, in every LoRA layer, one gather, two
small matmuls and one scatter per adapter present in the batch, with row indices rebuilt from
Python lists each time. With a small model or short decode steps that overhead dominates: mixed
traffic over 3 adapters ran at 0.60x the single-adapter rate on a CPU and 0.32-0.38x on an H100
(``bench/serve_bench.py``, ``bench/gpu_serve.py``).

Here every adapter's A matrices of a layer are stacked into one ``[sum r, in]`` matrix and its B
matrices into one ``[out, sum r]`` matrix (the adapters' own weights become views into them, so
memory is not doubled). A batch then computes, per layer, ``h = x @ A_all.T``, keeps each row's own
block of columns times its adapter's scaling (zero elsewhere), and adds ``h @ B_all.T`` into the
base layer's output in place: for each row, PEFT's ``lora_B(lora_A(x)) * scaling`` of its adapter
(the scaling applied before the second matmul rather than after: the same up to float rounding),
in a fixed number of kernels whatever the number of adapters. A row with no adapter (the base)
keeps no columns. PEFT's own path stays the reference it is tested against, and what runs when an
adapter uses a LoRA variant (DoRA, ...) this does not cover (:class:`RowAdapters`).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

PEFT_BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch
_EXACT_IN_FLOAT32 = (torch.float32, torch.bfloat16, torch.float16)


class _LastCast(threading.local):
    source: torch.Tensor | None = None
    version = -1
    result: torch.Tensor | None = None


_last_cast = _LastCast()


def cast_shared(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)``, kept for the next layer that reads the same ``x``.

    The query, key and value projections read one tensor, and so do the gate and up projections;
    each cast it to the compute dtype, and under autocast each LoRA update cast it again: six casts
    of one tensor per attention block, four per MLP. Casts were 2.3 of 14 s of evaluate's rows on the
    Xeon machine; sharing them saved 1.0 s. A cast is exact and deterministic, so the kept one is the
    value each would have made. It is kept per thread, for the last input only, while that tensor is
    unchanged (its version counter; an edit through ``.data`` is not seen, and nothing here makes one),
    and never for a tensor autograd tracks. Holding it keeps that input and its cast alive until the
    thread's next cast: one activation (a few MB for SmolLM2, ~50 MB for a 7B model's 2,048-token prefill).
    It lives here, where the dense layers of ``inference`` take it too: every stage that generates already
    depends on this module, and quantize-load, which dequantizes nothing, need not depend on ``inference``.
    """
    if x.dtype == dtype:
        return x
    if x.is_inference() or x.requires_grad:  # no version counter to tell an edit by; or a graph to record
        return x.to(dtype)
    last = _last_cast
    if last.source is x and last.version == x._version and last.result.dtype == dtype:
        return last.result
    result = x.to(dtype)
    last.source, last.version, last.result = x, x._version, result
    return result


@dataclass
class _Stack:
    a: torch.Tensor  # [sum r, in]
    b: torch.Tensor  # [out, sum r]
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
        self._masks: dict[tuple, dict] = {}
        self._converted: dict[tuple, tuple[int, torch.Tensor]] = {}
        self.rebuild()

    def rebuild(self) -> None:
        self.stacks, self._masks, self._converted = {}, {}, {}
        for layer in lora_layers(self.model):
            names = list(layer.lora_A)
            a = torch.cat([layer.lora_A[n].weight.detach() for n in names])
            b = torch.cat([layer.lora_B[n].weight.detach() for n in names], dim=1)
            blocks, start = {}, 0
            for name in names:
                rank = layer.lora_A[name].weight.shape[0]
                blocks[name] = (start, rank, float(layer.scaling[name]))
                # The adapter's own weights become views into the stack: one copy in memory.
                layer.lora_A[name].weight.data = a[start:start + rank]
                layer.lora_B[name].weight.data = b[:, start:start + rank]
                start += rank
            self.stacks[layer] = _Stack(a, b, blocks)

    def _row_weights(self, adapter_names: tuple[str, ...], device: torch.device) -> dict[Any, torch.Tensor]:
        """Per layer, ``[batch, 1, sum r]``: each row's own block of columns at its adapter's scaling, the rest 0.

        Layers with the same blocks share one tensor (all of them, for adapters that adapt the same
        modules at the same rank); cached per batch composition.
        """
        cached = self._masks.get(adapter_names)
        if cached is not None:
            return cached
        by_layout: dict[tuple, torch.Tensor] = {}
        weights = {}
        for layer, stack in self.stacks.items():
            layout = (stack.a.shape[0], tuple(sorted(stack.blocks.items())))
            if layout not in by_layout:
                rows = torch.zeros(len(adapter_names), stack.a.shape[0])
                for row, name in enumerate(adapter_names):
                    if name in stack.blocks:  # the base, or an adapter that skips this layer: no columns
                        start, rank, scaling = stack.blocks[name]
                        rows[row, start:start + rank] = scaling
                by_layout[layout] = rows.unsqueeze(1).to(device)
            weights[layer] = by_layout[layout]
        if len(self._masks) > 64:  # compositions come and go with continuous batching
            self._masks.clear()
            self._converted.clear()  # keyed by the cleared tensors' ids
        self._masks[adapter_names] = weights
        return weights

    def _in_dtype(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``tensor`` cast to ``dtype``, once while it is unchanged (its version counter, which in-place edits of
        the stacked tensor move). The adapters' own parameters are views made through ``.data``, whose edits
        (an optimizer step, ``load_state_dict``) the stack's counter does not see: edit an adapter, then
        ``rebuild()``, as the server does after every load (``restack``)."""
        if tensor.dtype == dtype:
            return tensor
        key = (id(tensor), dtype)
        version, converted = self._converted.get(key, (None, None))
        if version != tensor._version:
            converted = tensor.to(dtype)
            self._converted[key] = (tensor._version, converted)
        return converted

    def _lora_a_operands(self, x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The input and A of ``h = x @ A.T`` as PEFT computes it: the input in the adapter's dtype, then, under
        autocast, both in autocast's dtype.

        With a float32 adapter and an input of at most float32's precision, that is the input cast straight to
        autocast's dtype (float32 holds it exactly) through ``cast_shared``: the cast a dequantized base layer
        computing in that dtype has made already, or the one the query/key/value (gate/up) updates share;
        and A's cast, kept while A is unchanged (autocast casts again at every call a weight that does not
        require grad). The same values, with two casts fewer per layer and step.
        """
        device = x.device.type
        if a.dtype == torch.float32 and x.dtype in _EXACT_IN_FLOAT32 and torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            return cast_shared(x, dtype), self._in_dtype(a, dtype)
        return x.to(a.dtype), a

    @contextlib.contextmanager
    def mixed(self, adapter_names: Sequence[str]) -> Iterator[None]:
        """Within the block, each batch row ``i`` of a forward pass goes through adapter ``adapter_names[i]``."""
        device = next(iter(self.stacks.values())).a.device if self.stacks else torch.device("cpu")
        weights = self._row_weights(tuple(adapter_names), device)

        def add_rows_lora(layer: Any, args: tuple, output: torch.Tensor) -> torch.Tensor:
            stack = self.stacks[layer]
            hidden = torch.nn.functional.linear(*self._lora_a_operands(args[0], stack.a))
            # Each row keeps its own adapter's columns, scaled; then one matmul adds every row's update
            # into the base output in place (no update tensor the size of the output is made).
            hidden = hidden * self._in_dtype(weights[layer], hidden.dtype)
            if hidden.dtype == stack.b.dtype != output.dtype:
                # A float32 adapter over a base computing in bfloat16, without autocast: as PEFT, the update
                # in the adapter's dtype, added, then rounded to the output's (not the update rounded first).
                return (output + torch.nn.functional.linear(hidden, stack.b)).to(output.dtype)
            hidden = hidden.to(output.dtype)
            b = self._in_dtype(stack.b, output.dtype)
            if not output.is_contiguous():
                return output + torch.nn.functional.linear(hidden, b)
            output.view(-1, output.shape[-1]).addmm_(hidden.reshape(-1, hidden.shape[-1]), b.t())
            return output

        hooks = [layer.register_forward_hook(add_rows_lora) for layer in self.stacks]
        # Each LoRA layer computes its base alone; the hook adds the rest. The layers' own switch, set
        # directly: PEFT's disable_adapter() walks every module of the model (40 ms a step on a CPU).
        was = {layer: layer._disable_adapters for layer in self.stacks}
        try:
            for layer in self.stacks:
                layer._disable_adapters = True
            yield
        finally:
            for layer, value in was.items():
                layer._disable_adapters = value
            for hook in hooks:
                hook.remove()


class RowAdapters:
    """Which adapter each row of a forward pass goes through, by PEFT adapter name (``None`` = the base).

    ``stacked`` (:class:`StackedLoRA`) where every adapter is plain LoRA; otherwise PEFT's own
    mixed batch. A model without adapters takes only base rows.
    """

    def __init__(self, model: Any, mode: str = "stacked"):
        self.model, self.mode = model, mode
        self.stacked: StackedLoRA | None = None
        self.rebuild()

    @property
    def names(self) -> set[str]:
        config = getattr(self.model, "peft_config", None)
        return set(config) if config else set()

    def rebuild(self) -> None:
        self.stacked = None
        if self.mode == "stacked" and self.names and supported(self.model):
            self.stacked = StackedLoRA(self.model)

    @contextlib.contextmanager
    def rows(self, adapters: Sequence[str | None]) -> Iterator[None]:
        names = [PEFT_BASE if name is None else name for name in adapters]
        unknown = set(names) - self.names - {PEFT_BASE}
        if unknown:
            raise KeyError(f"no adapter named {', '.join(sorted(unknown))} is loaded")
        if not self.names:
            yield
        elif self.stacked is not None:
            with self.stacked.mixed(names):
                yield
        elif len(set(names)) == 1:  # one adapter for every row: PEFT's plain forward
            with self._only(names[0]):
                yield
        else:  # PEFT's own mixed batch (LoRA variants): each row through its own adapter
            with self.model._enable_peft_forward_hooks(adapter_names=names):
                yield

    @contextlib.contextmanager
    def _only(self, name: str) -> Iterator[None]:
        if name == PEFT_BASE:
            with self.model.disable_adapter():
                yield
            return
        active = self.model.active_adapter
        self.model.set_adapter(name)
        try:
            yield
        finally:
            self.model.set_adapter(active)


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
