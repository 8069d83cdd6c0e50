"""How long `dvc repro` takes when nothing changed, against the floor of starting DVC at all.

Both are timed in the same run, `--repeats` times each, medians reported: `dvc version` (the CLI's
own start-up, which no pipeline change can remove) and `dvc repro` on an up-to-date workspace, which
must report that nothing changed (the script fails otherwise: that would time real work).

Run (after `make run`; nothing else busy on the machine):
    .venv/bin/python bench/noop_repro.py --out bench/results/noop_repro_<machine>.json
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


def timed(command: list[str]) -> tuple[float, str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return seconds, done.stdout + done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from qlora_pipeline import hardware

    dvc = str(Path(sys.executable).parent / "dvc")
    startup, repro = [], []
    for _ in range(args.repeats):
        startup.append(timed([dvc, "version"])[0])
        seconds, output = timed([dvc, "repro"])
        if "Running stage" in output:
            raise SystemExit("dvc repro ran a stage: the workspace was not up to date; run `dvc repro` first")
        repro.append(seconds)
    result = {"machine_line": hardware.capability_line(), "repeats": args.repeats,
              "dvc_version_seconds": round(statistics.median(startup), 2),
              "noop_repro_seconds": round(statistics.median(repro), 2)}
    result["noop_repro_vs_startup"] = round(result["noop_repro_seconds"] / result["dvc_version_seconds"], 2)
    print(f"machine: {result['machine_line']}")
    print(f"dvc version (start-up floor): {result['dvc_version_seconds']} s; no-op dvc repro: "
          f"{result['noop_repro_seconds']} s ({result['noop_repro_vs_startup']}x the floor; target <= 5 s)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
