"""warm.py: a script run in a fork of a warm process is the process it would have been, and dies as it would.

Each test runs a small script (SCRIPT) in fresh interpreters, as a stage's script runs: it asks for a fork with
``warm.run_in_fork`` and otherwise goes on in its own process. The warm processes preload a small module of the
test's own (slow_lib: a stand-in for torch, it records which process imported it), live in a temporary folder of
the test's (TMPDIR) and stop after two idle seconds. The stages' own use (stage_main) runs in every end-to-end test:
test_mlflow_server.py's one MLflow run per `dvc repro` is tracking.execution_key finding DVC above a fork, and
test_failures.py's kill -9 of each stage is this module's kill of a fork.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from conftest import ROOT

SCRIPT = """
import json, os, signal, sys, time
sys.path.insert(0, {src!r})
from qlora_pipeline import warm

if not os.environ.get(warm.CHILD):
    status = warm.run_in_fork({preload!r}, wait=os.environ.get("QLORA_PIPELINE_TEST_WAIT", "1") == "1")
    if status is not None:
        sys.exit(status)
import qlora_pipeline
slow = sys.modules.get("slow_lib")
print(json.dumps({{"pid": os.getpid(), "ppid": os.getppid(), "argv": sys.argv[1:], "cwd": os.getcwd(),
                  "stage": os.environ.get("DVC_STAGE"), "child": os.environ.get(warm.CHILD),
                  "imported_by": slow and slow.IMPORTED_BY, "umask": os.umask(0), "stdin": sys.stdin.read(),
                  "edited": getattr(qlora_pipeline, "EDITED", False),
                  "hup_ignored": signal.getsignal(signal.SIGHUP) == signal.SIG_IGN,
                  "cpus": sorted(os.sched_getaffinity(0)), "dev_mode": sys.flags.dev_mode,
                  "nice": os.getpriority(os.PRIO_PROCESS, 0),
                  "files": __import__("resource").getrlimit(__import__("resource").RLIMIT_NOFILE)[0]}}), flush=True)
print("a line on stderr", file=sys.stderr, flush=True)
action = sys.argv[1]
if action == "exit":
    sys.exit(int(sys.argv[2]))
if action == "term":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))
if action == "abort":
    os.kill(os.getpid(), signal.SIGKILL)
if action == "leftovers":  # what a process's exit finishes: a thread still running, an atexit function, a file
    import atexit, threading
    atexit.register(print, "atexit ran", flush=True)
    threading.Thread(target=lambda: (time.sleep(0.5), print("thread done", flush=True))).start()
    handle = open("unclosed.txt", "w")
    handle.write("kept")
    sys.exit(sys.argv[2] if sys.argv[2:] else None)
if action == "raise":
    handle = open("unclosed.txt", "w")
    handle.write("kept")
    raise ValueError("boom")
if action == "cprint":  # a C extension's printf: in the C library's buffer (stdout a pipe) until the process exits
    import ctypes
    ctypes.CDLL(None).printf(b"from C\\n")
    sys.exit(0)
if action == "family":  # a process of its own, as a stage's llama.cpp converter or accelerate's workers
    import subprocess
    open("child.pid", "w").write(str(subprocess.Popen(["sleep", "120"]).pid))
if action in ("term", "sleep", "family"):
    open("fork.pid", "w").write(str(os.getpid()))
    time.sleep(120)
"""
# Its import takes QLORA_PIPELINE_TEST_SLOW seconds, or, given QLORA_PIPELINE_TEST_GATE, lasts until the test creates
# that file (at most 120 s): an import still under way for as long as a test needs, however slow the machine.
SLOW_LIB = ("import os, time\ngate = os.environ.get('QLORA_PIPELINE_TEST_GATE')\n"
            "if gate:\n    until = time.monotonic() + 120\n"
            "    while not os.path.exists(gate) and time.monotonic() < until:\n        time.sleep(0.05)\n"
            "else:\n    time.sleep(float(os.environ.get('QLORA_PIPELINE_TEST_SLOW', 0.3)))\n"
            "IMPORTED_BY = os.getpid()\n")
THREAD_LIB = "import threading, time\nthreading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"


@pytest.fixture
def folder():
    """A short temporary folder (the warm process's socket path must fit in 107 bytes), removed after."""
    path = Path(tempfile.mkdtemp(prefix="warm-"))
    yield path
    for process in warm_processes(path):  # idle for 30 s (environment): not left to outlive the test
        with contextlib.suppress(psutil.Error):
            process.kill()
    shutil.rmtree(path, ignore_errors=True)


def setup(folder: Path, preload: tuple[str, ...] = ("slow_lib",)) -> Path:
    """A copy of the package (so that a test may edit it) and the script, under ``folder``."""
    shutil.copytree(ROOT / "src" / "qlora_pipeline", folder / "src" / "qlora_pipeline",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "lib").mkdir()
    (folder / "lib" / "slow_lib.py").write_text(SLOW_LIB)
    (folder / "lib" / "thread_lib.py").write_text(THREAD_LIB)
    script = folder / "script.py"
    script.write_text(SCRIPT.format(src=str(folder / "src"), preload=preload))
    return script


def environment(folder: Path, **extra: str) -> dict[str, str]:
    """Idle for 30 s: a slow interpreter start on a loaded machine must not find the warm process gone between two
    runs (a test that waits for the idle stop sets its own)."""
    return {"PATH": os.environ["PATH"], "TMPDIR": str(folder), "PYTHONPATH": str(folder / "lib"),
            "QLORA_PIPELINE_WARM_IDLE": "30", **extra}


def run(script: Path, *args: str, env: dict, stdin: str = "", umask: int = 0o022, nohup: bool = False,
        limited: bool = False, pinned: bool = False, options: tuple[str, ...] = ()) -> tuple[dict, str, int]:
    def before():
        import resource

        os.umask(umask)
        if nohup:  # as `nohup` starts a command
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
        if limited:  # as `nice -n 5 prlimit --nofile=256` would
            os.setpriority(os.PRIO_PROCESS, 0, 5)
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        if pinned:  # as `taskset -c 0` would
            os.sched_setaffinity(0, {0})

    proc = subprocess.run([sys.executable, *options, str(script), *args], cwd=script.parent, env=env, input=stdin,
                          capture_output=True, text=True, timeout=120, preexec_fn=before)
    lines = proc.stdout.strip().splitlines()
    return (json.loads(lines[0]) if lines else {}), proc.stderr, proc.returncode


def warm_processes(folder: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline", "ppid"]):  # read once: a process may end meanwhile
        cmdline = process.info["cmdline"] or []
        if any(str(folder) in arg and arg.endswith(".sock") for arg in cmdline):
            found.append(process)
    return [p for p in found if not any(q.pid == p.info["ppid"] for q in found)]  # the servers, not their forks


def test_a_script_runs_in_a_fork_of_the_warm_process_as_its_own_process_would(folder):
    script = setup(folder)
    first, err, code = run(script, "exit", "3", env=environment(folder, DVC_STAGE="one"), stdin="hello",
                           umask=0o027)
    assert code == 3 and "a line on stderr" in err, err
    assert first["argv"] == ["exit", "3"] and Path(first["cwd"]) == folder and first["stdin"] == "hello"
    assert first["umask"] == 0o027 and first["stage"] == "one"
    warm = first["ppid"]
    assert first["imported_by"] == warm != first["pid"], first  # slow_lib came imported from the warm process
    assert first["child"] and first["child"] != str(first["pid"])  # the pid of the script's own process
    # The package edited between the two: a fork imports the project's modules from the script's sys.path.
    init = folder / "src" / "qlora_pipeline" / "__init__.py"
    init.write_text(init.read_text() + "\nEDITED = True\n")
    queued = {"CELERY_LOG_LEVEL": "20", "_MP_FORK_LOGLEVEL_": "20"}  # what DVC's queue worker sets for its runs
    second, _, code = run(script, "exit", "0", env=environment(folder, DVC_STAGE="two", **queued), nohup=True,
                          limited=True)
    assert code == 0 and second["ppid"] == warm and second["stage"] == "two"  # DVC's variables vary freely
    assert second["edited"] and not first["edited"]
    assert second["hup_ignored"] and not first["hup_ignored"]
    assert (second["nice"], second["files"]) == (5, 256) and first["nice"] == 0 and first["files"] != 256
    if len(os.sched_getaffinity(0)) > 1:  # other CPUs: another warm process, whose torch sized its pool for them
        pinned, _, code = run(script, "exit", "0", env=environment(folder), pinned=True)
        assert code == 0 and pinned["cpus"] == [0] and pinned["imported_by"] == pinned["ppid"] != warm


def test_a_fork_ends_as_the_scripts_own_process_would_however_the_script_ends(folder):
    """A fork leaves without tearing the interpreter down (warm._leave), yet its exit does what a process's does:
    the status Python gives each ending, threads joined, atexit functions run, a file its globals left open
    written out, the C library's buffered output, and an uncaught exception's traceback."""
    script = setup(folder)
    endings = [("leftovers",), ("leftovers", "bye"), ("raise",), ("exit", "300"), ("exit", str(2 ** 64)), ("cprint",)]
    outcomes = {}
    for switch in ("1", "0"):  # in a fork of the warm process, and in the script's own process
        env = environment(folder, QLORA_PIPELINE_WARM_START=switch)
        for ending in endings:
            (folder / "unclosed.txt").unlink(missing_ok=True)
            proc = subprocess.run([sys.executable, str(script), *ending], cwd=folder, env=env, capture_output=True,
                                  text=True, timeout=120)
            first, *rest = proc.stdout.splitlines()
            written = (folder / "unclosed.txt").read_text() if (folder / "unclosed.txt").exists() else None
            outcomes[switch, ending] = (json.loads(first)["child"] is not None, proc.returncode, rest,
                                        proc.stderr.splitlines()[-1], written)
    for ending in endings:
        forked, *warm = outcomes["1", ending]
        cold, *own = outcomes["0", ending]
        assert forked and not cold, ending
        assert warm == own, (ending, warm, own)
    assert outcomes["1", ("leftovers",)][1:] == (0, ["thread done", "atexit ran"], "a line on stderr", "kept")
    assert outcomes["1", ("leftovers", "bye")][1:] == (1, ["thread done", "atexit ran"], "bye", "kept")
    assert outcomes["1", ("raise",)][1:] == (1, [], "ValueError: boom", "kept")
    assert outcomes["1", ("exit", "300")][1] == 300 & 0xFF and outcomes["1", ("exit", str(2 ** 64))][1] == 255
    assert outcomes["1", ("cprint",)][1:3] == (0, ["from C"])


def test_a_signal_reaches_the_fork_and_a_fork_killed_by_one_ends_its_process_the_same_way(folder):
    script = setup(folder)
    env = environment(folder)
    aborted = run(script, "abort", env=env)
    assert aborted[2] == -signal.SIGKILL and aborted[0]["ppid"] != aborted[0]["pid"]
    proc = subprocess.Popen([sys.executable, str(script), "term"], cwd=folder, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    pid_file = folder / "fork.pid"
    deadline = time.monotonic() + 60
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 7  # the fork's own handler ran and chose the exit code
    pid_file.unlink()


def test_kill_9_of_the_scripts_process_kills_its_fork_at_once(folder):
    script = setup(folder)
    proc = subprocess.Popen([sys.executable, str(script), "sleep"], cwd=folder, env=environment(folder),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid_file = folder / "fork.pid"
    deadline = time.monotonic() + 60
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.1)
    fork = psutil.Process(int(pid_file.read_text()))
    assert fork.pid != proc.pid and fork.is_running()
    proc.kill()
    proc.wait()
    gone, _ = psutil.wait_procs([fork], timeout=20)  # it would sleep 120 s; reaped late on a loaded machine
    assert gone, "the fork outlived the process it ran for"


def test_ctrl_z_stops_the_fork_with_the_scripts_process_and_continuing_continues_both(folder):
    script = setup(folder)
    # As a shell starts a job: Ctrl-Z's default action (a test runner may ignore it), in a group of its own with
    # its parent in this session (a group with none is orphaned, and the kernel drops its SIGTSTP).
    def as_a_job():
        os.setpgid(0, 0)
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)

    proc = subprocess.Popen([sys.executable, str(script), "family"], cwd=folder, env=environment(folder),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=as_a_job)
    pid_file = folder / "fork.pid"
    child = None
    try:
        wait_for(pid_file.exists)
        wait_for(lambda: catches(proc.pid, signal.SIGTSTP))  # waiting on its fork, Ctrl-Z in hand
        fork, own = psutil.Process(int(pid_file.read_text())), psutil.Process(proc.pid)
        child = psutil.Process(int((folder / "child.pid").read_text()))  # what the fork started
        family = (fork, own, child)
        proc.send_signal(signal.SIGTSTP)  # what Ctrl-Z sends the terminal's foreground processes
        wait_for(lambda: {p.status() for p in family} == {psutil.STATUS_STOPPED})
        proc.send_signal(signal.SIGCONT)  # fg
        wait_for(lambda: psutil.STATUS_STOPPED not in {p.status() for p in family})
        proc.send_signal(signal.SIGTERM)  # still passed on: the fork ends, and its script's process the same way
        assert proc.wait(timeout=30) == -signal.SIGTERM
        gone, _ = psutil.wait_procs([fork], timeout=5)
        assert gone
    finally:
        proc.kill()
        proc.wait()
        if child is not None:
            child.kill()


def catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler of its own for ``signum`` (SigCgt in /proc/<pid>/status)."""
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigCgt:"))
    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)


def test_another_environment_gets_another_warm_process_and_the_switch_runs_in_the_process_itself(folder):
    script = setup(folder)
    one, _, _ = run(script, "exit", "0", env=environment(folder, SOME_SETTING="a"))
    other, _, _ = run(script, "exit", "0", env=environment(folder, SOME_SETTING="b"))
    assert one["imported_by"] == one["ppid"] and other["imported_by"] == other["ppid"] != one["ppid"]
    dev, _, code = run(script, "exit", "0", env=environment(folder, SOME_SETTING="a"), options=("-X", "dev"))
    assert code == 0 and dev["dev_mode"] and dev["imported_by"] == dev["ppid"] not in (one["ppid"], other["ppid"])
    assert not one["dev_mode"]  # interpreter options are the warm process's too
    cold, _, code = run(script, "exit", "0", env=environment(folder, QLORA_PIPELINE_WARM_START="0"))
    assert code == 0 and cold["child"] is None and cold["imported_by"] is None


def test_the_warm_process_stops_by_itself_when_idle_and_takes_its_socket_away(folder):
    script = setup(folder)
    run(script, "exit", "0", env=environment(folder, QLORA_PIPELINE_WARM_IDLE="6"))
    sockets = list((folder / f"qlora-pipeline-warm-{os.getuid()}").glob("*.sock"))
    assert len(sockets) == 1 and warm_processes(folder)
    deadline = time.monotonic() + 30
    while (warm_processes(folder) or sockets[0].exists()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not warm_processes(folder) and not sockets[0].exists()
    assert not list(sockets[0].parent.glob("*.ready*"))  # nor its word that it was ready


def wait_for(condition, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert condition()


def test_a_script_that_does_not_wait_runs_at_once_and_starts_a_warm_process_for_the_next(folder):
    """A data stage's way (stage_main's wait=False): a warm process only once it has imported everything."""
    script = setup(folder)
    gate = folder / "imports-may-end"
    env = environment(folder, QLORA_PIPELINE_TEST_WAIT="0", QLORA_PIPELINE_TEST_GATE=str(gate))
    files = folder / f"qlora-pipeline-warm-{os.getuid()}"
    try:
        # The warm process's import lasts until the gate opens: these two run while it is under way.
        first, _, code = run(script, "exit", "0", env=env)
        assert code == 0 and first["child"] is None and first["imported_by"] is None  # its own process, at once
        wait_for(lambda: len(warm_processes(folder)) == 1)  # started in the background, listening already
        (server,) = warm_processes(folder)
        # Another, while it imports: runs at once too, and starts no second one; looking left nothing in its log.
        second, _, code = run(script, "exit", "0", env=env)
        assert code == 0 and second["child"] is None and [p.pid for p in warm_processes(folder)] == [server.pid]
        assert not list(files.glob("*.ready"))  # still importing
        gate.touch()
        wait_for(lambda: list(files.glob("*.ready")))
        (ready,) = files.glob("*.ready")
        assert ready.read_text() == str(server.pid)
        third, _, code = run(script, "exit", "4", env=env)
        assert code == 4 and third["imported_by"] == third["ppid"] == server.pid  # in a fork of it, now
        waiting, _, code = run(script, "exit", "0", env={**env, "QLORA_PIPELINE_TEST_WAIT": "1"})
        assert code == 0 and waiting["ppid"] == server.pid  # the same process serves both ways
        log = next(files.glob("*.log")).read_text()
        assert "refused" not in log, log
        # Killed (-9): its ready file stays behind; the next script runs at once and starts another.
        server.kill()
        server.wait(timeout=10)
        assert ready.exists()
        fourth, _, code = run(script, "exit", "0", env=env)
        assert code == 0 and fourth["child"] is None
        wait_for(lambda: ready.exists() and ready.read_text() != str(server.pid))
        fifth, _, code = run(script, "exit", "0", env=env)
        assert code == 0 and fifth["ppid"] == int(ready.read_text()) != server.pid
    finally:
        for process in warm_processes(folder):
            process.kill()


def test_imports_that_leave_a_thread_make_it_refuse_and_the_script_runs_in_its_own_process(folder):
    script = setup(folder, preload=("slow_lib", "thread_lib"))
    first, _, code = run(script, "exit", "0", env=environment(folder))
    assert code == 0 and first["child"] is None and first["imported_by"] is None
    refused = list((folder / f"qlora-pipeline-warm-{os.getuid()}").glob("*.refused"))
    assert len(refused) == 1 and "thread" in refused[0].read_text()
    started = time.monotonic()
    again, _, code = run(script, "exit", "0", env=environment(folder))
    assert code == 0 and again["child"] is None and not warm_processes(folder)  # none started again
    assert time.monotonic() - started < 10



def test_scripts_that_do_not_wait_starting_together_start_one_warm_process(folder):
    """The start lock goes with the new warm process until it listens: a script that came meanwhile found it
    neither listening nor starting, and started a second one."""
    script = setup(folder)
    env = environment(folder, QLORA_PIPELINE_TEST_WAIT="0", QLORA_PIPELINE_TEST_SLOW="3")
    try:
        procs = [subprocess.Popen([sys.executable, str(script), "exit", "0"], cwd=folder, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(4)]
        assert [proc.wait(timeout=60) for proc in procs] == [0] * 4
        wait_for(lambda: list((folder / f"qlora-pipeline-warm-{os.getuid()}").glob("*.ready")))
        assert len(warm_processes(folder)) == 1
    finally:
        for process in warm_processes(folder):
            process.kill()


def test_a_started_warm_process_that_died_is_not_taken_for_alive_before_init_reaps_it():
    """A stage waits for the warm process it started to listen while that one is alive: one that died at start
    is a zombie until init reaps it (1.5 s on this project's VMs), and must not hold the stage (and the lock)."""
    from qlora_pipeline import warm

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        wait_for(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE)  # ended, not reaped
        assert psutil.pid_exists(proc.pid) and not warm._alive(proc.pid)
    finally:
        proc.wait()
    assert warm._alive(os.getpid()) and not warm._alive(proc.pid) and not warm._alive(0)
