"""The staging process: owns the shared-memory arena of slots; creates it and unlinks it.

NOTE [ who owns the arena ]
The arena outlives any reader or compute process that dies, and goes when the run ends:
this process creates it (removing those of killed runs first: NOTE [ arena ownership ] in
arena.py), reports its ArenaDesc in Ready, and unlinks it when told to shut down,
when the coordinator is gone (parent watchdog), or when it is terminated (the shutdown ladder's
TERMINATE, SIGUSR1, runs the same cleanup). The host cache's policy lives in the coordinator's scheduler beside the
prefetch logic (it is bookkeeping over slot ids), which saves a message hop per layer.

TERMINATE only sets a flag, which the main loop reads between short waits for a message
(TERM_POLL_MS) and turns into ShutdownRequested there, its one place: an exception raised by the
handler wherever the main thread is could cut short any step of making or unlinking the arena
(its registration with the resource tracker before its finalizer, the unlink) and leave the
segment to the tracker, which warns of a leak after the run's one line. The wait keeps the stop
well inside the shutdown ladder's TERM_WAIT_S between TERMINATE and SIGKILL (supervisor.py).
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass

from layerstream.loader.arena import Arena
from layerstream.proto.child import ChildEndpoints, ChildLinks, ShutdownRequested, run_child, settle
from layerstream.proto.codec import to_wire
from layerstream.proto.signals import TERMINATE

TERM_POLL_MS = 200  # the longest TERMINATE waits to be seen by the main loop


@dataclass(frozen=True)
class StagingConfig:
    ident: str
    n_slots: int
    slot_bytes: int
    endpoints: ChildEndpoints
    parent_pid: int
    populate_threads: int = 0  # threads that make the arena's pages at start (0: none)


def main(cfg: StagingConfig) -> None:
    """Process entry point (multiprocessing spawn target)."""
    term = _Term()
    signal.signal(TERMINATE, term)

    def body(links: ChildLinks) -> None:
        stop, filler = threading.Event(), None
        with Arena.create(cfg.n_slots, cfg.slot_bytes) as arena:
            try:
                if cfg.populate_threads:  # its pages made while the others start (NOTE [ populating the arena ])
                    filler = threading.Thread(target=arena.populate, args=(cfg.populate_threads, stop),
                                              name="arena-populate", daemon=True)
                    filler.start()
                links.ready({"arena": to_wire(arena.describe())})
                settle()  # (NOTE [ start-up objects frozen ] in proto/child.py)
                while not term.requested:
                    links.recv(TERM_POLL_MS)  # nothing to do but stay alive and answer control messages
                raise ShutdownRequested("terminated")
            finally:
                stop.set()
                if filler is not None:
                    filler.join(5.0)  # (a chunk's madvise is short) before the mapping goes

    run_child("staging", cfg.ident, cfg.endpoints, cfg.parent_pid, body)


class _Term:
    """TERMINATE's handler: it only records the request (a plain attribute, no lock that a second
    one, run inside the first one's handler, could wait on forever)."""

    requested = False

    def __call__(self, signum, frame) -> None:
        self.requested = True
