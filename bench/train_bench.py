"""Training speed and memory: the pipeline's train-adapter path against the usual QLoRA tutorial recipe, in one run.

Recipes, each run in its own process (so peak memory is its own), one after the other, on the
same training examples, steps, batch size and seed, `--repeats` times; medians are reported:
- ``pipeline``: this project's code path (``training.prepare_model`` / ``train_model``'s Trainer)
  with params.yaml as it is: dtypes, autocast and activation checkpointing resolved for this machine,
  length-grouped batches padded per batch, the loss on reply tokens through the head only there.
- ``tutorial``: the recipe most QLoRA tutorials show: ``BitsAndBytesConfig`` NF4 + double quant,
  ``prepare_model_for_kbit_training`` (activation checkpointing on), LoRA r 16 on all linear layers,
  ``padding="max_length"`` to train.max_length, ``DataCollatorForLanguageModeling``, the Trainer.
  It gets the same resolved compute dtype and autocast as the pipeline, so the comparison measures
  the recipe and not the dtype choice (on an AVX2 CPU a tutorial's bfloat16 would be ~30x slower).
- ``lora``: the pipeline path with ``train.method: lora``: the same LoRA on the unquantized frozen base.
A recipe can carry params overrides: ``pipeline:train.activation_checkpointing=true``.

Reported per recipe: non-padding tokens/s (the Trainer's ``include_num_input_tokens_seen="non_padding"``
over ``train_runtime``; no evaluation runs inside), padded tokens/s, seconds per step, peak resident
memory while training (sampled) and over the process, and model FLOPs utilisation: (6 x parameters
with activation checkpointing, 4 x without) FLOPs per non-padding token, over this machine's own
matmul peak in the compute dtype, measured in the same run by timing a large GEMM.

Run (after `dvc repro split quantize-load`; nothing else busy on the machine):
    .venv/bin/python bench/train_bench.py --repeats 3 --out bench/results/train_<machine>.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchlib import matmul_peak_flops, write_report

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPES = ("pipeline", "tutorial", "lora")


# ------------------------------------------------------------------------------- workers


class PeakRss:
    """Highest resident memory of this process while the block runs, sampled every 20 ms."""

    def __init__(self) -> None:
        import psutil

        self.process, self.peak, self._stop = psutil.Process(), 0, threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(0.02)

    def __enter__(self) -> "PeakRss":
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class CountingCollator:
    """Wraps a collator to count the tokens each batch carries, padding included."""

    def __init__(self, collate) -> None:
        self.collate, self.padded_tokens = collate, 0

    def __call__(self, features):
        batch = self.collate(features)
        self.padded_tokens += batch["input_ids"].numel()
        return batch


def bench_rows(params, count: int) -> list[dict]:
    from qlora_pipeline.data.sampling import cap_examples
    from qlora_pipeline.io import read_jsonl

    rows = [row for _, row in read_jsonl(ROOT / "data/splits/train.jsonl")]
    return cap_examples(rows, count, params.seed)


def bench_arguments(base_args, **changes):
    """The pipeline's TrainingArguments with evaluation, checkpoints and best-model reload off."""
    import dataclasses

    return dataclasses.replace(base_args, eval_strategy="no", save_strategy="no", load_best_model_at_end=False,
                               eval_on_start=False, logging_steps=1, **changes)


def run_pipeline(params, steps: int, work: Path) -> dict:
    """The train-adapter stage's own functions, minus evaluation and saving."""
    from collections import Counter

    from transformers import DataCollatorForSeq2Seq, set_seed

    from qlora_pipeline import training

    set_seed(params.seed)
    base_dir = ROOT / "models/base"
    precision = training.precision_for(params, base_dir)
    model, tokenizer = training.prepare_model(params, base_dir, work / "dense", precision)
    train_ds = training.build_dataset(bench_rows(params, steps * params.train.per_device_train_batch_size),
                                      tokenizer, params.train.max_length, Counter())
    tokenizer.padding_side = "right"
    collator = CountingCollator(DataCollatorForSeq2Seq(tokenizer, padding="longest",
                                                       label_pad_token_id=training.IGNORE_INDEX))
    args = bench_arguments(training.training_arguments(params.train, work / "out", params.seed, precision),
                           max_steps=steps)
    trainer = training.target_token_trainer_class()(model=model, args=args, train_dataset=train_ds,
                                                    data_collator=collator, processing_class=tokenizer)
    return timed_train(trainer, collator, precision.activation_checkpointing, precision)


def run_tutorial(params, steps: int, work: Path) -> dict:
    """The usual QLoRA notebook, written as tutorials write it (see module docstring)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, DataCollatorForLanguageModeling,
                              Trainer, TrainingArguments, set_seed)

    from qlora_pipeline import training
    from qlora_pipeline.modeling.quantization import disable_cpu_repack

    set_seed(params.seed)
    precision = training.precision_for(params, ROOT / "models/base")
    dense = dense_base(params, work)
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "models/base")
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=getattr(torch, precision.compute_dtype))
    model = AutoModelForCausalLM.from_pretrained(dense, quantization_config=bnb)
    disable_cpu_repack(model)  # the same guard as the pipeline: a repacked layer trains wrong
    model = prepare_model_for_kbit_training(model)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    rows = bench_rows(params, steps * params.train.per_device_train_batch_size)
    texts = [tokenizer.apply_chat_template([*row["messages"], {"role": "assistant", "content": row["target"]}],
                                           tokenize=False) for row in rows]
    dataset = Dataset.from_dict({"text": texts}).map(
        lambda batch: tokenizer(batch["text"], padding="max_length", truncation=True,
                                max_length=params.train.max_length), batched=True, remove_columns=["text"])
    collator = CountingCollator(DataCollatorForLanguageModeling(tokenizer, mlm=False))
    args = TrainingArguments(output_dir=str(work / "out"), per_device_train_batch_size=params.train.per_device_train_batch_size,
                             max_steps=steps, learning_rate=2e-4, logging_steps=1, gradient_checkpointing=True,
                             bf16=precision.bf16, fp16=precision.fp16, optim=training.resolve_optim("auto"),
                             report_to="none", save_strategy="no", include_num_input_tokens_seen="non_padding",
                             seed=params.seed, use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                      processing_class=tokenizer)
    return timed_train(trainer, collator, True, precision)


def dense_base(params, work: Path) -> Path:
    """The unquantized base as a plain safetensors folder, which the tutorial quantizes itself on load."""
    from transformers import AutoTokenizer

    from qlora_pipeline.modeling.loading import load_model, resolve_source

    folder = work / "dense-base"
    model = load_model(resolve_source(params.model), params.model, None, work / "gguf")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(ROOT / "models/base").save_pretrained(folder)
    del model
    return folder


def after_first_step():
    """A callback noting the clock and token count when step 1 ends: the steady state leaves out set-up."""
    from transformers import TrainerCallback

    class AfterFirstStep(TrainerCallback):
        at, tokens = None, 0

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                self.at, self.tokens = time.perf_counter(), state.num_input_tokens_seen

    return AfterFirstStep()


def timed_train(trainer, collator: CountingCollator, checkpointing: bool, precision) -> dict:
    import dataclasses

    first = after_first_step()
    trainer.add_callback(first)
    with PeakRss() as rss:
        output = trainer.train()
        ended = time.perf_counter()
    runtime = output.metrics["train_runtime"]
    tokens = int(trainer.state.num_input_tokens_seen)
    from qlora_pipeline.modeling.quantization import logical_parameters

    return {
        "non_padding_tokens": tokens,
        "padded_tokens": collator.padded_tokens,
        "steps": trainer.state.global_step,
        "train_runtime": runtime,
        "non_padding_tokens_per_second": tokens / runtime,
        "padded_tokens_per_second": collator.padded_tokens / runtime,
        "seconds_per_step": runtime / trainer.state.global_step,
        "steady_tokens_per_second": (tokens - first.tokens) / (ended - first.at),
        "train_peak_rss_mb": rss.peak / 2**20,
        "process_peak_rss_mb": process_peak_rss_mb(),
        "parameters": logical_parameters(trainer.model),
        "activation_checkpointing": checkpointing,
        "precision": dataclasses.asdict(precision),
        "final_loss": trainer.state.log_history[-2].get("loss") if len(trainer.state.log_history) > 1 else None,
    }


def process_peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def worker(recipe: str, steps: int, params_path: Path) -> None:
    """One measurement in this process; prints one JSON line."""
    sys.path.insert(0, str(ROOT / "src"))
    import yaml

    from qlora_pipeline.config import load_params, params_from_dict

    name, _, overrides = recipe.partition(":")
    params = load_params(params_path)
    if name == "lora" or overrides:
        raw = params.model_dump()
        for item in filter(None, overrides.split(",")):
            key, _, value = item.partition("=")
            set_key(raw, key, yaml.safe_load(value))  # as `dvc exp run -S` reads it
        if name == "lora":
            set_key(raw, "train.method", "lora")
        params = params_from_dict(raw)
    runner = {"pipeline": run_pipeline, "lora": run_pipeline, "tutorial": run_tutorial}[name]
    with tempfile.TemporaryDirectory(prefix="train_bench.") as work:
        result = runner(params, steps, Path(work))
    print("RESULT " + json.dumps({"recipe": recipe, **result}))


def set_key(raw: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        raw = raw[part]
    raw[last] = value


# -------------------------------------------------------------------------------- parent


def measure(recipe: str, steps: int, params_path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, __file__, "--worker", recipe, "--steps", str(steps),
                           "--params", str(params_path)], capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{recipe} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def summarise(runs: list[dict], peak_flops: float) -> dict:
    first = runs[0]
    keys = ("non_padding_tokens_per_second", "steady_tokens_per_second", "padded_tokens_per_second",
            "seconds_per_step", "train_peak_rss_mb", "process_peak_rss_mb")
    out = {key: round(statistics.median(run[key] for run in runs), 2) for key in keys}
    factor = 6 if first["activation_checkpointing"] else 4
    out["mfu"] = round(factor * first["parameters"] * out["non_padding_tokens_per_second"] / peak_flops, 4)
    out["steady_mfu"] = round(factor * first["parameters"] * out["steady_tokens_per_second"] / peak_flops, 4)
    out.update({key: first[key] for key in ("steps", "non_padding_tokens", "padded_tokens", "parameters",
                                            "activation_checkpointing", "precision")})
    out["runs"] = [{key: round(run[key], 2) for key in keys} for run in runs]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=list(DEFAULT_RECIPES))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.steps, args.params)

    sys.path.insert(0, str(ROOT / "src"))
    from qlora_pipeline import hardware

    info = hardware.capability()
    print(f"machine: {hardware.capability_line(info)}", flush=True)
    runs: dict[str, list[dict]] = {recipe: [] for recipe in args.recipes}
    for repeat in range(args.repeats):  # interleaved, so a slow spell on the machine hits every recipe
        for recipe in args.recipes:
            run = measure(recipe, args.steps, args.params)
            runs[recipe].append(run)
            print(f"  [{repeat + 1}/{args.repeats}] {recipe:<40} {run['non_padding_tokens_per_second']:7.1f} tok/s "
                  f"(padded {run['padded_tokens_per_second']:7.1f}), {run['seconds_per_step']:.2f} s/step, "
                  f"peak {run['train_peak_rss_mb']:.0f} MB", flush=True)
    compute = runs[args.recipes[0]][0]["precision"]["compute_dtype"] or "float32"
    autocast = runs[args.recipes[0]][0]["precision"]["bf16"]
    peak_dtype = "bfloat16" if autocast else compute
    peak = matmul_peak_flops(peak_dtype)
    results = {recipe: summarise(recipe_runs, peak) for recipe, recipe_runs in runs.items()}
    report = {"machine": info, "machine_line": hardware.capability_line(info), "steps": args.steps,
              "repeats": args.repeats, "matmul_peak_gflops": round(peak / 1e9, 1), "matmul_peak_dtype": peak_dtype,
              "results": results, "ratios": ratios(results)}
    print_report(report)
    write_report(args.out, report)


def ratios(results: dict) -> dict:
    out = {}
    if "pipeline" in results and "tutorial" in results:
        p, t = results["pipeline"], results["tutorial"]
        out["pipeline_vs_tutorial_tokens_per_second"] = round(
            p["non_padding_tokens_per_second"] / t["non_padding_tokens_per_second"], 2)
        out["pipeline_vs_tutorial_peak_memory"] = round(p["train_peak_rss_mb"] / t["train_peak_rss_mb"], 2)
    if "pipeline" in results and "lora" in results:
        out["qlora_vs_lora_tokens_per_second"] = round(
            results["pipeline"]["non_padding_tokens_per_second"] / results["lora"]["non_padding_tokens_per_second"], 2)
    return out


def print_report(report: dict) -> None:
    print(f"\nmachine: {report['machine_line']}")
    print(f"matmul peak ({report['matmul_peak_dtype']}, 2048^3 GEMM): {report['matmul_peak_gflops']} GFLOP/s")
    print(f"{'recipe':<40}{'tok/s':>9}{'steady':>9}{'padded':>9}{'s/step':>8}{'peak MB':>9}{'MFU':>7}{'steady':>8}"
          f"  (median of {report['repeats']}, {report['steps']} steps)")
    for recipe, r in report["results"].items():
        print(f"{recipe:<40}{r['non_padding_tokens_per_second']:>9.1f}{r['steady_tokens_per_second']:>9.1f}"
              f"{r['padded_tokens_per_second']:>9.1f}{r['seconds_per_step']:>8.2f}{r['train_peak_rss_mb']:>9.0f}"
              f"{r['mfu']:>7.1%}{r['steady_mfu']:>8.1%}")
    for name, value in report["ratios"].items():
        print(f"{name}: {value}x")


if __name__ == "__main__":
    main()
