"""Warm starts: a stage runs in a fork of a process that has imported its libraries already.

Plumbing: no output depends on it. A stage that loads a model spends ~5.5 s of a core importing torch,
transformers, bitsandbytes, PEFT, MLflow and scikit-learn before it reads a byte (``python -X importtime``; AMD
EPYC, Zen 4), and ``dvc repro`` starts seven of them. The first stage of a run starts a *warm process*: it imports
the libraries of every stage (``WARM``) once and waits on a Unix socket. Each model stage sends it its command and
gets a fork, which has them all in memory already, and the stage runs in that fork. A data stage (no model: fetch,
clean, split) still spends ~1.5 s importing MLflow and pandas; it takes a fork only of a warm process that has
finished importing (it says so in a ``.ready`` file), and otherwise runs in its own process at once, having
started one in the background: the model stages after it then find it ready, its imports made while the data
stages ran. (A data-only target, ``dvc repro clean``, so starts one that no stage uses: ~5.5 s of a core and
~0.5 GB of memory, until its idle stop.)

The fork runs what the stage's own process would: its script as ``__main__`` with the stage's argv, working
folder, environment, umask, ``sys.path`` and standard streams (passed over the socket). The project's own
modules are imported afresh from the stage's ``sys.path`` (a queued experiment's copy runs its own code); only
the third-party libraries come from the warm process. The stage's process waits and ends as the fork ends (its
exit code, or the same signal). The fork ends as a process does (threads joined, ``atexit`` functions run, the
streams flushed) but without the interpreter's teardown, which in a fork copies the page of every object the
warm process imported (``_leave``). SIGINT, SIGTERM and SIGHUP the stage's process receives are passed on to the
fork, Ctrl-Z (SIGTSTP) stops the fork and its process group with it until it is continued, and if it is killed
(kill -9), the warm process kills the fork at once. A fork also dies with the warm process.

A warm process serves only processes like the one that started it: the same interpreter, interpreter options,
installed packages (by name and version), CPUs (torch sizes its thread pool from them while it is imported), the
same environment but for the variables no library reads while it is imported (``_volatile``: DVC's, pytest's and
this project's own), and the same version of this file. It stops
by itself when nothing has run in it for ``QLORA_PIPELINE_WARM_IDLE`` seconds (60). It refuses to serve where a
fork is not safe or would not be the stage's process: another platform than Linux, a CUDA or ROCm build of torch
(a GPU run spends its time computing, not importing), a thread left running by an import, an import that failed,
or interpreter options it could not take; a ``.refused`` file beside its socket then keeps later stages from
asking. The stage then imports as before, and so it
does whenever anything here fails before the fork starts. ``QLORA_PIPELINE_WARM_START=0`` turns it off.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import json
import os
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from qlora_pipeline.process import (DATABASE_STORE, JUDGE, ROUGE, TRACKING, TRAINING, import_quietly,
                                    keep_freed_memory, pid_running)

# What the warm process imports: every library a stage that loads a model imports first (process.py's lists),
# then those the stages import later, inside their work, which each fork imported again (~0.2 s of a core a model
# stage; py-spy on the tiny pipeline): MLflow's run context (GitPython for the commit, IPython to tell whether it
# runs in a notebook), its tracing processor and the default store's SQLite dialect, the figures' pyplot, and the
# tabulate of torch._dynamo's utils. One that is not installed (IPython comes with the dev extras) is skipped.
LATER = ("git", "IPython", "mlflow.tracing.processor.base_mlflow", "sqlalchemy.dialects.sqlite", "matplotlib.pyplot",
         "tabulate")
WARM = (*TRAINING, *JUDGE, *ROUGE, *TRACKING, DATABASE_STORE, *LATER)
SWITCH = "QLORA_PIPELINE_WARM_START"  # "0" turns warm starts off
IDLE = "QLORA_PIPELINE_WARM_IDLE"  # seconds a warm process waits with nothing running in it before it stops
# Set in a fork's environment to the pid of the stage's own process (the one DVC started): the fork, and what it
# starts, start cold, and tracking finds the DVC process above that one (tracking.execution_key).
CHILD = "QLORA_PIPELINE_WARM_CHILD"
DEFAULT_IDLE_SECONDS = 60.0
# How long a stage waits for its fork to start: the warm process imports WARM first (~8 s on 2 cores).
START_TIMEOUT_SECONDS = 300.0
# The resource limits a fork takes from its stage's process (`ulimit`, `prlimit`), with its CPUs (`taskset`) and
# niceness (`nice`); one it may not take (a hard limit above the warm process's) stays the warm process's.
LIMITS = ("RLIMIT_AS", "RLIMIT_CORE", "RLIMIT_CPU", "RLIMIT_DATA", "RLIMIT_FSIZE", "RLIMIT_MEMLOCK", "RLIMIT_NOFILE",
          "RLIMIT_NPROC", "RLIMIT_RSS", "RLIMIT_STACK")
# The signals a stage's process passes on to its fork (those it does not ignore; the fork ignores the same).
PASSED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_PACKAGE = "qlora_pipeline"
_LOCK_FD = 3  # the start lock's descriptor in a warm process until it listens
_PR_SET_PDEATHSIG = 1


def _volatile(name: str) -> bool:
    """Variables that differ from stage to stage and that no library reads while it is imported: the warm
    process may serve a stage whose values differ (the fork takes the stage's own). ``CELERY_`` and ``_MP_FORK_``:
    the logging settings DVC's queue worker (Celery, on billiard's processes) leaves to the experiments it runs,
    which kept a queued experiment's stages from the warm process of a ``dvc repro`` or ``dvc exp run`` beside it."""
    return (name.startswith(("DVC_", "PYTEST_", "QLORA_PIPELINE_", "CELERY_", "_MP_FORK_"))
            or name in {"PWD", "OLDPWD", "SHLVL", "_"})


def _refusal_here() -> str | None:
    """Why this process must not use a warm process, or None."""
    if os.environ.get(SWITCH, "1").strip().lower() in {"0", "false", "no", "off"}:
        return f"{SWITCH} is off"
    if os.environ.get(CHILD):
        return "started by a warm fork"
    if sys.platform != "linux":
        return "not Linux"
    if "WORLD_SIZE" in os.environ:
        return "a process of a distributed launch"
    return None


@dataclass(frozen=True)
class Place:
    """Where the warm process for this interpreter, environment and import list listens."""

    socket: Path
    lock: Path
    refused: Path
    log: Path
    ready: Path  # written by the warm process once it has imported everything (its pid), removed as it stops


def place(preload: Sequence[str]) -> Place | None:
    """The warm process's files for ``preload`` in this process's setting; None where no safe folder is at hand."""
    site = sorted({p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)})
    # What is installed, by name and version (not the folders' times: Python's first byte-compiled file makes one)
    installed = [sorted(name for name in os.listdir(p) if name.endswith((".dist-info", ".egg-info"))) for p in site]
    setting = {"executable": sys.executable, "version": sys.version, "prefix": sys.prefix, "flags": _flags(),
               "cpus": sorted(os.sched_getaffinity(0)), "site": list(zip(site, installed)), "preload": list(preload),
               "env": sorted((k, v) for k, v in os.environ.items() if not _volatile(k)),
               "code": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()}
    key = hashlib.sha256(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:20]
    folder = Path(tempfile.gettempdir()) / f"qlora-pipeline-warm-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        info = os.lstat(folder)
    except OSError:
        return None
    # Ours alone: nobody else may put a socket here for us to send our environment to.
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        return None
    found = Place(*(folder / f"{key}.{kind}" for kind in ("sock", "lock", "refused", "log", "ready")))
    return found if len(str(found.socket)) < 100 else None  # AF_UNIX paths hold 107 bytes


def _flags() -> str:
    """This interpreter's options (``-u``, ``-X importtime``, ``-W error``, ...), as one string to compare."""
    options = sorted((k, v) for k, v in sys._xoptions.items() if k != "utf8")  # sys.flags.utf8_mode says it
    return repr((tuple(sys.flags), _unbuffered(), options, sys.warnoptions))


def _unbuffered() -> bool:
    """``-u`` or PYTHONUNBUFFERED (which ``sys.flags`` does not show): the standard streams write through."""
    return bool(getattr(sys.__stdout__, "write_through", False))


# ------------------------------------------------------------------ the stage's side


def run_in_fork(preload: Sequence[str] = WARM, wait: bool = True) -> int | None:
    """Run this process's command in a fork of the warm process for ``preload`` (started if none is up).

    ``wait``: False for a process that imports little of ``preload`` itself (a data stage: no model). It takes a
    fork only of a warm process that has imported everything already, and otherwise goes on in its own process at
    once, having started a warm process in the background where none was starting: the model stages after it
    then find one ready instead of waiting for its imports.

    Returns the fork's exit code; a fork killed by a signal kills this process with the same signal. None where
    no fork was started (off, refused, not ready, or anything failed before): this process then goes on as before.
    """
    if _refusal_here() or not os.path.isfile(sys.argv[0]):  # a script: what the fork runs as __main__
        return None
    try:
        found = place(preload)
        if found is None or found.refused.exists():
            return None
        connection = _connect_or_start(found, preload) if wait else _connect_if_ready(found, preload)
    except OSError:
        return None
    if connection is None:
        return None
    try:
        _send_request(connection)
        forked = _read_line(connection, START_TIMEOUT_SECONDS) == "forked"
    except OSError:
        forked = False
    if not forked:
        connection.close()
        return None
    return _wait_for_fork(connection)


def _connect(path: Path) -> socket.socket | None:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(str(path))
        return client
    except OSError:
        client.close()
        return None


def _connect_if_ready(found: Place, preload: Sequence[str]) -> socket.socket | None:
    """A connection to a warm process that has imported everything; else None, with one started in the background
    where none listens (one that listens and has not said it is ready is still importing)."""
    connection = _connect(found.socket)
    if connection is None:
        _connect_or_start(found, preload, wait=False)
        return None
    try:  # the ready file must be the listening process's own: a process started since may import still
        if _peer(connection)[0] == int(found.ready.read_text()):
            return connection
    except (OSError, ValueError):  # no ready file: still importing
        pass
    connection.close()  # the warm process takes it for a stage that went away (_Gone)
    return None


def _peer(connection: socket.socket) -> tuple[int, int, int]:
    """The pid, uid and gid of the process at the other end (Linux; a client sees the one that called ``listen``)."""
    return struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))


def _connect_or_start(found: Place, preload: Sequence[str], wait: bool = True) -> socket.socket | None:
    """A connection to the warm process, started first where none listens (one start at a time: a lock file,
    which the new process holds until it listens).

    ``wait=False``: only started where none listens and no other stage is starting one, and not waited for; no
    connection is returned (one made to find out is closed again, which the warm process takes for a stage that
    went away)."""
    connection = _connect(found.socket)
    if connection is None:
        server = None
        with open(found.lock, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # another stage is starting one
                return None
            connection = _connect(found.socket)  # another stage started it while this one waited
            if connection is None:
                # It gets this lock (its own copy of the descriptor) and lets go once it listens, or as it dies: a
                # stage that came meanwhile would start a second one.
                server = _start(found, preload, lock.fileno())
        if server is not None:
            if not wait:
                return None
            connection = _listening(found, server)
    if not wait and connection is not None:
        connection.close()
        return None
    return connection


def _start(found: Place, preload: Sequence[str], lock: int) -> int:
    """Start a warm process (``lock`` held, and handed to it); its pid."""
    # A warm process that died (kill -9) leaves its socket file, and its ready file
    found.ready.unlink(missing_ok=True)
    found.socket.unlink(missing_ok=True)
    source = str(Path(__file__).resolve().parent.parent)
    bootstrap = (f"import sys; sys.path.insert(0, {source!r}); from qlora_pipeline import warm; "
                 f"warm.become(warm.serve(sys.argv[1], sys.argv[3:], sys.argv[2], lock={_LOCK_FD}))")
    # This interpreter's options (the stdlib's own way, as multiprocessing's spawn starts its children): the
    # warm process checks that it has them all, and refuses to serve if not.
    options = [*subprocess._args_from_interpreter_flags(), *(["-u"] if _unbuffered() else []),
               # UTF-8 mode that a C locale turned on (PEP 540): the locale it coerced is not C any more
               *(["-X", "utf8"] if sys.flags.utf8_mode and "utf8" not in sys._xoptions else [])]
    return _start_detached([sys.executable, *options, "-c", bootstrap, str(found.socket), _flags(), *preload],
                           found.log, lock)


def _listening(found: Place, server: int) -> socket.socket | None:
    """A connection to the warm process just started, once it listens, which it does before it imports."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _alive(server):
        connection = _connect(found.socket)
        if connection is not None:
            return connection
        time.sleep(0.02)
    return None


def _start_detached(argv: list[str], log: Path, lock: int) -> int:
    """Start ``argv`` as a daemon does (forked twice, in a session of its own, in "/", stdin and stdout on
    /dev/null, stderr appended to ``log``, no other descriptor of ours but the lock file's, as ``_LOCK_FD``): no
    stage's child, so no stage has it to reap. Returns its pid."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(read)
            os.setsid()
            grandchild = os.fork()
            if grandchild:
                os.write(write, str(grandchild).encode())
                os._exit(0)
            os.chdir("/")
            null = os.open(os.devnull, os.O_RDWR)
            errors = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            for target, fd in ((0, null), (1, null), (2, errors)):
                os.dup2(fd, target)
            if lock != _LOCK_FD:
                os.dup2(lock, _LOCK_FD)
            os.set_inheritable(_LOCK_FD, True)
            os.closerange(_LOCK_FD + 1, os.sysconf("SC_OPEN_MAX"))
            os.execv(argv[0], argv)
        finally:
            os._exit(127)
    os.close(write)
    os.waitpid(child, 0)
    with os.fdopen(read) as pid:
        return int(pid.read() or 0)


def _alive(pid: int) -> bool:
    """Whether the warm process just started runs. Not our child: once it exits, init reaps it, and until then
    (seconds, on some machines) it is a zombie, which ``kill(pid, 0)`` still finds (``pid_running`` does not)."""
    return pid > 0 and pid_running(pid)  # 0: the first fork died before it could say (the kernel's own pid)


def _send_request(connection: socket.socket) -> None:
    _flush()
    import resource

    ignored = [int(signum) for signum in PASSED if signal.getsignal(signum) == signal.SIG_IGN]  # nohup's SIGHUP
    limits = {name: resource.getrlimit(getattr(resource, name)) for name in LIMITS if hasattr(resource, name)}
    request = json.dumps({"pid": os.getpid(), "argv": sys.argv, "orig_argv": sys.orig_argv, "cwd": os.getcwd(),
                          "env": dict(os.environ), "path": sys.path, "umask": _umask(), "ignored": ignored,
                          "affinity": sorted(os.sched_getaffinity(0)), "nice": os.getpriority(os.PRIO_PROCESS, 0),
                          "limits": limits}).encode()
    socket.send_fds(connection, [struct.pack("!I", len(request)) + request], [0, 1, 2])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _read_line(connection: socket.socket, timeout: float | None) -> str | None:
    """The next line the warm process sends; None at its end (or after ``timeout`` seconds)."""
    connection.settimeout(timeout)
    data = b""
    try:
        while not data.endswith(b"\n"):
            chunk = connection.recv(1)
            if not chunk:
                return None
            data += chunk
    except socket.timeout:
        return None
    return data.decode().strip()


def _wait_for_fork(connection: socket.socket) -> int:
    def forward(signum, _frame):
        try:
            connection.sendall(f"signal {signum}\n".encode())
        except OSError:
            pass

    def stop(_signum, _frame):
        """Ctrl-Z: the fork stops with this process (SIGSTOP to its group), and goes on when this one does.

        SIGTSTP is blocked but for the moment this process stops: another Ctrl-Z meanwhile neither runs this
        again nor meets the default action before the fork is told; it waits, and stops both again after."""
        tstp = {signal.SIGTSTP}
        signal.pthread_sigmask(signal.SIG_BLOCK, tstp)
        try:
            forward(signal.SIGSTOP, None)
            signal.signal(signal.SIGTSTP, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTSTP)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, tstp)  # stopped here until continued (fg, bg, kill -CONT)
            signal.pthread_sigmask(signal.SIG_BLOCK, tstp)
            signal.signal(signal.SIGTSTP, stop)
            forward(signal.SIGCONT, None)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, tstp)

    handlers = {**{signum: forward for signum in PASSED}, signal.SIGTSTP: stop}
    before = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()
              if signal.getsignal(signum) != signal.SIG_IGN}
    try:
        line = _read_line(connection, None)
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
        connection.close()
    if not (line and line.startswith("exit ")):
        print(f"error: the warm process ended while this stage ran in it; run again (or with {SWITCH}=0)",
              file=sys.stderr)
        return 1
    code = int(line.split()[1])
    if code < 0:  # killed by a signal: end the same way, for DVC and the shell to see
        _flush()
        try:
            signal.signal(-code, signal.SIG_DFL)
        except (OSError, ValueError):  # SIGKILL and SIGSTOP keep theirs
            pass
        os.kill(os.getpid(), -code)
        return 128 - code
    return code


# ------------------------------------------------------------------ the warm process


@dataclass
class Job:
    """What a fork runs: the stage's command, as its process sent it."""

    request: dict
    fds: list[int]
    server: int  # the warm process's pid


def serve(path: str, preload: Sequence[str], flags: str, lock: int | None = None) -> Job:
    """Listen at ``path``, import ``preload``, then fork a child per request until idle (``flags``: the
    interpreter options of the stage that started it, which this process must have; ``lock``: the start lock's
    descriptor, held until this process listens).

    Returns only in a fork, with the job it is to run (``become``); the warm process itself exits here.
    """
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    if lock is not None:
        os.close(lock)  # the next stage may start one again where this one dies: it will find this one listening
    inode, me = os.stat(path).st_ino, os.getpid()
    ready = Path(path).with_suffix(".ready")
    try:
        keep_freed_memory()
        started, environment = time.monotonic(), dict(os.environ)
        import_quietly(preload)
        # What the imports set in the environment (torch's KMP_INIT_AT_FORK, ...), as they would in a cold stage.
        set_by_imports = {k: v for k, v in os.environ.items() if environment.get(k) != v}
        print(f"warm {me}: {len(preload)} modules imported in {time.monotonic() - started:.1f} s", file=sys.stderr)
        refusal = _refusal_after_import() or (_flags() != flags and f"interpreter options {_flags()}, not {flags}")
        if refusal:
            _refuse(path, refusal)
        else:
            _say_ready(ready, me)
            job = _serve_forks(listener, float(os.environ.get(IDLE, DEFAULT_IDLE_SECONDS)))
            if job is not None:
                job.request["env"].update(set_by_imports)
                return job
    except Exception as err:  # noqa: BLE001 - the log says why; every waiting stage then starts cold
        if os.getpid() == me:
            _refuse(path, f"{type(err).__name__}: {err}")
    finally:
        if os.getpid() == me:
            _unsay_ready(ready, me)  # first: a stage that finds it still would connect to a closing socket
            _unlink_if_ours(path, inode, listener)
    return _exit(0)


def _refuse(path: str, reason: str) -> None:
    """Every later stage of this setting starts cold without asking (a reinstall makes another setting)."""
    Path(path).with_suffix(".refused").write_text(reason + "\n")
    print(f"warm {os.getpid()}: refusing to serve: {reason}", file=sys.stderr)


def _say_ready(ready: Path, me: int) -> None:
    """Everything imported: stages that import little themselves (``run_in_fork(wait=False)``) may ask now. Where
    the file cannot be written (a full disk), they run in their own processes; the model stages are served still."""
    written = ready.with_name(f"{ready.name}.{me}")
    try:
        written.write_text(str(me))
        os.replace(written, ready)
    except OSError as err:
        written.unlink(missing_ok=True)
        print(f"warm {me}: {ready}: {err}; the data stages run in their own processes", file=sys.stderr)


def _unsay_ready(ready: Path, me: int) -> None:
    try:  # ours only: a warm process started after ours died may have written its own
        if ready.read_text() == str(me):
            ready.unlink()
    except OSError:
        pass


def _exit(code: int):
    _flush()
    os._exit(code)


def _flush() -> None:
    """What this process wrote so far, out before a fork, an exit or another process writes to the same streams."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()


def _unlink_if_ours(path: str, inode: int, listener: socket.socket) -> None:
    try:  # a stage may have put another warm process's file there meanwhile: remove only our own
        if os.stat(path).st_ino == inode:
            os.unlink(path)
    except OSError:
        pass
    listener.close()


def _refusal_after_import() -> str | None:
    torch = sys.modules.get("torch")  # only where the imports brought it: checking must not import it
    if torch is not None and (torch.version.cuda or getattr(torch.version, "hip", None)):
        return "a CUDA or ROCm build of torch: a fork must not follow its initialisation"
    # Python threads only: the native pools imports start (OpenBLAS's, Arrow's) stop for a fork and start again
    # in it (their pthread_atfork handlers).
    if threading.active_count() > 1:
        return "an import left a Python thread running: a fork would not have it"
    return None


def _serve_forks(listener: socket.socket, idle: float) -> Job | None:
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children: dict[int, socket.socket] = {}
    watched: dict[socket.socket, int] = {}
    pending: dict[socket.socket, bytes] = {}  # a line of a stage's process not all read yet
    quiet_since = time.monotonic()
    forks = 0
    while True:
        timeout = None if children else quiet_since + idle - time.monotonic()
        if timeout is not None and timeout <= 0:
            print(f"warm {os.getpid()}: {forks} forks run; {idle:g} s idle: stopping", file=sys.stderr)
            return None
        try:
            ready, _, _ = select.select([listener, wake_read, *watched], [], [], timeout)
        except InterruptedError:
            ready = []
        if wake_read in ready:
            while True:
                try:
                    if not os.read(wake_read, 512):
                        break
                except BlockingIOError:
                    break
        for pid, status in _reaped():
            connection = children.pop(pid, None)
            if connection is not None:
                watched.pop(connection, None)
                pending.pop(connection, None)
                try:
                    connection.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
                except OSError:
                    pass
                connection.close()
            quiet_since = time.monotonic()
        for connection in [c for c in ready if c in watched]:
            rest = _pass_on(connection, watched[connection], pending.get(connection, b""))
            if rest is None:  # its process is gone and the fork killed: nothing more to read until it is reaped
                del watched[connection]
            else:
                pending[connection] = rest
        if listener in ready:
            running = len(children)
            job = _fork_for(listener, children, watched, (wake_read, wake_write))
            if job is not None:
                return job
            forks += len(children) - running


def _reaped() -> list[tuple[int, int]]:
    found = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return found
        if pid == 0:
            return found
        found.append((pid, status))


def _pass_on(connection: socket.socket, pid: int, pending: bytes) -> bytes | None:
    """The signals the stage's process received, for its fork; its end (killed) kills the fork and what the fork
    started (its process group). Returns what is left of a line not all read yet; None at the end."""
    try:
        data = connection.recv(256)
    except BlockingIOError:
        return pending
    except OSError:
        data = b""
    if not data:
        _kill(-pid, signal.SIGKILL)
        _kill(pid, signal.SIGKILL)  # not yet its group's leader
        return None
    *lines, rest = (pending + data).split(b"\n")
    for line in lines:
        parts = line.split()
        if len(parts) == 2 and parts[0] == b"signal" and parts[1].isdigit():
            signum = int(parts[1])
            if signum in (signal.SIGSTOP, signal.SIGCONT):  # what the fork started stops and goes on with it
                _kill(-pid, signum)
            _kill(pid, signum)
    return rest


def _kill(pid: int, signum: int) -> None:
    """``os.kill``; a negative pid is a process group."""
    try:
        os.kill(pid, signum) if pid > 0 else os.killpg(-pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _fork_for(listener: socket.socket, children: dict, watched: dict, pipe: tuple[int, int]) -> Job | None:
    """Fork for the next request; the fork gets the job, this process None (also when it could not fork)."""
    try:
        connection, _ = listener.accept()
    except OSError as err:  # out of file descriptors, say: the stage waits in the queue or starts cold
        print(f"warm {os.getpid()}: accept: {err}", file=sys.stderr)
        return None
    fds: list[int] = []
    try:
        _, uid, _ = _peer(connection)
        if uid != os.getuid():
            raise PermissionError(f"a process of user {uid} asked")
        request, fds = _receive(connection)
        # A stage's process that gave up waiting (START_TIMEOUT_SECONDS) has closed its end and runs cold.
        connection.setblocking(False)
        try:
            if connection.recv(1, socket.MSG_PEEK) == b"":
                raise ConnectionError("its process went away before the fork")
        except BlockingIOError:
            pass
        server = os.getpid()
        _flush()
        pid = os.fork()
    except (OSError, ValueError) as err:
        if not isinstance(err, _Gone):
            print(f"warm {os.getpid()}: request refused: {err}", file=sys.stderr)
        for fd in fds:
            os.close(fd)
        connection.close()
        return None
    if pid == 0:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for other in (listener, connection, *watched):
            other.close()
        for fd in pipe:
            os.close(fd)
        return Job(request, fds, server)
    for fd in fds:
        os.close(fd)
    try:
        connection.sendall(b"forked\n")
    except OSError:
        _kill(pid, signal.SIGKILL)
    children[pid] = connection
    watched[connection] = pid
    return None


class _Gone(ConnectionError):
    """A stage's process that only looked for a warm process (``_connect_or_start(wait=False)``)."""


def _receive(connection: socket.socket) -> tuple[dict, list[int]]:
    connection.settimeout(10)
    data, fds, _, _ = socket.recv_fds(connection, 1 << 16, 3)
    if not data and not fds:
        raise _Gone("closed without a request")
    try:
        if len(fds) != 3 or len(data) < 4:
            raise ValueError("expected a request with three file descriptors")
        size = struct.unpack("!I", data[:4])[0]
        data = data[4:]
        while len(data) < size:
            chunk = connection.recv(min(1 << 20, size - len(data)))
            if not chunk:
                raise ValueError("the request ended early")
            data += chunk
        return json.loads(data), fds
    except Exception:
        for fd in fds:
            os.close(fd)
        raise


def become(job: Job) -> None:
    """In a fork: turn into the stage's process, run its script as ``__main__`` and exit as it would (``_leave``)."""
    import ctypes
    import runpy

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # die with the warm process, which alone knows of us
    if os.getppid() != job.server:  # it died before the line above
        os._exit(1)
    os.setpgid(0, 0)  # its own process group: a kill of its stage's process kills what it starts too
    request = job.request
    for target, fd in enumerate(job.fds):
        os.dup2(fd, target)
        if fd > 2:
            os.close(fd)
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ[CHILD] = str(request["pid"])
    sys.argv, sys.orig_argv = list(request["argv"]), list(request["orig_argv"])
    for signum in PASSED:  # as the stage's own process had them: Python's defaults, or ignored
        ignored = int(signum) in request["ignored"]
        default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
        signal.signal(signum, signal.SIG_IGN if ignored else default)
    _take_limits(request)
    sys.path[:] = request["path"]
    if os.isatty(1) and not _unbuffered():  # as Python sets it up for a terminal
        sys.stdout.reconfigure(line_buffering=True)
    _forget_project()
    status = 0
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as done:
        status = _exit_status(done.code)
    except KeyboardInterrupt:
        raise  # Python's own exit: the traceback, then the process kills itself with SIGINT, as a stage's does
    except BaseException as error:
        _report_uncaught(error)
        status = 1
    # Out of the handler: the traceback and with it the script's frames and globals are let go, so that what
    # they alone held (a file left open) is closed, flushed, as the teardown would.
    _leave(status)


def _exit_status(code: object) -> int:
    """The status Python exits with for ``SystemExit(code)``: None 0, an integer its low byte (255 past a C long),
    anything else printed to stderr, 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF if -(2 ** 63) <= code < 2 ** 63 else 255
    _step(lambda: print(code, file=sys.stderr if sys.stderr is not None else sys.__stderr__))
    return 1


def _report_uncaught(error: BaseException) -> None:
    """What Python does with an exception nothing caught: kept in ``sys.last_*`` and printed by ``sys.excepthook``
    (by the default hook where that one fails)."""
    import traceback

    sys.last_type, sys.last_value, sys.last_traceback = type(error), error, error.__traceback__
    if sys.version_info >= (3, 12):
        sys.last_exc = error
    try:
        sys.excepthook(type(error), error, error.__traceback__)
    except BaseException:
        _step(lambda: traceback.print_exception(error, file=sys.__stderr__))


def _leave(status: int) -> None:
    """End the fork as Python ends a process, but for tearing the interpreter down.

    What a stage's exit needs is done in Python's order: other threads joined, ``atexit`` functions run (logging's
    shutdown, weak-reference finalizers, MLflow's), garbage with finalizers collected, the standard streams
    flushed (one failing to, on a reader gone or a full disk, makes the status 120, as Python does), and the C
    library's own buffers. Each step runs whatever the one before raised (a Ctrl-C while a thread is joined), its
    error reported as Python reports one it ignores. The teardown that ``os._exit`` then skips frees every object
    module by module: in a fork that writes to each of the ~840,000 objects the warm process imported, and so
    copies their pages (0.51 s of a core and ~95,000 page faults a fork, against 0.07 s and ~12,000 this way).
    Skipped with it: what only that teardown would close or delete (an object a module keeps open, with a
    ``__del__``), and C-level exit handlers; the project's code holds files and temporary folders in ``with``.
    """
    import atexit
    import ctypes
    import gc

    try:
        _step(threading._shutdown)  # what Python waits for at exit: the non-daemon threads
        _step(atexit._run_exitfuncs)  # an exception in one is printed and the others run, as at a normal exit
        _step(_forget_uncaught)
        _step(gc.collect)
        if not _step(_flush_stream, sys.stdout):  # Python's exit status where a standard stream fails to flush
            status = 120
        try:
            _flush_stream(sys.stderr)
        except BaseException:  # nowhere left to say so
            status = 120
        _step(lambda: ctypes.CDLL(None).fflush(None))  # printf's and std::cout's buffers, as exit() flushes them
    finally:
        os._exit(status)


def _forget_uncaught() -> None:
    """Let go of an uncaught exception's traceback (``_report_uncaught``) once the ``atexit`` functions that may read
    it have run: with it go the script's frames and globals, and what they alone held is closed, as the teardown
    would close it."""
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            delattr(sys, name)


def _step(call, *args) -> bool:
    """``call(*args)``; False where it raised, its exception printed as Python prints one it ignores at exit."""
    import traceback

    try:
        call(*args)
        return True
    except BaseException as error:
        try:
            print(f"Exception ignored in: {call!r}", file=sys.__stderr__)
            traceback.print_exception(error, file=sys.__stderr__)
        except BaseException:
            pass
        return False


def _flush_stream(stream) -> None:
    """A standard stream flushed, as Python flushes them at exit: one that is None or closed is left alone."""
    if stream is not None and not getattr(stream, "closed", False):
        stream.flush()


def _take_limits(request: dict) -> None:
    """The stage's process's CPUs, niceness and resource limits, where this process may take them."""
    import resource

    settings = [(os.sched_setaffinity, (0, request["affinity"])),
                (os.setpriority, (os.PRIO_PROCESS, 0, request["nice"]))]
    settings += [(resource.setrlimit, (getattr(resource, name), tuple(limit)))
                 for name, limit in request["limits"].items() if hasattr(resource, name)]
    for setting, args in settings:
        try:
            setting(*args)
        except (OSError, ValueError):  # raising a limit or lowering niceness needs privileges the stage lacked too
            pass


def _forget_project() -> None:
    """Drop this project's modules (the warm process's copy): the stage imports its own from its ``sys.path``."""
    for name in [name for name in sys.modules if name == _PACKAGE or name.startswith(_PACKAGE + ".")]:
        del sys.modules[name]
    sys.meta_path[:] = [finder for finder in sys.meta_path
                        if not type(finder).__module__.startswith(_PACKAGE + ".")]
    importlib.invalidate_caches()  # the warm process's listings of folders may predate a file added since
