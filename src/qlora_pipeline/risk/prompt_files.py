"""Reading the YAML prompt sets under ``risk/prompts/``: each error names the file, the entry and the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import yaml

from qlora_pipeline.errors import PipelineError


def read_yaml_mapping(path: str | Path, keys: Iterable[str]) -> dict:
    """The YAML mapping in ``path``, which must have exactly ``keys`` at its top level."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise PipelineError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: expected a mapping with the keys {', '.join(keys)}")
    check_keys(data, keys, f"{path}")
    return data


def check_keys(entry: Any, keys: Iterable[str], where: str) -> None:
    """``entry`` is a mapping with exactly ``keys``; the error names ``where`` and the key."""
    keys = list(keys)
    if not isinstance(entry, dict):
        raise PipelineError(f"{where}: expected a mapping with the keys {', '.join(keys)}, got {entry!r}")
    unknown = [key for key in entry if key not in keys]
    if unknown:
        raise PipelineError(f"{where}: unknown key {unknown[0]!r}; the keys are {', '.join(keys)}")
    missing = [key for key in keys if key not in entry]
    if missing:
        raise PipelineError(f"{where}: missing key {missing[0]!r}")


def text_value(entry: dict, key: str, where: str) -> str:
    """``entry[key]`` as a non-empty string, or an error naming ``where`` and the key."""
    value = entry[key]
    if not isinstance(value, str) or not value.strip():
        raise PipelineError(f"{where}: {key!r} must be non-empty text, got {value!r}")
    return value
