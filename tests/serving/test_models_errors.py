"""A damaged adapter folder, or an --out that cannot be made, is refused by name before any model loads.

Each test copies one of the session's persona adapters into tmp_path and damages it there; where the
refusal must come before the base loads, loading the base fails the test instead.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import default_params_file
from qlora_pipeline import cli
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.layout import RESOLVED_CONFIG
from qlora_pipeline.serving.models import AdapterSpec, load_persona_model

ROW = {"messages": [{"role": "user", "content": "hey, how was your weekend?"}], "target": "pretty good"}


@pytest.fixture
def adapter(tmp_path, persona_adapters) -> Path:
    """A copy of the persona adapter alice, to damage."""
    folder = tmp_path / "p"
    shutil.copytree(persona_adapters["alice"], folder)
    return folder


@pytest.fixture
def no_base_load(monkeypatch):
    """Loading any saved base fails the test: the refusal must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a base model was loaded before the adapter was checked")

    monkeypatch.setattr("qlora_pipeline.modeling.loading.load_saved_base", refuse)


def _edit_training_config(folder: Path, edit) -> None:
    path = folder / RESOLVED_CONFIG
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def _load(quantized_base: Path, folder: Path):
    return load_persona_model(quantized_base, [AdapterSpec("p", str(folder))], dequantize=False)


@pytest.mark.parametrize("edit, says", [
    (lambda resolved: [], r"expected a JSON object, as train-adapter writes it, not a list"),
    (lambda resolved: {k: v for k, v in resolved.items() if k != "method"},
     r"key 'method' is None, not one of qlora, lora, full"),
    (lambda resolved: {**resolved, "method": "sft"}, r"key 'method' is 'sft', not one of qlora, lora, full"),
    (lambda resolved: {**resolved, "model": None}, r"key 'model' must be an object \(the params' model section\), "
                                                   r"not null"),
    (lambda resolved: {**resolved, "model": {**resolved["model"], "quantization": []}},
     r"key 'model.quantization' must be an object or absent, not \[\]"),
    (lambda resolved: {**resolved, "base_fingerprint": 5}, r"key 'base_fingerprint' must be a string or null, not 5"),
    (lambda resolved: {**resolved, "split": ["x"]}, r"key 'split' must be an object or null, not \[\"x\"\]"),
    (lambda resolved: {**resolved, "method": "lora", "model": {}},
     r"key 'model.name_or_path' must be a string \(the source a lora adapter was trained on"),
])
def test_a_damaged_training_config_is_named_with_its_key_before_the_base_loads(edit, says, adapter, quantized_base,
                                                                                no_base_load):
    _edit_training_config(adapter, edit)
    with pytest.raises(PipelineError, match=rf"^adapter 'p' \({adapter}\): {adapter / RESOLVED_CONFIG}: {says}.*"
                                            r"retrain it \(dvc repro train-adapter\)"):
        _load(quantized_base, adapter)


def test_a_training_config_that_is_no_json_names_its_line(adapter, quantized_base, no_base_load):
    (adapter / RESOLVED_CONFIG).write_text('{\n  "method": "qlora",\n  "model": {\n')
    with pytest.raises(PipelineError, match=rf"adapter 'p' \({adapter}\): {adapter / RESOLVED_CONFIG}: not valid JSON "
                                            r"\(.*line 4 .*\); copy the adapter folder again, or retrain it"):
        _load(quantized_base, adapter)


@pytest.mark.parametrize("text, says", [
    ('{"r": 8, "target_modules": ["q_proj"', r"adapter_config.json: not valid JSON \(.*line 1 column \d+"),
    ("[8]", r"adapter_config.json holds a list, not the JSON object PEFT writes"),
])
def test_a_damaged_adapter_config_is_refused_before_the_base_loads(text, says, adapter, quantized_base, no_base_load):
    (adapter / "adapter_config.json").write_text(text)
    with pytest.raises(PipelineError, match=rf"adapter 'p' \({adapter}\): .*{says}.*copy the adapter folder again"):
        _load(quantized_base, adapter)


def test_cut_short_adapter_weights_are_refused_before_the_base_loads(adapter, quantized_base, no_base_load):
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(PipelineError, match=rf"adapter 'p' \({adapter}\): {weights} is not a complete safetensors "
                                            r"file \(.*\); it was cut short or damaged: copy the adapter folder again"):
        _load(quantized_base, adapter)


def test_missing_adapter_weights_are_refused_before_the_base_loads(adapter, quantized_base, no_base_load):
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(PipelineError, match=rf"adapter 'p' \({adapter}\): no adapter_model.safetensors in {adapter}"):
        _load(quantized_base, adapter)


def test_the_chat_command_says_what_is_wrong_and_exits_non_zero(adapter, quantized_base, no_base_load, capsys,
                                                                 tmp_path):
    _edit_training_config(adapter, lambda resolved: {**resolved, "base_fingerprint": 5})
    code = cli.main(["chat", "--adapter", f"p={adapter}", "--base", str(quantized_base),
                     "--params", str(default_params_file(tmp_path))])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: adapter 'p'") and "key 'base_fingerprint' must be a string or null" in err
    assert "Traceback" not in err


# ------------------------------------------------------------------ errors PEFT raises while attaching


@pytest.fixture
def tiny_base(tiny_llama):
    """A plain tiny Llama: attach_adapters' errors come from the adapter's files, before any shape matters."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama)


def test_target_modules_the_base_lacks_name_the_adapter_and_its_config(adapter, tiny_base):
    from peft.utils.error import NoMatchingPeftModuleError

    from qlora_pipeline.modeling.adapters import attach_adapters

    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["no_such_proj"]}))
    with pytest.raises(PipelineError, match=rf"adapter 'p' \({adapter}\): the target_modules of its "
                                            r"adapter_config.json name no layer of the loaded base .*load it with that "
                                            r"base, or retrain it on this one") as caught:
        attach_adapters(tiny_base, {"p": adapter})
    assert isinstance(caught.value.__cause__, NoMatchingPeftModuleError)


def test_cut_short_weights_met_while_attaching_name_the_file(adapter, tiny_base):
    from safetensors import SafetensorError

    from qlora_pipeline.modeling.adapters import attach_adapters

    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(PipelineError, match=rf"adapter 'p' \({adapter}\): adapter_model.safetensors could not be "
                                            r"read \(.*\); it is cut short or damaged") as caught:
        attach_adapters(tiny_base, {"p": adapter})
    assert isinstance(caught.value.__cause__, SafetensorError)


def test_a_bug_while_attaching_keeps_its_traceback(adapter, tiny_base, monkeypatch):
    """Only what bad input raises becomes a PipelineError: anything else is a bug to see whole."""
    from peft import PeftModel

    from qlora_pipeline.modeling.adapters import attach_adapters

    def broken(*args, **kwargs):
        raise TypeError("a bug")

    monkeypatch.setattr(PeftModel, "from_pretrained", broken)
    with pytest.raises(TypeError, match="a bug"):
        attach_adapters(tiny_base, {"p": adapter})


def test_an_adapter_that_fails_to_load_at_run_time_leaves_the_others_as_they_were(adapter, quantized_base,
                                                                                    persona_adapters):
    """serve's POST /adapters: a refused adapter leaves no half of itself in the model the server goes on with."""
    persona = load_persona_model(quantized_base, [AdapterSpec("alice", str(persona_adapters["alice"]))],
                                 dequantize=False)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["no_such_proj"]}))
    with pytest.raises(PipelineError, match=rf"adapter 'p' \({adapter}\): the target_modules of its adapter_config.json"):
        persona.load_adapter(AdapterSpec("p", str(adapter)))
    assert list(persona.model.peft_config) == ["alice"] and persona.names == ["base", "alice"]
    persona.load_adapter(AdapterSpec("bob", str(persona_adapters["bob"])))  # the model still takes adapters
    assert persona.names == ["base", "alice", "bob"]
    # weights that do not fit the config: PEFT had added the layers before it read them, and left them behind,
    # so the name could never be loaded again (and memory grew with each try)
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": config["r"] // 2}))
    with pytest.raises(PipelineError, match=r"adapter_model.safetensors does not fit its adapter_config.json \(size"):
        persona.load_adapter(AdapterSpec("p", str(adapter)))
    assert list(persona.model.peft_config) == ["alice", "bob"] and persona.names == ["base", "alice", "bob"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    persona.load_adapter(AdapterSpec("p", str(adapter)))
    assert persona.names == ["base", "alice", "bob", "p"]


# ------------------------------------------------------------------ export


@pytest.fixture
def no_export_load(monkeypatch):
    from qlora_pipeline.serving import export

    def refuse(*args, **kwargs):
        raise AssertionError("export loaded a model before its input was checked")

    monkeypatch.setattr(export, "load_base_for", refuse)


def _export(adapter: Path, out: Path, base: Path, tmp_path: Path, rows: tuple[dict, ...] = (ROW,)) -> int:
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return cli.main(["export", "--adapter", str(adapter), "--out", str(out), "--base", str(base), "--test", str(test),
                     "--params", str(default_params_file(tmp_path))])


def test_export_to_an_out_inside_a_file_fails_before_the_merge(persona_adapters, quantized_base, tmp_path,
                                                                no_export_load, capsys):
    """`--out /dev/null/x`: the folder --out goes in is a file, so nothing could be saved after the merge."""
    (tmp_path / "a-file").write_text("mine")
    out = tmp_path / "a-file" / "merged"
    assert _export(persona_adapters["alice"], out, quantized_base, tmp_path) == 1
    err = capsys.readouterr().err
    assert f"error: --out {out}: {tmp_path / 'a-file'} is a file, not a folder" in err
    assert "choose an --out in a folder" in err and "Traceback" not in err
    assert (tmp_path / "a-file").read_text() == "mine"


@pytest.mark.parametrize("row, says", [
    ({"messages": [{"role": "user", "content": 123}], "target": "yo"},
     "messages[0] needs a 'role' (system, user, assistant) and a text 'content', not "
     '{"role": "user", "content": 123}'),
    ({"messages": [{"role": "robot"}], "target": "yo"}, 'messages[0] needs a \'role\''),
    ({"messages": [ROW["messages"][0], "hi"], "target": "yo"}, 'messages[1] needs a \'role\''),
    ({"messages": [], "target": ""}, "'messages' is empty"),  # was blamed on the model's chat template
    ({"messages": ROW["messages"]}, "a test row needs 'messages'"),
])
def test_a_malformed_test_row_is_named_by_its_line_before_the_base_loads(persona_adapters, quantized_base, tmp_path,
                                                                        no_export_load, capsys, row, says):
    """A TypeError or jinja2's UndefinedError from the chat template, after the base had loaded, where a row was bad."""
    out = tmp_path / "merged"
    assert _export(persona_adapters["alice"], out, quantized_base, tmp_path, (ROW, row)) == 1
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'test.jsonl'}:2: {says}" in err and "as the split stage writes them" in err, err
    assert "Traceback" not in err and not out.exists()


def test_export_into_its_own_adapter_or_base_is_refused_before_anything_loads(adapter, quantized_base, tmp_path,
                                                                              no_export_load, capsys):
    """A 269 MB merged model was written into the adapter's folder (a DVC output, the folder a server loads)."""
    for out, flag, folder in ((adapter / "merged", "--adapter", adapter),
                              (quantized_base / "x" / "merged", "--base", quantized_base)):
        assert _export(adapter, out, quantized_base, tmp_path) == 1
        err = capsys.readouterr().err
        assert f"error: --out {out} is inside {flag} {folder}" in err and "choose an --out outside it" in err, err
        assert not (adapter / "merged").exists() and not (quantized_base / "x").exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="Linux's /proc, where no folder can be made")
def test_export_to_an_out_where_nothing_can_be_made_fails_before_the_merge(adapter, quantized_base, tmp_path,
                                                                           no_export_load, capsys):
    """/proc passes os.access for root, and the save failed after the merge with a traceback from mkdtemp."""
    assert _export(adapter, Path("/proc/merged"), quantized_base, tmp_path) == 1
    err = capsys.readouterr().err
    assert "error: --out /proc/merged: nothing can be made in the folder /proc (" in err, err
    assert "choose an --out in a folder you can write to" in err and "Traceback" not in err


def test_export_to_an_out_of_new_folders_is_let_through_and_creates_nothing(tmp_path):
    from qlora_pipeline.serving.export import check_out_free

    out = tmp_path / "new" / "deeper" / "merged"
    check_out_free(out)
    assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == []  # the probe of the folder is gone


def test_export_to_an_out_it_cannot_look_into_names_out(tmp_path, monkeypatch):
    from qlora_pipeline.serving.export import check_out_free

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    with pytest.raises(PipelineError, match=r"--out .*merged: cannot be checked \(Permission denied\); choose an "
                                            r"--out in a folder you can write to"):
        with monkeypatch.context() as patched:
            patched.setattr(Path, "exists", denied)
            check_out_free(tmp_path / "merged")


def test_export_of_a_damaged_training_config_is_named_not_a_traceback(adapter, quantized_base, tmp_path,
                                                                      no_export_load, capsys):
    (adapter / RESOLVED_CONFIG).write_text("[]")
    out = tmp_path / "merged"
    assert _export(adapter, out, quantized_base, tmp_path) == 1
    err = capsys.readouterr().err
    assert f"{adapter / RESOLVED_CONFIG}: expected a JSON object" in err and "Traceback" not in err
    assert not out.exists()


def test_export_needs_the_max_length_training_cut_rows_to(adapter, quantized_base, tmp_path, no_export_load, capsys):
    _edit_training_config(adapter, lambda resolved: {**resolved, "train": {**resolved["train"], "max_length": None}})
    out = tmp_path / "merged"
    assert _export(adapter, out, quantized_base, tmp_path) == 1
    err = capsys.readouterr().err
    assert "key 'train.max_length' must be a positive integer" in err and "not None" in err
    assert not out.exists()


def test_a_first_adapter_that_fails_to_load_at_run_time_leaves_the_bare_base(adapter, quantized_base, persona_adapters):
    """A server started with no adapter wraps its base on the first runtime load: a refused first adapter leaves
    the base unwrapped, and the next load of the name works."""
    import torch
    from peft import PeftModel

    from qlora_pipeline.modeling.stacked_lora import lora_layers

    persona = load_persona_model(quantized_base, [], runtime_adapters=True)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = persona.model(input_ids=ids).logits
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": config["r"] // 2}))
    with pytest.raises(PipelineError, match=r"adapter_model.safetensors does not fit its adapter_config.json \(size"):
        persona.load_adapter(AdapterSpec("p", str(adapter)))
    assert not isinstance(persona.model, PeftModel) and not lora_layers(persona.model) and persona.names == ["base"]
    with torch.no_grad():
        assert torch.equal(persona.model(input_ids=ids).logits, before)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    persona.load_adapter(AdapterSpec("p", str(adapter)))
    assert persona.names == ["base", "p"] and list(persona.model.peft_config) == ["p"]
