"""A stage's start-up and exit: its libraries imported as before against ``process.import_quietly``, in one run.

Each stage process imports its libraries (its script's ``imports(params)``, read here from the script), works,
and exits. ``import_quietly`` holds CPython's full garbage collections off while they import and freezes what
they made, so neither the full collections during the imports nor the one at exit walks those objects. Here a
fresh interpreter per measurement imports one stage's list and exits, both ways, interleaved (plain then quiet,
then quiet then plain, ...): the wall time of the whole process, start to exit, which is what the change
touches. The stage's own work is not run.

Run on an idle machine (one heavy process at a time):
    .venv/bin/python bench/startup_bench.py --out bench/results/<machine>/startup.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import write_report

ROOT = Path(__file__).resolve().parents[1]

STAGES = ("fetch", "clean", "split", "quantize-load", "train-adapter", "style-judge", "choose-decoding", "zero-shot",
          "evaluate", "risk")

# The child: the stage's modules imported plainly (one importlib call each, as the stage's own imports did) or
# through import_quietly; then it exits as a stage does.
CHILD = """
import importlib, sys
sys.path.insert(0, {src!r})
from qlora_pipeline import process
if {quiet!r}:
    process.import_quietly({names!r})
else:
    for name in {names!r}:
        importlib.import_module(name)
"""


def stage_names(stage: str, params) -> list[str]:
    """What the stage's script imports first under ``params`` (its ``imports``, as ``stage_main`` resolves it)."""
    import importlib.util

    from qlora_pipeline.pipeline.common import stage_imports

    path = ROOT / "stages" / f"{stage.replace('-', '_')}.py"
    spec = importlib.util.spec_from_file_location(f"stage_script_{path.stem}", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # its top only: stage_main runs under __main__
    return stage_imports(script.imports, params)


def one(names: list[str], quiet: bool) -> float:
    # Bytecode written and read as a stage's own process does (`make` unexports PYTHONDONTWRITEBYTECODE).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", CHILD.format(src=str(ROOT / "src"), names=names, quiet=quiet)],
                   check=True, capture_output=True, env=env)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per stage; medians reported")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml",
                        help="the params the stages' lists are read under (train.method, mlflow.tracking_uri)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: give 1 or more")
    sys.path.insert(0, str(ROOT / "src"))
    from qlora_pipeline import hardware
    from qlora_pipeline.config import load_params

    params = load_params(args.params)
    lists = {stage: stage_names(stage, params) for stage in STAGES}
    for names in lists.values():  # every module's bytecode written once, before anything is timed
        one(names, quiet=False)
    rows, total = {}, {"plain": 0.0, "quiet": 0.0}
    for stage, names in lists.items():
        times = {"plain": [], "quiet": []}
        for round_ in range(args.rounds):
            for quiet in ((False, True) if round_ % 2 == 0 else (True, False)):  # neither always goes first
                times["quiet" if quiet else "plain"].append(one(names, quiet=quiet))
        plain, quiet = statistics.median(times["plain"]), statistics.median(times["quiet"])
        total["plain"] += plain
        total["quiet"] += quiet
        rows[stage] = {"imports": names, "plain_seconds": round(plain, 2), "quiet_seconds": round(quiet, 2),
                       "saved_seconds": round(plain - quiet, 2), "speedup": round(plain / quiet, 2),
                       "rounds": {k: [round(t, 2) for t in v] for k, v in times.items()}}
        print(f"{stage:16} plain {plain:6.2f} s  quiet {quiet:6.2f} s  {plain / quiet:4.2f}x", flush=True)
    print(f"{'ten stages':16} plain {total['plain']:6.2f} s  quiet {total['quiet']:6.2f} s  "
          f"{total['plain'] / total['quiet']:4.2f}x  ({total['plain'] - total['quiet']:.1f} s saved per run)")
    report = {"machine": hardware.capability_line(), "python": sys.version.split()[0], "stages": rows,
              "ten_stages": {"plain_seconds": round(total["plain"], 2), "quiet_seconds": round(total["quiet"], 2),
                             "speedup": round(total["plain"] / total["quiet"], 2)}}
    write_report(args.out, report)


if __name__ == "__main__":
    main()
