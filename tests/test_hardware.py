"""Every `auto` float type and memory trade-off, resolved per kind of machine (capability checks faked)."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from qlora_pipeline import hardware, training

# (CUDA compute capability or None, CPU oneDNN bf16, CPU AMX) -> the dtype auto must pick
MACHINES = {
    "H100 (Hopper)": ((9, 0), False, False, "bfloat16"),
    "A100 (Ampere)": ((8, 0), False, False, "bfloat16"),
    "T4 (Turing)": ((7, 5), False, False, "float16"),
    "V100 (Volta)": ((7, 0), False, False, "float16"),
    "CPU with AVX-512 BF16": (None, True, False, "bfloat16"),
    "CPU with AMX": (None, True, True, "bfloat16"),
    # AMX in the CPUID but oneDNN capped below bfloat16 (ONEDNN_MAX_CPU_ISA=AVX2): its matmuls would be plain loops
    "AMX, oneDNN capped at AVX2": (None, False, True, "float32"),
    "AVX2 laptop": (None, False, False, "float32"),
}


def fake_machine(monkeypatch, cuda, cpu_bf16, amx, free_bytes=24 * 2**30):
    monkeypatch.setattr(hardware, "cuda_capability", lambda: cuda)
    monkeypatch.setattr(hardware, "cpu_bf16_native", lambda: cpu_bf16)
    monkeypatch.setattr(hardware, "cpu_amx", lambda: amx)
    monkeypatch.setattr(hardware, "free_memory_bytes", lambda: free_bytes)


@pytest.mark.parametrize("machine", MACHINES)
def test_auto_dtype_follows_the_hardware(machine, monkeypatch):
    cuda, cpu_bf16, amx, expected = MACHINES[machine]
    fake_machine(monkeypatch, cuda, cpu_bf16, amx)
    assert hardware.native_dtype() == expected
    assert hardware.resolve_dtype("auto") == expected
    for explicit in ("float32", "bfloat16", "float16"):  # an explicit value always wins
        assert hardware.resolve_dtype(explicit) == explicit


@pytest.mark.parametrize("machine", MACHINES)
def test_auto_mixed_precision_follows_the_hardware(machine, monkeypatch):
    cuda, cpu_bf16, amx, expected = MACHINES[machine]
    fake_machine(monkeypatch, cuda, cpu_bf16, amx)
    bf16, fp16 = hardware.resolve_mixed_precision("auto", "auto")
    assert (bf16, fp16) == (expected == "bfloat16", expected == "float16")
    assert hardware.resolve_mixed_precision(False, False) == (False, False)
    assert hardware.resolve_mixed_precision(True, "auto") == (True, False)  # explicit wins, the other stays off
    assert hardware.resolve_mixed_precision("auto", True) == (False, True)


def test_bnb_config_resolves_the_compute_dtype_on_this_machine(monkeypatch, params_factory):
    import torch

    from qlora_pipeline.modeling.quantization import bnb_config

    params = params_factory()
    assert params.model.quantization.bnb_4bit_compute_dtype == "auto"  # the shipped default
    for cuda, cpu_bf16, expected in (((7, 5), False, torch.float16), (None, False, torch.float32),
                                     (None, True, torch.bfloat16)):
        fake_machine(monkeypatch, cuda, cpu_bf16, False)
        assert bnb_config(params.model.quantization).bnb_4bit_compute_dtype == expected
    explicit = params_factory({"model.quantization.bnb_4bit_compute_dtype": "bfloat16"})
    assert bnb_config(explicit.model.quantization).bnb_4bit_compute_dtype == torch.bfloat16


SMOL = SimpleNamespace(num_hidden_layers=30, hidden_size=576)  # SmolLM2-135M
LLAMA_7B = SimpleNamespace(num_hidden_layers=32, hidden_size=4096)


def test_activation_checkpointing_auto_decides_by_model_size_and_free_memory(monkeypatch):
    fake_machine(monkeypatch, None, False, False, free_bytes=20 * 2**30)  # a CPU with 20 GiB free
    assert hardware.resolve_activation_checkpointing("auto", SMOL, 8 * 256, "float32") is False
    fake_machine(monkeypatch, None, False, False, free_bytes=4 * 2**30)  # a small laptop: it would not fit well
    assert hardware.resolve_activation_checkpointing("auto", SMOL, 8 * 256, "float32") is True
    fake_machine(monkeypatch, (8, 6), False, False, free_bytes=22 * 2**30)  # a 24 GB GPU, Llama-2-7B, 4 x 1024 tokens
    assert hardware.resolve_activation_checkpointing("auto", LLAMA_7B, 4 * 1024, "bfloat16") is True
    fake_machine(monkeypatch, (9, 0), False, False, free_bytes=78 * 2**30)  # an H100 holds one 512-token sequence
    assert hardware.resolve_activation_checkpointing("auto", LLAMA_7B, 512, "bfloat16") is False
    assert hardware.resolve_activation_checkpointing(False, LLAMA_7B, 4 * 1024, "bfloat16") is False
    assert hardware.resolve_activation_checkpointing(True, SMOL, 8, "float32") is True
    # The estimate itself: 30 layers x 576 hidden x 2048 tokens x 34 bytes (16-bit) = 1.2 GB; float32 doubles it.
    assert hardware.activation_bytes(30, 576, 2048, 2) == 30 * 576 * 2048 * 34
    assert hardware.activation_bytes(30, 576, 2048, 4) == 2 * 30 * 576 * 2048 * 34


@pytest.mark.parametrize("machine", ["T4 (Turing)", "CPU with AVX-512 BF16", "AVX2 laptop"])
def test_training_precision_resolves_every_auto(machine, monkeypatch, params_factory):
    cuda, cpu_bf16, amx, expected = MACHINES[machine]
    fake_machine(monkeypatch, cuda, cpu_bf16, amx)
    precision = training.resolve_precision(params_factory(), SMOL)
    assert precision.compute_dtype == expected and precision.model_dtype == expected
    assert precision.activation_checkpointing is False  # 24 GiB free: a 135M model's activations fit
    assert precision.fp16 is (expected == "float16") and precision.bf16 is (expected == "bfloat16")
    full = training.resolve_precision(params_factory({"train.method": "full"}), SMOL)
    assert full.model_dtype == "float32" and full.compute_dtype is None  # AdamW needs float32 master weights
    pinned = training.resolve_precision(params_factory({"model.dtype": "float32", "train.bf16": False,
                                                        "train.activation_checkpointing": True}), SMOL)
    assert pinned.model_dtype == "float32" and pinned.bf16 is False and pinned.activation_checkpointing is True


def test_capability_line_names_what_runs_are_told_apart_by():
    info = hardware.capability()
    assert set(info) >= {"cpu_model", "cpu_capability", "cpu_bf16_native", "cpu_amx", "cores", "native_dtype", "gpu"}
    assert info["cores"] >= 1 and info["native_dtype"] in ("float32", "bfloat16", "float16")
    line = hardware.capability_line(info)
    assert info["cpu_model"] in line and info["cpu_capability"] in line and f"auto dtype {info['native_dtype']}" in line


def _cpu_flags() -> set[str] | None:
    info = Path("/proc/cpuinfo")
    found = re.search(r"^flags\s*:(.*)$", info.read_text(), re.M) if info.is_file() else None
    return set(found.group(1).split()) if found else None


@pytest.mark.skipif(_cpu_flags() is None, reason="reads the flags line of Linux's /proc/cpuinfo (x86)")
def test_the_amx_check_agrees_with_the_cpu_flags():
    """AMX tiles as the kernel lists them; the check once looked where torch 2.13 has nothing and read False."""
    assert hardware.cpu_amx() == ("amx_tile" in _cpu_flags())


def test_the_amx_check_reads_torchs_answer(monkeypatch):
    """On any machine: whatever torch.cpu says is what the check says (it once never asked torch.cpu)."""
    import torch

    for answer in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda answer=answer: answer)
        assert hardware.cpu_amx() is answer


def test_both_mixed_precisions_at_once_are_refused(params_factory):
    from qlora_pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="train.bf16 and train.fp16: both true"):
        params_factory({"train.bf16": True, "train.fp16": True})
    with pytest.raises(ConfigError, match="model.dtype: must be one of 'auto'"):
        params_factory({"model.dtype": "bf16"})
    with pytest.raises(ConfigError, match=r"train.activation_checkpointing: expected bool or 'auto', got 'sometimes'"):
        params_factory({"train.activation_checkpointing": "sometimes"})


@pytest.mark.slow
def test_resolved_dtypes_and_the_machine_reach_metrics_and_mlflow(tiny_llama, params_factory, tmp_path, monkeypatch):
    import json

    import mlflow

    from qlora_pipeline.pipeline.quantize_load import run_quantize_load
    from qlora_pipeline.pipeline.train_adapter import run_train_adapter
    from tests.test_training import synthetic_splits

    monkeypatch.setenv("QLORA_PIPELINE_RUN_KEY", "resolved-dtypes")
    params = params_factory({"model.name_or_path": str(tiny_llama), "model.gguf_file": None,
                             "model.smoke_max_new_tokens": 2, "model.smoke_prompts": ["hi"],
                             "train.max_steps": 2, "train.eval_steps": 2, "train.save_steps": 2,
                             "train.per_device_train_batch_size": 4})
    assert params.model.dtype == "auto" and params.train.bf16 == "auto"
    native = hardware.native_dtype()
    base = run_quantize_load(params, tmp_path / "base", tmp_path / "base.json")
    train = run_train_adapter(params, tmp_path / "base", synthetic_splits(tmp_path / "splits"), tmp_path / "adapter",
                              tmp_path / "ckpt", tmp_path / "train.json", tmp_path / "log.csv")
    for written in (json.loads((tmp_path / "base.json").read_text()), base):
        assert written["dtype"] == native and written["bnb_4bit_compute_dtype"] == native
        assert written["hardware"] == hardware.capability()
    written = json.loads((tmp_path / "train.json").read_text())
    assert written["precision"] == {"model_dtype": native, "compute_dtype": native, "bf16": native == "bfloat16",
                                    "fp16": native == "float16", "activation_checkpointing": False}
    assert written["hardware"]["cpu_capability"] == train["hardware"]["cpu_capability"]

    mlflow.set_tracking_uri(params.mlflow.tracking_uri)
    run = mlflow.search_runs(experiment_names=[params.mlflow.experiment_name], output_format="list")[0]
    tags, metrics = run.data.tags, run.data.metrics
    assert tags["base.dtype"] == native and tags["train.precision.compute_dtype"] == native
    assert tags["train.hardware.cpu_capability"] == hardware.capability()["cpu_capability"]
    assert tags["base.hardware.cpu_model"] == hardware.cpu_model()
    assert metrics["train.hardware.cores"] == hardware.usable_cores()
    assert run.data.params["model.dtype"] == "auto"  # the params as written, beside what they resolved to
