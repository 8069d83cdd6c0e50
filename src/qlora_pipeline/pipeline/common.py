"""Plumbing shared by the stage modules: the command-line entry point and reading stage outputs."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

import yaml

from qlora_pipeline.config import ConfigError, Params, load_params
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.io import read_jsonl
from qlora_pipeline.process import (ADAPTERS, QUANTIZED_MODEL, TRACKING, import_quietly, keep_freed_memory,
                                    tracking_imports)
from qlora_pipeline.warm import run_in_fork


def model_imports(params: Params, peft_for: tuple[str, ...] = ("qlora", "lora")) -> tuple[str, ...]:
    """The model libraries of a stage that loads the base and the trained model: PEFT only where
    ``train.method`` makes an adapter the stage loads (``peft_for``); full fine-tuning's model is plain."""
    return ADAPTERS if params.train.method in peft_for else QUANTIZED_MODEL


def validate_conversation(obj: dict, where: str) -> dict:
    """Check one canonical conversation; raise naming ``where`` (file:line) on a bad shape."""
    messages = obj.get("messages")
    if not isinstance(obj.get("id"), str) or not isinstance(messages, list):
        raise PipelineError(f"{where}: expected {{'id': str, 'messages': [...]}}; re-run the previous stage")
    for index, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("speaker"), str)
                and isinstance(message.get("text"), str)):
            raise PipelineError(
                f"{where}: messages[{index}] needs string 'speaker' and 'text'; re-run the previous stage"
            )
    return obj


def read_conversations(path: Path) -> list[dict]:
    """Canonical conversations, checked line by line; ids must be unique (splits group by them)."""
    conversations, lines = [], {}
    for number, obj in read_jsonl(path):
        conversation = validate_conversation(obj, f"{path}:{number}")
        if conversation["id"] in lines:
            raise PipelineError(f"{path}:{number}: conversation id '{conversation['id']}' repeats line "
                                f"{lines[conversation['id']]}; re-run the previous stage")
        lines[conversation["id"]] = number
        conversations.append(conversation)
    if not conversations:
        raise PipelineError(f"{path}: no conversations; re-run the previous stage or check its params")
    return conversations


def stage_imports(imports: Callable[[Params], Sequence[str]], params: Params) -> list[str]:
    """What a stage imports first under ``params``: its script's list, and MLflow's store where the tracking URI
    names a database (``process.tracking_imports``)."""
    names = list(imports(params))
    if set(TRACKING) & set(names):
        names += [name for name in tracking_imports(params.mlflow.tracking_uri) if name not in names]
    return names


def experiment_params_hint(params_path: Path) -> str | None:
    """How to get back from a params error in a ``dvc exp run`` in the workspace, None elsewhere.

    DVC writes an experiment's ``-S`` values into the params file before running it and keeps them there, and
    the failed stage's outputs removed, when a stage fails (``git checkout`` of the params, dvc.lock and metrics,
    then ``dvc checkout --force``, gave back the last commit's state, ``dvc status`` up to date, tried on a real
    run). A queued
    experiment runs in a copy under ``.dvc/tmp``, which leaves the workspace as it was. DVC names the experiment
    (``DVC_EXP_NAME``) and the repository's root (``DVC_ROOT``) to every stage it runs in one.
    """
    root = os.environ.get("DVC_ROOT")
    if not os.environ.get("DVC_EXP_NAME") or not root:
        return None
    here, root_dir = Path.cwd().resolve(), Path(root).resolve()
    if not here.is_relative_to(root_dir) or here.is_relative_to(root_dir / ".dvc"):
        return None
    # dvc.lock too: the stages before the failed one ran and wrote it, and `dvc checkout` then refused to remove
    # their outputs ("unsaved files") without --force (tried on a real run: a risk gate failing after evaluate).
    lock = ["dvc.lock"] if _git_tracks(root_dir, "dvc.lock") else []  # git checkout fails whole on an untracked one
    restore = " ".join([str(params_path), *lock, *git_carried_folders(root_dir / "dvc.yaml")])
    return (f"this experiment's -S values are now in {params_path} (DVC wrote them there and keeps them after a "
            f"failed stage, whose outputs it removed): fix the value there and run it again, or restore the last "
            f"commit with `git checkout {restore} && dvc checkout --force` (git checkout also drops your own "
            "uncommitted edits of those files)")


def _git_tracks(root: Path, path: str) -> bool:
    try:
        return subprocess.run(["git", "ls-files", "--error-unmatch", path], cwd=root, capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def git_carried_folders(dvc_yaml: Path) -> list[str]:
    """The folders (or top-level files) of the outputs ``dvc_yaml`` has git carry (``cache: false``): ``dvc
    checkout`` does not bring those back; none where the file cannot be read."""
    try:
        pipeline = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return []
    stages = pipeline.get("stages") if isinstance(pipeline, dict) else None
    found = set()
    for stage in stages.values() if isinstance(stages, dict) else ():
        if not isinstance(stage, dict):
            continue
        for entry in [e for kind in ("outs", "metrics", "plots") for e in stage.get(kind) or []]:
            for path, options in (entry.items() if isinstance(entry, dict) else ()):
                if isinstance(options, dict) and options.get("cache") is False:
                    found.add(Path(path).parts[0])
    return sorted(found)


def stage_main(description: str, add_paths: Callable[[argparse.ArgumentParser], None],
               run: Callable[[Params, argparse.Namespace], object], argv: list[str] | None = None,
               imports: Callable[[Params], Sequence[str]] = lambda params: ()) -> int:
    """Shared entry point of ``stages/*.py``: parse paths, load params, run, report errors briefly.

    ``imports``: the script's ``imports(params)``, the modules the stage runs on (its own module and the lists
    in ``process``), imported before ``run`` with full garbage collections held off (``stage_imports``,
    ``process.import_quietly``). The scripts import their stage module inside ``run``, not at their top, so
    that its own imports (torch, for most) are among them. A stage runs in a fork of the warm process, which has
    imported them already (``warm.run_in_fork``), where it can: one that loads a model (torch among them) waits
    for it; a data stage takes it only if it is ready, and otherwise starts it for the model stages after it.
    """
    # Per-tensor progress bars of weight loading bury the stage's own summary lines in DVC's log.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    keep_freed_memory()
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file")
    add_paths(parser)
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
    except ConfigError as err:  # the params file itself: in a workspace experiment, DVC's -S values are in it
        print(f"error: {err}", file=sys.stderr)
        hint = experiment_params_hint(args.params)
        if hint:
            print(hint, file=sys.stderr)
        return 1
    try:
        names = stage_imports(imports, params)
        if argv is None:  # its own process: in a warm fork where it can (warm.py)
            # A stage loading a model waits for the warm process's imports, which are its own; a data stage
            # takes one only if it is ready, and otherwise starts it for the model stages after it.
            status = run_in_fork(wait="torch" in names)
            if status is not None:
                return status
        import_quietly(names)
        run(params, args)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
