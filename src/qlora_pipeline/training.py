"""train-adapter: QLoRA, LoRA or full fine-tuning with the transformers Trainer.

Load order follows QLoRA: the 4-bit base (``BitsAndBytesConfig``) -> ``prepare_model_for_kbit_training``
-> ``LoraConfig`` -> ``get_peft_model``. Examples are rendered with the base model's chat
template and the loss is computed on the reply tokens only (the end-of-turn token included).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from qlora_pipeline import hardware
from qlora_pipeline.config import Params, TrainConfig
from qlora_pipeline.data.formatting import encode_example
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.io import read_json_object, write_json
from qlora_pipeline.labels import IGNORE_INDEX
from qlora_pipeline.modeling.loss import causal_lm_parts, target_token_nll

FINGERPRINT = "fingerprint.json"


# --------------------------------------------------------------------------- examples


def build_dataset(rows: Iterable[dict], tokenizer: Any, max_length: int, counts: Counter) -> Any:
    """A ``datasets.Dataset`` of input_ids / attention_mask / labels."""
    import datasets

    records = []
    for row in rows:
        encoded = encode_example(tokenizer, row["messages"], row["target"], max_length, counts)
        records.append({"input_ids": encoded.input_ids, "attention_mask": [1] * len(encoded.input_ids),
                        "labels": encoded.labels})
    counts["examples"] += len(records)
    # A label at the first position teaches nothing (the loss predicts each token from those before it): with no
    # label past it in any example, training ran its steps at a loss of 0 and saved an adapter that learned nothing.
    if records and not any(label != IGNORE_INDEX for r in records for label in r["labels"][1:]):
        default = TrainConfig.model_fields["max_length"].default
        raise PipelineError(f"train.max_length: {max_length} tokens leave no reply token to learn in any of the "
                            f"{len(records)} examples; raise it (params.yaml's default is {default})")
    return datasets.Dataset.from_list(records)


def by_length(dataset: Any) -> Any:
    """The examples shortest first: validation batches then pad little (~2% here instead of ~35% in split order).

    A batch's loss is the mean over its own target tokens, so regrouping changes the validation loss
    in its last digits, the same way for every evaluation of a run.
    """
    return dataset.select(sorted(range(len(dataset)), key=lambda i: len(dataset[i]["input_ids"])))


def pack(dataset: Any, max_length: int) -> Any:
    """Examples packed into sequences of at most ``max_length`` tokens (TRL's best-fit-decreasing), whole.

    Each packed row keeps where its examples start (``seq_lengths``): positions restart at 0 for
    every example and attention stays inside it (:class:`PackedCollator`), so packing changes what
    a step holds, not what any example sees.
    """
    from trl import pack_dataset

    return pack_dataset(dataset.remove_columns("attention_mask"), max_length, strategy="bfd")


def packed_collator(pad_token_id: int, varlen: bool) -> Any:
    """Batches of packed rows: per-example positions, and no padding mask, so attention stays inside each example.

    ``varlen``: the rows flattened into one sequence with its boundaries, for flash attention's varlen
    kernels (a GPU). Otherwise each row is padded on the right and transformers builds a
    block-diagonal causal mask from the positions (SDPA on a CPU); padding gets positions of its own
    and labels -100.
    """
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    class PackedCollator(DataCollatorForLanguageModeling):
        def torch_call(self, examples: list[dict]) -> dict:
            batch = super().torch_call(examples)
            batch.pop("attention_mask", None)  # with a mask, transformers would not look for the examples' bounds
            return batch

    return PackedCollator(pad_token_id=pad_token_id, padding_free=varlen, return_position_ids=True)


def use_varlen_attention(model: Any) -> bool:
    """Flash attention on a GPU takes a flattened batch with its sequence bounds: no padding at all."""
    import torch

    return torch.cuda.is_available() and "flash" in str(getattr(model.config, "_attn_implementation", ""))


def padding_share(dataset: Any, batch_size: int, lengths_of: str = "input_ids") -> float:
    """Share of a run's tokens that would be padding, for batches of ``batch_size`` in the dataset's order."""
    lengths = [len(ids) for ids in dataset[lengths_of]]
    total = real = 0
    for start in range(0, len(lengths), batch_size):
        chunk = lengths[start:start + batch_size]
        total += max(chunk) * len(chunk)
        real += sum(chunk)
    return round(1 - real / total, 4) if total else 0.0


# ------------------------------------------------------------------------------ model


def check_target_modules(config_path: Path, target_modules: str | list[str]) -> None:
    """Fail fast on a ``target_modules`` name the model lacks, using an empty (meta) model: no weights."""
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return
        target_modules = [target_modules]
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    names = {name.rsplit(".", 1)[-1] for name, module in skeleton.named_modules()
             if isinstance(module, torch.nn.Linear)}
    unknown = sorted(set(target_modules) - names)
    if unknown:
        raise PipelineError(f"train.lora.target_modules: {', '.join(unknown)} not in the model; "
                            f"its linear layers are {', '.join(sorted(names))} (or use all-linear)")


def resolve_optim(name: str) -> str:
    """``auto``: paged 32-bit AdamW where CUDA exists (QLoRA's choice), plain AdamW on CPU."""
    if name != "auto":
        return name
    import torch

    return "paged_adamw_32bit" if torch.cuda.is_available() else "adamw_torch"


def lora_config(train: TrainConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", **train.lora.model_dump())


def count_parameters(model: Any) -> dict[str, int]:
    from qlora_pipeline.modeling.quantization import logical_parameters

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable_parameters": trainable, "total_parameters": logical_parameters(model)}


# ------------------------------------------------------------------------- precision


@dataclass(frozen=True)
class Precision:
    """Every ``auto`` of params that picks a float type or a memory trade-off, resolved on this machine."""

    model_dtype: str  # unquantized weights (the lora base; full trains float32 master weights)
    compute_dtype: str | None  # the 4-bit matmuls (qlora only)
    bf16: bool  # the Trainer's autocast
    fp16: bool
    activation_checkpointing: bool


def autocast_for(precision: Precision) -> Any:
    """The autocast the Trainer runs under, for forward passes outside it (sampling mid-training)."""
    import contextlib

    import torch

    if not (precision.bf16 or precision.fp16):
        return contextlib.nullcontext()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device, dtype=torch.bfloat16 if precision.bf16 else torch.float16)


def resolve_precision(params: Params, model_config: Any) -> Precision:
    """Resolve ``model.dtype``, ``bnb_4bit_compute_dtype``, ``train.bf16/fp16`` and activation checkpointing."""
    train = params.train
    bf16, fp16 = hardware.resolve_mixed_precision(train.bf16, train.fp16)
    model_dtype = "float32" if train.method == "full" else hardware.resolve_dtype(params.model.dtype)
    compute = hardware.resolve_dtype(params.model.quantization.bnb_4bit_compute_dtype) if train.method == "qlora" else None
    # Activations take the autocast type, else the type the unquantized layers run in
    # (prepare_model_for_kbit_training upcasts them to float32 for qlora).
    activation_dtype = "bfloat16" if bf16 or fp16 else "float32" if train.method != "lora" else model_dtype
    checkpointing = hardware.resolve_activation_checkpointing(
        train.activation_checkpointing, model_config, train.per_device_train_batch_size * train.max_length,
        activation_dtype)
    return Precision(model_dtype, compute, bf16, fp16, checkpointing)


def precision_for(params: Params, base_dir: Path) -> Precision:
    """:func:`resolve_precision` for the base saved in ``base_dir`` (its config only, no weights)."""
    from transformers import AutoConfig

    return resolve_precision(params, AutoConfig.from_pretrained(base_dir))


# --------------------------------------------------------------------------- trainer


def training_arguments(train: TrainConfig, output_dir: Path, seed: int, precision: Precision) -> Any:
    import torch
    from transformers import TrainingArguments

    keys = ("max_steps", "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
            "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "logging_steps",
            "eval_steps", "save_steps", "save_total_limit", "train_sampling_strategy")
    return TrainingArguments(
        output_dir=str(output_dir),
        **{key: getattr(train, key) for key in keys},
        activation_checkpointing=precision.activation_checkpointing,
        bf16=precision.bf16,
        fp16=precision.fp16,
        optim=resolve_optim(train.optim),
        activation_checkpointing_kwargs={"use_reentrant": False},
        eval_strategy="steps",
        save_strategy="steps",
        eval_on_start=True,  # the zero-shot validation loss, at step 0
        load_best_model_at_end=True,  # keep the best checkpoint, not the last (overfitting guard)
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        include_num_input_tokens_seen="non_padding",
        # Packed rows carry seq_lengths, which the model does not take but the collator needs.
        remove_unused_columns=not train.packing,
        logging_first_step=True,
        seed=seed,
        data_seed=seed,
        report_to="none",  # MLflow gets the curves from StepLogCallback, into the pipeline's own run
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        dataloader_num_workers=0,
        # Every LoRA weight takes part in every step: DDP need not search the graph for unused ones.
        ddp_find_unused_parameters=False,
    )


def log_rows(log_history: list[dict]) -> list[dict]:
    """The Trainer's log history as one row per step: step, train loss, val loss, learning rate."""
    rows: dict[int, dict] = {}
    for entry in log_history:
        row = rows.setdefault(entry["step"], {"step": entry["step"], "train_loss": None, "val_loss": None,
                                              "learning_rate": None})
        if "loss" in entry:
            row["train_loss"] = round(entry["loss"], 5)
            row["learning_rate"] = entry.get("learning_rate")
        if "eval_loss" in entry:
            row["val_loss"] = round(entry["eval_loss"], 5)
    return [rows[step] for step in sorted(rows)]


# The model keys training reads (the base itself is covered by models/base's config in the inputs).
MODEL_KEYS = ("name_or_path", "gguf_file", "revision", "dtype", "trust_remote_code")


def fingerprint(params: Params, inputs: Iterable[Path]) -> str:
    """What a checkpoint belongs to: resuming is only valid for the same params and inputs."""
    digest = hashlib.sha256()
    model = {key: getattr(params.model, key) for key in MODEL_KEYS}
    digest.update(json.dumps([params.seed, model, params.train.model_dump()], sort_keys=True).encode())
    for path in inputs:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def resumable_checkpoint(checkpoints: Path, expected: str, max_steps: int) -> str | None:
    """The last checkpoint of an interrupted run with the same fingerprint; otherwise start clean.

    A run that finished is not resumed: the stage only runs again when its code or inputs
    changed, and then training starts over.
    """
    state = read_json_object(checkpoints / FINGERPRINT)  # {} when absent, or cut by a kill
    if state.get("fingerprint") == expected and not state.get("completed"):
        complete = _drop_incomplete_checkpoints(checkpoints)
        # A checkpoint at max_steps means training had ended: the Trainer would take one step too many.
        if complete and complete[-1][0] < max_steps:
            return str(complete[-1][1])
    shutil.rmtree(checkpoints, ignore_errors=True)
    checkpoints.mkdir(parents=True)
    write_json(checkpoints / FINGERPRINT, {"fingerprint": expected, "completed": False})
    return None


def _drop_incomplete_checkpoints(checkpoints: Path) -> list[tuple[int, Path]]:
    """The complete checkpoints as (step, folder), oldest first; partial ones are deleted.

    The Trainer writes a checkpoint's files one after another into ``checkpoint-N`` and its
    ``trainer_state.json`` last, so a kill mid-save leaves a folder without that file (or with
    half of it). Resuming from such a folder fails; the one before it is complete.
    """
    found = []
    for folder in checkpoints.glob("checkpoint-*") if checkpoints.is_dir() else ():
        step = folder.name.rsplit("-", 1)[-1]
        if not (folder.is_dir() and step.isdigit()):
            continue
        if read_json_object(folder / "trainer_state.json").get("global_step") == int(step):
            found.append((int(step), folder))
        else:
            print(f"train-adapter: removing {folder.name}: it was being written when the last run stopped",
                  file=sys.stderr)
            shutil.rmtree(folder, ignore_errors=True)
    return sorted(found)


def mark_completed(checkpoints: Path) -> None:
    """Record that the run behind these checkpoints finished and its outputs were written."""
    write_json(checkpoints / FINGERPRINT, {**read_json_object(checkpoints / FINGERPRINT), "completed": True})


def prepare_model(params: Params, base_dir: Path, workdir: Path,
                  precision: Precision | None = None) -> tuple[Any, Any]:
    """The model to train, per ``train.method``, and its tokenizer (end token already fixed by quantize-load)."""
    from peft import get_peft_model
    from transformers import AutoTokenizer

    from qlora_pipeline.modeling.loading import load_dense
    from qlora_pipeline.modeling.preparation import prepare_4bit_base, quiet_peft_deprecations

    train = params.train
    precision = precision or precision_for(params, base_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if train.method == "qlora":
        model, _ = prepare_4bit_base(base_dir, params.model.quantization.bnb_4bit_compute_dtype,
                                     precision.activation_checkpointing)
    else:
        model = load_dense(params.model, tokenizer, workdir, full=train.method == "full")
        if precision.activation_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()  # frozen embeddings would otherwise cut the graph
    if train.method != "full":
        with quiet_peft_deprecations():
            model = get_peft_model(model, lora_config(train))
    return model, tokenizer


def save_sharded(trainer: Any, out: Path) -> bool:
    """FSDP or ZeRO-3: gather the weights spread over the processes and save them into ``out``.

    A collective: every process must call it (rank 0 writes). False, saving nothing, when each
    process holds the whole model (one process, DDP): the caller saves it then.
    """
    if not (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        return False
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(out))
    return True


def peak_memory_mb() -> float:
    import resource

    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def make_step_logger() -> Any:
    """A Trainer callback sending each logged step to the pipeline's MLflow run, as ``train.*`` curves.

    Not the Trainer's own MLflowCallback: that one opens, names and ends runs on its own terms,
    while every stage here must join the pipeline execution's run. Through ``tracking``, so the
    steps logged while a server is away are kept for ``qlora-pipeline mlflow-sync``.
    """
    from transformers import TrainerCallback

    from qlora_pipeline import tracking

    names = {"loss": "loss", "eval_loss": "val_loss", "learning_rate": "learning_rate", "grad_norm": "grad_norm"}

    class StepLogCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            values = {names[k]: float(v) for k, v in (logs or {}).items() if k in names and v is not None}
            if values and tracking.in_run():
                tracking.log_metrics("train", values, step=state.global_step)

    return StepLogCallback()


def target_token_trainer_class() -> type:
    """``Trainer`` whose loss meets the vocabulary head only at target tokens (see ``modeling/loss.py``).

    Same loss as the model's own (summed over target tokens, divided by the Trainer's count of
    them across accumulated batches), without the full logits. Models it cannot take apart (a
    distributed wrapper) go through the library's own ``compute_loss``.
    """
    from transformers import Trainer

    class TargetTokenTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            parts = causal_lm_parts(model)
            if parts is None:
                self.loss_is_scaled_for_ga = None
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            decoder, head = parts
            # accelerate applies autocast by wrapping the top model's forward, which this bypasses.
            with self.accelerator.autocast():
                # Packed rows come with per-example positions and no padding mask (see packed_collator).
                # No cache: transformers looks for packed examples' bounds only when there is none.
                extra = {key: value for key, value in inputs.items() if key not in ("input_ids", "labels")}
                hidden = decoder(input_ids=inputs["input_ids"], use_cache=False, **extra)
                nll, counts = target_token_nll(hidden.last_hidden_state, inputs["labels"], head)
            # Validation is the mean over this batch's own target tokens: the Trainer hands in a count
            # summed over processes there too, but gathers one loss per process and keeps only the
            # real (not padded) batches' values, so a global count would skew the multi-process loss.
            if num_items_in_batch is not None and model.training:  # the accumulated batch's count: GA-scaled
                loss = nll.sum() / num_items_in_batch
                if self.args.average_tokens_across_devices:
                    loss = loss * self.accelerator.num_processes  # the count was summed over processes
            else:
                loss = nll.sum() / counts.sum().clamp(min=1)
            self.loss_is_scaled_for_ga = num_items_in_batch is not None and model.training
            return (loss, {"loss": loss}) if return_outputs else loss

    return TargetTokenTrainer


def train_model(params: Params, model: Any, tokenizer: Any, train_ds: Any, val_ds: Any, checkpoints: Path,
                resume: str | None, precision: Precision | None = None) -> Any:
    """Run the Trainer (resuming from ``resume`` if given) and return it, best checkpoint loaded."""
    from transformers import DataCollatorForSeq2Seq, EarlyStoppingCallback

    precision = precision or resolve_precision(params, model.config)
    tokenizer.padding_side = "right"
    callbacks = [make_step_logger()]
    if params.train.packing:
        train_ds = pack(train_ds, params.train.max_length)
        collator = packed_collator(tokenizer.pad_token_id, use_varlen_attention(model))
    else:  # pads each batch to its own longest example; labels padded with -100
        collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX)
    if params.train.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(params.train.early_stopping_patience,
                                               params.train.early_stopping_threshold))
    trainer = target_token_trainer_class()(
        model=model,
        args=training_arguments(params.train, checkpoints, params.seed, precision),
        train_dataset=train_ds,
        eval_dataset=val_ds,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer
