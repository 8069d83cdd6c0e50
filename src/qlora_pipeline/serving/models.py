"""Persona adapters by name over one base model in memory: for chat, serve and export.

``--adapter NAME=SOURCE`` names an adapter folder (``models/adapter``) or an MLflow artifact of a
past run (``runs:/<run_id>/adapter``), so any experiment ``dvc exp run`` produced can be served
beside the others. Every adapter must have been trained on the base that is loaded: the
fingerprint train-adapter recorded in its ``training_config.json`` must match. ``base`` is always
the model with no adapter.

No stage imports this package: editing it re-runs nothing.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.layout import RESOLVED_CONFIG
from qlora_pipeline.modeling.stacked_lora import PEFT_BASE, RowAdapters
from qlora_pipeline.serving.specs import BASE, RUN_URI, AdapterSpec, local_folder, parse_adapter_specs


@dataclass
class Adapter:
    name: str
    source: str
    folder: Path  # local folder (downloaded for a runs:/ source)
    resolved: dict  # its training_config.json

    @property
    def system_prompt(self) -> str | None:
        return (self.resolved.get("split") or {}).get("system_prompt") or None

    @property
    def base_fingerprint(self) -> str | None:
        return self.resolved.get("base_fingerprint")


def fetch_adapter(source: str, tracking_uri: str | None, downloads: Path | None = None) -> Path:
    """A local folder for ``source``: the folder itself, or a run's artifact downloaded from MLflow."""
    if source.startswith(RUN_URI):
        import mlflow

        try:
            path = mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=tracking_uri,
                                                       dst_path=str(downloads) if downloads else None)
        except Exception as err:  # MlflowException, or the store's own error: name the URI either way
            raise PipelineError(f"{source}: could not fetch it from the MLflow store {tracking_uri}: "
                                f"{str(err).splitlines()[0]}") from err
        return Path(path)
    return local_folder(source)


def read_adapter(name: str, source: str, folder: Path) -> Adapter:
    """The adapter in ``folder``, refused with a clear message when it is no LoRA adapter of this pipeline.

    Every file is checked here, before any base loads: a damaged adapter costs no load time.
    """
    from qlora_pipeline.modeling.adapters import check_training_config

    resolved_path = folder / RESOLVED_CONFIG
    if (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
        raise PipelineError(f"adapter '{name}' ({source}) is a full fine-tuned model, not an adapter: it cannot "
                            "share a base with others; chat with it alone with --base " + source)
    if not (folder / "adapter_config.json").is_file():
        raise PipelineError(f"adapter '{name}' ({source}): no adapter_config.json; point it at a trained adapter "
                            "folder such as models/adapter (dvc repro train-adapter writes one)")
    if not resolved_path.is_file():
        raise PipelineError(f"adapter '{name}' ({source}): no {RESOLVED_CONFIG}; only adapters trained by this "
                            "pipeline carry the base they belong to")
    resolved = _read_adapter_json(name, source, resolved_path)
    try:
        check_training_config(resolved, resolved_path)
    except PipelineError as err:
        raise PipelineError(f"adapter '{name}' ({source}): {err}") from None
    if resolved["method"] == "full":
        raise PipelineError(f"adapter '{name}' ({source}) is a full fine-tune, not an adapter")
    check_adapter_files(name, source, folder)
    return Adapter(name, source, folder, resolved)


def check_adapter_files(name: str, source: str, folder: Path) -> None:
    """PEFT's two files in ``folder`` are whole: checked before any base loads, so a damaged copy costs no load time.

    adapter_config.json must parse as a JSON object; the weights' safetensors header must cover the whole file
    (``safe_open`` reads the header only, not the tensors).
    """
    from safetensors import SafetensorError, safe_open

    from qlora_pipeline.modeling.adapters import ADAPTER_WEIGHTS, FIX_ADAPTER

    config_path = folder / "adapter_config.json"
    config = _read_adapter_json(name, source, config_path)
    if not isinstance(config, dict):
        raise PipelineError(f"adapter '{name}' ({source}): {config_path} holds a {type(config).__name__}, not the "
                            f"JSON object PEFT writes; {FIX_ADAPTER}")
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise PipelineError(f"adapter '{name}' ({source}): no {ADAPTER_WEIGHTS} in {folder}; {FIX_ADAPTER}")
    try:
        with safe_open(str(weights), framework="pt"):
            pass
    except SafetensorError as err:
        raise PipelineError(f"adapter '{name}' ({source}): {weights} is not a complete safetensors file ({err}); "
                            f"it was cut short or damaged: {FIX_ADAPTER}") from None


def _read_adapter_json(name: str, source: str, path: Path) -> Any:
    """``read_json(path)``; its error (which names the file and line) says which adapter it is and the fix."""
    from qlora_pipeline.io import read_json
    from qlora_pipeline.modeling.adapters import FIX_ADAPTER

    try:
        return read_json(path)
    except PipelineError as err:
        raise PipelineError(f"adapter '{name}' ({source}): {err}; {FIX_ADAPTER}") from None


def check_same_base(adapters: list[Adapter], method: str, fingerprint: str, base_label: str) -> None:
    """Every adapter was trained with ``method`` on the base whose fingerprint is ``fingerprint``."""
    for adapter in adapters:
        if adapter.resolved.get("method") != method:
            raise PipelineError(
                f"adapter '{adapter.name}' ({adapter.source}) was trained with method {adapter.resolved.get('method')} "
                f"but the loaded base {base_label} is for {method}: adapters on one base share its method")
        if adapter.base_fingerprint is None:
            print(f"warning: adapter '{adapter.name}' ({adapter.source}) records no base fingerprint (trained before "
                  "it was recorded); assuming it belongs to the loaded base", file=sys.stderr)
        elif adapter.base_fingerprint != fingerprint:
            raise PipelineError(
                f"adapter '{adapter.name}' ({adapter.source}) was trained on base {adapter.base_fingerprint[:19]}..., "
                f"not on the loaded base {base_label} ({fingerprint[:19]}...); serve it with the base it was trained "
                "on (--base), or retrain it on this one")


@dataclass
class PersonaModel:
    """One base in memory with any number of named adapters, switched per request or per batch row."""

    model: Any  # a PeftModel once an adapter is loaded, else the base
    tokenizer: Any
    method: str
    base_dir: Path
    fingerprint: str
    resolved: dict  # the first adapter's resolved config (precision, model keys); {} for the base alone
    adapters: dict[str, Adapter] = field(default_factory=dict)
    dequantized: bool = False
    mixed_batches: str = "stacked"  # stacked: modeling/stacked_lora.py; peft: PEFT's adapter_names path
    row_adapters: Any = None  # how each batch row gets its adapter (RowAdapters), rebuilt by restack()
    tracking_uri: str | None = None
    downloads: Path | None = None
    lock: threading.RLock = field(default_factory=threading.RLock)

    @property
    def names(self) -> list[str]:
        return [BASE, *self.adapters]

    @property
    def stacked(self) -> Any:
        """The StackedLoRA mixed batches go through; None = PEFT's own path."""
        return self.row_adapters.stacked if self.row_adapters is not None else None

    @stacked.setter
    def stacked(self, value: Any) -> None:
        self.row_adapters.stacked = value

    @property
    def context_length(self) -> int:
        config = self.model.config
        return int(getattr(config, "max_position_embeddings", None) or 2048)

    def system_prompt(self, name: str) -> str | None:
        """The system prompt ``name`` was trained with (the base takes the first adapter's, if any)."""
        if name in self.adapters:
            return self.adapters[name].system_prompt
        return next((a.system_prompt for a in self.adapters.values()), None)

    def peft_name(self, name: str) -> str:
        if name == BASE:
            return PEFT_BASE
        if name not in self.adapters:
            raise KeyError(name)
        return name

    def autocast(self) -> Any:
        from qlora_pipeline.modeling.adapters import autocast_like_training

        return autocast_like_training(self.resolved or {"train": {"bf16": "auto", "fp16": "auto"}})

    @contextlib.contextmanager
    def using(self, name: str) -> Iterator[Any]:
        """The model with only ``name`` active (``base``: every adapter off), for single-stream generation."""
        with self.lock:
            if name == BASE:
                context = self.model.disable_adapter() if self.adapters else contextlib.nullcontext()
                with context:
                    yield self.model
            else:
                self.model.set_adapter(self.peft_name(name))
                yield self.model

    def load_adapter(self, spec: AdapterSpec) -> Adapter:
        """Add an adapter at run time (the same base check as at start)."""
        from peft import PeftModel

        from qlora_pipeline.modeling.adapters import adapter_load_errors, attach_adapters

        with self.lock:
            if spec.name in self.adapters:
                raise PipelineError(f"adapter '{spec.name}' is already loaded; unload it first or choose another name")
            adapter = read_adapter(spec.name, spec.source, fetch_adapter(spec.source, self.tracking_uri, self.downloads))
            check_same_base([adapter], self.method, self.fingerprint, str(self.base_dir))
            if isinstance(self.model, PeftModel):
                try:
                    with adapter_load_errors(adapter.name, adapter.folder):
                        self.model.load_adapter(str(adapter.folder), adapter_name=adapter.name)
                except BaseException:
                    # PEFT adds the layers before it reads the weights: a failed load left them behind, holding
                    # memory (~12 MB a try) and the name, which every later load of it then failed on
                    if adapter.name in self.model.peft_config:
                        self.model.delete_adapter(adapter.name)
                    raise
            else:
                self.model = attach_adapters(self.model, {adapter.name: adapter.folder})
                self.resolved = adapter.resolved
            self.model.eval()
            self.adapters[adapter.name] = adapter
            self.restack()
            return adapter

    def unload_adapter(self, name: str) -> None:
        with self.lock:
            if name not in self.adapters:
                raise KeyError(name)
            self.model.delete_adapter(name)
            del self.adapters[name]
            self.restack()

    def restack(self) -> None:
        """Mixed batches through :mod:`stacked_lora` when asked for and every adapter is plain LoRA."""
        from qlora_pipeline.modeling import stacked_lora

        with self.lock:
            if self.row_adapters is None:
                self.row_adapters = RowAdapters(self.model, self.mixed_batches)
            else:
                self.row_adapters.model = self.model  # the base became a PeftModel when its first adapter came
                self.row_adapters.rebuild()
            if self.mixed_batches == "stacked" and self.adapters and self.row_adapters.stacked is None:
                print("warning: mixed batches take PEFT's path: an adapter uses a LoRA variant (DoRA, ...)",
                      file=sys.stderr)
            stacked_lora.release_freed_memory()  # the weights the stacks replaced, and what loading freed


def load_persona_model(base_dir: Path, specs: list[AdapterSpec], *, tracking_uri: str | None = None,
                       downloads: Path | None = None, dequantize: bool | str = "auto",
                       runtime_adapters: bool = False, mixed_batches: str = "stacked") -> PersonaModel:
    """The base of ``base_dir`` as training prepared it, with every adapter of ``specs`` on it.

    All adapters are fetched and checked before the base is loaded, so a mismatch costs no load time.
    ``dequantize`` (``evaluate.dequantize_4bit``'s values) trades memory for CPU speed; it is
    skipped when adapters may arrive at run time with none loaded yet, as PEFT can only wrap
    layers it knows.
    """
    from qlora_pipeline.modeling.adapters import attach_adapters, load_base_for
    from qlora_pipeline.modeling.inference import dequantize_for_inference, should_dequantize
    from qlora_pipeline.modeling.preparation import base_fingerprint, prepare_4bit_base

    adapters = [read_adapter(s.name, s.source, fetch_adapter(s.source, tracking_uri, downloads)) for s in specs]
    resolved = adapters[0].resolved if adapters else {"method": "qlora", "model": {}}
    method = resolved["method"]
    if method == "qlora" and not (base_dir / "config.json").is_file():
        raise PipelineError(f"--base {base_dir}: no saved base model; run `dvc repro quantize-load` (or give the "
                            "folder the adapters were trained on)")
    fingerprint = base_fingerprint(method, base_dir, resolved.get("model", {}))
    check_same_base(adapters, method, fingerprint, str(base_dir))
    if adapters:
        base, tokenizer = load_base_for(resolved, base_dir)
        model = attach_adapters(base, {a.name: a.folder for a in adapters})
    else:  # the base alone: its compute dtype follows this machine
        resolved = {}
        base, tokenizer = prepare_4bit_base(base_dir, "auto")
        model = base.eval()
    persona = PersonaModel(model, tokenizer, method, base_dir, fingerprint, resolved, {a.name: a for a in adapters},
                           mixed_batches=mixed_batches, tracking_uri=tracking_uri, downloads=downloads)
    if (adapters or not runtime_adapters) and should_dequantize(dequantize, model):
        persona.dequantized = dequantize_for_inference(model) > 0  # this process never saves the model
    persona.restack()
    return persona


def chosen_decoding_for(adapter: Adapter, decoding_file: Path | None, tracking_uri: str | None,
                        downloads: Path | None = None) -> tuple[Any, str] | None:
    """The decoding choose-decoding picked for this adapter's weights, and where it was found; None if none.

    A ``runs:/<id>/...`` adapter looks in its own run (``runs:/<id>/decoding.json``); a folder in
    ``decoding_file`` (the workspace's reports/decoding.json). Either counts only when the digest
    it records is this adapter's: a choice made for other weights is not this persona's.
    """
    return find_chosen_decoding(adapter, decoding_file, tracking_uri, downloads)[0]


def find_chosen_decoding(adapter: Adapter, decoding_file: Path | None, tracking_uri: str | None,
                          downloads: Path | None = None) -> tuple[tuple[Any, str] | None, str]:
    """:func:`chosen_decoding_for`'s answer, and when it is None why a report there was passed over ("" when
    there is no report): a choice dropped without a word read as one that was never made."""
    from qlora_pipeline.config import ConfigError, decoding_setting_from
    from qlora_pipeline.io import read_json
    from qlora_pipeline.modeling.adapters import adapter_digest

    if adapter.source.startswith(RUN_URI):
        run_id = adapter.source[len(RUN_URI):].split("/", 1)[0]
        source = f"{RUN_URI}{run_id}/decoding.json"
        try:
            import mlflow

            path = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=tracking_uri,
                                                            dst_path=str(downloads) if downloads else None))
        except Exception:  # a run made before choose-decoding existed has none: the params decide
            return None, ""
    elif decoding_file is not None and Path(decoding_file).is_file():
        path, source = Path(decoding_file), str(decoding_file)
    else:
        return None, ""
    report = read_json(path)
    fix = ("write it again with `dvc repro choose-decoding`, or give --decoding another report (chat and serve: or "
           "set chat.use_chosen_decoding: false)")
    if not isinstance(report, dict):
        raise PipelineError(f"{source}: holds a {type(report).__name__}, not the JSON object choose-decoding "
                            f"writes; {fix}")
    recorded, digest = report.get("adapter_sha256"), adapter_digest(adapter.folder)
    if recorded != digest:
        weights = (f"other adapter weights (sha256 {recorded[:12]}..., not these {digest[:12]}...)"
                   if isinstance(recorded, str) else "weights it does not record (no adapter_sha256)")
        return None, f"not {source}'s choice: it was made for {weights}"
    try:
        return (decoding_setting_from(report.get("chosen"), source), source), ""
    except ConfigError as err:  # headed by the file and what it holds; the fix added
        raise PipelineError(f"{err}\n{fix}") from None


@dataclass
class Defaults:
    """Each model's decoding defaults in chat and serve: an adapter's own, chosen on validation for its weights
    (``chat.use_chosen_decoding``, :func:`chosen_decoding_for`), else the params' chat section. The base takes the
    first adapter's, as it takes its system prompt (base and tuned compare under one decoding, as in evaluate),
    unless it was given its own (chat's ``/set``)."""

    chat: Any  # ChatConfig: the params' chat section
    own: dict[str, Any] = field(default_factory=dict)  # model name -> ChatConfig
    adapters: Any = field(default_factory=dict)  # the persona's adapters, in order (the live mapping)

    def of(self, model: str) -> Any:
        if model in self.own:
            return self.own[model]
        first = next(iter(self.adapters), None)
        return self.of(first) if model == BASE and first is not None else self.chat


def chat_defaults(chat: Any, persona: PersonaModel, decoding_file: Path | None) -> tuple[Defaults, str]:
    """The decoding defaults of chat and serve, and lines saying where each model's came from."""
    defaults = Defaults(chat, adapters=persona.adapters)
    lines = [adopt_chosen_decoding(defaults, adapter, decoding_file, persona.tracking_uri, persona.downloads)
             for adapter in persona.adapters.values()]
    first = next(iter(persona.adapters), None)
    lines.append(f"decoding of {BASE!r}: " + (f"that of the first adapter, {first!r}" if first
                                              else _params_decoding(chat)))
    return defaults, "\n".join(lines)


def adopt_chosen_decoding(defaults: Defaults, adapter: Adapter, decoding_file: Path | None,
                          tracking_uri: str | None = None, downloads: Path | None = None) -> str:
    """Give ``adapter`` the decoding chosen on validation for its weights, if one was; a line saying which decoding
    it has. For each adapter at start, and for one serve loads at run time (before it is loaded: its first request
    must not decode by the chat section)."""
    passed_over = ""
    if defaults.chat.use_chosen_decoding:
        found, passed_over = find_chosen_decoding(adapter, decoding_file, tracking_uri, downloads)
        if found is not None:
            setting, source = found
            defaults.own[adapter.name] = defaults.chat.model_copy(update=setting.model_dump())
            return f"decoding of {adapter.name!r}: chosen on validation ({source}): {_describe(setting)}"
    defaults.own.pop(adapter.name, None)
    line = f"decoding of {adapter.name!r}: {_params_decoding(defaults.chat)}"
    return f"{line}; {passed_over}" if passed_over else line


def _params_decoding(chat: Any) -> str:
    keys = ("temperature", "top_p", "top_k", "repetition_penalty", "no_repeat_ngram_size")
    return f"the params' chat section: {_describe_dict({k: getattr(chat, k) for k in keys})}"


def _describe(setting: Any) -> str:
    return _describe_dict(setting.model_dump())


def _describe_dict(values: dict) -> str:
    values = {k: v for k, v in values.items() if v is not None}  # the length decay, when off
    if values["temperature"] == 0:
        values = {k: v for k, v in values.items() if k not in ("temperature", "top_p", "top_k")}
        return "greedy, " + ", ".join(f"{k} {v}" for k, v in values.items())
    return ", ".join(f"{k} {v}" for k, v in values.items())


def load_from_args(args: Any) -> tuple[PersonaModel, Defaults]:
    """The persona model and the chat decoding defaults for a ``chat``/``serve`` command line.

    ``--params`` gives the ``chat`` section and the MLflow store that ``runs:/`` sources come from;
    without it, params.yaml if there is one, else the defaults (:func:`~qlora_pipeline.config.command_params`).
    ``--decoding`` is the workspace's choose-decoding report (see :func:`chat_defaults`).
    """
    from qlora_pipeline.config import command_params
    from qlora_pipeline.mlflow_store import resolve_tracking_uri

    params = command_params(args.params)
    dequantize = {"auto": "auto", "true": True, "false": False}[args.dequantize]
    persona = load_persona_model(Path(args.base), parse_adapter_specs(args.adapter),
                                 tracking_uri=resolve_tracking_uri(params.mlflow.tracking_uri), dequantize=dequantize,
                                 runtime_adapters=getattr(args, "allow_runtime_adapters", False),
                                 mixed_batches=getattr(args, "mixed_batches", "stacked"))
    defaults, where = chat_defaults(params.chat, persona, getattr(args, "decoding", None))
    print(where, file=sys.stderr)
    return persona, defaults
