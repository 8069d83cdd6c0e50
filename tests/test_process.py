"""process.py: the settings every stage and command makes of its own Python process.

``import_quietly`` changes the garbage collector's state for the whole process (thresholds, frozen objects),
so its tests run in a fresh interpreter each, not in the pytest worker.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

# A module whose import leaves 600,000 objects the collector tracks alive (lists: a dict of plain values is not
# tracked), as a large library's does: enough for CPython to run full collections while it imports.
BIG_MODULE = "KEPT = [[i] for i in range(600_000)]\n"


def run_python(code: str, tmp_path: Path) -> dict:
    """Run ``code`` in a fresh interpreter with ``tmp_path`` importable; the JSON it printed last."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": f"{tmp_path}:{ROOT / 'src'}", "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_an_import_runs_no_full_collection_and_what_it_kept_is_frozen(tmp_path):
    (tmp_path / "big_a.py").write_text(BIG_MODULE)
    (tmp_path / "big_b.py").write_text(BIG_MODULE)
    result = run_python("""
        import gc, json
        from qlora_pipeline.process import import_quietly

        full = []
        gc.callbacks.append(lambda phase, info: phase == "start" and info["generation"] == 2 and full.append(1))
        before = gc.get_threshold()
        import big_a                                 # plainly: CPython's own full collections
        plain, full[:] = len(full), []
        failed = import_quietly(["big_b"])
        print(json.dumps({"plain": plain, "quiet": len(full), "failed": failed, "frozen": gc.get_freeze_count(),
                          "restored": gc.get_threshold() == before, "imported": "big_b" in __import__("sys").modules}))
    """, tmp_path)
    assert result["plain"] >= 1, result  # the control: this import does make CPython collect in full
    assert result["quiet"] == 0, result
    # both modules' lists: what the plain import left unfrozen too, so the freeze came after big_b's import
    assert result["frozen"] >= 1_200_000 and result["imported"] and result["restored"] and result["failed"] == []


def test_a_module_not_installed_is_skipped_and_named_and_any_other_import_error_is_raised(tmp_path):
    (tmp_path / "broken.py").write_text("import no_such_module_anywhere\n")
    (tmp_path / "raises.py").write_text("raise RuntimeError('no GPU driver')\n")
    (tmp_path / "fine.py").write_text("VALUE = 1\n")
    result = run_python("""
        import gc, json, sys
        from qlora_pipeline.process import import_quietly

        gc.set_threshold(500, 7, 9)
        skipped = import_quietly(["not_a_module", "not_a_package.sub", "fine"])
        raised = []
        for name in ("broken", "raises"):
            try:
                import_quietly([name])
            except Exception as err:
                raised.append(f"{type(err).__name__}: {err}")
        print(json.dumps({"skipped": skipped, "fine": "fine" in sys.modules, "thresholds": gc.get_threshold(),
                          "raised": raised}))
    """, tmp_path)
    assert result == {"skipped": ["not_a_module", "not_a_package.sub"], "fine": True, "thresholds": [500, 7, 9],
                      "raised": ["ModuleNotFoundError: No module named 'no_such_module_anywhere'",
                                 "RuntimeError: no GPU driver"]}


def test_only_the_first_call_freezes_so_garbage_left_by_what_ran_between_is_still_collected(tmp_path):
    (tmp_path / "fine.py").write_text("VALUE = 1\n")
    result = run_python("""
        import gc, json, weakref
        from qlora_pipeline.process import import_quietly

        import_quietly(["json"])
        frozen = gc.get_freeze_count()

        class Node:
            pass

        gone = []
        node = Node()
        node.self = node                             # a dropped cycle, as a finished command leaves
        weakref.finalize(node, gone.append, 1)
        del node
        import_quietly(["fine"])                     # a second command in the same process
        gc.collect()
        print(json.dumps({"first": frozen > 0, "same": gc.get_freeze_count() == frozen, "collected": len(gone)}))
    """, tmp_path)
    assert result == {"first": True, "same": True, "collected": 1}


def test_a_fork_of_a_process_that_froze_freezes_nothing_and_does_not_count_the_frozen(tmp_path):
    """A warm process's fork (warm.py) inherits the freeze: its calls neither freeze again nor walk the frozen
    objects to learn whether they are (``gc.get_freeze_count`` reads every one's header: ~50 ms a call there)."""
    (tmp_path / "fine.py").write_text("VALUE = 1\n")
    result = run_python("""
        import gc, json, os
        from qlora_pipeline.process import import_quietly

        import_quietly(["json"])
        read, write = os.pipe()
        if os.fork() == 0:
            counted, count = [], gc.get_freeze_count
            gc.get_freeze_count = lambda: counted.append(1) or count()
            gc.unfreeze()                            # were it to freeze again, the count would show it
            import_quietly(["fine"])
            os.write(write, json.dumps({"counted": len(counted), "frozen": count()}).encode())
            os._exit(0)
        os.wait()
        print(os.read(read, 1000).decode())
    """, tmp_path)
    assert result == {"counted": 0, "frozen": 0}


def test_cyclic_garbage_made_after_is_still_collected_on_its_own(tmp_path):
    """Only what was alive at the freeze is kept: a cycle dropped afterwards goes with the young collections."""
    (tmp_path / "big_a.py").write_text(BIG_MODULE)
    result = run_python("""
        import gc, json, weakref
        from qlora_pipeline.process import import_quietly

        import_quietly(["big_a"])

        class Node:
            pass

        gone = []
        for _ in range(50):
            node = Node()
            node.self = node                         # a cycle: reference counting alone never frees it
            weakref.finalize(node, gone.append, 1)
            del node
        kept = [[] for _ in range(20_000)]           # objects that stay: they set the young collections off
        print(json.dumps({"collected": len(gone)}))
    """, tmp_path)
    assert result["collected"] == 50


def test_a_stage_imports_what_it_names_and_the_database_store_only_for_a_database_uri(tmp_path, monkeypatch):
    from qlora_pipeline.pipeline import common
    from qlora_pipeline.process import DATABASE_STORE, TRACKING

    asked: list[list[str]] = []
    monkeypatch.setattr(common, "import_quietly", lambda names: asked.append(list(names)) or [])
    monkeypatch.setattr(common, "keep_freed_memory", lambda: True)  # the worker's allocator stays as it is
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")  # what stage_main sets, undone after the test
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    ran = []
    for uri in (None, "postgresql://db/mlflow", "http://127.0.0.1:5000", "databricks"):
        raw["mlflow"]["tracking_uri"] = uri
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
        code = common.stage_main("a stage", lambda parser: None, lambda params, args: ran.append(len(asked)),
                                 argv=["--params", str(tmp_path / "params.yaml")],
                                 imports=lambda params: ("json", *TRACKING) if params.seed == raw["seed"] else ())
        assert code == 0
    assert asked == [["json", *TRACKING, DATABASE_STORE], ["json", *TRACKING, DATABASE_STORE], ["json", *TRACKING],
                     ["json", *TRACKING]]
    assert ran == [1, 2, 3, 4]  # each stage ran after its imports


def test_a_params_error_in_a_workspace_experiment_says_how_to_get_back(tmp_path, monkeypatch, capsys):
    """`dvc exp run -S train.lora.r=abc` leaves the bad value in params.yaml: the stage's error says so, and how to
    restore it; in a queued experiment's copy (under .dvc/tmp) and in a plain `dvc repro` it says nothing more."""
    from qlora_pipeline.config import ConfigError
    from qlora_pipeline.pipeline import common

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"]["lora"]["r"] = "abc"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())  # what names metrics/ as git's to restore
    queued = tmp_path / ".dvc" / "tmp" / "exps" / "run" / "abc123"
    queued.mkdir(parents=True)
    (queued / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setattr(common, "run_in_fork", lambda wait: None)  # the stage runs here, in the test's process
    monkeypatch.setattr(common, "import_quietly", lambda names: [])  # nothing it would import matters here
    monkeypatch.setattr(common, "keep_freed_memory", lambda: True)  # the worker's allocator stays as it is
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")  # what stage_main sets, undone after the test
    said = {}
    for case, cwd, env in (("workspace experiment", tmp_path, {"DVC_EXP_NAME": "sappy-lobe", "DVC_ROOT": tmp_path}),
                           ("queued experiment", queued, {"DVC_EXP_NAME": "sappy-lobe", "DVC_ROOT": tmp_path}),
                           ("dvc repro", tmp_path, {})):
        monkeypatch.chdir(cwd)
        for name in ("DVC_EXP_NAME", "DVC_ROOT"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, str(value))
        assert common.stage_main("a stage", lambda parser: None, lambda params, args: pytest.fail("ran"), argv=[]) == 1
        said[case] = capsys.readouterr().err
    assert all("train.lora.r: expected int, got 'abc'" in err for err in said.values())
    assert "this experiment's -S values are now in params.yaml" in said["workspace experiment"]
    assert "`git checkout params.yaml metrics && dvc checkout --force`" in said["workspace experiment"]
    assert "-S values" not in said["queued experiment"] and "-S values" not in said["dvc repro"]
    monkeypatch.setenv("DVC_EXP_NAME", "sappy-lobe")  # the workspace experiment again, from here on
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    # Another file's problem, raised while the stage runs (evaluate's reading of decoding.json): no hint.
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())

    def refuse(params, args):
        raise ConfigError("metrics/decoding.json", ["chosen.top_k: expected int, got 1.5 (float)"])

    assert common.stage_main("a stage", lambda parser: None, refuse, argv=[]) == 1
    err = capsys.readouterr().err
    assert "metrics/decoding.json: 1 problem(s)" in err and "-S values" not in err
    (tmp_path / "dvc.yaml").write_text("stages: [not, a, mapping]\n")  # unreadable as a pipeline: dvc checkout alone
    assert "`git checkout params.yaml && dvc checkout --force`" in common.experiment_params_hint(Path("params.yaml"))
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")  # stages before the failed one wrote it
    assert "`git checkout params.yaml && dvc checkout --force`" in common.experiment_params_hint(Path("params.yaml"))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)  # untracked: git checkout would fail whole
    subprocess.run(["git", "add", "dvc.lock"], cwd=tmp_path, check=True)
    assert "`git checkout params.yaml dvc.lock && dvc checkout --force`" in \
        common.experiment_params_hint(Path("params.yaml"))


def test_every_library_a_list_names_is_installed():
    """A misspelled name would be skipped for good (import_quietly skips what is not installed)."""
    import importlib.util

    from qlora_pipeline import process

    names = [name for attr in ("TRACKING", "QUANTIZED_MODEL", "ADAPTERS", "TRAINING", "JUDGE", "ROUGE")
             for name in getattr(process, attr)] + [process.DATABASE_STORE, "gguf"]
    assert [name for name in names if importlib.util.find_spec(name) is None] == []


def test_full_fine_tuning_stages_import_no_peft_and_adapters_from_runs_bring_mlflow(params_factory):
    import argparse

    from qlora_pipeline.cli import _model_imports
    from qlora_pipeline.pipeline.common import model_imports
    from qlora_pipeline.process import ADAPTERS, QUANTIZED_MODEL, TRACKING

    assert model_imports(params_factory({"train.method": "qlora"})) == ADAPTERS
    assert model_imports(params_factory({"train.method": "full"})) == QUANTIZED_MODEL
    assert model_imports(params_factory({"train.method": "lora"}), ("qlora",)) == QUANTIZED_MODEL  # zero-shot's
    assert _model_imports(argparse.Namespace(adapter=["alice=models/adapter"])) == ADAPTERS
    assert _model_imports(argparse.Namespace(adapter=["alice=runs:/abc/adapter"])) == (*ADAPTERS, *TRACKING)
    assert _model_imports(argparse.Namespace(adapter="runs:/abc/adapter")) == (*ADAPTERS, *TRACKING)  # export's
    for spec in ("runs:/abc/adapter", "bob= runs:/def/adapter"):  # bare; spaced, as parse_adapter_spec strips it
        assert _model_imports(argparse.Namespace(adapter=[spec])) == (*ADAPTERS, *TRACKING), spec
