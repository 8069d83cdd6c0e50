"""Where `make test` spends CPU, by process: the test workers, the stage processes, the commands, DVC, the rest.

On two cores both workers keep the machine busy for the whole suite, so what `make test` costs is CPU time, and
what shortens it is less of it. This measures whose it is, on a fresh clone of this checkout:

1. ``git clone`` into a work folder, then ``make setup gguf browser postgres`` there (what `make test` sets up);
2. a ``.pth`` file in *the clone's* environment (never this checkout's) that makes every Python process started
   from it append its own CPU time (``os.times``: user + system, its children not included), its command line
   and its test worker to a JSON-lines file at exit, when ``SUITE_CPU_LOG`` names one;
3. ``make test`` in the clone, with ``SUITE_CPU_LOG`` set;
4. the log summed by role: the pytest workers themselves (the tests that run the model in process), each stage
   script DVC starts, ``qlora-pipeline`` commands, DVC's own commands, and every other Python process.

Beside it, the busy CPU time over the run (the container's cgroup, or the machine's ``/proc/stat``: every
process, those that detach from ``make test`` included, such as DVC's queue workers and the servers; so run it
on an idle machine): the difference is what logged nothing (processes killed by a signal, as the kill test's
are, and programs that are not Python: llama.cpp's quantizer, PostgreSQL, Chromium, git).

It takes as long as `make test` does. Run on an idle machine:
    .venv/bin/python bench/suite_cpu.py --out bench/results/<machine>/suite_cpu.json
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

ROOT = Path(__file__).resolve().parents[1]
LOGGER = "_suite_cpu_log"
# Imported by the clone's site module in every Python process (a .pth line that starts with "import" runs).
LOGGER_SOURCE = '''
import atexit, json, os, sys, time

_PATH = os.environ.get("SUITE_CPU_LOG")
_STARTED = time.time()


def _log():
    times = os.times()
    record = {"argv": sys.argv[:3], "cpu": round(times.user + times.system, 3),
              "wall": round(time.time() - _STARTED, 3), "worker": os.environ.get("PYTEST_XDIST_WORKER"),
              # a worker runs pytest-xdist itself; a process a test starts only inherits the variable
              "xdist": "xdist" in sys.modules}
    try:
        with open(_PATH, "a", encoding="utf-8") as handle:  # one short line: appends do not interleave
            handle.write(json.dumps(record) + "\\n")
    except OSError:
        pass


if _PATH:
    atexit.register(_log)
'''


def role(record: dict) -> str:
    """What a logged process was, from its command line."""
    argv = record["argv"] or [""]
    first = argv[0]
    if first == "-c" and record["worker"] and record["xdist"]:
        return "test worker"
    if "/stages/" in first or first.startswith("stages/"):
        return "stage " + Path(first).stem.replace("_", "-")
    name = Path(first).name
    if name == "qlora-pipeline":
        return "qlora-pipeline " + (argv[1] if len(argv) > 1 else "")
    if name == "dvc":
        return "dvc"
    if first.endswith("pytest/__main__.py") or name == "pytest":
        return "pytest main"
    return "other"


def summarize(records: list[dict]) -> dict:
    by_role: dict[str, list[float]] = collections.defaultdict(list)
    for record in records:
        by_role[role(record)].append(record["cpu"])
    groups = collections.defaultdict(lambda: [0.0, 0])
    for name, cpus in by_role.items():
        group = "stage processes" if name.startswith("stage ") else (
            "qlora-pipeline commands" if name.startswith("qlora-pipeline") else name)
        groups[group][0] += sum(cpus)
        groups[group][1] += len(cpus)
    return {
        "groups": {name: {"cpu_seconds": round(cpu, 1), "processes": count}
                   for name, (cpu, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])},
        "roles": {name: {"cpu_seconds": round(sum(cpus), 1), "processes": len(cpus)}
                  for name, cpus in sorted(by_role.items(), key=lambda kv: -sum(kv[1]))},
        "logged_cpu_seconds": round(sum(record["cpu"] for record in records), 1),
    }


def busy_cpu_seconds() -> float:
    """Busy CPU time so far, all cores: this container's (cgroup v2 ``cpu.stat``) where there is one, else the
    machine's since boot (``/proc/stat``'s first line, less idle and iowait)."""
    cgroup = Path("/sys/fs/cgroup/cpu.stat")
    if cgroup.is_file():
        usage = dict(line.split() for line in cgroup.read_text().splitlines() if line.strip())
        if "usage_usec" in usage:
            return int(usage["usage_usec"]) / 1e6
    fields = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal; guest is inside user
    return busy / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="where the clone goes (default: a new temp folder)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="suite-cpu-"))
    clone = workdir / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run(["make", "setup", "gguf", "browser", "postgres"], cwd=clone, env=env, check=True)
    python = clone / ".venv" / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / f"{LOGGER}.py").write_text(LOGGER_SOURCE, encoding="utf-8")
    (Path(site) / f"{LOGGER}.pth").write_text(f"import {LOGGER}\n", encoding="utf-8")

    log = workdir / "cpu.jsonl"
    before = busy_cpu_seconds()
    started = time.perf_counter()
    test = subprocess.run(["make", "test"], cwd=clone, env={**env, "SUITE_CPU_LOG": str(log)},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - started
    all_cpu = busy_cpu_seconds() - before
    (workdir / "make-test.log").write_text(test.stdout, encoding="utf-8")
    records = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    summary = summarize(records)
    report = {
        "machine": environment(),
        "make_test_exit_status": test.returncode,
        "make_test_wall_seconds": round(wall, 1),
        "machine_busy_cpu_seconds": round(all_cpu, 1),
        "cores_busy_on_average": round(all_cpu / wall, 2),
        **summary,
        "not_logged_cpu_seconds": round(all_cpu - summary["logged_cpu_seconds"], 1),
        "summary_line": test.stdout.strip().splitlines()[-1] if test.stdout.strip() else "",
    }
    print(f"make test: exit {test.returncode}, {wall:.0f} s, {all_cpu:.0f} s of CPU in all "
          f"({report['cores_busy_on_average']} cores busy on average); {report['summary_line']}")
    print(f"{'whose':<32} {'CPU s':>8} {'processes':>10}")
    for name, row in summary["groups"].items():
        print(f"{name:<32} {row['cpu_seconds']:>8} {row['processes']:>10}")
    print(f"{'(not logged)':<32} {report['not_logged_cpu_seconds']:>8}")
    print(f"clone, logs and make test's output: {workdir}")
    write_report(args.out, report)
    if test.returncode:
        sys.exit(f"make test failed (exit {test.returncode}); its output: {workdir / 'make-test.log'}")


if __name__ == "__main__":
    main()
