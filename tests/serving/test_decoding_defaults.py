"""chat and serve decode as choose-decoding picked on validation, for the adapter it was picked for only."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from qlora_pipeline.cli import build_parser
from qlora_pipeline.config import ChatConfig
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.modeling.adapters import adapter_digest
from qlora_pipeline.serving.models import Adapter, chat_defaults, chosen_decoding_for

CHOSEN = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.2, "no_repeat_ngram_size": 3}


def _adapter(name: str, folder: Path, source: str | None = None) -> Adapter:
    return Adapter(name, source or str(folder), folder, {"method": "qlora"})


def _report(path: Path, digest: str) -> Path:
    path.write_text(json.dumps({"chosen": CHOSEN, "adapter_sha256": digest, "grid": []}))
    return path


def _persona(*adapters: Adapter, uri: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(adapters={a.name: a for a in adapters}, tracking_uri=uri, downloads=None)


def test_the_choice_made_for_these_weights_becomes_the_default(persona_adapters, tmp_path):
    alice = _adapter("alice", persona_adapters["alice"])
    report = _report(tmp_path / "decoding.json", adapter_digest(alice.folder))
    defaults, where = chat_defaults(ChatConfig(), _persona(alice), report)
    chosen = defaults.of("alice")
    assert (chosen.temperature, chosen.repetition_penalty, chosen.no_repeat_ngram_size) == (0.0, 1.2, 3)
    assert chosen.max_new_tokens == ChatConfig().max_new_tokens  # only the decoding keys change
    assert "decoding of 'alice': chosen on validation" in where and "greedy" in where
    assert defaults.of("base") == chosen  # the first adapter's, as its system prompt: compared as evaluate compares
    assert "decoding of 'base': that of the first adapter, 'alice'" in where


def test_each_adapter_decodes_by_its_own_choice_or_else_the_params(persona_adapters, tmp_path):
    """One adapter's choice served every model: a second experiment's adapter, whose own run chose otherwise,
    was served with the first one's decoding, though the docs and params.yaml promised each its own."""
    alice, bob = (_adapter(n, persona_adapters[n]) for n in ("alice", "bob"))
    report = _report(tmp_path / "decoding.json", adapter_digest(bob.folder))
    defaults, where = chat_defaults(ChatConfig(), _persona(alice), report)
    assert defaults.of("alice") == defaults.of("base") == ChatConfig() and "params' chat section" in where
    assert chosen_decoding_for(alice, report, None) is None
    defaults, _ = chat_defaults(ChatConfig(use_chosen_decoding=False), _persona(bob), report)
    assert defaults.of("bob") == ChatConfig(use_chosen_decoding=False)
    persona = _persona(alice, bob)
    defaults, where = chat_defaults(ChatConfig(), persona, report)
    assert defaults.of("bob").no_repeat_ngram_size == 3 and defaults.of("alice") == ChatConfig()
    assert defaults.of("base") == defaults.of("alice")  # the first adapter's, as its system prompt is
    # bob's report was dropped for alice without a word, as if choose-decoding had never run
    assert where.splitlines() == ["decoding of 'alice': the params' chat section: temperature 0.7, top_p 0.9, "
                                  "top_k 50, repetition_penalty 1.15, no_repeat_ngram_size 4; "
                                  f"not {report}'s choice: it was made for other adapter weights (sha256 "
                                  f"{adapter_digest(bob.folder)[:12]}..., not these {adapter_digest(alice.folder)[:12]}"
                                  "...)",
                                  f"decoding of 'bob': chosen on validation ({report}): greedy, "
                                  "repetition_penalty 1.2, no_repeat_ngram_size 3",
                                  "decoding of 'base': that of the first adapter, 'alice'"]
    del persona.adapters["alice"]  # unloaded: base follows the next first adapter, as its system prompt does
    assert defaults.of("base") == defaults.of("bob")
    defaults, _ = chat_defaults(ChatConfig(), _persona(bob), tmp_path / "missing.json")
    assert defaults.of("bob") == defaults.of("base") == ChatConfig()


def test_a_past_runs_adapter_brings_its_runs_choice(persona_adapters, tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("x", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(persona_adapters["carol"]), "adapter")
    client.log_artifact(run.info.run_id, str(_report(tmp_path / "decoding.json",
                                                     adapter_digest(persona_adapters["carol"]))))
    source = f"runs:/{run.info.run_id}/adapter"
    carol = _adapter("carol", persona_adapters["carol"], source)
    setting, where = chosen_decoding_for(carol, None, uri, tmp_path / "downloads")
    assert setting.repetition_penalty == 1.2 and where == f"runs:/{run.info.run_id}/decoding.json"
    other = client.create_run(experiment)  # a run with no choice (made before the stage existed)
    assert chosen_decoding_for(_adapter("c2", persona_adapters["carol"], f"runs:/{other.info.run_id}/adapter"),
                               None, uri, tmp_path / "d2") is None


def test_a_report_with_bad_values_is_named_as_the_report_not_as_params(persona_adapters, tmp_path):
    """Its problems were headed "problem(s) in params", sending the user to a params.yaml that is fine."""
    alice = _adapter("alice", persona_adapters["alice"])
    report = tmp_path / "decoding.json"
    report.write_text(json.dumps({"chosen": {**CHOSEN, "temperature": -1},
                                  "adapter_sha256": adapter_digest(alice.folder)}))
    with pytest.raises(PipelineError) as caught:
        chat_defaults(ChatConfig(), _persona(alice), report)
    message = str(caught.value)
    assert message.startswith(f"{report}: 1 problem(s) in the decoding choose-decoding chose:\n  - chosen.temperature")
    assert "in params" not in message and "dvc repro choose-decoding" in message
    report.write_text("[1, 2]")
    with pytest.raises(PipelineError, match=r"decoding.json: holds a list, not the JSON object choose-decoding writes"):
        chat_defaults(ChatConfig(), _persona(alice), report)


@pytest.mark.parametrize("command", ["chat", "serve"])
def test_a_given_decoding_must_be_a_report_while_the_default_may_be_absent(command, tmp_path, monkeypatch, capsys):
    """--decoding /nonexistent.json, a folder or a file of [1,2] ran on the params' section with no word of why."""
    monkeypatch.chdir(tmp_path)  # no reports/decoding.json here: the default is optional
    assert build_parser().parse_args([command]).decoding == Path("reports/decoding.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "cut.json").write_text('{"chosen": {')
    _report(tmp_path / "good.json", "0" * 64)
    assert build_parser().parse_args([command, "--decoding", "good.json"]).decoding == Path("good.json")
    for given, why in [("nonexistent.json", "no such file"), (".", "not a file"),
                       ("list.json", "holds a list, not the JSON object choose-decoding writes"),
                       ("cut.json", "not valid JSON (Expecting property name enclosed in double quotes: line 1")]:
        with pytest.raises(SystemExit) as exited:
            build_parser().parse_args([command, "--decoding", given])
        assert exited.value.code == 2
        assert f"argument --decoding: {given}: {why}" in capsys.readouterr().err
