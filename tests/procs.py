"""Helpers for tests that start processes: which shared-memory segments a run left behind, and
waiting for a server to listen."""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import socket
import subprocess
import time


def ends_with_the_test() -> None:
    """In a process a test starts in a process group of its own (a server, a long run, the bench), before exec:
    SIGTERM when the process that started it ends (Linux's parent-death signal), so that a test run
    killed mid-test (a timeout's SIGTERM, a Ctrl-C to pytest's group) stops it, and it removes its
    shared memory, rather than leave it running. Elsewhere nothing."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def signal_state(pid: int) -> dict[str, int]:
    """A process's SigBlk, SigIgn, SigCgt (masks: bit n - 1 is signal n) and Threads, from /proc; {} where
    it cannot be read (gone, not Linux)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            rows = [line.split(":") for line in f if line.startswith(("SigBlk", "SigIgn", "SigCgt", "Threads"))]
    except OSError:
        return {}
    return {k: int(v, 10 if k == "Threads" else 16) for k, v in rows}


def segments() -> set[str]:
    return set(glob.glob("/dev/shm/layerstream-*"))


def creator_alive(path: str) -> bool:
    """Whether the process that made a segment (the pid in layerstream-PID-...) still runs."""
    try:
        os.kill(int(os.path.basename(path).split("-")[1]), 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def made_under(path: str) -> int | None:
    """The pid of the run whose child made a segment (layerstream-PID-pPARENT-...), or None."""
    try:
        return int(os.path.basename(path).split("-")[2].removeprefix("p"))
    except (ValueError, IndexError):
        return None


def leaked(before: set[str], run: int | None = None) -> set[str]:
    """New segments whose creator is gone: leaks. One whose creator still runs belongs to another
    run on this machine, not to the test; `run`: only the segments of that run (a launcher the test
    started as a process), since another test's run may have a creator just killed and its segment
    about to be removed (the pipeline tests kill staging on purpose)."""
    return {s for s in segments() - before if not creator_alive(s) and (run is None or made_under(s) == run)}


def descendants(pid: int) -> list[int]:
    """The processes under `pid`, at any depth (from ps: /proc has no list of children)."""
    out = subprocess.run(["ps", "-eo", "pid,ppid"], capture_output=True, text=True).stdout.split("\n")[1:]
    kids: dict[int, list[int]] = {}
    for line in out:
        if line.strip():
            p, pp = map(int, line.split())
            kids.setdefault(pp, []).append(p)
    found, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            found.append(k)
            todo.append(k)
    return found


def wait_listening(p: subprocess.Popen, port: int, timeout: float = 120) -> None:
    """Wait until the server process `p` accepts connections on 127.0.0.1:`port`; AssertionError
    with its stderr where it exits first, or where `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        assert p.poll() is None, f"the server exited: {p.stderr.read()}"
        assert time.monotonic() < deadline, f"the server did not listen in {timeout:g} s"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.3)


def stop(p: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
    """Send `sig` to the server process `p` and return its exit status; its process group is killed
    if it has not ended within `timeout` (which then raises subprocess.TimeoutExpired)."""
    p.send_signal(sig)
    try:
        return p.wait(timeout=timeout)
    finally:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@contextlib.contextmanager
def serving(p: subprocess.Popen, port: int):
    """The block runs once the server process `p` listens on `port` (wait_listening); its process
    group is killed on the way out if it still runs (a test that fails leaves nothing running)."""
    try:
        wait_listening(p, port)
        yield p
    finally:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


# A program's last part that prints, for each of its threads, whether it is the main one and whether it
# blocks SIGINT (NOTE [ SIGINT and threads ]); `sigint_takers` reads what it printed.
THREAD_MASKS = r"""
import os as _os, signal as _signal
for _t in _os.listdir("/proc/self/task"):
    _m = int(next(l for l in open(f"/proc/self/task/{_t}/status") if l.startswith("SigBlk")).split()[1], 16)
    print(_t == str(_os.getpid()), bool(_m & (1 << (_signal.SIGINT - 1))))
"""


def sigint_takers(out: str) -> tuple[int, int]:
    """From THREAD_MASKS' output: (threads, threads but the main one that take SIGINT); asserts the
    main one takes it."""
    rows = [line.split() for line in out.splitlines()]
    assert ["True", "False"] in rows, out
    return len(rows), sum(1 for main, blocked in rows if main == "False" and blocked == "False")
