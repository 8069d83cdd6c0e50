"""A stage's start-up and exit: its libraries imported as before against ``process.import_quietly``, in one run.

Each stage process imports its libraries (the lists its script names: ``stage_main(imports=...)``), works, and
exits. ``import_quietly`` holds CPython's full garbage collections off while they import and freezes what they
made, so neither the full collections during the imports nor the one at exit walks those objects. Here a fresh
interpreter per measurement imports one stage's list and exits, both ways, interleaved (plain then quiet, then
quiet then plain, ...): the wall time of the whole process, start to exit, which is what the change touches. The stage's own
work is not run.

Run on an idle machine (one heavy process at a time):
    .venv/bin/python bench/startup_bench.py --out bench/results/<machine>/startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Each stage's list as its script names it (stages/*.py) under the default params (train.method qlora), and the store
# of the default (SQLite) tracking URI. Kept by hand: a script's list is an argument of its stage_main call.
STAGES = {
    "fetch": ("qlora_pipeline.pipeline.fetch", "TRACKING"),
    "clean": ("qlora_pipeline.pipeline.clean", "TRACKING"),
    "split": ("qlora_pipeline.pipeline.split", "TRACKING"),
    "quantize-load": ("qlora_pipeline.pipeline.quantize_load", "QUANTIZED_MODEL", "gguf", "TRACKING"),
    "train-adapter": ("qlora_pipeline.pipeline.train_adapter", "TRAINING", "TRACKING"),
    "style-judge": ("qlora_pipeline.pipeline.style_judge", "JUDGE", "TRACKING"),
    "choose-decoding": ("qlora_pipeline.pipeline.choose_decoding", "ADAPTERS", "JUDGE", "ROUGE", "TRACKING"),
    "zero-shot": ("qlora_pipeline.pipeline.zero_shot", "ADAPTERS", "TRACKING"),
    "evaluate": ("qlora_pipeline.pipeline.evaluate", "ADAPTERS", "JUDGE", "ROUGE", "TRACKING"),
    "risk": ("qlora_pipeline.pipeline.risk", "ADAPTERS", "TRACKING"),
}

# The child: the stage's modules imported plainly (one importlib call each, as the stage's own imports did) or
# through import_quietly; then it exits as a stage does.
CHILD = """
import importlib, sys
sys.path.insert(0, {src!r})
from qlora_pipeline import process
names = []
for part in {parts!r}:
    names += list(getattr(process, part)) if part.isupper() else [part]
names.append(process.DATABASE_STORE)
if {quiet!r}:
    process.import_quietly(names)
else:
    for name in names:
        importlib.import_module(name)
"""


def one(parts: tuple[str, ...], quiet: bool) -> float:
    # Bytecode written and read as a stage's own process does (`make` unexports PYTHONDONTWRITEBYTECODE).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", CHILD.format(src=str(ROOT / "src"), parts=parts, quiet=quiet)],
                   check=True, capture_output=True, env=env)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per stage; medians reported")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: give 1 or more")
    sys.path.insert(0, str(ROOT / "src"))
    from qlora_pipeline import hardware

    for parts in STAGES.values():  # every module's bytecode written once, before anything is timed
        one(parts, quiet=False)
    rows, total = {}, {"plain": 0.0, "quiet": 0.0}
    for stage, parts in STAGES.items():
        times = {"plain": [], "quiet": []}
        for round_ in range(args.rounds):
            for quiet in ((False, True) if round_ % 2 == 0 else (True, False)):  # neither always goes first
                times["quiet" if quiet else "plain"].append(one(parts, quiet=quiet))
        plain, quiet = statistics.median(times["plain"]), statistics.median(times["quiet"])
        total["plain"] += plain
        total["quiet"] += quiet
        rows[stage] = {"plain_seconds": round(plain, 2), "quiet_seconds": round(quiet, 2),
                       "saved_seconds": round(plain - quiet, 2), "speedup": round(plain / quiet, 2),
                       "rounds": {k: [round(t, 2) for t in v] for k, v in times.items()}}
        print(f"{stage:16} plain {plain:6.2f} s  quiet {quiet:6.2f} s  {plain / quiet:4.2f}x", flush=True)
    print(f"{'ten stages':16} plain {total['plain']:6.2f} s  quiet {total['quiet']:6.2f} s  "
          f"{total['plain'] / total['quiet']:4.2f}x  ({total['plain'] - total['quiet']:.1f} s saved per run)")
    report = {"machine": hardware.capability_line(), "python": sys.version.split()[0], "stages": rows,
              "ten_stages": {"plain_seconds": round(total["plain"], 2), "quiet_seconds": round(total["quiet"], 2),
                             "speedup": round(total["plain"] / total["quiet"], 2)}}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
