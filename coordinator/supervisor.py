"""Starts the pipeline's child processes and stops them: one shutdown ladder, written once.

NOTE [ shutdown order ]
Stopping asks first (a Shutdown message, sent by the pipeline while its loop is healthy),
then waits ASK_WAIT_S, then TERMINATE (SIGUSR1), waits TERM_WAIT_S, then SIGKILL. A child the
message could not reach (one still starting, when a run is interrupted early) gets TERMINATE at
once: waiting for it gains nothing. A child found stopped (SIGSTOP, a debugger) while the ladder
waits is killed at once: neither the message nor a signal reaches it until it is continued, and the
run's exit waited out both waits for it. The waits are short, since a stop by TERMINATE is as clean
as one by the message: readers and compute hold nothing that outlives them, and staging unlinks its
arena on TERMINATE too (or the pipeline does, where it was killed).
Readers and compute stop before staging, because staging owns the shared-memory arena and unlinks it as it exits (on Shutdown, on
TERMINATE, or when its parent is gone). Children ignore SIGINT, SIGTERM, SIGHUP and SIGQUIT: a Ctrl-C, a
closed terminal, a Ctrl-\\ and a stop sent to the group reach the whole process group, and only the
coordinator decides how to stop (a child still in multiprocessing's bootstrap too: NOTE [ SIGINT
while a child starts ] in sigmask.py). A child stopped before its body runs (TERMINATE in staging's
handler while it connects) exits quietly.

NOTE [ warm starts ]
A spawned child starts a Python and imports its role's modules before it can run: for compute,
torch and the compute stack, seconds that the launcher has just spent on its own import of torch
(for the quant-type checks and the plan). So the launcher may spawn each child ahead, as soon as
its arguments are parsed (`WarmStarts`), before the model's header, whose parse takes seconds
where a large vocabulary is not yet in the header cache: the process imports its role's modules
and waits on a pipe for what `spawned` takes (the config is known once the plan is made). A warm
process that gets nothing (a check failed, the run ended) sees the pipe close and exits, or is
terminated with the launcher. Nothing of the model is read or mapped before its config comes.
The imports overlap only where cores are free for them: on a 2-core machine the children's imports
slowed the launcher's own (a refused quant type took 5.6 to 6.1 s instead of 2.6 to 3.2, on a busy
machine), so warm starts are taken from WARM_MIN_CPUS cores up.

NOTE [ quick exits ]
A process that imported torch spends about a second in the interpreter's teardown (freeing its
modules) once its work is done: 1.1 to 1.5 s on the 2-core CPU, for the compute process and for
the launcher alike. The launcher waits for the compute process's teardown when it stops the
pipeline, and the user waits for the launcher's, after the answer is out. So both end through
`quick_exit`: atexit's callbacks run (logging's flush; in the launcher the supervisor's last
resort), stdio is flushed, and the process ends with os._exit. A child's own cleanup (links
closed, the arena unlinked, threads joined) has run by then, in run_child and its role's body.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import logging
import multiprocessing as mp
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_any
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable

from layerstream.coordinator.sigmask import stop_signals_blocked
from layerstream.cpus import usable_cpus
from layerstream.errors import STALLED
from layerstream.proctitle import set_process_name
from layerstream.proto.child import ShutdownRequested, spawned
from layerstream.proto.signals import STOP_SIGNALS, TERMINATE, ignore_stop_signals, restore, set_handlers

log = logging.getLogger("layerstream.pipeline")


@dataclass
class Child:
    role: str
    ident: str
    target: Callable[[Any], None]
    cfg: Any
    proc: Any = None
    ready: dict | None = None
    restarts: int = 0
    expected_exit: bool = False
    links_heard: set = field(default_factory=set)
    last_error: str | None = None
    stop_logged: bool = False  # (-v's line, once)
    cpu: tuple[float, float] = (-1.0, 0.0)  # its CPU seconds when last looked at, and since when (start_blame)

    @property
    def label(self) -> str:
        """How a line names it: "the compute process", "the reader process reader-0"."""
        return f"the {self.role} process" + ("" if self.ident == self.role else f" {self.ident}")


WARM_MIN_CPUS = 4
# A child's own stop (its links closed, staging's arena unlinked, quick_exit) takes a small part of
# ASK_WAIT_S; one still running after it is not on its way out by itself. Staging reads TERMINATE
# within TERM_POLL_MS (staging_proc.py), well inside TERM_WAIT_S; readers and compute die of it.
ASK_WAIT_S = 1.0
TERM_WAIT_S = 0.5


def warm_starts_pay(cpus: int | None = None) -> bool:
    """Whether this machine has the cores for children to import beside the launcher (NOTE [ warm starts ])."""
    if cpus is None:
        cpus = usable_cpus()
    return cpus >= WARM_MIN_CPUS


# what a warm process of each role imports while it waits (NOTE [ warm starts ])
WARM_MODULES = {
    "staging": ("layerstream.loader.staging_proc",),
    "reader": ("layerstream.loader.reader_proc",),
    "compute": ("layerstream.compute.compute_proc",),
}


@contextlib.contextmanager
def spawning():
    """The stop signals blocked while children are spawned (NOTE [ SIGINT while a child starts ]).
    The resource tracker, which multiprocessing starts with the first child, is started first:
    its start unblocks SIGINT in this thread once it has spawned it. A main script that is no
    file (`python -`, whose `__main__.__file__` is "<stdin>") is not handed to the children: each
    ran it again from that path, which does not exist, and died with FileNotFoundError before its
    body, where a script given as a file runs again in each as multiprocessing does (Engine.open's
    line for a missing main guard)."""
    from multiprocessing import resource_tracker

    # The tracker ignores SIGINT and SIGTERM itself, not SIGHUP or SIGQUIT, so it is started with those
    # ignored, which it inherits: a closed terminal's SIGHUP to the group killed it, and the tracker
    # started again did not know the run's segment (a traceback at its unregistering).
    try:
        saved = set_handlers(set(STOP_SIGNALS) - {signal.SIGINT, signal.SIGTERM}, signal.SIG_IGN)
    except ValueError:  # (not the main thread)
        saved = {}
    try:
        resource_tracker.ensure_running()
    finally:
        restore(saved)
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    hide = path is not None and getattr(main.__spec__, "name", None) is None and not os.path.isfile(path)
    with stop_signals_blocked():
        if hide:
            del main.__file__  # (multiprocessing's spawn reads it while a child starts)
        try:
            yield
        finally:
            if hide:
                main.__file__ = path


def quick_exit(code: int) -> None:
    """End the process with `code` without the interpreter's teardown (NOTE [ quick exits ])."""
    atexit._run_exitfuncs()
    logging.shutdown()
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError, AttributeError):  # (a closed pipe: what was written is gone anyway; none)
            pass
    os._exit(code)


def _terminate(p) -> None:
    """The ladder's TERMINATE to a child still running (the children ignore SIGTERM: NOTE [ shutdown order ])."""
    if p.pid is not None and p.exitcode is None:
        try:
            os.kill(p.pid, TERMINATE)
        except ProcessLookupError:  # (gone meanwhile)
            pass


def child_main(*args) -> None:
    """Every child's process target: proto.child's `spawned(*args)`, then a quick exit with the
    status it ends with (NOTE [ quick exits ])."""
    ignore_stop_signals()
    set_process_name(f"layerstream-{args[1]}")  # (role, ident, ...): layerstream-compute, layerstream-reader-0
    code = 0
    try:
        spawned(*args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except ShutdownRequested:  # asked to stop before or after its body's own handling (NOTE [ shutdown order ])
        pass
    signal.signal(TERMINATE, signal.SIG_DFL)  # (a handler of its role raises: nothing is left to clean up)
    quick_exit(code)


def warm_child(role: str, modules: tuple[str, ...], conn, device: str = "auto") -> None:
    """A warm process: import `modules` and run the last one's `prepare_warm(device)` where it has
    one (`device`: the run's --device), then run as `spawned` with what comes on `conn` (exit quietly
    when the pipe closes first)."""
    ignore_stop_signals()  # (as every child: NOTE [ shutdown order ])
    gc.disable()  # (its imports too: NOTE [ start-up objects frozen ] in proto/child.py)
    set_process_name(f"layerstream-{role}")  # (child_main names it by its ident once it is given one)
    try:
        for m in modules:
            importlib.import_module(m)
        prepare = getattr(sys.modules[modules[-1]], "prepare_warm", None) if modules else None
        if prepare is not None:  # the role's own work before its config (compute_proc.prepare_warm)
            prepare(device)
    except BaseException:  # noqa: BLE001 - spawned imports it again and reports the error as data;
        pass  # what prepare_warm did not finish, the role's start does (and reports)
    try:
        args = conn.recv()
    except (EOFError, OSError):
        quick_exit(0)
    finally:
        conn.close()
    child_main(*args)


class WarmStarts:
    """Processes spawned ahead for a run's children, by role (NOTE [ warm starts ])."""

    def __init__(self, roles: dict[str, int], device: str = "auto"):
        """roles: how many processes of each role to start now; `device`: the run's --device."""
        ctx = mp.get_context("spawn")
        self.waiting: dict[str, list[tuple[Any, Any]]] = {}
        self.closed = False
        try:
            with spawning():  # (a Ctrl-C is taken after the loop)
                for role, n in roles.items():
                    for _ in range(n):
                        theirs, ours = ctx.Pipe(duplex=False)
                        proc = ctx.Process(target=warm_child, args=(role, WARM_MODULES.get(role, ()), theirs, device),
                                           name=f"layerstream-{role}", daemon=True)
                        proc.start()
                        theirs.close()
                        self.waiting.setdefault(role, []).append((proc, ours))
        except BaseException:  # (the caller never gets the object to close)
            self.close()
            raise

    def take(self, role: str, args: tuple):
        """A waiting process of `role` given `spawned`'s arguments, or None where none is left."""
        while self.waiting.get(role):
            proc, conn = self.waiting[role].pop(0)
            try:
                conn.send(args)
                return proc
            except OSError:  # it died meanwhile
                proc.join(0)
            finally:
                conn.close()
        return None

    def close(self) -> None:
        """Let the processes that got nothing go: their pipe closes, and those still importing are
        terminated (once: the launcher calls it when its run has started, on its way out, and at exit)."""
        if self.closed:
            return
        self.closed = True
        procs = [p for waiting in self.waiting.values() for p, _ in waiting]
        for waiting in self.waiting.values():
            for _, conn in waiting:
                conn.close()
        self.waiting = {}
        for p in procs:
            _terminate(p)
        join_all(procs, 2.0)

    def __enter__(self) -> "WarmStarts":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Supervisor:
    """Owns the child processes (spawned, daemonic) and their shutdown."""

    def __init__(self, warm: WarmStarts | None = None):
        self.mp = mp.get_context("spawn")
        self.children: dict[str, Child] = {}
        self.warm = warm  # processes spawned ahead, taken first (a restarted child is spawned anew)
        atexit.register(self.kill_all)

    def start(self, role: str, ident: str, target, cfg) -> Child:
        """Spawn target(cfg) through proto.child.spawned, which reports a failure to import the
        target or to unpickle cfg to the coordinator (cfg.endpoints) like any other."""
        c = self.children.get(ident) or Child(role, ident, target, cfg)
        c.ready, c.expected_exit, c.links_heard, c.stop_logged = None, False, set(), False
        c.cpu = (-1.0, time.monotonic())
        args = (role, ident, getattr(cfg, "endpoints", None), getattr(cfg, "parent_pid", os.getpid()),
                f"{target.__module__}:{target.__qualname__}", bytes(ForkingPickler.dumps(cfg)))
        warm = self.warm.take(role, args) if self.warm is not None and not c.restarts else None
        if warm is not None:
            c.proc = warm
            self.children[ident] = c
            log.info("%s: started (pid %d, spawned ahead)", ident, warm.pid)
            return c
        with spawning():  # (a Ctrl-C is taken once the child is recorded)
            c.proc = self.mp.Process(target=child_main, args=args, name=f"layerstream-{ident}", daemon=True)
            c.proc.start()
            self.children[ident] = c
        log.info("%s: started (pid %d)", ident, c.proc.pid)
        return c

    def dead(self) -> list[Child]:
        """Children that exited without being asked to."""
        return [c for c in self.children.values()
                if c.proc is not None and not c.expected_exit and c.proc.exitcode is not None]

    def start_blame(self, idents: list[str], now: float, timeout: float) -> tuple[str | None, float, frozenset[str]]:
        """The start's watchdog (Pipeline._run_until), as StreamCore.stall_blame is a step's: a child of
        `idents` not Ready yet stalls the start once it used no CPU for `timeout` s (stopped, or hung on a
        lock or a read), where one importing torch or making a CUDA context keeps using it. Its verdict,
        when to look again, and whom it blames. Where /proc does not say, only ready_timeout_s applies."""
        late, at = [], now + timeout
        for i in idents:
            c = self.children.get(i)
            cpu = None if c is None or c.ready is not None or c.proc is None else cpu_seconds(c.proc.pid)
            if cpu is None:
                continue
            if cpu != c.cpu[0]:
                c.cpu = (cpu, now)
            if now - c.cpu[1] > timeout:
                late.append(i)
            at = min(at, c.cpu[1] + timeout)
        if not late:
            return None, at, frozenset()
        who = ", ".join(self.children[i].label for i in late)
        return f"{who} used no CPU for {timeout:g} s of its start {STALLED}", now, frozenset(late)

    def unwell(self) -> str | None:
        """What keeps a child from its part now, or None: one that died without being asked to stop, or one
        stopped (SIGSTOP, a debugger: state T or t), which the watchdog blames only once a step waits on it.
        Quick, and safe from another thread (the server's /health): a dead child's exit status is kept by
        whichever thread looks first."""
        for c in list(self.children.values()):
            if c.proc is None or c.expected_exit:
                continue
            if (code := c.proc.exitcode) is not None:
                return f"{c.label} died (exit code {code})"
            if proc_state(c.proc.pid) in ("T", "t"):
                return f"{c.label} is stopped (SIGSTOP or a debugger): it does nothing until continued (SIGCONT)"
        return None

    def count_anew(self, now: float) -> None:
        """The coordinator itself was stopped (and its children with it?): their starts count from now."""
        for c in self.children.values():
            c.cpu = (c.cpu[0], now)

    def stop(self, idents: list[str], timeout: float, asked: set[str] | None = None,
             hung: frozenset[str] = frozenset()) -> None:
        """Wait up to `timeout` for children asked to stop (`asked`: those of idents that were; default
        all); then TERMINATE; then SIGKILL. A child not asked gets TERMINATE at once; a `hung` one (the
        watchdog's, stopped or deadlocked: TERMINATE would wait for it in vain), or one found stopped,
        SIGKILL at once (NOTE [ shutdown order ])."""
        procs = [self.children[i].proc for i in idents if i in self.children and self.children[i].proc]
        for i in idents:
            c = self.children.get(i)
            if c is None:
                continue
            c.expected_exit = True
            if c.proc is not None and c.proc.exitcode is None:
                if i in hung:
                    c.proc.kill()
                elif asked is not None and i not in asked:
                    _terminate(c.proc)
        _wait_stopping(procs, timeout)
        for p in procs:
            _terminate(p)
        _wait_stopping(procs, TERM_WAIT_S)
        for p in procs:
            if p.exitcode is None:
                p.kill()
        join_all(procs, 1.0)
        for i in idents:
            c = self.children.get(i)
            if c is not None and c.proc is not None and c.proc.exitcode is not None and not c.stop_logged:
                c.stop_logged = True
                log.info("%s: stopped (exit status %s)", i, c.proc.exitcode)

    def kill_all(self) -> None:
        """Last resort (atexit): nothing of the run may outlive the coordinator."""
        if self.warm is not None:
            self.warm.close()
        order = [i for i, c in self.children.items() if c.role != "staging"]
        order += [i for i, c in self.children.items() if c.role == "staging"]
        self.stop(order, 0.0)


def _stat(pid: int) -> list[bytes] | None:
    """The fields of a process's /proc/PID/stat after its name (state first), or None where that does not say."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()  # (after the name, which may hold spaces)
    except (OSError, IndexError):
        return None


def cpu_seconds(pid: int) -> float | None:
    """A process's CPU time so far, user and system (Linux's /proc), or None where that does not say."""
    try:
        fields = _stat(pid)
        return None if fields is None else (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (IndexError, ValueError):
        return None


def proc_state(pid: int) -> str | None:
    """A process's state letter (R, S, D, T stopped, Z exited, ...; Linux's /proc), or None where that does not say."""
    fields = _stat(pid)
    return fields[0].decode(errors="replace") if fields else None


def start_parts(info: dict) -> str:
    """A child's Ready info's "start_s" (what its start took, by part) for the -v line, or ""."""
    if not isinstance(parts := info.get("start_s"), dict) or not parts:
        return ""
    return " (" + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items() if isinstance(v, (int, float))) + ")"


def _wait_stopping(procs, timeout: float) -> None:
    """Wait until every process has exited, or for `timeout`; one found stopped meanwhile is killed at
    once (NOTE [ shutdown order ])."""
    end = time.monotonic() + timeout
    while live := [p for p in procs if p.exitcode is None]:
        for p in live:
            if proc_state(p.pid) in ("T", "t"):
                p.kill()
        left = end - time.monotonic()
        if left <= 0:
            return
        wait_any([p.sentinel for p in live], min(left, 0.05))


def join_all(procs, timeout: float) -> None:
    """Join every one of `procs` within `timeout` seconds in all (not each)."""
    end = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
