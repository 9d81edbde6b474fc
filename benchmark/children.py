"""What the drivers (minatar.py and two_colors.py through grid.run_commands, gpu_check.py) share about the runs they
start: each run ends when its driver ends, however the driver ends, and the driver says what it stopped.

    - A run is started in its own session (its own process group: a terminal's Ctrl-C reaches only the driver) with
      Linux's parent-death signal set to SIGKILL (prctl(PR_SET_PDEATHSIG), set by a small launcher that then execs the
      command): if the driver dies, even by kill -9, the kernel kills the run.
    - `owned_children(prog)` around a driver's work turns SIGTERM, SIGHUP and SIGINT (those not ignored: under nohup,
      SIGHUP stays ignored) into an exception (`Stopped`, a SystemExit with code 128 + the signal), so that the
      driver's `finally` blocks run; when the block ends by any exception, every run still alive is stopped (its
      process group: SIGTERM, then SIGKILL after `GRACE` seconds; a second signal skips the wait) with one line each:
      "PROG: SIGTERM: stopped NAME (PID n)". An `atexit` hook does the same for runs left at the interpreter's exit.
    - `CellLock(path)` holds an exclusive flock on `path` while one driver runs a cell: a dead holder's lock is released
      by the kernel, and the file is removed when it is released.
"""

import atexit
import contextlib
import errno
import fcntl
import os
import signal
import subprocess
import sys
import threading
import time

GRACE = 5.0  # seconds a stopped run has to exit after SIGTERM before SIGKILL
# Run between Popen and the command (a preexec_fn would make Popen fork this multithreaded process, which JAX warns
# against): ask the kernel for SIGKILL when the parent dies, make sure the parent is still the driver, then exec the
# command in place (same PID; the death signal is kept across exec).
LAUNCHER = """
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass
if os.getppid() != int(sys.argv[1]):
    os._exit(128 + signal.SIGKILL)
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as error:
    print(f"cannot run {sys.argv[2]}: {error}", file=sys.stderr, flush=True)
    os._exit(127)
"""


class Stopped(SystemExit):
    """A signal asked the driver to stop: SystemExit(128 + signal), after its runs are stopped."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.name = signal.Signals(signum).name


class Children:
    """The runs this process started and has not yet seen end: {pid: (Popen, description)}."""

    def __init__(self):
        self.running = {}
        self.prog = os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] not in ("", "-c") else "driver"
        self.hurry = False

    def start(self, command, description: str, **popen_kwargs) -> subprocess.Popen:
        """Popen(command) in its own session, killed by the kernel if this process dies."""
        if threading.current_thread() is not threading.main_thread():  # the death signal follows the forking thread
            raise RuntimeError("runs are started from the main thread")
        launcher = [sys.executable, "-S", "-c", LAUNCHER, str(os.getpid())]
        process = subprocess.Popen([*launcher, *command], start_new_session=True, **popen_kwargs)
        self.running[process.pid] = (process, description)
        return process

    def ended(self, process: subprocess.Popen):
        self.running.pop(process.pid, None)

    def stop(self, process: subprocess.Popen, why: str) -> str:
        """Stop one run (SIGTERM to its process group, SIGKILL after GRACE s) and say so; '' if it had ended."""
        description = self.running.get(process.pid, (None, f"PID {process.pid}"))[1]
        alive = process.poll() is None
        if alive:
            _signal_group(process.pid, signal.SIGTERM)
            deadline = time.time() + GRACE
            while process.poll() is None and time.time() < deadline and not self.hurry:
                time.sleep(0.05)
        if alive:  # what is left of its group, the run itself if it did not exit
            _signal_group(process.pid, signal.SIGKILL)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.running.pop(process.pid, None)
        if not alive:
            return ""
        line = f"{self.prog}: {why}: stopped {description} (PID {process.pid})"
        print(line, file=sys.stderr, flush=True)
        return line

    def stop_all(self, why: str) -> list:
        """Stop every run still alive; one line each."""
        return [line for process, _ in list(self.running.values()) if (line := self.stop(process, why))]

    def run(self, command, description: str, **popen_kwargs) -> int:
        """subprocess.run(command).returncode, as a run of this driver (stopped with it)."""
        process = self.start(command, description, **popen_kwargs)
        process.wait()
        self.ended(process)
        return process.returncode


def _signal_group(pid: int, signum: int):
    try:
        os.killpg(pid, signum)
    except OSError as error:  # the group has ended already
        if error.errno not in (errno.ESRCH, errno.EPERM):
            raise


CHILDREN = Children()
atexit.register(lambda: CHILDREN.stop_all("exit"))


def why(error: BaseException) -> str:
    if isinstance(error, Stopped):
        return error.name
    if isinstance(error, KeyboardInterrupt):
        return "SIGINT"
    return f"{type(error).__name__}: {error}".splitlines()[0][:200] if str(error) else type(error).__name__


@contextlib.contextmanager
def owned_children(prog: str = ""):
    """Within the block, SIGTERM, SIGHUP and SIGINT raise Stopped; leaving the block by any exception stops every run
    still alive and says so. The previous signal handlers come back afterwards."""
    if prog:
        CHILDREN.prog = prog
    previous = {}
    stopping = []

    def handler(signum, frame):
        if stopping:  # a second signal: no grace for the runs
            CHILDREN.hurry = True
            return
        stopping.append(signum)
        raise Stopped(signum)

    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            if signal.getsignal(signum) is not signal.SIG_IGN:  # nohup's SIGHUP, a background job's SIGINT stay ignored
                previous[signum] = signal.signal(signum, handler)
    try:
        yield CHILDREN
    except BaseException as error:
        stopping.append(0)
        CHILDREN.stop_all(why(error))
        raise
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
        CHILDREN.hurry = False


class CellLock:
    """An exclusive, non-blocking flock on `path` (created if missing) with the holder's PID in it. acquire() is False
    while another process holds it; the kernel releases the lock of a dead holder. release() removes the file."""

    def __init__(self, path: str):
        self.path, self.fd = path, None

    def acquire(self) -> bool:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            try:  # the file may have been removed by its last holder between our open and our lock: lock the new one
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return True

    def holder(self) -> str:
        """The PID written by the process that holds the lock ('?' if unknown)."""
        try:
            with open(self.path) as f:
                return f.read().strip() or "?"
        except OSError:
            return "?"

    def release(self):
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = None
