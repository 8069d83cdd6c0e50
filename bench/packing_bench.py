"""Packing against length grouping: the same training examples, one epoch, the train-adapter stage's own path.

Two modes, each in its own process, one after the other, on the same examples (the default run's
``train.max_steps x per_device_train_batch_size`` examples of the train split), the same validation
examples and the same seed:
- ``grouped``: params.yaml as it is (``train.packing: false``): batches of similar lengths
  (``group_by_length``), each padded to its own longest example.
- ``packed``: ``train.packing: true``: examples packed whole into rows of ``train.max_length``
  (TRL's best-fit-decreasing), positions restarting per example, attention kept inside it.

A packed batch holds more examples, so an epoch takes fewer steps. Reported per mode: steps,
non-padding tokens/s over the training steps alone (validation excluded), the padding share of the
tokens the batches carried, and the validation-loss curve (step, non-padding tokens seen, loss),
validation every ``--eval-every`` steps and before the first. Ratios packed / grouped are printed.

Run after `dvc repro split quantize-load`, on an idle machine:
    .venv/bin/python bench/packing_bench.py --out bench/results/<machine>/packing.json
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import write_report

ROOT = Path(__file__).resolve().parents[1]
MODES = ("grouped", "packed")


def worker(mode: str, eval_every: int) -> None:
    """One mode in this process; prints one JSON line."""
    sys.path.insert(0, str(ROOT / "src"))
    from collections import Counter

    from transformers import TrainerCallback, set_seed

    from qlora_pipeline import training
    from qlora_pipeline.config import load_params, params_from_dict
    from qlora_pipeline.data.sampling import cap_examples
    from qlora_pipeline.io import read_jsonl

    params = load_params(ROOT / "params.yaml")
    cfg = params.train
    count = cfg.max_steps * cfg.per_device_train_batch_size
    rows = cap_examples([row for _, row in read_jsonl(ROOT / "data/splits/train.jsonl")], count, params.seed)
    val_rows = cap_examples([row for _, row in read_jsonl(ROOT / "data/splits/val.jsonl")], cfg.max_eval_samples,
                            params.seed)
    set_seed(params.seed)
    base_dir = ROOT / "models/base"
    precision = training.precision_for(params, base_dir)
    with tempfile.TemporaryDirectory(prefix="packing_bench.") as work:
        model, tokenizer = training.prepare_model(params, base_dir, Path(work) / "dense", precision)
        train_ds = training.build_dataset(rows, tokenizer, cfg.max_length, Counter())
        val_ds = training.by_length(training.build_dataset(val_rows, tokenizer, cfg.max_length, Counter()))
        rows_per_epoch = len(training.pack(train_ds, cfg.max_length)) if mode == "packed" else len(train_ds)
        steps = math.ceil(rows_per_epoch / cfg.per_device_train_batch_size)
        raw = params.model_dump()
        raw["train"].update(packing=mode == "packed", max_steps=steps, eval_steps=eval_every, save_steps=eval_every,
                            early_stopping_patience=None)
        params = params_from_dict(raw)

        class StepClock(TrainerCallback):
            """Seconds inside training steps only, and the tokens each batch carried (padding included)."""

            seconds, carried, started = 0.0, 0, None

            def on_step_begin(self, args, state, control, **kwargs):
                self.started = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                self.seconds += time.perf_counter() - self.started

        clock, made = StepClock(), {}
        stage_trainer_class = training.target_token_trainer_class

        def clocked_trainer_class():
            """The stage's trainer, counting what each batch carries and timing the steps."""

            class Clocked(stage_trainer_class()):
                def __init__(self, *args, **kwargs):
                    super().__init__(*args, **kwargs)
                    self.add_callback(clock)
                    made["trainer"] = self

                def training_step(self, model, inputs, num_items_in_batch=None):
                    clock.carried += inputs["input_ids"].numel()
                    return super().training_step(model, inputs, num_items_in_batch)

            return Clocked

        training.target_token_trainer_class = clocked_trainer_class  # train_model looks it up when called
        training.train_model(params, model, tokenizer, train_ds, val_ds, Path(work) / "ckpt", None, precision)
        trainer = made["trainer"]
        tokens = int(trainer.state.num_input_tokens_seen)
        seen_at = {0: 0}
        curve = []
        for entry in trainer.state.log_history:
            if "num_input_tokens_seen" in entry:
                seen_at[entry["step"]] = int(entry["num_input_tokens_seen"])
            if "eval_loss" in entry:
                curve.append({"step": entry["step"], "tokens_seen": seen_at.get(entry["step"]),
                              "val_loss": round(entry["eval_loss"], 4)})
    print("RESULT " + json.dumps({
        "mode": mode, "examples": len(rows), "rows_per_epoch": rows_per_epoch, "steps": trainer.state.global_step,
        "non_padding_tokens": tokens, "carried_tokens": clock.carried,
        "padding_share": round(1 - tokens / clock.carried, 4) if clock.carried else None,
        "training_seconds": round(clock.seconds, 2), "non_padding_tokens_per_second": round(tokens / clock.seconds, 1),
        "val_loss": curve}))


def measure(mode: str, eval_every: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", mode, "--eval-every", str(eval_every)],
                          capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", choices=MODES, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.eval_every)
        return
    sys.path.insert(0, str(ROOT / "src"))
    from qlora_pipeline import hardware

    results = {mode: measure(mode, args.eval_every) for mode in MODES}
    grouped, packed = results["grouped"], results["packed"]
    report = {"machine": hardware.capability_line(), "results": results,
              "packed_vs_grouped_tokens_per_second": round(packed["non_padding_tokens_per_second"]
                                                           / grouped["non_padding_tokens_per_second"], 2),
              "packed_vs_grouped_training_seconds": round(packed["training_seconds"] / grouped["training_seconds"], 2)}
    for mode, result in results.items():
        curve = ", ".join(f"{point['step']}: {point['val_loss']}" for point in result["val_loss"])
        print(f"{mode}: {result['steps']} steps, {result['non_padding_tokens_per_second']} tok/s, padding "
              f"{result['padding_share']:.1%}, {result['training_seconds']} s of steps; val loss by step {curve}")
    print(f"packed / grouped: tokens/s {report['packed_vs_grouped_tokens_per_second']}x, "
          f"training time {report['packed_vs_grouped_training_seconds']}x")
    write_report(args.out, report)


if __name__ == "__main__":
    main()
