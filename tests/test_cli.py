"""The command line refuses what it cannot use before any work, naming the flag; summary reads what it can."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, default_params_file
from qlora_pipeline.cli import main


@pytest.mark.parametrize("argv, expected", [
    (["runs", "--limit", "0"], "argument --limit: '0' is not a whole number of at least 1"),
    (["serve", "--port", "70000"], "argument --port: '70000' is not a whole number from 1 to 65535"),
    (["serve", "--port", "-5"], "argument --port: '-5' is not a whole number from 1 to 65535"),
    (["serve", "--request-timeout", "nan"], "argument --request-timeout: 'nan' is not a number of seconds above 0"),
    (["serve", "--grace-seconds", "inf"], "argument --grace-seconds: 'inf' is not a number of seconds above 0"),
    (["serve", "--max-context", "-5"], "argument --max-context: '-5' is not a whole number of at least 1"),
    (["serve", "--max-context", "0"], "argument --max-context: '0' is not a whole number of at least 1"),
    (["serve", "--max-queue", "-1"], "argument --max-queue: '-1' is not a whole number of at least 0"),
    (["export", "--adapter", "a=models/a", "--adapter", "b=models/b", "--out", "x"],
     "argument --adapter: given twice; export takes one adapter"),
    (["export", "--adapter", "models/a", "--out", "x", "--max-samples", "0"],
     "argument --max-samples: '0' is not a whole number of at least 1"),
])
def test_a_flag_out_of_range_is_refused_before_any_work(argv, expected, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert expected in capsys.readouterr().err


# A command line that names a model wrongly; what it must say; run in a fresh interpreter, which must not have
# imported torch (or any model library) by the time it says so.
BAD_MODEL_LINES = [
    (["chat", "--adapter", "ghost=no/such/folder"], "error: no/such/folder: no such adapter folder"),
    (["chat", "--adapter", "alice=.", "--use", "carol"],
     "error: --use carol: no such model; the models are base, alice (add an adapter with --adapter NAME=SOURCE)"),
    (["serve", "--adapter", "base=."], "error: --adapter 'base=.': 'base' is reserved for the base model"),
    (["serve", "--adapter", "Base=."], "error: --adapter 'Base=.': 'Base' is reserved for the base model"),
    (["serve", "--adapter", "unknown=."], "error: --adapter 'unknown=.': 'unknown' is reserved: /metrics counts"),
    (["serve", "--adapter", "a=.", "--adapter", "a=src"], "error: --adapter: the name 'a' is given twice (. and src)"),
    (["serve", "--adapter", "no such name=."], "error: --adapter 'no such name=.': adapter name 'no such name' must be"),
    (["export", "--adapter", "ghost", "--out", "x"], "error: ghost: no such adapter folder"),
]


def test_a_bad_adapter_or_model_name_is_refused_before_the_model_libraries_are_imported(tmp_path):
    code = ("import json, sys\nfrom qlora_pipeline.cli import main\n"
            "status = main(json.loads(sys.argv[1]))\n"
            "print(json.dumps({'status': status, 'loaded': sorted({'torch', 'transformers', 'peft', 'bitsandbytes'}"
            " & set(sys.modules))}))")
    for argv, message in BAD_MODEL_LINES:
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(argv)], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)
        assert json.loads(proc.stdout.splitlines()[-1]) == {"status": 1, "loaded": []}, (argv, proc.stderr)
        assert message in proc.stderr, argv
    assert list(tmp_path.iterdir()) == []  # export wrote nothing


def test_the_command_lines_reserved_name_is_peft_s_own():
    from qlora_pipeline.modeling import stacked_lora
    from qlora_pipeline.serving import specs

    assert specs.PEFT_BASE == stacked_lora.PEFT_BASE


def test_summary_prints_what_it_can_read_and_names_what_it_cannot(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "train.json").write_text(json.dumps(
        {"steps": 80, "zero_shot_val_loss": 4.6, "best_val_loss": 4.06, "best_step": 80, "wall_seconds": 150.0}))
    assert main(["summary"]) == 0
    assert "Training: 80 steps, validation loss 4.6 (zero-shot) -> 4.06 (best, step 80), 150.0 s." in (
        capsys.readouterr().out)

    (tmp_path / "metrics" / "split.json").write_text("{oops")  # damaged
    (tmp_path / "metrics" / "eval.json").write_text(json.dumps({"steps": 1}))  # another version's, or another file
    assert main(["summary"]) == 1
    out, err = capsys.readouterr()
    assert "Training: 80 steps" in out and "Compare runs:" in out  # the rest is still printed
    assert "metrics/split.json: not readable (JSONDecodeError" in out
    assert "metrics/eval.json: not readable (KeyError: 'samples')" in out
    assert err.startswith("error: metrics/split.json, metrics/eval.json: not the metrics this version's stages write")

    (tmp_path / "metrics" / "split.json").unlink()
    (tmp_path / "metrics" / "split.json").mkdir()  # a folder where the file was: IsADirectoryError's traceback
    evaluation = json.loads((ROOT / "metrics" / "eval.json").read_text())  # the committed run's, every key there
    (tmp_path / "metrics" / "eval.json").write_text(json.dumps({**evaluation, "confidence_level": math.inf}))
    assert main(["summary"]) == 1
    out = capsys.readouterr().out
    assert "metrics/split.json: not readable (IsADirectoryError" in out
    assert "metrics/eval.json: not readable (OverflowError" in out  # an interval's level of Infinity


def test_serve_refuses_a_port_in_use_before_loading_a_model():
    from qlora_pipeline.errors import PipelineError
    from qlora_pipeline.serving.server import check_port_free

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PipelineError, match=rf"--port {port}: cannot listen on 127.0.0.1:{port} \(Address "
                                                r"already in use\); stop what listens there, or pick another port"):
            check_port_free("127.0.0.1", port)
    check_port_free("127.0.0.1", port)  # let go: free again
    with pytest.raises(PipelineError, match=rf"cannot listen on 192.0.2.1:{port} \(Cannot assign requested"):
        check_port_free("192.0.2.1", port)  # TEST-NET-1: an address of no machine here


def test_mlflow_sync_refuses_a_tracking_uri_that_is_no_store(capsys):
    """Checked as params' mlflow.tracking_uri is; MLflow's own refusal was a traceback, after reading the spool."""
    assert main(["mlflow-sync", "--tracking-uri", "foo://bar"]) == 1
    assert "--tracking-uri: 'foo://bar' is no MLflow tracking store; give a server" in capsys.readouterr().err


@pytest.mark.parametrize("argv, expected", [
    (["export", "--format", "safetensors", "--quant", "q8_0"], "--quant is for --format gguf or gguf-lora, not "
                                                               "safetensors"),
    (["export", "--format", "vllm", "--quant", "f16"], "--quant is for --format gguf or gguf-lora, not vllm"),
    (["export", "--format", "gguf", "--dtype", "float32"], "--dtype is for --format safetensors, not gguf"),
])
def test_an_export_flag_its_format_does_not_read_is_refused_before_any_work(argv, expected, tmp_path, capsys):
    """--quant with safetensors ran a 32 s merge and dropped it; --dtype with gguf was dropped too."""
    out = tmp_path / "out"
    assert main([*argv, "--adapter", str(tmp_path / "adapter"), "--out", str(out)]) == 1
    assert expected in capsys.readouterr().err and not out.exists()


def test_compare_refuses_run_with_runs(capsys):
    """--runs was dropped, and the whole queue of experiments ran."""
    assert main(["compare", "--run", "--runs", "abc"]) == 1
    assert "--run and --runs: choose one" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["runs", "compare", "chat", "serve"])
def test_a_params_file_named_but_missing_is_refused_not_read_as_the_defaults(command, tmp_path, capsys):
    """A mistyped --params ran on the defaults (another MLflow store, other chat settings) and said nothing."""
    missing = tmp_path / "parms.yaml"
    assert main([command, "--params", str(missing)]) == 1
    assert f"{missing}: 1 problem(s) in params:\n  - --params names no file; check the path" in capsys.readouterr().err


def params_with_store(folder, uri: str):
    """A params file of the defaults in ``folder`` with ``mlflow.tracking_uri`` set to ``uri``."""
    import yaml

    params = folder / "params.yaml"
    raw = yaml.safe_load(default_params_file(folder).read_text())
    params.write_text(yaml.safe_dump({**raw, "mlflow": {**raw["mlflow"], "tracking_uri": uri}}))
    return params


@pytest.mark.parametrize("command", ["runs", "compare"])
def test_a_server_that_does_not_answer_is_named_at_once(command, tmp_path, capsys):
    """They waited through MLflow's minutes of retries (killed at 120 s by the hunt's timeout), then a traceback."""
    import time

    from qlora_pipeline.launching import free_port

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    params = params_with_store(tmp_path, uri)
    started = time.monotonic()
    assert main([command, "--params", str(params)]) == 1
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert f"error: {uri} unreachable (mlflow.tracking_uri); start the server (make mlflow-server)" in err
    assert "Traceback" not in err


def other_programs_database(path) -> None:
    import contextlib
    import sqlite3

    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE notes (text)")
        db.commit()


# A SQLite store's file as a user may have it: made by the test in tmp_path ("store.db" unless a folder is named),
# and what `runs` and `compare` say of it.
BAD_STORE_FILES = {
    "missing": (lambda path: None, "no MLflow store here (no stage has logged to it, or a mistyped path)"),
    "missing folder": (lambda path: None, "no such folder as"),
    "a folder": (lambda path: path.mkdir(), "a folder, not an MLflow store file"),
    "random bytes": (lambda path: path.write_bytes(bytes(range(256)) * 4), "not an MLflow store (file is not a "
                                                                           "database; 1024 bytes)"),
    "an empty file": (lambda path: path.write_bytes(b""), "not an MLflow store (no MLflow tables in it; an empty "
                                                          "file)"),
    "another program's": (other_programs_database, "not an MLflow store (no MLflow tables in it)"),
}


@pytest.mark.parametrize("command", ["runs", "compare"])
@pytest.mark.parametrize("case", BAD_STORE_FILES)
def test_a_sqlite_file_that_is_no_mlflow_store_is_named_and_left_as_it_was(command, case, tmp_path, capsys):
    """MLflow made a store of a missing file (folders too) and built its tables into an empty one or another
    program's database, then said there was no experiment; any other file was a traceback."""
    make, says = BAD_STORE_FILES[case]
    store = tmp_path / ("new/store.db" if case == "missing folder" else "store.db")
    make(store)
    params = params_with_store(tmp_path, f"sqlite:///{store}")
    before = sorted(tmp_path.rglob("*"))
    contents = store.read_bytes() if store.is_file() else None
    assert main([command, "--params", str(params), *(["--out", str(tmp_path / "out")] * (command == "compare"))]) == 1
    err = capsys.readouterr().err
    assert f"error: {store}: {says}" in err
    assert "(mlflow.tracking_uri); run the pipeline first (make run), or set mlflow.tracking_uri to the store" in err
    assert "Traceback" not in err
    assert sorted(tmp_path.rglob("*")) == before  # nothing made: no store, folder or output
    assert (store.read_bytes() if store.is_file() else None) == contents


def damaged_store(empty_store, folder):
    """An MLflow store whose experiment_tags table is gone (a hand edit, a half-applied migration by another tool)."""
    import contextlib
    import sqlite3

    from conftest import place_store

    uri = place_store(empty_store, folder)
    with contextlib.closing(sqlite3.connect(uri.removeprefix("sqlite:///"))) as db:
        db.execute("DROP TABLE experiment_tags")
        db.commit()
    return uri


@pytest.mark.parametrize("command", ["runs", "compare"])
@pytest.mark.parametrize("store", ["damaged", "mysql://user@127.0.0.1:9/mlflow"])
def test_a_store_mlflow_cannot_read_is_named_with_what_to_do(command, store, empty_store, tmp_path, capsys):
    """A store with its tables but damaged past them, and a database whose driver is not installed: tracebacks."""
    uri = damaged_store(empty_store, tmp_path) if store == "damaged" else store
    params = params_with_store(tmp_path, uri)
    assert main([command, "--params", str(params), *(["--out", str(tmp_path / "out")] * (command == "compare"))]) == 1
    err = capsys.readouterr().err
    if store == "damaged":
        assert f"error: {uri}: MLflow could not read or write this store (" in err and "experiment_tags" in err
        assert f"check it with `mlflow ui --backend-store-uri {uri}`" in err
    else:
        assert (f"error: {uri}: this store's database driver is not installed (the module 'MySQLdb'); install it "
                "(.venv/bin/pip install mysqlclient)") in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_a_run_row_mlflow_refuses_to_read_is_named_not_a_traceback(empty_store, tmp_path, capsys):
    """A run row without a start time (written by another tool): MLflow's own refusal was a traceback from `runs`."""
    import contextlib
    import sqlite3

    import mlflow

    from conftest import place_store

    uri = place_store(empty_store, tmp_path)
    client = mlflow.MlflowClient(uri)
    client.create_run(client.create_experiment("qlora-pipeline", artifact_location=(tmp_path / "art").as_uri()))
    with contextlib.closing(sqlite3.connect(tmp_path / "mlflow.db")) as db:
        db.execute("UPDATE runs SET start_time = NULL")
        db.commit()
    assert main(["runs", "--params", str(params_with_store(tmp_path, uri))]) == 1
    err = capsys.readouterr().err
    assert f"error: {uri}: MLflow could not read or write this store (start_time cannot be None)" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, expected", [
    (["--prefix", ""], "--prefix '': give the start of the comparison's experiment names (default: params' "
                       "compare.name_prefix, 'compare-')"),
    (["--prefix", "mine-", "--runs", "abc"], "--prefix and --runs: --prefix picks the newest runs of experiments so "
                                             "named, which --run and --runs do not read; drop it"),
    (["--prefix", "mine-", "--run"], "--prefix and --run: --prefix picks"),
])
def test_compare_refuses_a_prefix_it_would_drop(argv, expected, tmp_path, capsys):
    """'' was read as the default prefix; with --run or --runs a prefix was dropped (and --run queued experiments)."""
    assert main(["compare", "--params", str(default_params_file(tmp_path)), "--out", str(tmp_path / "out"),
                 *argv]) == 1
    assert expected in capsys.readouterr().err and not (tmp_path / "out").exists()
