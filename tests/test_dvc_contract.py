"""dvc.yaml and params.yaml agree with each other and with the stage scripts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, dvc_paths

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
STAGES = DVC["stages"]


def _lookup(mapping: dict, dotted: str):
    node = mapping
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"{dotted} is not in params.yaml"
        node = node[part]
    return node


@pytest.mark.parametrize("name", list(STAGES))
def test_every_params_key_exists(name):
    for key in STAGES[name].get("params", []):
        _lookup(PARAMS, key)


def _names_path_in(stage: dict, folder: str) -> bool:
    """Whether one of the stage's params keys has ``folder``, or a path inside it, as its value in params.yaml."""
    values = [_lookup(PARAMS, key) for key in stage.get("params", [])]
    return any(isinstance(v, str) and (v.rstrip("/") == folder or v.startswith(f"{folder}/")) for v in values)


@pytest.mark.parametrize("name", list(STAGES))
def test_every_dep_and_out_is_used_by_its_stage(name):
    stage = STAGES[name]
    cmd = stage["cmd"]
    script = re.search(r"python (stages/\S+\.py)", cmd).group(1)
    assert script in stage["deps"], f"{name}: its script must be a dep"
    for dep in dvc_paths(stage["deps"]):
        assert (ROOT / dep).exists() or dep.startswith(("data/", "models/", "reports/")), f"{name}: dep {dep} does not exist"
        if not dep.startswith("src/"):  # a data dep is passed to the command, or the folder holding it is,
            # or a params key of the stage names it or a file in it (fetch's data/source and data.path)
            assert dep in cmd or str(Path(dep).parent) in cmd.split() or _names_path_in(stage, dep), (
                f"{name}: dep {dep} is not passed to its command")
    for out in [*dvc_paths(stage.get("outs")), *dvc_paths(stage.get("metrics")), *dvc_paths(stage.get("plots"))]:
        assert out in cmd, f"{name}: out {out} is not passed to its command"


def test_metrics_files_are_not_cached():
    for name, stage in STAGES.items():
        for entry in stage.get("metrics", []):
            (path, opts), = entry.items()
            assert opts.get("cache") is False, f"{name}: {path} should be committed to git (cache: false)"


# Plumbing every stage shares; editing it should not re-run every stage.
PLUMBING = {"src/qlora_pipeline/__init__.py", "src/qlora_pipeline/config.py", "src/qlora_pipeline/io.py",
            "src/qlora_pipeline/errors.py", "src/qlora_pipeline/tracking.py", "src/qlora_pipeline/process.py",
            "src/qlora_pipeline/pipeline/__init__.py", "src/qlora_pipeline/pipeline/common.py",
            "src/qlora_pipeline/data/__init__.py", "src/qlora_pipeline/modeling/__init__.py",
            # the names of files inside output folders (the folders are dvc.yaml's)
            "src/qlora_pipeline/layout.py",
            # where tracking's calls go: the MLflow store, or the spool while a server is away
            "src/qlora_pipeline/mlflow_store.py", "src/qlora_pipeline/spool.py",
            # read by config for the PII type names and the grammar of risk.fail_on (also a dep of risk,
            # which reads its gates with it)
            "src/qlora_pipeline/data/pii_types.py", "src/qlora_pipeline/gate_syntax.py",
            # the folder of the risk prompt sets (PROMPTS), which zero-shot reads too
            "src/qlora_pipeline/risk/__init__.py",
            # keeps bitsandbytes from running a Hub kernel: what it keeps out is never part of an output
            "src/qlora_pipeline/remote_code.py",
            # where a stage's process runs: in a fork of a process that imported its libraries (warm starts)
            "src/qlora_pipeline/warm.py"}


def _module_file(module: str) -> str | None:
    if not module.startswith("qlora_pipeline"):
        return None
    base = ROOT / "src" / module.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return str(candidate.relative_to(ROOT))
    return None


def _imports(path: str) -> set[str]:
    """Package modules imported anywhere in a file, function-level imports included."""
    import ast

    found = set()
    for node in ast.walk(ast.parse((ROOT / path).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found.update(f for f in map(_module_file, names) if f)
    return found


def _closure(path: str) -> set[str]:
    seen, todo = set(), [path]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(_imports(current))
    # The templates and prompt sets a module loads (package data beside it, named in its source) shape
    # what it writes.
    data = {str(Path(f).parent / folder) for f in seen for folder in ("templates", "prompts")
            if f'"{folder}"' in (ROOT / f).read_text()}
    # So do data files beside a module that its source names ("name_words.txt").
    files = {str(Path(f).parent / name) for f in seen for name in re.findall(r'"([\w-]+\.(?:txt|json|yaml))"',
                                                                             (ROOT / f).read_text())}
    return seen | {d for d in data if (ROOT / d).is_dir()} | {f for f in files if (ROOT / f).is_file()}


@pytest.mark.parametrize("name", list(STAGES))
def test_every_module_a_stage_runs_is_a_dep(name):
    """Editing code a stage runs must re-run that stage: every package module it imports is a dep."""
    stage = STAGES[name]
    script = re.search(r"python (stages/\S+\.py)", stage["cmd"]).group(1)
    used = _closure(script) - PLUMBING - {script}
    missing = sorted(used - set(dvc_paths(stage["deps"])))
    assert not missing, f"{name}: add to its deps in dvc.yaml: {missing}"


# What a stage may take from the plumbing (no stage's dep): names that move bytes, parse and check
# params, log, or name a file. Anything else taken from there could shape an output without
# re-running it when edited: it belongs in a module that is the stage's dep (as without_canaries,
# once in pipeline/common.py, now data/canary_ids.py).
ALLOWED_FROM_PLUMBING = {
    "qlora_pipeline.io": {"atomic_path", "read_json", "read_json_object", "read_jsonl", "remove_outputs", "write_csv",
                          "write_json", "write_jsonl", "write_text", "sha256_file", "remove_stale_temporaries",
                          "refuse_archive"},  # an archive given as a text file is refused: no output to shape
    "qlora_pipeline.errors": {"PipelineError"},
    # params as typed objects; their values live in params.yaml, which DVC tracks key by key
    "qlora_pipeline.config": {"Params", "load_params", "params_from_dict", "DataConfig", "CleanConfig", "SplitConfig",
                              "ModelConfig", "QuantizationConfig", "TrainConfig", "PreferenceConfig", "DecodingSetting",
                              "ObjectiveWeights", "ChatConfig", "PACKAGE_PREFIX", "EXPORT_SOURCES",
                              # reads the chosen decoding from reports/decoding.json (a dep), checked like params
                              "decoding_setting_from"},
    # model_imports: which libraries a stage imports first (process.import_quietly), not what it computes
    "qlora_pipeline.pipeline.common": {"stage_main", "read_conversations", "validate_conversation", "model_imports"},
    "qlora_pipeline.layout": {"CONVERSATIONS", "MANIFEST", "RESOLVED_CONFIG"},
    # what a stage imports first, with full garbage collections held off (process.import_quietly)
    "qlora_pipeline.process": {"keep_freed_memory", "TRACKING", "QUANTIZED_MODEL", "ADAPTERS", "TRAINING", "JUDGE",
                               "ROUGE"},
    # a stage's process in a fork of the warm process, which imported its libraries already
    "qlora_pipeline.warm": {"run_in_fork", "CHILD"},
    # the names of the PII types and engines, which params are checked against
    "qlora_pipeline.data.pii_types": {"PII_TYPES", "PRESIDIO_TYPES", "ALL_PII_TYPES", "ENGINES"},
    # the folder of the risk prompt sets (itself a dep of the stages that read it)
    "qlora_pipeline.risk": {"PROMPTS"},
    # the MLflow logging, imported whole (`from qlora_pipeline import tracking`)
    "qlora_pipeline": {"tracking", "process", "io", "errors", "config"},
}


def _from_plumbing(path: str) -> list[tuple[str, str]]:
    """(module, name) of every `from <plumbing module> import name` in a file."""
    import ast

    found = []
    for node in ast.walk(ast.parse((ROOT / path).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and _module_file(node.module) in PLUMBING:
            for alias in node.names:
                submodule = _module_file(f"{node.module}.{alias.name}")
                if submodule is None or submodule in PLUMBING:
                    found.append((node.module, alias.name))
    return found


@pytest.mark.parametrize("name", list(STAGES))
def test_what_a_stage_takes_from_the_plumbing_shapes_no_output(name):
    """Editing a function that shapes an output must re-run the stages it shapes: none may come from plumbing."""
    stage = STAGES[name]
    script = re.search(r"python (stages/\S+\.py)", stage["cmd"]).group(1)
    deps = set(dvc_paths(stage["deps"]))
    taken = {(module, item, path) for path in _closure(script) if path.endswith(".py") and path not in PLUMBING
             for module, item in _from_plumbing(path)
             if _module_file(module) not in deps and _module_file(f"{module}.{item}") not in deps}
    unexpected = sorted(f"{path}: from {module} import {item}" for module, item, path in taken
                        if item not in ALLOWED_FROM_PLUMBING.get(module, set()))
    assert not unexpected, (f"{name}: these come from modules that are no stage's dep; move each into a module "
                            f"the stage depends on, or, if it is pure plumbing, allow it here: {unexpected}")


def test_the_plumbing_allow_list_is_not_stale():
    """Every name the allow-list grants exists where it says, so a move is noticed."""
    import importlib

    for module, names in ALLOWED_FROM_PLUMBING.items():
        imported = importlib.import_module(module)
        missing = sorted(n for n in names if not hasattr(imported, n)
                         and _module_file(f"{module}.{n}") is None)
        assert not missing, f"{module} has no {missing}: drop them from ALLOWED_FROM_PLUMBING"


@pytest.mark.parametrize("name", list(STAGES))
def test_no_stage_depends_on_code_it_does_not_run(name):
    """A module a stage never imports is not its dep: editing it (chat, serve, export) must re-run nothing."""
    stage = STAGES[name]
    script = re.search(r"python (stages/\S+\.py)", stage["cmd"]).group(1)
    used = _closure(script)
    extra = sorted(dep for dep in dvc_paths(stage["deps"]) if dep.startswith("src/") and dep not in used)
    assert not extra, f"{name}: not imported by the stage, drop from its deps in dvc.yaml: {extra}"


def test_serving_code_is_no_stage_dep():
    """chat, serve and export live in qlora_pipeline.serving; no stage imports any of it."""
    serving = {str(path.relative_to(ROOT)) for path in (ROOT / "src/qlora_pipeline/serving").glob("*.py")}
    assert serving, "the serving package is missing"
    for name, stage in STAGES.items():
        script = re.search(r"python (stages/\S+\.py)", stage["cmd"]).group(1)
        assert not (_closure(script) & serving), f"{name} imports serving code"


def test_a_stage_runs_the_code_of_the_workspace_it_is_in(tmp_path):
    """A queued experiment's copy runs its own src/ (what its dvc.lock hashes), not the editable install's."""
    import shutil
    import subprocess
    import sys

    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "stages", tmp_path / "stages", ignore=ignore)
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=ignore)
    common = tmp_path / "src/qlora_pipeline/pipeline/common.py"
    common.write_text(common.read_text() + '\nprint("code of the copy", file=sys.stderr)\n')
    for script in sorted((tmp_path / "stages").glob("*.py")):
        proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 0 and "code of the copy" in proc.stderr, (script.name, proc.stderr[-500:])


def test_the_users_data_file_is_a_dependency_of_fetch():
    """Editing the file data.path names must re-run fetch: it lives in a folder that is fetch's dep and git tracks."""
    fetch = STAGES["fetch"]
    assert "data.path" in fetch["params"]
    folders = [dep for dep in dvc_paths(fetch["deps"]) if _names_path_in({"params": ["data.path"]}, dep)]
    assert folders, "fetch: add the folder data.path points into to its deps in dvc.yaml"
    folder = ROOT / folders[0]
    assert (folder / "README.md").is_file(), f"{folders[0]}: its README.md tells users where files go"
    from scmrepo.git import Git

    # DVC looks for .dvc files only in folders its git library does not count as ignored; that
    # library counts data/ as ignored under "/data/*", even with "!/data/source/" after it.
    scm = Git(ROOT)
    for part in [*reversed(Path(folders[0]).parents[:-1]), Path(folders[0])]:
        assert not scm.is_ignored(f"{ROOT / part}/"), f".gitignore: DVC would skip {part}/ and the .dvc files in it"


def test_dvc_reads_its_yaml_with_libyaml():
    """ruamel.yaml.clib (pyproject.toml) gives DVC's loads of dvc.yaml, dvc.lock and params.yaml libyaml's parser;
    ruamel.yaml 0.19 made it optional, and without it every dvc command parses them in pure Python
    (bench/noop_repro.py). Same data as PyYAML reads."""
    from dvc.utils.serialize._yaml import parse_yaml
    from ruamel.yaml import YAML

    assert YAML(typ="safe").Parser.__module__.startswith("ruamel.yaml.clib"), YAML(typ="safe").Parser
    for name in ("dvc.yaml", "params.yaml"):
        text = (ROOT / name).read_text()
        assert parse_yaml(text, name) == yaml.safe_load(text), name
