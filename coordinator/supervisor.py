"""Starts the pipeline's child processes and stops them: one shutdown ladder, written once.

NOTE [ shutdown order ]
Stopping asks first (a Shutdown message, sent by the pipeline while its loop is healthy),
then waits, then SIGTERM, waits, then SIGKILL. A child the message could not reach (one still
starting, when a run is interrupted early) gets SIGTERM at once: waiting for it gains nothing.
Readers and compute stop before staging, because staging owns the shared-memory arena and unlinks it as it exits (on Shutdown, on
SIGTERM, or when its parent is gone). Children ignore SIGINT: a Ctrl-C in the terminal
reaches the whole process group, and only the coordinator decides how to stop.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable

from layerstream.proto.child import spawned


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


class Supervisor:
    """Owns the child processes (spawned, daemonic) and their shutdown."""

    def __init__(self):
        self.mp = mp.get_context("spawn")
        self.children: dict[str, Child] = {}
        atexit.register(self.kill_all)

    def start(self, role: str, ident: str, target, cfg) -> Child:
        """Spawn target(cfg) through proto.child.spawned, which reports a failure to import the
        target or to unpickle cfg to the coordinator (cfg.endpoints) like any other."""
        c = self.children.get(ident) or Child(role, ident, target, cfg)
        c.ready, c.expected_exit, c.links_heard = None, False, set()
        args = (role, ident, getattr(cfg, "endpoints", None), getattr(cfg, "parent_pid", os.getpid()),
                f"{target.__module__}:{target.__qualname__}", bytes(ForkingPickler.dumps(cfg)))
        c.proc = self.mp.Process(target=spawned, args=args, name=f"layerstream-{ident}", daemon=True)
        c.proc.start()
        self.children[ident] = c
        return c

    def dead(self) -> list[Child]:
        """Children that exited without being asked to."""
        return [c for c in self.children.values()
                if c.proc is not None and not c.expected_exit and c.proc.exitcode is not None]

    def stop(self, idents: list[str], timeout: float, asked: set[str] | None = None) -> None:
        """Wait for children asked to stop (`asked`: those of idents that were; default all);
        then SIGTERM; then SIGKILL. A child not asked gets SIGTERM at once."""
        procs = [self.children[i].proc for i in idents if i in self.children and self.children[i].proc]
        for i in idents:
            if i in self.children:
                self.children[i].expected_exit = True
                if asked is not None and i not in asked and self.children[i].proc is not None \
                        and self.children[i].proc.exitcode is None:
                    self.children[i].proc.terminate()
        _join_all(procs, timeout)
        for p in procs:
            if p.exitcode is None:
                p.terminate()
        _join_all(procs, 1.5)
        for p in procs:
            if p.exitcode is None:
                p.kill()
        _join_all(procs, 1.0)

    def kill_all(self) -> None:
        """Last resort (atexit): nothing of the run may outlive the coordinator."""
        order = [i for i, c in self.children.items() if c.role != "staging"]
        order += [i for i, c in self.children.items() if c.role == "staging"]
        self.stop(order, 0.0)


def _join_all(procs, timeout: float) -> None:
    end = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
