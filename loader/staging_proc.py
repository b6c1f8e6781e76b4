"""The staging process: owns the shared-memory arena of slots; creates it and unlinks it.

NOTE [ who owns the arena ]
The arena outlives any reader or compute process that dies, and goes when the run ends:
this process creates it (removing those of killed runs first: NOTE [ arena ownership ] in
arena.py), reports its ArenaDesc in Ready, and unlinks it when told to shut down,
when the coordinator is gone (parent watchdog), or when it is terminated (SIGTERM runs the
same cleanup). The host cache's policy lives in the coordinator's scheduler beside the
prefetch logic (it is bookkeeping over slot ids), which saves a message hop per layer.
"""

from __future__ import annotations

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

    def on_term(signum, frame):
        raise ShutdownRequested("terminated")

    signal.signal(signal.SIGTERM, on_term)

    def body(links: ChildLinks) -> None:
        with Arena.create(cfg.n_slots, cfg.slot_bytes) as arena:
            links.ready({"arena": to_wire(arena.describe())})
            # its pages are made while the others start (NOTE [ populating the arena ] in arena.py)
            stop = threading.Event()
            filler = threading.Thread(target=arena.populate, args=(cfg.populate_threads, stop),
                                      name="arena-populate", daemon=True)
            if cfg.populate_threads:
                filler.start()
            try:
                while True:
                    links.recv()  # nothing to do but stay alive and answer control messages
            finally:
                stop.set()
                if filler.is_alive():
                    filler.join(5.0)  # (a chunk's madvise is short) before the mapping goes

    run_child("staging", cfg.ident, cfg.endpoints, cfg.parent_pid, body)
