"""Typed configuration: one dataclass per ``params.yaml`` section.

The YAML is turned into these objects once, before any work. Unknown keys, missing keys,
wrong types and impossible values are all collected and raised together in one
:class:`ConfigError`, each line naming the key and the fix. Keys that feed a library call
carry that library's argument names (``LoraConfig``, ``BitsAndBytesConfig``,
``TrainingArguments``, ``generate``), so a section can be passed on without renaming.
"""

from __future__ import annotations

import dataclasses
import math
import string
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from qlora_pipeline.errors import PipelineError

PII_TYPES = ("email", "phone", "url", "ip", "card", "ssn", "handle")


class ConfigError(PipelineError):
    """Every problem found in a params file, reported together."""

    def __init__(self, path: str, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{path}: {len(problems)} problem(s) in params:\n{lines}")


# ----------------------------------------------------------------------------- data


@dataclass
class FieldMap:
    """Which column of the source feeds which canonical field (``null`` = not present)."""

    conversation_id: str = "conversation_id"
    speaker: str = "speaker"
    text: str = "text"
    time: Optional[str] = None
    prompt: str = "prompt"
    response: str = "response"
    id: Optional[str] = None


@dataclass
class HubDataset:
    """Arguments of ``datasets.load_dataset`` for ``source: hf``."""

    path: Optional[str] = None
    name: Optional[str] = None
    revision: Optional[str] = None
    split: str = "train"


@dataclass
class DataConfig:
    source: Literal["chitchat", "jsonl", "csv", "parquet", "hf"] = "chitchat"
    path: Optional[str] = None
    shape: Literal["chat_log", "pairs"] = "chat_log"
    hf: HubDataset = field(default_factory=HubDataset)
    fields: FieldMap = field(default_factory=FieldMap)
    prompt_template: str = "{prompt}"

    def problems(self) -> list[str]:
        out = []
        if self.source in ("jsonl", "csv", "parquet") and not self.path:
            out.append(f"data.path: source '{self.source}' needs a file path; set data.path")
        if self.source == "hf":
            if not self.hf.path:
                out.append("data.hf.path: source 'hf' needs a dataset id or local folder; set data.hf.path")
        if self.source == "chitchat" and self.shape != "chat_log":
            out.append("data.shape: the chitchat source is a chat log; set data.shape: chat_log")
        try:
            names = [n for _, n, _, _ in string.Formatter().parse(self.prompt_template) if n is not None]
            if any(not n.isidentifier() for n in names):
                out.append(f"data.prompt_template: placeholders must be field names like {{prompt}}; got {names}")
        except ValueError as err:
            out.append(f"data.prompt_template: not a valid template ({err}); write literal braces as {{{{ }}}}")
        if self.shape == "chat_log" and not self.fields.speaker:
            out.append("data.fields.speaker: a chat log needs a speaker field")
        return out


# ---------------------------------------------------------------------------- clean


@dataclass
class CleanConfig:
    unicode_normalization: Literal["NFC", "NFKC", "none"] = "NFKC"
    min_chars: int = 1
    max_chars: int = 2000
    dedup: Literal["none", "exact", "near"] = "near"
    near_dup_ratio: float = 0.9
    near_dup_window: int = 20
    dedup_min_chars: int = 1
    min_messages: int = 2
    min_speakers: int = 1
    pii: list[str] = field(default_factory=lambda: list(PII_TYPES))
    exclude_speakers: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        out = []
        for key in ("min_chars", "max_chars", "dedup_min_chars", "min_messages", "min_speakers"):
            if getattr(self, key) < 0:
                out.append(f"clean.{key}: must be >= 0, got {getattr(self, key)}")
        if self.max_chars < self.min_chars:
            out.append(f"clean.max_chars: {self.max_chars} is below clean.min_chars {self.min_chars}")
        if self.near_dup_window < 1:
            out.append(f"clean.near_dup_window: must be >= 1, got {self.near_dup_window}")
        if not 0.0 < self.near_dup_ratio <= 1.0:
            out.append(f"clean.near_dup_ratio: must be in (0, 1], got {self.near_dup_ratio}")
        for name in self.pii:
            if name not in PII_TYPES:
                out.append(f"clean.pii: unknown type '{name}'; choose from {', '.join(PII_TYPES)}")
        return out


# ---------------------------------------------------------------------------- split


@dataclass
class SplitRatios:
    train: float = 0.8
    val: float = 0.1
    test: float = 0.1


@dataclass
class SplitCaps:
    """Most examples kept per split (``null`` = all), applied after grouping."""

    train: Optional[int] = None
    val: Optional[int] = None
    test: Optional[int] = None


@dataclass
class SplitConfig:
    persona: str = "auto"
    context_turns: int = 4
    system_prompt: str = ""
    min_target_chars: int = 1
    ratios: SplitRatios = field(default_factory=SplitRatios)
    max_examples: SplitCaps = field(default_factory=SplitCaps)

    def problems(self) -> list[str]:
        out = []
        if self.context_turns < 1:
            out.append(f"split.context_turns: must be >= 1 (a reply needs context), got {self.context_turns}")
        if self.min_target_chars < 0:
            out.append(f"split.min_target_chars: must be >= 0, got {self.min_target_chars}")
        ratios = dataclasses.asdict(self.ratios)
        for name, value in ratios.items():
            if value < 0:
                out.append(f"split.ratios.{name}: must be >= 0, got {value}")
        if not math.isclose(sum(ratios.values()), 1.0, abs_tol=1e-6):
            out.append(f"split.ratios: train + val + test must sum to 1, got {sum(ratios.values()):g}")
        for name, cap in dataclasses.asdict(self.max_examples).items():
            if cap is not None and cap < 0:
                out.append(f"split.max_examples.{name}: must be >= 0 or null, got {cap}")
        if not self.persona.strip():
            out.append("split.persona: empty; use 'auto', 'all' or a speaker id")
        return out


# ----------------------------------------------------------------------------- mlflow


@dataclass
class MlflowConfig:
    # null = a SQLite store at the repository root (also from DVC's temporary workspaces).
    tracking_uri: Optional[str] = None
    experiment_name: str = "qlora-pipeline"

    def problems(self) -> list[str]:
        return [] if self.experiment_name.strip() else ["mlflow.experiment_name: must not be empty"]


# ------------------------------------------------------------------------------ whole


@dataclass
class Params:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate the whole params file; raise :class:`ConfigError` listing every problem."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(str(path), ["file not found; run from the repository root or pass --params"]) from None
    except yaml.YAMLError as err:
        raise ConfigError(str(path), [f"not valid YAML: {err}"]) from None
    return params_from_dict(raw if raw is not None else {}, source=str(path))


def params_from_dict(raw: Any, source: str = "params") -> Params:
    problems: list[str] = []
    params = _build(Params, raw, "", problems)
    if params is not None:
        problems.extend(_semantic_problems(params))
    if problems:
        raise ConfigError(source, problems)
    return params


def _semantic_problems(obj: Any) -> list[str]:
    """Cross-field checks: each config's own ``problems()``, recursively."""
    out = list(obj.problems()) if hasattr(obj, "problems") else []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.extend(_semantic_problems(value))
    return out


def _build(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    """Build dataclass ``cls`` from a mapping, appending a message per bad key to ``problems``."""
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping of keys, got {type(raw).__name__}")
        return None
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            problems.append(f"{prefix}{key}: unknown key; valid keys here: {', '.join(known)}")
    values = {}
    for name, f in known.items():
        key = f"{prefix}{name}"
        if name not in raw:
            # No silent defaults: params.yaml states every knob, so a run is fully described.
            problems.append(f"{key}: missing; add it to params.yaml")
            continue
        ok, value = _coerce(hints[name], raw[name], key, problems)
        if ok:
            values[name] = value
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str, problems: list[str]) -> tuple[bool, Any]:
    """Check ``value`` against type ``hint``; return (ok, value converted where lossless)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        before = len(problems)
        built = _build(hint, value, key + ".", problems)
        return built is not None and len(problems) == before, built
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return True, None
        errors: list[str] = []
        for option in (a for a in args if a is not type(None)):
            trial: list[str] = []
            ok, converted = _coerce(option, value, key, trial)
            if ok:
                return True, converted
            errors.extend(trial)
        problems.append(errors[0] if len(errors) == 1 else f"{key}: expected {_describe(hint)}, got {value!r}")
        return False, None
    if origin is Literal:
        if value in args:
            return True, value
        problems.append(f"{key}: must be one of {', '.join(map(repr, args))}; got {value!r}")
        return False, None
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{key}: expected a list, got {value!r}")
            return False, None
        items = [_coerce(args[0], item, f"{key}[{i}]", problems) for i, item in enumerate(value)]
        return all(ok for ok, _ in items), [v for _, v in items]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {value!r}")
            return False, None
        items = {k: _coerce(args[1], v, f"{key}.{k}", problems) for k, v in value.items()}
        return all(ok for ok, _ in items.values()), {k: v for k, (_, v) in items.items()}
    return _coerce_scalar(hint, value, key, problems)


def _coerce_scalar(hint: Any, value: Any, key: str, problems: list[str]) -> tuple[bool, Any]:
    # bool is an int subclass in Python: refuse `r: true` rather than read it as 1.
    if hint is bool and isinstance(value, bool):
        return True, value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return True, value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return True, float(value)
    if hint is str and isinstance(value, str):
        return True, value
    if hint is Any:
        return True, value
    problems.append(f"{key}: expected {_describe(hint)}, got {value!r} ({type(value).__name__})")
    return False, None


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def section_dict(section: Any) -> dict:
    """A config section as plain data, for logging and for library ``**kwargs``."""
    return dataclasses.asdict(section)


def flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: the form MLflow params and DVC keys use."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
