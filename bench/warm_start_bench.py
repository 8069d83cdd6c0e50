"""Warm starts against cold ones: `dvc repro -f` of a whole pipeline both ways, alternating, in one run.

A stage runs in a fork of the warm process (``qlora_pipeline/warm.py``, the default: a model stage waits for
its imports, a data stage takes it once it is ready and starts it otherwise), or imports its libraries in its own
process as before (``QLORA_PIPELINE_WARM_START=0``, the baseline). Here
`dvc repro -f` runs every stage of a copy of the repository each way, ``--rounds`` times, the order alternating
(warm first, then cold first, ...). Each stage's seconds are read from DVC's output, from its "Running stage"
line to the next. Every warm run starts its own warm process (a temporary folder of its own), so each pays for
the imports once, as the first `dvc repro` of a session does; the figures are of a cold start of the run, not of
a warm process left from before. Outputs are compared too: both ways must give the same hashes in dvc.lock but
for the metrics files (timings and peak memory differ run to run).

Run after `make run` (it copies the workspace with its DVC cache and runs there), nothing else busy:
    .venv/bin/python bench/warm_start_bench.py --out bench/results/<machine>/warm_start.json
`--repo` takes another repository of this project (the tests' tiny pipeline, say: tests/conftest.py tiny_repo).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchlib import write_report

ROOT = Path(__file__).resolve().parents[1]


def repro(repo: Path, warm: bool) -> tuple[float, dict[str, float], dict[str, str]]:
    """`dvc repro -f` in ``repo``: its seconds, each stage's, and the hashes of dvc.lock's outputs."""
    folder = tempfile.mkdtemp(prefix="warm-bench-")  # its own warm process: this run pays for starting it
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", "TMPDIR": folder,
           "QLORA_PIPELINE_WARM_START": "1" if warm else "0", "QLORA_PIPELINE_WARM_IDLE": "5",
           # as `make run` sets them (saved tokenizers record whether the Hub was off)
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    proc = subprocess.Popen(["dvc", "repro", "-f"], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    begun, lines = {}, []
    for line in proc.stdout:
        lines.append(line)
        found = re.match(r"Running stage '([^']+)'", line)
        if found:
            begun[found.group(1)] = time.monotonic()
    ended = time.monotonic()
    if proc.wait():
        raise SystemExit("dvc repro -f failed:\n" + "".join(lines)[-3000:])
    shutil.rmtree(folder, ignore_errors=True)
    order = list(begun)
    ends = [*(begun[stage] for stage in order[1:]), ended]
    stages = {stage: end - begun[stage] for stage, end in zip(order, ends)}
    return ended - started, stages, output_hashes(repo)


# Outputs that hold the run's own timings, peak memory or energy: they differ from run to run either way.
TIMED = ("metrics/", "reports/decoding.json", "reports/evaluate/run.json", "reports/risk.md")


def output_hashes(repo: Path) -> dict[str, str]:
    """Every output file's md5 from dvc.lock (a folder's files from its listing in the cache), but TIMED."""
    import json

    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    hashes = {}
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            md5 = out.get("md5", "")
            if md5.endswith(".dir"):
                listing = repo / ".dvc/cache/files/md5" / md5[:2] / md5[2:]
                hashes.update({f"{out['path']}/{entry['relpath']}": entry["md5"]
                               for entry in json.loads(listing.read_text())})
            else:
                hashes[out["path"]] = md5
    return {path: md5 for path, md5 in hashes.items() if not path.startswith(TIMED)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=ROOT, help="a repository of this project, run (copied first)")
    parser.add_argument("--rounds", type=int, default=1, help="runs each way, alternating; medians reported")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: give 1 or more")
    if not (args.repo / "dvc.lock").is_file():
        parser.error(f"--repo {args.repo}: no dvc.lock; run the pipeline there first (make run)")
    sys.path.insert(0, str(ROOT / "src"))
    from qlora_pipeline import hardware

    with tempfile.TemporaryDirectory(prefix="warm-bench-repo-") as tmp:
        repo = Path(tmp) / "repo"
        shutil.copytree(args.repo, repo, symlinks=True, ignore=shutil.ignore_patterns(".venv", "mlruns"))
        runs = {"warm": [], "cold": []}
        for round_ in range(args.rounds):
            for warm in ((True, False) if round_ % 2 == 0 else (False, True)):
                seconds, stages, hashes = repro(repo, warm)
                runs["warm" if warm else "cold"].append((seconds, stages, hashes))
                print(f"round {round_ + 1} {'warm' if warm else 'cold'}: {seconds:7.1f} s", flush=True)
    reference = runs["cold"][0][2]
    differ = sorted({path for way in runs.values() for run in way for path in set(run[2]) | set(reference)
                     if run[2].get(path) != reference.get(path)})
    same = not differ
    total = {way: statistics.median(run[0] for run in done) for way, done in runs.items()}
    stages = {}
    for stage in runs["cold"][0][1]:
        warm = statistics.median(run[1][stage] for run in runs["warm"])
        cold = statistics.median(run[1][stage] for run in runs["cold"])
        stages[stage] = {"warm_seconds": round(warm, 1), "cold_seconds": round(cold, 1),
                         "saved_seconds": round(cold - warm, 1)}
        print(f"{stage:16} cold {cold:7.1f} s  warm {warm:7.1f} s  saved {cold - warm:6.1f} s")
    print(f"{'dvc repro -f':16} cold {total['cold']:7.1f} s  warm {total['warm']:7.1f} s  "
          f"{total['cold'] / total['warm']:4.2f}x  outputs the same both ways: {same}")
    report = {"machine": hardware.capability_line(), "python": sys.version.split()[0], "repo": args.repo.name,
              "rounds": args.rounds, "repro_seconds": {way: round(value, 1) for way, value in total.items()},
              "speedup": round(total["cold"] / total["warm"], 2), "stages": stages,
              "outputs_same_both_ways": same, "outputs_that_differ": differ,
              "per_run_seconds": {way: [round(run[0], 1) for run in done] for way, done in runs.items()}}
    write_report(args.out, report)
    if not same:
        raise SystemExit(f"outputs differ between the runs (dvc.lock's hashes, timed files aside): {differ}")


if __name__ == "__main__":
    main()
