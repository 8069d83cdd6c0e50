"""params.yaml loads into typed configs; every bad key is reported together, by name."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import yaml

from conftest import ROOT
from qlora_pipeline.config import ConfigError, load_params, params_from_dict


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
            node = node[part]
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
    ({"clean__pii": ["email", "dna"]}, "clean.pii: unknown type 'dna'"),
    ({"split__ratios__train": 0.9}, "split.ratios: train + val + test must sum to 1, got 1.1"),
    ({"split__ratios__val": -0.1, "split__ratios__train": 1.0}, "split.ratios.val: must be >= 0"),
    ({"split__context_turns": 0}, "split.context_turns: must be >= 1"),
    ({"split__max_examples__test": -5}, "split.max_examples.test: must be >= 1 or null"),
    ({"split__context_turns": KeyError}, "split.context_turns: missing; add it to params.yaml"),
    ({"data__source": "ftp"}, "data.source: must be one of 'chitchat', 'jsonl'"),
    ({"train__num_processes": 2}, "train.num_processes / train.accelerate_config: need train.launcher: accelerate"),
    ({"train__launcher": "accelerate", "train__num_processes": 0}, "train.num_processes: must be >= 1"),
    ({"data__source": "jsonl", "data__path": None}, "data.path: source 'jsonl' needs a file path"),
    ({"data__prompt_template": "{oops"}, "data.prompt_template: not a valid template"),
    ({"seed": 1.5}, "seed: expected int, got 1.5"),
    ({"mlflow": "x"}, "mlflow: expected a mapping of keys, got str"),
    ({"train__learning_rate": "fast"}, "train.learning_rate: expected float, got 'fast' (str)"),
    ({"train__lora__r": 0}, "train.lora.r: must be >= 1"),
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
])
def test_bad_params_are_named(base_params_dict, changes, expected):
    with pytest.raises(ConfigError) as err:
        params_from_dict(broken(base_params_dict, **changes))
    assert expected in str(err.value)


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


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("seed: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_params_yaml_has_every_section_and_nothing_else():
    sections = set(yaml.safe_load((ROOT / "params.yaml").read_text()))
    assert sections == {f.name for f in dataclasses.fields(load_params(ROOT / "params.yaml"))}
