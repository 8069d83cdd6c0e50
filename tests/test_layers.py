"""Imports run one way, downward, through the package's layers (STYLE.md: "Imports run one way").

From the bottom:

0. foundation: errors, files, processes (and warm starts), the Hub kernel refused, hardware, statistics, figures,
   templates, the names of output files and of PII types, the grammar of risk gates, the label value
   the loss skips; none imports the rest of the package.
1. params and tracking: ``config`` (typed ``params.yaml``), ``tracking`` (MLflow logging), the MLflow store
   and the spool that keeps what a server away could not take.
2. data: reading, cleaning, splitting and formatting chats.
3. modeling: loading, quantizing, adapters, the generation engine, the loss.
4. measures and training: evaluation, fidelity, topicality, decoding, training, preference tuning.
5. reports: risk and human evaluation.
6. stages and experiments: ``pipeline/`` (one module per DVC stage, plus ``common``) and ``compare``.
7. front ends: ``serving/`` (chat, serve, export) and ``cli``.

A module may import its own layer and the ones below. A stage's module is a DVC stage's code:
only its script under ``stages/`` imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "src" / "qlora_pipeline"

LAYERS = [
    ("foundation", ["qlora_pipeline", "remote_code", "errors", "io", "process", "warm", "hardware", "layout", "labels",
                    "intervals", "figures", "templating", "data.pii_types", "data.canary_ids", "gate_syntax"]),
    ("params and tracking", ["config", "mlflow_store", "spool", "tracking"]),
    ("data", ["data"]),
    ("modeling", ["modeling"]),
    ("measures and training", ["evaluation", "fidelity", "topicality", "decoding", "test_replies", "training",
                               "preference", "launching"]),
    ("reports", ["risk", "human_eval"]),
    ("stages and experiments", ["pipeline", "compare", "compare_queue"]),
    ("front ends", ["serving", "cli"]),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT / "src").with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The layer of the longest listed name that is the module or a package holding it."""
    short = module.removeprefix("qlora_pipeline.")
    best, rank = -1, None
    for index, (_, names) in enumerate(LAYERS):
        for name in names:
            if (short == name or short.startswith(name + ".") or module == name) and len(name) > best:
                best, rank = len(name), index
    assert rank is not None, f"{module}: in no layer; add it to LAYERS in tests/test_layers.py"
    return rank


def package_imports(path: Path, module_level: bool = False) -> set[str]:
    """Package modules a file imports, function-level ones too unless ``module_level``.

    ``from a import b`` counts as importing ``a``, and ``a.b`` too where that is a module.
    """
    tree = ast.parse(path.read_text())
    found = set()
    for node in (tree.body if module_level else ast.walk(tree)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qlora_pipeline"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names
                         if is_module(f"{node.module}.{alias.name}"))
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("qlora_pipeline"))
    return found


def is_module(name: str) -> bool:
    base = ROOT / "src" / name.replace(".", "/")
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_in_a_layer():
    for path in MODULES:
        layer_of(module_name(path))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_run_downward(path):
    own = layer_of(module_name(path))
    upward = sorted(f"{name} ({LAYERS[layer_of(name)][0]})" for name in package_imports(path)
                    if layer_of(name) > own)
    assert not upward, (f"{module_name(path)} ({LAYERS[own][0]}) imports from a layer above it: {upward}; "
                        "move the shared name down (see tests/test_layers.py's docstring)")


STAGE_MODULES = {f"qlora_pipeline.pipeline.{p.stem}" for p in (PACKAGE / "pipeline").glob("*.py")
                 if p.stem not in ("__init__", "common")}


def test_only_the_stage_scripts_import_a_stage_module():
    importers = sorted(f"{module_name(path)} imports {name}" for path in MODULES
                       for name in package_imports(path) & STAGE_MODULES)
    assert not importers, f"a stage's module is its stage's code alone; move what these use into the package: " \
                          f"{importers}"


def test_no_import_cycles():
    """Among module-level imports: a function-level import may break a cycle on purpose."""
    graph = {module_name(p): package_imports(p, module_level=True) for p in MODULES}
    done: set[str] = set()
    active: list[str] = []

    def visit(module: str) -> None:
        assert module not in active, f"import cycle: {' -> '.join(active[active.index(module):] + [module])}"
        if module in done:
            return
        active.append(module)
        for name in sorted(graph.get(module, ())):
            if name in graph and name != module:
                visit(name)
        active.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_the_layer_check_catches_an_upward_import(tmp_path):
    """The check itself: a data module importing the engine is named."""
    fake = PACKAGE / "data" / "formatting.py"
    upward = [name for name in package_imports(fake) if layer_of(name) > layer_of(module_name(fake))]
    assert upward == []
    probe = tmp_path / "probe.py"
    probe.write_text("from qlora_pipeline.modeling.engine import Engine\nfrom qlora_pipeline.io import read_json\n")
    names = package_imports(probe)
    assert {"qlora_pipeline.modeling.engine", "qlora_pipeline.io"} <= names
    assert layer_of("qlora_pipeline.modeling.engine") > layer_of("qlora_pipeline.data.formatting")
    assert (layer_of("qlora_pipeline.data.pii_types") < layer_of("qlora_pipeline.config")
            < layer_of("qlora_pipeline.data.formatting"))
