"""train-adapter on 2 CPU processes (accelerate launch, DDP over gloo) against 1 process, same global batch.

The base is a tiny random Llama quantized to NF4 by the real quantize-load stage; both runs train
the same LoRA adapter from the same seed on the same splits, float32 throughout, so the only
difference is how each batch is spread over processes and how the gradients are summed.
"""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import BIN, CHAT_FIELDS, chat_rows, copy_repository, pipeline_env, sh

pytestmark = pytest.mark.slow

# Measured on the AVX-512 BF16 machine: the largest difference between the two loss curves was
# below 1e-6 (float32 sums in another order). The tolerance leaves room for other CPUs' kernels,
# and is still ~1000x smaller than one step's change in loss.
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_llama) -> Path:
    overrides = {"data.source": "jsonl", "data.path": "chat.jsonl", **CHAT_FIELDS,
                 "model.name_or_path": str(tiny_llama), "model.gguf_file": None, "model.dtype": "float32",
                 "model.quantization.bnb_4bit_compute_dtype": "float32",
                 "model.smoke_prompts": ["hi"], "model.smoke_max_new_tokens": 2,
                 "train.max_steps": 6, "train.eval_steps": 3, "train.save_steps": 3, "train.logging_steps": 1,
                 "train.warmup_steps": 1, "train.learning_rate": 0.002, "train.early_stopping_patience": None,
                 "train.bf16": False, "train.fp16": False, "train.per_device_train_batch_size": 8,
                 "train.train_sampling_strategy": "random",
                 # The validation loss is a mean of per-batch means: one example per batch makes the
                 # batches the same however the examples are spread over processes.
                 "train.per_device_eval_batch_size": 1}
    chat = "".join(json.dumps(r) + "\n" for r in chat_rows())
    repo = copy_repository(tmp_path_factory.mktemp("ddp") / "repo", overrides, {"chat.jsonl": chat})
    sh(["dvc", "repro", "split", "quantize-load"], repo)
    return repo


def train(repo: Path, name: str, **train_keys) -> Path:
    """The train-adapter stage script, as dvc.yaml runs it, with ``train`` keys changed; its output folder."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"].update(train_keys)
    out = repo / "runs" / name
    out.mkdir(parents=True)
    (out / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    command = [str(BIN / "python"), "stages/train_adapter.py", "--params", str(out / "params.yaml"),
               "--base", "models/base", "--splits", "data/splits", "--out", str(out / "adapter"),
               "--checkpoints", str(out / "checkpoints"), "--metrics", str(out / "train.json"),
               "--log", str(out / "train_log.csv"), "--accelerate-configs", "configs/accelerate"]
    env = {**pipeline_env(), "QLORA_PIPELINE_RUN_KEY": f"ddp-{name}"}
    proc = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (out / "stdout.txt").write_text(proc.stdout + proc.stderr)
    return out


def curve(run: Path, column: str) -> dict[int, float]:
    with (run / "train_log.csv").open() as handle:
        return {int(row["step"]): float(row[column]) for row in csv.DictReader(handle) if row[column]}


def test_two_processes_with_half_the_batch_follow_one_process_with_the_whole(repo):
    single = train(repo, "one", per_device_train_batch_size=8)
    double = train(repo, "two", per_device_train_batch_size=4, launcher="accelerate", num_processes=2)

    assert "2 processes under accelerate launch" in (double / "stdout.txt").read_text()
    one, two = json.loads((single / "train.json").read_text()), json.loads((double / "train.json").read_text())
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["steps"] == two["steps"] == 6
    # Every example of a step is seen once either way: same tokens trained.
    assert one["tokens_seen"] == two["tokens_seen"]

    train_one, train_two = curve(single, "train_loss"), curve(double, "train_loss")
    val_one, val_two = curve(single, "val_loss"), curve(double, "val_loss")
    assert sorted(train_one) == sorted(train_two) == [1, 2, 3, 4, 5, 6]
    assert sorted(val_one) == sorted(val_two) == [0, 3, 6]
    differences = [abs(train_one[s] - train_two[s]) for s in train_one] + [abs(val_one[s] - val_two[s]) for s in val_one]
    print(f"largest loss difference, 1 vs 2 processes: {max(differences):.2e}")
    assert max(differences) < TOLERANCE
    # The curves moved: equal because training matched, not because nothing trained.
    assert abs(train_one[6] - train_one[1]) > 100 * TOLERANCE
    assert one["best_val_loss"] == pytest.approx(two["best_val_loss"], abs=TOLERANCE)

    # Only the first process wrote: one adapter, one set of checkpoints, loaded as usual.
    for run in (single, double):
        assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert_adapter_loads(repo, double / "adapter")


def assert_adapter_loads(repo: Path, adapter: Path) -> None:
    from peft import PeftModel

    from qlora_pipeline.modeling.loading import load_saved_base

    config = json.loads((adapter / "training_config.json").read_text())
    assert config["train"]["launcher"] == "accelerate" and config["train"]["num_processes"] == 2
    model, _ = load_saved_base(repo / "models/base", "float32")
    tuned = PeftModel.from_pretrained(model, adapter)
    assert any("lora_A" in name for name, _ in tuned.named_parameters())


def test_a_cpu_run_refuses_a_gpu_only_config_before_launching(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"].update(launcher="accelerate", num_processes=2, accelerate_config="fsdp_qlora")
    (repo / "bad.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = subprocess.run([str(BIN / "python"), "stages/train_adapter.py", "--params", "bad.yaml", "--base",
                           "models/base", "--splits", "data/splits", "--out", "bad-out", "--checkpoints", "bad-ck",
                           "--metrics", "bad.json", "--log", "bad.csv", "--accelerate-configs", "configs/accelerate"],
                          cwd=repo, env=pipeline_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "bnb_4bit_quant_storage: bfloat16" in proc.stderr and "fsdp_qlora.yaml" in proc.stderr
    assert not (repo / "bad-out").exists()
