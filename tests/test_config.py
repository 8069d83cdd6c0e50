"""params.yaml loads into typed configs; every bad key is reported together, by name."""

from __future__ import annotations

import copy
import json
import re

import jsonschema
import pytest
import yaml

from conftest import ROOT
from qlora_pipeline.config import (GREEDY_TEMPERATURE, SCHEMA_FILE, ConfigError, DecodingSetting, Params,
                                   command_params, decoding_setting_from, load_params, params_from_dict, params_schema)


def test_repository_params_load():
    params = load_params(ROOT / "params.yaml")
    assert params.data.source == "chitchat"
    assert params.clean.pii == ["email", "phone", "url", "ip", "card", "ssn", "handle"]


def broken(base, **changes):
    raw = copy.deepcopy(base)
    for dotted, value in changes.items():
        node = raw
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        if value is KeyError:
            del node[leaf]
        else:
            node[leaf] = value
    return raw


@pytest.mark.parametrize("changes, expected", [
    ({"clean__colour": 1}, "clean.colour: unknown key; valid keys here: unicode_normalization"),
    ({"clean__min_chars": "3"}, "clean.min_chars: expected int, got '3'"),
    ({"clean__min_chars": True}, "clean.min_chars: expected int, got True"),
    ({"clean__min_chars": -1}, "clean.min_chars: must be >= 0, got -1"),
    ({"clean__max_chars": 0, "clean__min_chars": 5}, "clean.max_chars: 0 is below clean.min_chars 5"),
    ({"clean__dedup": "fuzzy"}, "clean.dedup: must be one of 'none', 'exact', 'near'; got 'fuzzy'"),
    ({"clean__pii": ["email", "dna"]}, "clean.pii[1]: must be one of 'email', 'phone'"),
    ({"clean__pii": ["email", "name"]}, "clean.pii: type 'name' needs clean.pii_engine: presidio"),
    ({"split__ratios__train": 0.9}, "split.ratios: train + val + test must sum to 1, got 1.1"),
    ({"split__ratios__val": -0.1, "split__ratios__train": 1.0}, "split.ratios.val: must be > 0, got -0.1"),
    ({"split__context_turns": 0}, "split.context_turns: must be >= 1"),
    ({"split__max_examples__test": -5}, "split.max_examples.test: must be >= 1 or null, got -5"),
    ({"split__context_turns": KeyError}, "split.context_turns: missing; add it to params.yaml"),
    ({"data__source": "ftp"}, "data.source: must be one of 'chitchat', 'jsonl'"),
    ({"train__num_processes": 2}, "train.num_processes / train.accelerate_config: need train.launcher: accelerate"),
    ({"train__launcher": "accelerate", "train__num_processes": 0}, "train.num_processes: must be >= 1"),
    ({"data__source": "jsonl", "data__path": None}, "data.path: source 'jsonl' needs a file path"),
    ({"data__prompt_template": "{oops"}, "data.prompt_template: not a valid template"),
    ({"seed": 1.5}, "seed: expected int, got 1.5"),
    ({"mlflow": "x"}, "mlflow: expected a mapping of keys, got 'x' (str)"),
    ({"train__bf16": "yes"}, "train.bf16: expected bool or 'auto', got 'yes' (str)"),
    ({"train__bf16": KeyError}, "train.bf16: missing; add it to params.yaml"),
    ({"model__quantization__bnb_4bit_quant_storage": "int4"},
     "model.quantization.bnb_4bit_quant_storage: must be one of 'uint8', 'bfloat16', 'float16', 'float32' or null"),
    ({"chat__top_p": 0}, "chat.top_p: must be in (0, 1], got 0"),
    ({"chat__max_new_tokens": 0}, "chat.max_new_tokens: must be >= 1, got 0"),
    ({"compare__learning_rate__lora": "-1e-4"}, "compare.learning_rate.lora: must be > 0, got -0.0001"),
    ({"compare__name_prefix": "my run"}, "compare.name_prefix: letters, digits, '-' and '_' only"),
    ({"mlflow__experiment_name": " "}, "mlflow.experiment_name: must not be empty"),
    ({"train__learning_rate": "fast"}, "train.learning_rate: expected float, got 'fast' (str)"),
    ({"train__lora__r": 0}, "train.lora.r: must be >= 1"),
    ({"data__source": "csv", "data__path": "x.csv", "data__shape": "messages"},
     "data.shape: messages needs a source whose cells hold lists (jsonl, parquet or hf); a CSV cell holds text"),
    ({"model__quantization__load_in_4bit": False}, "train.method: qlora trains on a 4-bit base"),
    ({"train__eval_steps": 500, "train__save_steps": 500}, "train.eval_steps: 500 is above train.max_steps"),
    ({"split__ratios__val": 0.0, "split__ratios__train": 0.9}, "split.ratios.val: must be > 0"),
    ({"split__max_examples__test": 0}, "split.max_examples.test: must be >= 1 or null"),
    ({"train__objective": "dpo", "train__method": "full"}, "train.objective: dpo tunes an adapter"),
    ({"train__objective": "ppo"}, "train.objective: must be one of 'sft', 'dpo'"),
    ({"train__preference__temperature": 0.0}, "train.preference.temperature: must be > 0"),
    ({"train__preference__reference": "sft"}, "train.preference.reference: must be one of 'adapter', 'base'"),
    ({"decoding__grid": [{"temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0,
                          "no_repeat_ngram_size": 0, "exponential_decay_length_penalty": [12, 0.9]}]},
     "decoding.grid[0].exponential_decay_length_penalty: must be null or [start_index, decay_factor]"),
    ({"decoding__grid__1__top_p": 1.5}, "decoding.grid[1].top_p: must be in (0, 1], got 1.5"),
    ({"decoding__grid": []}, "decoding.grid: give at least one setting"),
    # values that passed the check once and failed a stage later, or never
    ({"seed": -1}, "seed: must be in [0, 4294967295], got -1"),
    ({"seed": 2 ** 32}, "seed: must be in [0, 4294967295], got 4294967296"),
    ({"train__lr_scheduler_type": "bogus"}, "train.lr_scheduler_type: must be one of 'linear', 'cosine'"),
    ({"train__optim": "adam"}, "train.optim: must be one of 'auto', 'adamw_torch'"),
    ({"train__preference__loss_type": "bogus"}, "train.preference.loss_type: must be one of 'sigmoid', 'hinge'"),
    ({"train__weight_decay": float("nan")}, "train.weight_decay: must be a finite number, got nan"),
    ({"train__learning_rate": float("inf")}, "train.learning_rate: must be a finite number, got inf"),
    ({"decoding__grid__1__temperature": float("inf")}, "decoding.grid[1].temperature: must be a finite number"),
    ({"risk__fail_on": ["pii_rate_tuned > nan"]}, "risk.fail_on[0]: 'pii_rate_tuned > nan': 'nan' is not a finite"),
    ({"split__ratios__train": 0.0, "split__ratios__val": 0.5, "split__ratios__test": 0.5},
     "split.ratios.train: must be > 0, got 0.0 (the train split is what the adapter learns from)"),
    ({"compare__learning_rate__qlora_dpo": 1e-4},
     "compare.learning_rate.qlora_dpo: not a valid key here; must be one of 'qlora', 'lora', 'full', 'qlora-dpo'"),
    ({"model__gguf_file": ""}, "model.gguf_file: must not be empty"),
    ({"mlflow__tracking_uri": "ftp://x"}, "mlflow.tracking_uri: 'ftp://x' is no MLflow tracking store; give a server"),
    ({"mlflow__tracking_uri": "not a uri"}, "mlflow.tracking_uri: 'not a uri' is no MLflow tracking store"),
    ({"data__prompt_template": "Q: {prompt:>{width}}"},
     "data.prompt_template: placeholders are bare field names like {prompt}; remove the format or conversion of "
     "{prompt:>{width}}"),
    ({"data__prompt_template": "Q: {prompt!r}"}, "remove the format or conversion of {prompt!r}"),
    ({"risk__canaries": 500_001}, "risk.canaries: 500,001 canaries and as many fresh ones to compare with need "
                                  "1,000,002 distinct six-digit secrets; there are 1,000,000: give at most 500,000"),
    ({"risk__canary_candidates": 10 ** 6}, "risk.canary_candidates: 1,000,000 candidate secrets, all distinct and "
                                           "none the canary's own, need more than the 1,000,000"),
])
def test_bad_params_are_named(base_params_dict, changes, expected):
    with pytest.raises(ConfigError) as err:
        params_from_dict(broken(base_params_dict, **changes))
    assert expected in str(err.value)


def test_as_many_canaries_and_candidates_as_the_secrets_hold_are_accepted(base_params_dict):
    """The bounds themselves pass (test_bad_params_are_named has one past each)."""
    params = params_from_dict(broken(base_params_dict, risk__canaries=500_000, risk__canary_candidates=999_999))
    assert (params.risk.canaries, params.risk.canary_candidates) == (500_000, 999_999)


def test_exponent_floats_that_yaml_reads_as_text_are_accepted(base_params_dict):
    # `dvc exp run -S train.learning_rate=0.00005` writes 5e-05, which PyYAML returns as a string.
    params = params_from_dict(broken(base_params_dict, train__learning_rate="5e-05", train__weight_decay="1E-2"))
    assert params.train.learning_rate == 5e-05 and params.train.weight_decay == 0.01


def test_all_problems_are_reported_together(base_params_dict):
    raw = broken(base_params_dict, clean__min_chars=-1, split__ratios__test=0.5, data__bogus=1)
    with pytest.raises(ConfigError) as err:
        params_from_dict(raw)
    assert len(err.value.problems) == 3
    assert "3 problem(s)" in str(err.value)


def test_a_command_reads_the_params_it_names_else_the_folders_else_the_defaults(tmp_path, monkeypatch,
                                                                               base_params_dict):
    monkeypatch.chdir(tmp_path)
    assert command_params(None) == Params()  # a served folder need not be a pipeline checkout
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**base_params_dict, "seed": 7}), encoding="utf-8")
    assert command_params(None).seed == 7
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({**base_params_dict, "seed": 8}), encoding="utf-8")
    assert command_params(tmp_path / "mine.yaml").seed == 8
    with pytest.raises(ConfigError, match=r"(?s)mne.yaml: .*--params names no file; check the path, or leave --params "
                                          r"out for ./params.yaml"):
        command_params(tmp_path / "mne.yaml")  # was read as "no params": the defaults, silently
    (tmp_path / "params.yaml").write_text("seed: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        command_params(None)  # a broken params.yaml here is no reason to fall back either


def test_a_temperature_the_engine_would_take_as_greedy_is_refused(base_params_dict):
    """1e-6 was "sampled" (samples_per_prompt seeded draws) where the engine picks greedily below 1e-5: the same
    reply drawn each time, scored as a sample."""
    from qlora_pipeline.modeling.sampling import GREEDY_BELOW

    assert GREEDY_TEMPERATURE == GREEDY_BELOW  # the params' floor is the engine's
    with pytest.raises(ConfigError, match=r"decoding.grid\[1\].temperature: 1e-06 would pick greedily, as 0 does "
                                          r"\(0 = greedy, else at least 1e-05\)"):
        params_from_dict(broken(base_params_dict, decoding__grid__1__temperature=1e-6))
    for fine in (0, 1e-5, 0.7):
        assert params_from_dict(broken(base_params_dict, decoding__grid__1__temperature=fine))


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a folder, not a params file; pass the params.yaml inside it"):
        load_params(tmp_path)  # was IsADirectoryError's traceback
    bad = tmp_path / "params.yaml"
    bad.write_text("seed: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_a_key_stated_twice_or_a_file_not_in_utf8_is_named_by_line(tmp_path):
    text = (ROOT / "params.yaml").read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.startswith("  min_chars:"))
    twice = tmp_path / "twice.yaml"
    twice.write_text("".join(lines[:at] + ["  min_chars: 50\n"] + lines[at:]), encoding="utf-8")
    with pytest.raises(ConfigError) as err:  # PyYAML alone keeps the last value, silently
        load_params(twice)
    assert err.value.problems == [f"line {at + 2}: key 'min_chars' stated twice (first on line {at + 1}); keep one"]
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(("# caf\u00e9\n" + text).encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        load_params(latin)
    assert err.value.problems == ["line 1: not UTF-8 (byte 0xe9); save the file as UTF-8"]
    with pytest.raises(ConfigError, match="line 1: not UTF-8"):
        (tmp_path / "utf16.yaml").write_text(text, encoding="utf-16")
        load_params(tmp_path / "utf16.yaml")
    # the same key in two sections, and anchors with merge keys, are not a key stated twice
    fine = tmp_path / "fine.yaml"
    fine.write_text(text + "\nx: &a {p: 1}\ny: {<<: *a, p: 2}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_params(fine)
    assert err.value.problems == ["x: unknown key; valid keys here: " + ", ".join(Params.model_fields),
                                  "y: unknown key; valid keys here: " + ", ".join(Params.model_fields)]


def test_a_file_store_is_taken_only_where_mlflow_would_take_it(base_params_dict, monkeypatch):
    raw = broken(base_params_dict, mlflow__tracking_uri="file:///srv/mlruns")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(ConfigError, match="MLflow 3 refuses its file store unless MLFLOW_ALLOW_FILE_STORE=true"):
        params_from_dict(raw)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert params_from_dict(raw).mlflow.tracking_uri == "file:///srv/mlruns"


def test_the_choices_of_library_names_are_the_installed_libraries_own():
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames
    from trl import DPOConfig

    from qlora_pipeline.config import DPO_LOSSES, LR_SCHEDULERS, OPTIMIZERS

    assert set(LR_SCHEDULERS) == {kind.value for kind in SchedulerType}
    assert set(OPTIMIZERS) == {name.value for name in OptimizerNames} | {"auto"}
    help_text = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    listed = help_text.split("Possible values are:")[1].split(". ")[0]
    assert set(DPO_LOSSES) == set(re.findall(r"'([a-z_]+)'", listed))


def test_params_yaml_has_every_section_and_nothing_else():
    sections = set(yaml.safe_load((ROOT / "params.yaml").read_text()))
    assert sections == set(Params.model_fields)


def test_a_decoding_read_from_a_report_is_checked_key_by_key():
    with pytest.raises(ConfigError) as err:
        decoding_setting_from({"temperature": -1, "top_p": 1.0, "top_k": 1.5}, "reports/decoding.json")
    assert err.value.problems == ["chosen.temperature: must be >= 0, got -1 (0 = greedy, else at least 1e-05)",
                                  "chosen.top_k: expected int, got 1.5 (float)",
                                  "chosen.repetition_penalty: missing; add it to params.yaml",
                                  "chosen.no_repeat_ngram_size: missing; add it to params.yaml"]
    # Code may build a config from its defaults; only a file must state every key.
    assert decoding_setting_from(DecodingSetting().model_dump(), "r.json") == DecodingSetting()


def test_the_published_schema_is_current_and_params_yaml_points_to_it():
    assert (ROOT / SCHEMA_FILE).read_text() == params_schema(), (
        f"{SCHEMA_FILE} is stale; write it again: python -m qlora_pipeline.config > {SCHEMA_FILE}")
    first_line = (ROOT / "params.yaml").read_text().splitlines()[0]
    assert first_line == f"# yaml-language-server: $schema={SCHEMA_FILE}"


def test_the_schema_checks_what_load_params_checks(base_params_dict):
    validator = jsonschema.Draft202012Validator(json.loads(params_schema()))
    assert [e.message for e in validator.iter_errors(base_params_dict)] == []
    assert validator.is_valid(broken(base_params_dict, train__learning_rate="5e-05"))  # as PyYAML reads it
    for fine in ("1e-5", "2e-1", 1e-5, 0):  # PyYAML reads the first two as text
        assert validator.is_valid(broken(base_params_dict, decoding__grid__1__temperature=fine)), fine
    for bad in ({"clean__colour": 1}, {"split__context_turns": KeyError}, {"train__lora__r": 0},
                {"clean__min_chars": True}, {"train__bf16": "yes"}, {"decoding__grid__1__top_p": 1.5},
                {"decoding__grid__1__temperature": 1e-6}):
        assert not validator.is_valid(broken(base_params_dict, **bad)), bad
