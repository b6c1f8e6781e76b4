"""The staging process: owns the shared-memory arena of slots; creates it and unlinks it.

NOTE [ who owns the arena ]
The arena outlives any reader or compute process that dies, and goes when the run ends:
this process creates it (removing those of killed runs first: NOTE [ arena ownership ] in
arena.py), reports its ArenaDesc in Ready, and unlinks it when told to shut down,
when the coordinator is gone (parent watchdog), or when it is terminated (SIGTERM runs the
same cleanup). The host cache's policy lives in the coordinator's scheduler beside the
prefetch logic (it is bookkeeping over slot ids), which saves a message hop per layer.

A SIGTERM raises ShutdownRequested wherever the main thread is, so it is held back while the arena
is made, until the context that unlinks it holds it (one that landed between the segment's
registration with the resource tracker and its finalizer left the segment to the tracker, which
warned of a leak after the run's one line), and once the process stops, further SIGTERMs (the
shutdown ladder's second, when the first is slow to be taken) are ignored, so that no cleanup is
cut short between the finalizer's detach and the unlink (nor the wait for the thread that makes the
arena's pages, which must end before the mapping goes). Held back by a flag its handler reads, not
by the signal mask: the kernel hands the signal to any thread that does not block it (numpy's
OpenBLAS threads), and Python runs the handler in the main thread whatever its mask.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass

from layerstream.loader.arena import Arena
from layerstream.proto.child import ChildEndpoints, ChildLinks, ShutdownRequested, run_child
from layerstream.proto.codec import to_wire


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
    signal.signal(signal.SIGTERM, term)

    def body(links: ChildLinks) -> None:
        stop, filler = threading.Event(), None
        with contextlib.ExitStack() as owned:
            try:
                # taken once the arena is owned and the thread that makes its pages is known to this
                # block's end (the module's docstring; one raised inside Thread.start left it running
                # over the closed arena: a traceback)
                with term.held():
                    arena = owned.enter_context(Arena.create(cfg.n_slots, cfg.slot_bytes))
                    if cfg.populate_threads:  # its pages made while the others start (NOTE [ populating the arena ])
                        filler = threading.Thread(target=arena.populate, args=(cfg.populate_threads, stop),
                                                  name="arena-populate", daemon=True)
                        filler.start()
                links.ready({"arena": to_wire(arena.describe())})
                while True:
                    links.recv()  # nothing to do but stay alive and answer control messages
            finally:
                term.stopping = True  # however asked to stop
                stop.set()
                if filler is not None:
                    filler.join(5.0)  # (a chunk's madvise is short) before the mapping goes

    run_child("staging", cfg.ident, cfg.endpoints, cfg.parent_pid, body)


class _Term:
    """The SIGTERM handler: ShutdownRequested, held back while `held()` and none once the cleanup runs
    (`stopping`; the module's docstring)."""

    def __init__(self):
        self.holding = self.pending = self.stopping = False

    def __call__(self, signum, frame) -> None:
        if self.stopping:  # (set by the cleanup itself: a SIGTERM raised but lost on its way there is raised again)
            return
        if self.holding:
            self.pending = True
            return
        raise ShutdownRequested("terminated")

    @contextlib.contextmanager
    def held(self):
        """A SIGTERM meanwhile is raised once the block is done (if it ends without an error)."""
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.pending:
            raise ShutdownRequested("terminated")
