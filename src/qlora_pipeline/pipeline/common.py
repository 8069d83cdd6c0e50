"""Plumbing shared by the stage modules: the command-line entry point and reading stage outputs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from qlora_pipeline.config import Params, load_params
from qlora_pipeline.data.splitting import validate_conversation
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.io import read_jsonl

CONVERSATIONS = "conversations.jsonl"
MANIFEST = "manifest.json"


def read_conversations(path: Path) -> list[dict]:
    conversations = [validate_conversation(obj, f"{path}:{n}") for n, obj in read_jsonl(path)]
    if not conversations:
        raise PipelineError(f"{path}: no conversations; re-run the previous stage or check its params")
    return conversations


def stage_main(description: str, add_paths: Callable[[argparse.ArgumentParser], None],
               run: Callable[[Params, argparse.Namespace], object], argv: list[str] | None = None) -> int:
    """Shared entry point of ``stages/*.py``: parse paths, load params, run, report errors briefly."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file")
    add_paths(parser)
    args = parser.parse_args(argv)
    try:
        run(load_params(args.params), args)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
