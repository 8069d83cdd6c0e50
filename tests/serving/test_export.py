"""export: a qlora adapter merged into the dequantized base, saved plain, loaded without peft or bitsandbytes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import default_params_file
from qlora_pipeline import cli
from qlora_pipeline.serving import export

pytestmark = pytest.mark.slow

ROWS = [
    {"id": "t1", "messages": [{"role": "user", "content": "hey, how was your weekend?"}],
     "target": "pretty good, we went hiking and I slept a lot"},
    {"id": "t2", "messages": [{"role": "user", "content": "do you like dogs or cats more?"},
                              {"role": "assistant", "content": "dogs, always"},
                              {"role": "user", "content": "why?"}],
     "target": "they are happy to see you every single time"},
    {"id": "t3", "messages": [{"role": "user", "content": "what are you cooking tonight?"}],
     "target": "just pasta, nothing fancy"},
]

# Loads the export with neither peft nor bitsandbytes importable; writes its logits at the given positions.
PLAIN_LOAD = """
import json, sys
sys.modules["peft"] = None
sys.modules["bitsandbytes"] = None
import torch
from transformers import AutoModelForCausalLM

folder, cases, out = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(folder).eval()
logits = []
with torch.no_grad():
    for case in json.loads(open(cases).read()):
        full = model(input_ids=torch.tensor([case["input_ids"]])).logits[0]
        logits.append(full[case["positions"]].float())
for name in ("peft", "bitsandbytes"):
    try:
        __import__(name)
        raise SystemExit(name + " was importable")
    except ImportError:
        pass
torch.save({"logits": logits, "dtype": str(model.dtype)}, out)
"""


def _export(adapter: Path, out: Path, base: Path, split: Path, dtype: str, *extra: str) -> int:
    return cli.main(["export", "--adapter", str(adapter), "--out", str(out), "--dtype", dtype, "--base", str(base),
                     "--test", str(split), "--params", str(default_params_file(split.parent)), *extra])


def _report(folder: Path) -> dict:
    return json.loads((folder / export.REPORT).read_text())


def _no_leftovers(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), "a temporary folder was left behind"


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("split") / "test.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def adapters(trained_size_adapters) -> dict[str, Path]:
    return trained_size_adapters


@pytest.fixture(scope="module")
def float32_export(tmp_path_factory, quantized_base, adapters, split) -> Path:
    out = tmp_path_factory.mktemp("exports") / "alice-f32"
    assert _export(adapters["alice"], out, quantized_base, split, "float32") == 0
    return out


def test_float32_export_is_a_plain_hugging_face_folder(float32_export, quantized_base, adapters):
    from transformers import AutoTokenizer

    names = {p.name for p in float32_export.iterdir()}
    assert "model.safetensors" in names and "README.md" in names and export.REPORT in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    assert "adapter_config.json" not in names
    config = json.loads((float32_export / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == "float32" and config["tie_word_embeddings"] is True  # the head stays shared
    tokenizer = AutoTokenizer.from_pretrained(float32_export)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    generation = json.loads((float32_export / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id
    assert generation["pad_token_id"] == tokenizer.pad_token_id != tokenizer.eos_token_id
    card = (float32_export / "README.md").read_text()
    assert str(adapters["alice"]) in card and str(quantized_base) in card and "float32" in card
    report = _report(float32_export)
    assert report["passed"] and report["samples"] == len(ROWS) and report["dtype"] == "float32"
    assert report["tolerance"]["precision"] == "float32"  # the fixtures compute in float32, no autocast


def test_export_loads_without_peft_or_bitsandbytes_and_matches_the_reference(
        float32_export, quantized_base, adapters, tmp_path):
    from qlora_pipeline.data.formatting import encode_example
    from qlora_pipeline.modeling.adapters import (attach_adapters, autocast_like_training, load_base_for,
                                                  read_training_config)
    from qlora_pipeline.labels import IGNORE_INDEX

    resolved = read_training_config(adapters["alice"])
    base, tokenizer = load_base_for(resolved, quantized_base)
    reference_model = attach_adapters(base, {"alice": adapters["alice"]})
    cases, reference = [], []
    for row in ROWS:
        encoded = encode_example(tokenizer, row["messages"], row["target"], 256)
        positions = [t for t, label in enumerate(encoded.labels[1:]) if label != IGNORE_INDEX]
        with torch.no_grad(), autocast_like_training(resolved):
            logits = reference_model(input_ids=torch.tensor([encoded.input_ids])).logits[0]
        reference.append(logits[positions].float())
        cases.append({"input_ids": encoded.input_ids, "positions": positions})
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    (tmp_path / "load.py").write_text(PLAIN_LOAD)
    proc = subprocess.run([sys.executable, str(tmp_path / "load.py"), str(float32_export), str(tmp_path / "cases.json"),
                           str(tmp_path / "logits.pt")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = torch.load(tmp_path / "logits.pt")
    assert plain["dtype"] == "torch.float32"
    worst = max(float((a - b).abs().max()) for a, b in zip(plain["logits"], reference))
    assert worst <= _report(float32_export)["tolerance"]["max_abs_logit_diff"]


def test_the_merge_into_dequantized_weights_beats_the_naive_4bit_merge(float32_export):
    report = _report(float32_export)
    merged, naive = report["merged"], report["naive_4bit_merge"]
    assert merged["max_abs_logit_diff"] < naive["max_abs_logit_diff"]
    assert merged["mean_kl"] < naive["mean_kl"]
    reference = report["reference"]["perplexity"]
    assert abs(merged["perplexity"] - reference) < abs(naive["perplexity"] - reference)


def test_bfloat16_export_passes_its_own_tolerance(tmp_path, quantized_base, adapters, split, float32_export):
    out = tmp_path / "bob-bf16"
    assert _export(adapters["bob"], out, quantized_base, split, "bfloat16", "--max-samples", "2") == 0
    report = _report(out)
    assert report["passed"] and report["samples"] == 2
    assert report["tolerance"]["precision"] == "bfloat16"
    assert report["merged"]["max_abs_logit_diff"] <= report["tolerance"]["max_abs_logit_diff"]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    half = (out / "model.safetensors").stat().st_size / (float32_export / "model.safetensors").stat().st_size
    assert 0.45 < half < 0.55


def test_a_model_outside_the_tolerance_is_not_kept(tmp_path, quantized_base, persona_adapters, split, capsys):
    # The session's oversized random adapter: bfloat16 cannot hold the model it makes (see `adapters`).
    out = tmp_path / "carol-bf16"
    assert _export(persona_adapters["carol"], out, quantized_base, split, "bfloat16", "--max-samples", "1") == 1
    assert "outside the bfloat16 tolerance" in capsys.readouterr().err
    assert {p.name for p in out.iterdir()} == {export.REPORT}  # the numbers, and no model to load by mistake
    report = _report(out)
    assert report["passed"] is False and report["merged"]["mean_kl"] > report["tolerance"]["mean_kl"]


@pytest.mark.parametrize("case", ["existing_out", "other_base", "lora_method", "full_model", "missing_test"])
def test_refusals_name_the_problem_and_write_nothing(case, tmp_path, quantized_base, persona_adapters, split,
                                                     float32_export, capsys):
    from qlora_pipeline.layout import RESOLVED_CONFIG

    adapter, out, test_file = persona_adapters["alice"], tmp_path / "out", split
    if case == "existing_out":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case in ("other_base", "lora_method"):
        adapter = tmp_path / "other"
        shutil.copytree(persona_adapters["alice"], adapter)
        resolved = json.loads((adapter / RESOLVED_CONFIG).read_text())
        if case == "other_base":
            resolved["base_fingerprint"] = "sha256:" + "0" * 64
        else:
            resolved["method"] = "lora"
        (adapter / RESOLVED_CONFIG).write_text(json.dumps(resolved))
    elif case == "full_model":
        adapter = float32_export  # a merged export is a plain model: nothing left to merge
    else:
        test_file = tmp_path / "absent.jsonl"
    assert _export(adapter, out, quantized_base, test_file, "float32") == 1
    message = capsys.readouterr().err
    expected = {"existing_out": "already exists; remove it or choose another",
                "other_base": "was trained on base sha256:0000",
                "lora_method": "trained with method lora on the unquantized source",
                "full_model": "already a plain model",
                "missing_test": "--test"}[case]
    assert expected in message
    if case == "existing_out":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        _no_leftovers(out)
