"""``--adapter NAME=SOURCE`` and ``--use NAME`` read and checked without torch: a typo costs no import time.

``chat``, ``serve`` and ``export`` import torch, transformers, PEFT and bitsandbytes (about 4 s on a
2-core CPU) before they can load a model; a command line this module refuses is refused before that
(``qlora-pipeline`` calls :func:`check_command_line` first), and again where the model is loaded
(:mod:`qlora_pipeline.serving.models`), which also serves adapters loaded at run time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from qlora_pipeline.errors import PipelineError

BASE = "base"
# PEFT's name for "no adapter" in a mixed batch: stacked_lora.PEFT_BASE, which imports torch (tests/test_cli.py
# holds the two equal).
PEFT_BASE = "__base__"
UNKNOWN_MODEL = "unknown"  # the model label of requests for a model this server does not serve (/metrics)
RUN_URI = "runs:/"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    source: str  # a folder, or runs:/<run_id>/<artifact path>


def parse_adapter_spec(text: str) -> AdapterSpec:
    """``NAME=SOURCE``, or a bare SOURCE named after its folder (``models/adapter`` -> ``adapter``)."""
    name, sep, source = text.partition("=")
    if not sep:
        name, source = _default_name(text), text
    name, source = name.strip(), source.strip()
    if not source:
        raise PipelineError(f"--adapter {text!r}: no source; give NAME=FOLDER or NAME=runs:/<run_id>/adapter")
    try:
        check_name(name, f"--adapter {text!r}")
    except PipelineError as err:
        if sep:
            raise
        # No name was given: say where this one came from, and what a folder named "base" may really be.
        folder = Path(source)
        not_adapter = folder.is_dir() and not (folder / "adapter_config.json").is_file()
        raise PipelineError(f"{err} (the name is the folder's: give one with NAME={source})" + (
            f"; {source} holds no adapter_config.json, so it is no adapter: the base is served without --adapter, "
            "as 'base'" if not_adapter else "")) from None
    return AdapterSpec(name, source)


def _default_name(source: str) -> str:
    return Path(source.rstrip("/")).name or source


def check_name(name: str, where: str) -> None:
    # In any case: "Base" beside "base" in /v1/models read as the base model twice
    if name.casefold() in (BASE, PEFT_BASE):
        raise PipelineError(f"{where}: '{name}' is reserved for the base model with no adapter; choose another name")
    if name == UNKNOWN_MODEL:  # its requests would be counted with those for models not served
        raise PipelineError(f"{where}: '{name}' is reserved: /metrics counts requests for models not served under it; "
                            "choose another name")
    if not _NAME.match(name):
        raise PipelineError(f"{where}: adapter name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")


def parse_adapter_specs(values: Sequence[str]) -> list[AdapterSpec]:
    specs = [parse_adapter_spec(value) for value in values]
    seen: dict[str, str] = {}
    for spec in specs:
        if spec.name in seen:
            raise PipelineError(f"--adapter: the name '{spec.name}' is given twice ({seen[spec.name]} and "
                                f"{spec.source}); name them apart with NAME=SOURCE")
        seen[spec.name] = spec.source
    return specs


def local_folder(source: str) -> Path:
    """The folder a local source names, refused when there is none (a ``runs:/`` source is fetched instead)."""
    folder = Path(source)
    if not folder.is_dir():
        raise PipelineError(f"{source}: no such adapter folder (give a folder with adapter_config.json, "
                            "or runs:/<run_id>/adapter for a past run's adapter)")
    return folder


def check_model(names: Sequence[str], name: str, where: str) -> str:
    if name not in names:
        raise PipelineError(f"{where} {name}: no such model; the models are {', '.join(names)} "
                            "(add an adapter with --adapter NAME=SOURCE)")
    return name


def first_model(names: Sequence[str], use: str | None) -> str:
    """``--use``, else the first adapter given, else the base."""
    if use is not None:
        return check_model(names, use, "--use")
    return names[1] if len(names) > 1 else BASE


def check_command_line(adapters: str | Sequence[str], use: str | None = None) -> list[AdapterSpec]:
    """The ``--adapter`` values read, each local folder there, and ``--use`` among the models: what a command
    line alone can get wrong, said before any model library is imported."""
    specs = parse_adapter_specs([adapters] if isinstance(adapters, str) else adapters)
    for spec in specs:
        if not spec.source.startswith(RUN_URI):
            local_folder(spec.source)
    first_model([BASE, *(spec.name for spec in specs)], use)
    return specs
