"""train-adapter stage: fine-tune on the splits, keep the best checkpoint, save adapter + model card + metrics."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from qlora_pipeline import hardware, launching, tracking
from qlora_pipeline.config import Params
from qlora_pipeline.data.sampling import cap_examples, read_split
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.io import atomic_path, read_json, remove_outputs, write_csv, write_json, write_jsonl
from qlora_pipeline.layout import MANIFEST, RESOLVED_CONFIG
from qlora_pipeline.modeling.preparation import base_fingerprint

LOG_FIELDS = ("step", "train_loss", "val_loss", "learning_rate")
# Metrics of the machine and the moment, not of the model: they differ between identical runs (a
# resumed run trains the same adapter, bit for bit, as one never interrupted).
MEASURED = frozenset({"tokens_per_second", "training_tokens_per_second", "eval_seconds", "wall_seconds",
                      "peak_memory_mb", "energy_joules", "resumed_from_step"})


def run_train_adapter(params: Params, base_dir: Path, splits_dir: Path, out_dir: Path, checkpoints: Path,
                      metrics_path: Path, log_path: Path, pairs_path: Path | None = None) -> dict | None:
    """Train per ``params.train``; write the adapter (or full model) to ``out_dir`` and the metrics.

    With ``train.objective: dpo`` the SFT adapter is then preference-tuned (qlora_pipeline.preference)
    on pairs written to ``pairs_path`` (with sft the file is written empty: a DVC output either way).
    Under ``accelerate launch`` every process trains; only the first writes outputs, checkpoints
    and MLflow (the others return None).
    """
    from transformers import set_seed

    from qlora_pipeline import training

    main = launching.is_main_process()
    if main:
        remove_outputs(out_dir, metrics_path, log_path, *([pairs_path] if pairs_path else []))
    if not (base_dir / "config.json").is_file():
        raise PipelineError(f"{base_dir}: no base model; run the quantize-load stage first (dvc repro quantize-load)")
    if params.train.method != "full":
        training.check_target_modules(base_dir, params.train.lora.target_modules)
    fix = "check the split stage's params (ratios, caps, persona)"
    train_rows, val_rows = (read_split(splits_dir / f"{name}.jsonl", fix) for name in ("train", "val"))
    val_rows = cap_examples(val_rows, params.train.max_eval_samples, params.seed)
    set_seed(params.seed)
    started = time.perf_counter()
    energy_start = hardware.energy_joules()
    precision = training.precision_for(params, base_dir)
    with (atomic_path(out_dir) if main else _scratch()) as tmp:
        model, tokenizer = training.prepare_model(params, base_dir, tmp.parent / "dense", precision)
        counts: Counter = Counter()
        train_ds = training.build_dataset(train_rows, tokenizer, params.train.max_length, counts)
        val_ds = training.by_length(training.build_dataset(val_rows, tokenizer, params.train.max_length, Counter()))
        inputs = [splits_dir / "train.jsonl", splits_dir / "val.jsonl", base_dir / "config.json"]
        # One process decides (it may delete partial checkpoints); the others take its answer.
        resume = launching.broadcast(training.resumable_checkpoint(
            checkpoints, training.fingerprint(params, inputs), params.train.max_steps) if main else None)
        with tracking.pipeline_run(params, "train_adapter") if main else contextlib.nullcontext():
            trainer = training.train_model(params, model, tokenizer, train_ds, val_ds, checkpoints, resume, precision)
            pairs = None
            if params.train.objective == "dpo":
                pairs, preferred = preference_tune(params, trainer.model, tokenizer, train_rows, precision)
            saved = training.save_sharded(trainer, tmp)
            if not main:
                return None
            metrics = train_metrics(trainer, counts, training.count_parameters(model), resume, started)
            metrics["processes"] = launching.world_size()
            metrics["peak_memory_mb"] = training.peak_memory_mb()
            # What every auto resolved to, and on what: runs on different machines stay comparable.
            metrics["precision"] = dataclasses.asdict(precision)
            metrics["hardware"] = hardware.capability()
            if pairs is not None:
                metrics["preference"] = preferred
            # Measured where the machine has energy counters (RAPL, NVML); the risk stage estimates otherwise.
            energy_end = hardware.energy_joules()
            metrics["energy_joules"] = (round(energy_end - energy_start, 1)
                                        if energy_start is not None and energy_end is not None else None)
            save_trained(trainer.model, tokenizer, tmp, params, base_dir, splits_dir, metrics, weights=not saved)
            # What a user keeps and ships per persona: an adapter (MBs) or a whole model (GBs).
            metrics["output_mb"] = round(sum(f.stat().st_size for f in tmp.glob("*.safetensors")) / 2**20, 2)
            tracking.log_metrics("train", {k: v for k, v in metrics.items() if k != "examples"})
    if pairs_path is not None:
        write_jsonl(pairs_path, pairs or [])
    write_json(metrics_path, metrics)
    write_csv(log_path, LOG_FIELDS, training.log_rows(trainer.state.log_history))
    training.mark_completed(checkpoints)
    print(f"train-adapter: {params.train.method}, {metrics['steps']} steps, val loss "
          f"{metrics['zero_shot_val_loss']} -> {metrics['best_val_loss']} (best step {metrics['best_step']}), "
          f"{metrics['wall_seconds']} s -> {out_dir}/, {metrics_path}, {log_path}")
    return metrics


def preference_tune(params: Params, model: Any, tokenizer: Any, train_rows: list[dict], precision: Any
                    ) -> tuple[list[dict], dict]:
    """The SFT adapter's preference pairs (the person's reply over a sampled one) and DPO on them, in place."""
    from qlora_pipeline import preference, training

    cfg = params.train.preference
    started = time.perf_counter()
    rows = preference.pick_contexts(train_rows, cfg, params.seed)
    adapter = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapters[0]
    sampler = model.disable_adapter() if cfg.rejected_from == "base" else contextlib.nullcontext()
    with sampler, training.autocast_for(precision):
        rejected = preference.rejected_replies(model, tokenizer, rows, cfg, params.seed)
    pairs = preference.preference_rows(rows, rejected)
    sampled = time.perf_counter()
    metrics = preference.tune(params, model, tokenizer, pairs, precision, adapter)
    metrics.update({"contexts": len(rows), "same_as_chosen": len(rows) - len(pairs),
                    "rejected_seconds": round(sampled - started, 1),
                    "dpo_seconds": round(time.perf_counter() - sampled, 1)})
    print(f"train-adapter: preference tuning (DPO, beta {cfg.beta}) on {len(pairs)} pairs, the rejected side from "
          f"the {cfg.rejected_from}: loss {metrics['first_loss']} -> {metrics['final_loss']}, reward accuracy "
          f"{metrics['final_reward_accuracy']}")
    return pairs, metrics


@contextlib.contextmanager
def _scratch():
    """Where a non-writing process keeps what it must put somewhere (a dense lora/full base)."""
    with tempfile.TemporaryDirectory(prefix="train-adapter-") as folder:
        yield Path(folder) / "out"


def train_metrics(trainer: Any, counts: Counter, parameters: dict, resume: str | None, started: float) -> dict:
    state = trainer.state
    evals = [e for e in state.log_history if "eval_loss" in e]
    losses = [e["loss"] for e in state.log_history if "loss" in e]
    # The Trainer's own throughput: non-padding tokens (include_num_input_tokens_seen) per second of
    # train_runtime, which includes the evaluations; training_tokens_per_second leaves them out.
    throughput = [e["train_tokens_per_second"] for e in state.log_history if "train_tokens_per_second" in e]
    # Every log entry carries the running train_runtime; the last one is the whole run's.
    runtime = next((e["train_runtime"] for e in reversed(state.log_history) if "train_runtime" in e), None)
    eval_seconds = sum(e.get("eval_runtime", 0.0) for e in evals)
    return {
        "zero_shot_val_loss": round(evals[0]["eval_loss"], 5) if evals and evals[0]["step"] == 0 else None,
        "best_val_loss": round(state.best_metric, 5) if state.best_metric is not None else None,
        "final_val_loss": round(evals[-1]["eval_loss"], 5) if evals else None,
        "final_train_loss": round(losses[-1], 5) if losses else None,
        "best_step": _step_of(state.best_model_checkpoint),
        "steps": state.global_step,
        "stopped_early": state.global_step < state.max_steps,
        "resumed_from_step": _step_of(resume),
        "tokens_seen": int(state.num_input_tokens_seen),
        "tokens_per_second": round(throughput[-1], 1) if throughput else None,
        "eval_seconds": round(eval_seconds, 1),
        "training_tokens_per_second": round(state.num_input_tokens_seen / (runtime - eval_seconds), 1)
        if runtime and runtime > eval_seconds and resume is None else None,
        "wall_seconds": round(time.perf_counter() - started, 1),
        **parameters,
        "examples": dict(counts),
    }


def _step_of(checkpoint: str | None) -> int | None:
    return int(checkpoint.rsplit("-", 1)[-1]) if checkpoint else None


def save_trained(model: Any, tokenizer: Any, out: Path, params: Params, base_dir: Path, splits_dir: Path,
                 metrics: dict, weights: bool = True) -> None:
    """Adapter (or full model) + tokenizer + resolved config + model card, into ``out``.

    ``weights=False``: the weights are already there (gathered from FSDP/ZeRO-3 shards).
    """
    if weights:
        model.save_pretrained(out)
    sort_target_modules(out / "adapter_config.json")
    tokenizer.save_pretrained(out)
    manifest = read_json(splits_dir / MANIFEST) if (splits_dir / MANIFEST).is_file() else {}
    resolved = {
        "method": params.train.method,
        "base_model": str(base_dir) if params.train.method == "qlora" else params.model.name_or_path,
        # Chat and serve refuse to put adapters of different bases on one model.
        "base_fingerprint": base_fingerprint(params.train.method, base_dir, params.model.model_dump()),
        "seed": params.seed,
        "model": params.model.model_dump(),
        "train": params.train.model_dump(),
        "data": {"source": manifest.get("source"), "sha256": manifest.get("sha256"),
                 "persona": manifest.get("persona"), "files": manifest.get("files")},
        # How prompts were rendered (system prompt, context turns): chat renders its turns the same way.
        "split": manifest.get("split", {}),
        # What the run reached, not how long it took: the folder is a function of its inputs, so two
        # runs of the same seed hash the same (timings and memory stay in metrics/train.json).
        "metrics": {k: v for k, v in metrics.items() if k != "examples" and k not in MEASURED},
    }
    write_json(out / RESOLVED_CONFIG, resolved)
    (out / "README.md").write_text(model_card(resolved), encoding="utf-8")


def sort_target_modules(config: Path) -> None:
    """PEFT writes the resolved ``target_modules`` set in the process's string-hash order, which
    changes from run to run: sorted, the same training gives the same bytes (and DVC hash)."""
    if not config.is_file():  # full fine-tuning: no adapter config
        return
    data = json.loads(config.read_text(encoding="utf-8"))
    if isinstance(data.get("target_modules"), list):
        data["target_modules"] = sorted(data["target_modules"])
        write_json(config, data)


def model_card(resolved: dict) -> str:
    """A Hugging Face model card: YAML metadata, then what was trained on what, and how well."""
    from huggingface_hub import ModelCard, ModelCardData

    model = resolved["model"]
    base = model["name_or_path"] + (f" ({model['gguf_file']})" if model.get("gguf_file") else "")
    data = ModelCardData(base_model=None if model["name_or_path"].startswith("package:") else model["name_or_path"],
                         library_name="peft" if resolved["method"] != "full" else "transformers",
                         tags=["qlora-pipeline", resolved["method"], "persona-chat"], pipeline_tag="text-generation")
    m = resolved["metrics"]
    lines = [
        f"# Persona chat {'adapter' if resolved['method'] != 'full' else 'model'} ({resolved['method']})",
        "",
        f"- Base model: `{base}`, quantization: {_quantization_text(resolved)}",
        f"- Method: `{resolved['method']}`; LoRA: `{json.dumps(resolved['train']['lora'])}`",
        f"- Persona: `{resolved['data']['persona']}`; data source `{resolved['data']['source']}`, "
        f"sha256 `{resolved['data']['sha256']}`",
        f"- Seed: {resolved['seed']}; steps: {m['steps']} (best {m['best_step']}); tokens seen: {m['tokens_seen']}",
        f"- Precision: `{json.dumps(m.get('precision'))}`",
        f"- Trained on: {m['hardware']['cpu_model']} ({m['hardware']['cpu_capability']}), GPU "
        f"{m['hardware']['gpu'] or 'none'}" if m.get("hardware") else "- Trained on: not recorded",
        "",
        "## Results",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in m.items() if not isinstance(v, dict)],
        "",
        "Resolved configuration: `training_config.json`. Produced by `dvc repro` in qlora-pipeline.",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))


def _quantization_text(resolved: dict) -> str:
    q = resolved["model"]["quantization"]
    if resolved["method"] != "qlora":
        return f"none ({resolved['model']['dtype'] if resolved['method'] == 'lora' else 'float32'})"
    return f"4-bit {q['bnb_4bit_quant_type']}, double quant {q['bnb_4bit_use_double_quant']}"


