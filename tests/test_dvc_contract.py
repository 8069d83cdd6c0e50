"""dvc.yaml and params.yaml agree with each other and with the stage scripts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
STAGES = DVC["stages"]


def _lookup(mapping: dict, dotted: str):
    node = mapping
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"{dotted} is not in params.yaml"
        node = node[part]
    return node


def _paths(entries):
    for entry in entries or []:
        yield next(iter(entry)) if isinstance(entry, dict) else entry


@pytest.mark.parametrize("name", list(STAGES))
def test_every_params_key_exists(name):
    for key in STAGES[name].get("params", []):
        _lookup(PARAMS, key)


@pytest.mark.parametrize("name", list(STAGES))
def test_every_dep_and_out_is_used_by_its_stage(name):
    stage = STAGES[name]
    cmd = stage["cmd"]
    script = re.search(r"python (stages/\S+\.py)", cmd).group(1)
    assert script in stage["deps"], f"{name}: its script must be a dep"
    for dep in _paths(stage["deps"]):
        assert (ROOT / dep).exists() or dep.startswith(("data/", "models/")), f"{name}: dep {dep} does not exist"
        if not dep.startswith("src/"):
            assert dep in cmd, f"{name}: dep {dep} is not passed to its command"
    for out in [*_paths(stage.get("outs")), *_paths(stage.get("metrics")), *_paths(stage.get("plots"))]:
        assert out in cmd, f"{name}: out {out} is not passed to its command"


def test_metrics_files_are_not_cached():
    for name, stage in STAGES.items():
        for entry in stage.get("metrics", []):
            (path, opts), = entry.items()
            assert opts.get("cache") is False, f"{name}: {path} should be committed to git (cache: false)"
