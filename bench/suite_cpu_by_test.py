"""Each test's CPU time, every process it starts included: where `make test`'s time goes, test by test.

`make test` keeps both cores busy (``bench/suite_cpu.py`` counts whose processes use them), so what it costs is
CPU time, and the tests' wall times under two workers say little: each runs beside the other worker's. This runs
the suite on one worker with one torch thread, as each `make test` worker runs it, and reads the machine's busy
CPU time at each test's start and end (``suite_cpu.busy_cpu_seconds``): the test's own, the first build of the
fixtures it asks for, and every process it starts (stage forks, servers, DVC, llama.cpp's tools) counted. Run on
an idle machine: anything else running is counted too. It takes about twice as long as `make test`.

    .venv/bin/python bench/suite_cpu_by_test.py --out bench/results/<machine>/suite_cpu_by_test.json [pytest args]

Run it as pytest's plugin (``-p suite_cpu_by_test``), it appends one JSON line per test to ``SUITE_CPU_BY_TEST_LOG``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import environment, write_report
from suite_cpu import busy_cpu_seconds

ROOT = Path(__file__).resolve().parents[1]
LOG = "SUITE_CPU_BY_TEST_LOG"
_started: dict[str, tuple[float, float]] = {}


# ------------------------------------------------------------------------- the plugin, inside the pytest run


def pytest_runtest_logstart(nodeid, location):
    _started[nodeid] = (time.perf_counter(), busy_cpu_seconds())


def pytest_runtest_logfinish(nodeid, location):
    wall, cpu = _started.pop(nodeid)
    record = {"test": nodeid, "wall": round(time.perf_counter() - wall, 3), "cpu": round(busy_cpu_seconds() - cpu, 3)}
    with open(os.environ[LOG], "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------------------------------- the report


def summarize(records: list[dict], top: int = 40) -> dict:
    modules: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0])
    for record in records:
        row = modules[record["test"].split("::")[0]]
        row[0] += record["cpu"]
        row[1] += record["wall"]
        row[2] += 1
    return {
        "tests": len(records),
        "cpu_seconds": round(sum(r["cpu"] for r in records), 1),
        "wall_seconds": round(sum(r["wall"] for r in records), 1),
        "modules": {name: {"cpu_seconds": round(cpu, 1), "wall_seconds": round(wall, 1), "tests": count}
                    for name, (cpu, wall, count) in sorted(modules.items(), key=lambda kv: -kv[1][0])},
        "slowest_tests": sorted(records, key=lambda r: -r["cpu"])[:top],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args, pytest_args = parser.parse_known_args()

    log = Path(tempfile.mkdtemp(prefix="suite-cpu-by-test-")) / "tests.jsonl"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    env.update({LOG: str(log), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "bench"), env.get("PYTHONPATH")]))})
    started = time.perf_counter()
    command = [sys.executable, "-m", "pytest", "-q", "-p", "suite_cpu_by_test", "-p", "no:cacheprovider", *pytest_args]
    test = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    summary = summarize(records)
    report = {"machine": environment(), "pytest_exit_status": test.returncode, "pytest_wall_seconds": round(wall, 1),
              "summary_line": test.stdout.strip().splitlines()[-1] if test.stdout.strip() else "", **summary}
    print(f"pytest: exit {test.returncode}, {wall:.0f} s; the tests {summary['cpu_seconds']:.0f} s of CPU in all; "
          f"{report['summary_line']}")
    print(f"{'CPU s':>7} {'wall s':>7} {'tests':>5}  module")
    for name, row in list(summary["modules"].items())[:25]:
        print(f"{row['cpu_seconds']:>7} {row['wall_seconds']:>7} {row['tests']:>5}  {name}")
    write_report(args.out, report)
    if test.returncode:
        sys.exit(f"pytest failed (exit {test.returncode}):\n{test.stdout[-3000:]}")


if __name__ == "__main__":
    main()
