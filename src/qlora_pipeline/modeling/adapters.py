"""One base model in memory with one or more trained adapters on it: for evaluation and chat.

The base is prepared exactly as training prepared it (``prepare_model_for_kbit_training`` upcasts
the unquantized weights to float32), so a reloaded adapter gives the logits it gave in training.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.io import read_json
from qlora_pipeline.layout import RESOLVED_CONFIG

TRAIN_METHODS = ("qlora", "lora", "full")  # train.method's values; all but full save an adapter
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # what PEFT's save_pretrained writes
# How to mend a damaged adapter folder: every message about one ends with it.
FIX_ADAPTER = "copy the adapter folder again, or retrain it (dvc repro train-adapter)"


def read_training_config(adapter_dir: Path) -> dict:
    path = adapter_dir / RESOLVED_CONFIG
    if not path.is_file():
        raise PipelineError(f"{adapter_dir}: no trained adapter ({RESOLVED_CONFIG} missing); "
                            "run the train-adapter stage first (dvc repro train-adapter)")
    return check_training_config(read_json(path), path)


def check_training_config(resolved: Any, path: Path) -> dict:
    """``resolved`` (read from ``path``), refused unless it has the shape train-adapter writes and the loaders read.

    Checked before any model loads: a hand-edited or damaged file fails here, naming the key, not deep in a load.
    """
    if not isinstance(resolved, dict):
        raise PipelineError(f"{path}: expected a JSON object, as train-adapter writes it, not a "
                            f"{type(resolved).__name__}; {FIX_ADAPTER}")
    method = resolved.get("method")
    if method not in TRAIN_METHODS:
        raise PipelineError(f"{path}: key 'method' is {method!r}, not one of {', '.join(TRAIN_METHODS)} "
                            f"(train.method of the run that trained it); fix the key, {FIX_ADAPTER}")
    for key, kind, types in _SHAPE:
        value = _dotted(resolved, key)
        if not isinstance(value, types):
            raise PipelineError(f"{path}: key '{key}' must be {kind}, not {json.dumps(value)[:60]}; "
                                f"fix the key, {FIX_ADAPTER}")
    if method == "lora" and not isinstance(resolved["model"].get("name_or_path"), str):
        raise PipelineError(f"{path}: key 'model.name_or_path' must be a string (the source a lora adapter was "
                            f"trained on, loaded again under it); fix the key, {FIX_ADAPTER}")
    return resolved


# (dotted key, what it must be, the types it may have): what the loaders read with .get() chains and slices.
# An absent key reads as None, as a null one does.
_SHAPE: tuple[tuple[str, str, tuple[type, ...]], ...] = (
    ("model", "an object (the params' model section)", (dict,)),
    ("model.quantization", "an object or absent", (dict, type(None))),
    ("train", "an object or absent", (dict, type(None))),
    ("base_fingerprint", "a string or null", (str, type(None))),
    ("split", "an object or null", (dict, type(None))),
    ("split.system_prompt", "a string or null", (str, type(None))),
)


def _dotted(resolved: dict, key: str) -> Any:
    """The value at ``key`` (``a.b``), or None where a part is absent (a part that is no object was checked before)."""
    node: Any = resolved
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def load_base_for(resolved: dict, base_dir: Path, workdir: Path | None = None) -> tuple[Any, Any]:
    """The base an adapter was trained on: the 4-bit ``base_dir`` for qlora, the unquantized source otherwise."""
    from transformers import AutoTokenizer

    from qlora_pipeline.modeling.loading import load_dense
    from qlora_pipeline.modeling.preparation import prepare_4bit_base

    if resolved["method"] == "qlora":
        # The compute dtype the adapter was trained with (auto resolves on this machine); None keeps the saved one.
        compute_dtype = resolved.get("model", {}).get("quantization", {}).get("bnb_4bit_compute_dtype")
        return prepare_4bit_base(base_dir, compute_dtype)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    return load_dense(_model_config(resolved), tokenizer, workdir, full=resolved["method"] == "full"), tokenizer


def _model_config(resolved: dict) -> Any:
    from qlora_pipeline.config import ModelConfig, QuantizationConfig

    fields = dict(resolved["model"])
    fields["quantization"] = QuantizationConfig(**fields["quantization"])
    return ModelConfig(**fields)


def autocast_like_training(resolved: dict) -> Any:
    """A context that runs a model as training ran it: under the autocast training used, or none.

    ``train.bf16``/``train.fp16`` of the adapter's resolved config (``auto`` resolves on this
    machine), so evaluation and chat see the logits training saw.
    """
    import contextlib

    import torch

    from qlora_pipeline.hardware import resolve_mixed_precision

    train = resolved.get("train", {})
    bf16, fp16 = resolve_mixed_precision(train.get("bf16", False), train.get("fp16", False))
    if not (bf16 or fp16):
        return contextlib.nullcontext()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device, dtype=torch.bfloat16 if bf16 else torch.float16)


TUNED = "tuned"  # the adapter's name where evaluate, risk and choose-decoding load it


@dataclass
class Sides:
    """Base and tuned, loaded once for a stage: generation through one engine per model, forward passes per side.

    With an adapter (qlora, lora) there is one model: a row's adapter is switched on (tuned) or off
    (base) per row, so base and tuned rows share batches. A full fine-tune has no adapter to switch
    off: the base is a second model, with its own engine.
    """

    resolved: dict
    models: dict[str, tuple[Any, Any]]  # side -> (model, tokenizer)
    engines: dict[str, Any]  # side -> Engine (the same one for both sides when there is an adapter)
    adapters: dict[str, str | None]  # side -> the adapter its rows name (None = the model as it is)

    @property
    def tokenizer(self) -> Any:
        return self.models["tuned"][1]

    def run(self, workload: list[tuple[str, Any]]) -> list[Any]:
        """Results of ``(side, Request)`` pairs, in order; each engine runs its share of the workload at once."""
        import dataclasses

        results: list[Any] = [None] * len(workload)
        by_engine: dict[int, list[int]] = {}
        for i, (side, _) in enumerate(workload):
            by_engine.setdefault(id(self.engines[side]), []).append(i)
        for indices in by_engine.values():
            engine = self.engines[workload[indices[0]][0]]
            requests = [dataclasses.replace(workload[i][1], adapter=self.adapters[workload[i][0]]) for i in indices]
            for i, result in zip(indices, engine.run(requests)):
                results[i] = result
        return results

    def on_base(self, run: Callable[[Any, Any], Any]) -> Any:
        """``run(model, tokenizer)`` on the base (the adapter switched off), under the autocast training used."""
        model, tokenizer = self.models["base"]
        switched_off = model.disable_adapter() if self.adapters["tuned"] else contextlib.nullcontext()
        with autocast_like_training(self.resolved), switched_off:
            return run(model, tokenizer)

    def each(self, run: Callable[[Any, Any, str], None]) -> None:
        """``run(model, tokenizer, side)`` for the base, then the tuned model, under the autocast training used."""
        with autocast_like_training(self.resolved):
            for side in ("base", "tuned"):
                model, tokenizer = self.models[side]
                context = model.disable_adapter() if side == "base" and self.adapters["tuned"] else contextlib.nullcontext()
                with context:
                    run(model, tokenizer, side)


def load_sides(base_dir: Path, adapter_dir: Path, dequantize: bool | str, max_batch_size: int) -> Sides:
    """The tuned model of ``adapter_dir`` and its base, for generation (4-bit weights dequantized when asked)."""
    from qlora_pipeline.modeling.engine import Engine
    from qlora_pipeline.modeling.inference import dequantize_for_inference, should_dequantize

    model, tokenizer, resolved = load_tuned(base_dir, adapter_dir)
    models = {"tuned": (model, tokenizer)}
    if resolved["method"] == "full":
        models["base"] = load_base_for(resolved, base_dir)
    else:
        models["base"] = (model, tokenizer)
    for candidate, _ in {id(m): (m, t) for m, t in models.values()}.values():
        if should_dequantize(dequantize, candidate):  # this process never saves the model
            dequantize_for_inference(candidate)

    def autocast() -> Any:
        return autocast_like_training(resolved)

    engines = {side: Engine(m, t, max_batch_size=max_batch_size, autocast=autocast) for side, (m, t) in models.items()
               if side == "tuned" or resolved["method"] == "full"}
    adapter = None if resolved["method"] == "full" else TUNED
    if adapter is not None:
        engines["base"] = engines["tuned"]
    return Sides(resolved, models, engines, {"base": None, "tuned": adapter})


def load_base_for_params(params: Any, base_dir: Path, dequantize: bool | str) -> tuple[Any, Any, dict]:
    """The base model as ``params`` would train on it (before any adapter exists), for generation."""
    from qlora_pipeline.modeling.inference import dequantize_for_inference, should_dequantize

    resolved = {"method": params.train.method, "model": params.model.model_dump(),
                "train": {"bf16": params.train.bf16, "fp16": params.train.fp16}}
    model, tokenizer = load_base_for(resolved, base_dir)
    if should_dequantize(dequantize, model):
        dequantize_for_inference(model)
    return model.eval(), tokenizer, resolved


def on_base_then_tuned(model: Any, tokenizer: Any, resolved: dict, base_dir: Path,
                       run: Callable[[Any, Any, str], None]) -> None:
    """``run(model, tokenizer, side)`` for the base, then the tuned model, under the autocast training used.

    The base is the tuned model with its adapter switched off, or for full fine-tuning (no adapter
    to switch off) a second model loaded for the purpose and dropped after.
    """
    with autocast_like_training(resolved):
        if resolved["method"] == "full":
            base, base_tokenizer = load_base_for(resolved, base_dir)
            run(base, base_tokenizer, "base")
            del base
        else:
            with model.disable_adapter():
                run(model, tokenizer, "base")
        run(model, tokenizer, "tuned")


def attach_adapters(base: Any, adapters: dict[str, Path]) -> Any:
    """Wrap ``base`` with every named adapter; switch with ``set_adapter``, bypass with ``disable_adapter()``."""
    from peft import PeftModel

    from qlora_pipeline.modeling.preparation import quiet_peft_deprecations

    names = list(adapters)
    try:
        with quiet_peft_deprecations(), adapter_load_errors(names[0], adapters[names[0]]):
            model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            with adapter_load_errors(name, adapters[name]):
                model.load_adapter(adapters[name], adapter_name=name)
    except BaseException:
        unwrap_lora(base)  # a server goes on with the base: as it was, not wrapped in layers of no adapter
        raise
    model.set_adapter(names[0])
    return model.eval()


def unwrap_lora(base: Any) -> None:
    """Undo, in place, what PEFT does to a base before it reads an adapter's weights: each LoRA layer it put in
    goes back to the layer it wraps, and the ``peft_config`` it set on the base goes. A load that failed after
    that (weights that do not fit their config) left them, and the base ran through layers of no adapter."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(base.named_modules()):
        if isinstance(module, LoraLayer):
            parent, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent), child, module.get_base_layer())
    vars(base).pop("peft_config", None)


@contextlib.contextmanager
def adapter_load_errors(name: str, folder: Path) -> Iterator[None]:
    """Within the block, PEFT's and safetensors' errors about an adapter's files become a PipelineError naming them.

    Only what a damaged or mismatched adapter raises is caught (any other error is a bug, and keeps its
    traceback); the original stays as ``__cause__``.
    """
    from peft.utils.error import NoMatchingPeftModuleError
    from safetensors import SafetensorError

    try:
        yield
    except NoMatchingPeftModuleError as err:
        raise PipelineError(f"adapter '{name}' ({folder}): the target_modules of its adapter_config.json name no "
                            f"layer of the loaded base ({_first_line(err)}); it was trained for another base: load "
                            "it with that base, or retrain it on this one") from err
    except SafetensorError as err:
        raise PipelineError(f"adapter '{name}' ({folder}): {ADAPTER_WEIGHTS} could not be read ({_first_line(err)}); "
                            f"it is cut short or damaged: {FIX_ADAPTER}") from err
    except RuntimeError as err:
        if "size mismatch" not in str(err):  # torch's load_state_dict: the weights are not the config's shapes
            raise
        raise PipelineError(f"adapter '{name}' ({folder}): {ADAPTER_WEIGHTS} does not fit its adapter_config.json "
                            f"(size mismatch: r or target_modules edited after training?); {FIX_ADAPTER}") from err
    except (ValueError, OSError) as err:
        raise PipelineError(f"adapter '{name}' ({folder}): its adapter_config.json and {ADAPTER_WEIGHTS} could not "
                            f"be loaded onto the base ({type(err).__name__}: {_first_line(err)}); "
                            f"{FIX_ADAPTER}") from err


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def load_tuned(base_dir: Path, adapter_dir: Path, workdir: Path | None = None) -> tuple[Any, Any, dict]:
    """The tuned model for ``adapter_dir`` and its tokenizer: base + adapter, or the full fine-tuned model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = read_training_config(adapter_dir)
    if resolved["method"] == "full":
        from qlora_pipeline.modeling.loading import NO_HUB_KERNELS, device_map

        model = AutoModelForCausalLM.from_pretrained(adapter_dir, use_safetensors=True, device_map=device_map(),
                                                     **NO_HUB_KERNELS)
        return model.eval(), AutoTokenizer.from_pretrained(adapter_dir), resolved
    base, tokenizer = load_base_for(resolved, base_dir, workdir)
    return attach_adapters(base, {TUNED: adapter_dir}), tokenizer, resolved


def load_tuned_for_generation(base_dir: Path, adapter_dir: Path, dequantize: bool | str) -> tuple[Any, Any, dict]:
    """:func:`load_tuned`, its 4-bit weights dequantized once when ``dequantize`` says so (same outputs, faster on a CPU)."""
    from qlora_pipeline.modeling.inference import dequantize_for_inference, should_dequantize

    model, tokenizer, resolved = load_tuned(base_dir, adapter_dir)
    if should_dequantize(dequantize, model):  # this process never saves the model
        dequantize_for_inference(model)
    return model, tokenizer, resolved


def adapter_digest(adapter_dir: Path) -> str:
    """sha256 over the folder's safetensors files (name and content): which trained weights a choice was made for."""
    import hashlib

    from qlora_pipeline.io import sha256_file

    files = sorted(Path(adapter_dir).glob("*.safetensors"))
    if not files:
        raise PipelineError(f"{adapter_dir}: no .safetensors weights; run the train-adapter stage first")
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}:{sha256_file(path)}\n".encode())
    return digest.hexdigest()
