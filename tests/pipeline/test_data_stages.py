"""fetch -> clean -> split as the stages run them: outputs, metrics, MLflow, and failures that leave nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import CHAT_FIELDS, ROOT, write_chat_jsonl
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.pipeline.clean import run_clean
from qlora_pipeline.pipeline.fetch import run_fetch
from qlora_pipeline.pipeline.split import run_split


@pytest.fixture
def chat_params(tmp_path, params_factory, monkeypatch):
    monkeypatch.setenv("QLORA_PIPELINE_RUN_KEY", "test-execution")
    path = write_chat_jsonl(tmp_path / "chat.jsonl")
    # Two conversations: too few for val/test shares to round up, so both land in train.
    return lambda extra=None: params_factory({"data.source": "jsonl", "data.path": str(path), **CHAT_FIELDS,
                                              **(extra or {})})


def run_all(params, tmp_path):
    run_fetch(params, tmp_path / "raw")
    run_clean(params, tmp_path / "raw", tmp_path / "clean", tmp_path / "metrics/clean.json")
    return run_split(params, tmp_path / "clean", tmp_path / "splits", tmp_path / "metrics/split.json",
                     tmp_path / "canaries.json")


def test_data_stages_write_outputs_and_one_mlflow_run(chat_params, tmp_path, capsys):
    params = chat_params()
    metrics = run_all(params, tmp_path)
    assert metrics["persona"] == "alice"
    # two conversations: both go to train; said here, where train-adapter only found an empty val.jsonl
    assert ("warning: val.jsonl and test.jsonl hold no examples: each split takes whole conversations, and only 2 "
            "have persona replies") in capsys.readouterr().err
    train = [json.loads(line) for line in (tmp_path / "splits/train.jsonl").read_text().splitlines()]
    assert [ex["target"] for ex in train] == ["nice, where did you go?", "i have always wanted to go there",
                                             "yes! mail me at <EMAIL>", "see you then"]
    clean_metrics = json.loads((tmp_path / "metrics/clean.json").read_text())
    assert clean_metrics["pii_replacements"]["email"] == 1

    import mlflow

    mlflow.set_tracking_uri(params.mlflow.tracking_uri)
    runs = mlflow.search_runs(experiment_names=[params.mlflow.experiment_name])
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["params.data.source"] == "jsonl" and run["params.split.context_turns"] == "4"
    assert run["metrics.clean.pii_replacements.email"] == 1
    assert run["metrics.split.train.examples"] == 4
    assert run["tags.split.persona"] == "alice"


def test_a_val_or_test_split_too_small_for_its_intervals_is_warned_of(tmp_path, params_factory, capsys, monkeypatch):
    """A 14-conversation export was split 19/1/1 without a word; evaluate then gave intervals over one example."""
    from conftest import chat_rows

    monkeypatch.setenv("QLORA_PIPELINE_RUN_KEY", "test-execution")
    path = write_chat_jsonl(tmp_path / "chat.jsonl", chat_rows(12))
    params = params_factory({"data.source": "jsonl", "data.path": str(path), **CHAT_FIELDS})
    metrics = run_all(params, tmp_path)
    err = capsys.readouterr().err
    assert 0 < metrics["test"]["examples"] < 20 and 0 < metrics["val"]["examples"] < 20
    assert (f"warning: val.jsonl holds {metrics['val']['examples']}, test.jsonl holds {metrics['test']['examples']} "
            "example(s): choose-decoding picks on val, and evaluate's and risk's intervals over so few") in err
    assert "hold no examples" not in err


def test_a_new_execution_gets_a_new_run(chat_params, tmp_path, monkeypatch):
    params = chat_params()
    run_fetch(params, tmp_path / "raw")
    monkeypatch.setenv("QLORA_PIPELINE_RUN_KEY", "another-execution")
    run_fetch(params, tmp_path / "raw")
    import mlflow

    mlflow.set_tracking_uri(params.mlflow.tracking_uri)
    assert len(mlflow.search_runs(experiment_names=[params.mlflow.experiment_name])) == 2


def test_clean_to_nothing_fails_and_leaves_no_output(chat_params, tmp_path):
    params = chat_params({"clean.min_chars": 500})
    run_fetch(params, tmp_path / "raw")
    (tmp_path / "clean").mkdir()  # a stale output from an earlier run must not survive either
    with pytest.raises(PipelineError, match=r"every conversation was removed by clean .*too_short.*loosen clean\.min_chars"):
        run_clean(params, tmp_path / "raw", tmp_path / "clean", tmp_path / "metrics/clean.json")
    assert not (tmp_path / "clean").exists() and not (tmp_path / "metrics/clean.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # removed for having too few speakers: that key is named, not the three the message always named
    params = chat_params({"clean.min_speakers": 3})
    with pytest.raises(PipelineError) as err:
        run_clean(params, tmp_path / "raw", tmp_path / "clean", tmp_path / "metrics/clean.json")
    assert str(err.value).endswith("loosen clean.min_speakers") and "too_few_speakers" in str(err.value)
    assert ": 0" not in str(err.value)  # counts that are zero are left out


def test_message_lists_through_the_data_stages_learn_the_assistant(tmp_path, params_factory, monkeypatch):
    """data.shape: messages (OpenAI's chat fine-tuning format): the assistant is the persona split learns."""
    monkeypatch.setenv("QLORA_PIPELINE_RUN_KEY", "test-execution")
    rows = [{"id": f"c{i}", "messages": [{"role": "user", "content": f"question {i}: how was day {i}?"},
                                         {"role": "assistant", "content": f"day {i} was fine, thanks"}]}
            for i in range(30)]
    path = write_chat_jsonl(tmp_path / "chats.jsonl", rows)
    params = params_factory({"data.source": "jsonl", "data.path": str(path), "data.shape": "messages",
                             "data.fields.id": "id"})
    metrics = run_all(params, tmp_path)
    assert metrics["persona"] == "assistant"
    assert sum(metrics[name]["examples"] for name in ("train", "val", "test")) == 30
    example = json.loads((tmp_path / "splits" / "train.jsonl").read_text().splitlines()[0])
    assert example["target"].startswith("day ") and example["messages"][-1]["content"].startswith("question ")


def test_an_export_cut_after_every_message_names_the_session_gap(params_factory, tmp_path, monkeypatch):
    """Replies five hours apart: the export was cut into one-message conversations, and clean named only
    clean.min_messages, then clean.min_speakers, and split the skipped opening turns: never the gap."""
    monkeypatch.setenv("QLORA_PIPELINE_RUN_KEY", "test-execution")
    lines = [f"12/{day + 20}/23, {hour:02d}:00 - {'Ann' if (day + hour) % 2 else 'Bob'}: message {day} {hour}\n"
             for day in range(1, 4) for hour in (4, 9, 14, 19)]
    export = tmp_path / "chat.txt"
    export.write_text("".join(lines), encoding="utf-8")
    params = params_factory({"data.source": "whatsapp", "data.path": str(export), "split.persona": "Ann"})
    run_fetch(params, tmp_path / "raw")
    with pytest.raises(PipelineError) as err:
        run_clean(params, tmp_path / "raw", tmp_path / "clean", tmp_path / "metrics/clean.json")
    assert "loosen clean.min_messages; or raise data.session_gap_minutes (now 60): the export is cut" in str(err.value)
    params = params_factory({"data.source": "whatsapp", "data.path": str(export), "split.persona": "Ann",
                             "clean.min_messages": 1, "clean.min_speakers": 1})
    run_clean(params, tmp_path / "raw", tmp_path / "clean", tmp_path / "metrics/clean.json")
    with pytest.raises(PipelineError) as err:
        run_split(params, tmp_path / "clean", tmp_path / "splits", tmp_path / "metrics/split.json",
                  tmp_path / "canaries.json")
    assert "opening turn without context (data.session_gap_minutes, for a chat app's export)" in str(err.value)


def test_unknown_persona_stops_clean_when_it_pseudonymizes(chat_params, tmp_path):
    params = chat_params({"split.persona": "mallory"})
    run_fetch(params, tmp_path / "raw")
    with pytest.raises(PipelineError, match=r"split\.persona: speaker 'mallory' does not occur .*alice \(5 messages\)"):
        run_clean(params, tmp_path / "raw", tmp_path / "clean", tmp_path / "metrics/clean.json")
    assert not (tmp_path / "clean").exists() and not (tmp_path / "metrics/clean.json").exists()


def test_unknown_persona_fails_and_leaves_no_output(chat_params, tmp_path):
    params = chat_params({"split.persona": "mallory", "clean.pseudonymize_speakers": False})
    run_fetch(params, tmp_path / "raw")
    run_clean(params, tmp_path / "raw", tmp_path / "clean", tmp_path / "metrics/clean.json")
    with pytest.raises(PipelineError, match=r"split\.persona: speaker 'mallory' does not occur"):
        run_split(params, tmp_path / "clean", tmp_path / "splits", tmp_path / "metrics/split.json",
                  tmp_path / "canaries.json")
    assert not (tmp_path / "splits").exists() and not (tmp_path / "metrics/split.json").exists()
    assert not (tmp_path / "canaries.json").exists()


def test_malformed_stage_input_names_file_and_line(chat_params, tmp_path):
    params = chat_params()
    run_fetch(params, tmp_path / "raw")
    raw = tmp_path / "raw/conversations.jsonl"
    raw.write_text(raw.read_text() + '{"id": "x", "messages": "oops"}\n')
    with pytest.raises(PipelineError, match=r"raw/conversations\.jsonl:3: expected \{'id': str, 'messages'"):
        run_clean(params, tmp_path / "raw", tmp_path / "clean", tmp_path / "metrics/clean.json")
    assert not (tmp_path / "clean").exists()


def test_failed_fetch_keeps_no_partial_output(chat_params, tmp_path):
    bad = tmp_path / "chat.jsonl"
    bad.write_text(bad.read_text() + "not json\n")
    with pytest.raises(PipelineError, match=r"chat\.jsonl:10: malformed JSON"):
        run_fetch(chat_params(), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_stage_script_exits_nonzero_with_a_clear_message(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text().replace("context_turns: 4", "context_turns: -4"))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, str(ROOT / "stages/split.py"), "--params", str(params),
                           "--clean", str(tmp_path / "clean"), "--out", str(tmp_path / "splits"),
                           "--metrics", str(tmp_path / "split.json"), "--canaries", str(tmp_path / "canaries.json")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 1
    assert "split.context_turns: must be >= 1" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "splits").exists()


def test_repeated_conversation_ids_are_refused(chat_params, tmp_path):
    params = chat_params()
    run_fetch(params, tmp_path / "raw")
    raw = tmp_path / "raw/conversations.jsonl"
    first = raw.read_text().splitlines()[0]
    raw.write_text(raw.read_text() + first + "\n")
    with pytest.raises(PipelineError, match=r"conversations\.jsonl:3: conversation id 'c1' repeats line 1"):
        run_clean(params, tmp_path / "raw", tmp_path / "clean", tmp_path / "metrics/clean.json")


def test_a_whatsapp_export_through_the_data_stages(params_factory, tmp_path, capsys, monkeypatch):
    """fetch names who is in the export, clean hides everyone but the persona named by display name."""
    monkeypatch.setenv("QLORA_PIPELINE_RUN_KEY", "test-execution")
    export = ROOT / "tests/data/exports/fixtures/whatsapp/ios_group.txt"
    params = params_factory({"data.source": "whatsapp", "data.path": str(export), "split.persona": "sam okafor"})
    run_fetch(params, tmp_path / "raw")
    out = capsys.readouterr().out
    assert "(1 file(s), 1 chat(s); 9 app line(s) removed, 0 row(s) rejected)" in out
    assert "most messages: Renee Dubois (2), Sam Okafor (2), +1 555 0100 (1)" in out
    metrics = run_clean(params, tmp_path / "raw", tmp_path / "clean", tmp_path / "metrics/clean.json")
    assert metrics["rows_removed_at_fetch"] == {"call": 1, "deleted": 2, "media_omitted": 3, "system": 3}
    assert metrics["pseudonymized"] == {"speakers": 2, "names_in_text": 1}
    cleaned = (tmp_path / "clean/conversations.jsonl").read_text()
    assert "Renee" not in cleaned and "Dubois" not in cleaned and "555 0100" not in cleaned
    # The phone-number speaker's digits appear in no speaker and no text (a conversation id, a hash
    # of the export's path, may hold any digits: this clone's once held "555").
    said = [f"{m['speaker']} {m['text']}" for line in cleaned.splitlines() for m in json.loads(line)["messages"]]
    assert said and not [text for text in said if "555" in text]
    split = run_split(params, tmp_path / "clean", tmp_path / "splits", tmp_path / "metrics/split.json",
                      tmp_path / "canaries.json")
    assert split["persona"] == "Sam Okafor" and split["train"]["examples"] == 1
