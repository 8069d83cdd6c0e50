"""The base exactly as training prepared it, and which base an adapter belongs to.

Training and every later user of an adapter (evaluate, chat, serve, export) call the same
function, so a reloaded adapter meets the weights it was trained against: the saved 4-bit base,
its compute dtype resolved on this machine, then ``prepare_model_for_kbit_training`` (which
upcasts the unquantized weights to float32).
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.io import sha256_file


def prepare_4bit_base(base_dir: Path, compute_dtype: str | None,
                      activation_checkpointing: bool = False) -> tuple[Any, Any]:
    """``models/base`` loaded and prepared for k-bit training, and its tokenizer."""
    from peft import prepare_model_for_kbit_training

    from qlora_pipeline.modeling.loading import load_saved_base

    model, tokenizer = load_saved_base(base_dir, compute_dtype)
    if not getattr(model, "is_loaded_in_4bit", False):
        raise PipelineError(f"{base_dir}: not a 4-bit base; qlora needs model.quantization.load_in_4bit: true, "
                            "or use train.method: lora")
    if stores_4bit_as_float(model):
        # FSDP (fsdp_qlora) flattens each decoder layer's frozen parameters into one tensor of one
        # dtype: the 4-bit weights stored as bfloat16 and the norms beside them. PEFT's preparation
        # would upcast those norms to float32 and FSDP would refuse the layer (seen on an H200), so
        # do the rest of it and keep the dtypes; LoRA layers get FSDP units of their own (the
        # Trainer's PEFT wrap policy), so their float32 weights do not mix with the base's.
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        if activation_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        return model, tokenizer
    with quiet_peft_deprecations():
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=activation_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


# What PEFT 0.21 still calls on a transformers 5 model: wrapping one (``PeftModel.__init__``) reads
# ``is_gradient_checkpointing``, and ``prepare_model_for_kbit_training`` calls
# ``gradient_checkpointing_enable``; transformers 5 renamed both (``*activation_checkpointing*``).
PEFT_DEPRECATIONS = r"`(is_gradient_checkpointing|gradient_checkpointing_enable)` is deprecated"


@contextlib.contextmanager
def quiet_peft_deprecations() -> Iterator[None]:
    """Around PEFT's wrapping and preparing of a model: the FutureWarnings of PEFT_DEPRECATIONS alone go.

    They are PEFT's to fix and ask nothing of the user, yet every stage, chat and server that
    loads an adapter printed one. Any other warning, and these anywhere else, still show.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PEFT_DEPRECATIONS, category=FutureWarning)
        yield


def stores_4bit_as_float(model: Any) -> bool:
    """True when the 4-bit weights are stored in a float dtype (``bnb_4bit_quant_storage``), as FSDP needs."""
    config = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
    storage = getattr(config, "bnb_4bit_quant_storage", None)
    return bool(getattr(storage, "is_floating_point", False))


def base_fingerprint(method: str, base_dir: Path, model: dict) -> str:
    """What an adapter was trained on: the saved 4-bit weights (qlora) or the unquantized source (lora).

    qlora: sha256 over ``config.json`` and every safetensors file of ``base_dir``, so two bases
    quantized from different models (or with other quantization keys) never match. lora: the
    source as params name it (``name_or_path``, GGUF file, pinned revision, dtype), which is
    what its loader reads again.
    """
    if method == "qlora":
        digest = hashlib.sha256()
        files = [base_dir / "config.json", *sorted(base_dir.glob("*.safetensors"))]
        for path in files:
            if not path.is_file():
                raise PipelineError(f"{base_dir}: no saved base model ({path.name} missing); "
                                    "run the quantize-load stage first (dvc repro quantize-load)")
            digest.update(f"{path.name}:{sha256_file(path)}\n".encode())
        return f"sha256:{digest.hexdigest()}"
    source = model["name_or_path"] + (f"/{model['gguf_file']}" if model.get("gguf_file") else "")
    return f"source:{source}@{model.get('revision') or 'local'}:{model.get('dtype')}"
