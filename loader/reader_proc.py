"""A reader process: reads layers' byte ranges from the GGUF file(s) into staging slots; it maps the
arena when AttachArena comes (NOTE [ the arena after Ready ] in coordinator/pipeline.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from layerstream.loader.arena import Arena
from layerstream.loader.layout import ReadRange
from layerstream.loader.reader import LayerReader
from layerstream.proto.child import ChildEndpoints, ChildLinks, run_child, settle
from layerstream.proto.messages import AttachArena, LayerStaged, LoadLayer, ReadFailed
from layerstream.proto.timeline import Timeline


@dataclass(frozen=True)
class ReaderConfig:
    ident: str
    files: tuple[str, ...]  # the model's files; LoadLayer ranges name them by index
    serve: tuple[str, ...]  # the files this reader opens
    direct: bool
    threads: int  # read threads (NOTE [ parallel reads ] in reader.py)
    endpoints: ChildEndpoints
    parent_pid: int
    trace: bool = False


def main(cfg: ReaderConfig) -> None:
    """Process entry point (multiprocessing spawn target)."""
    tl = Timeline("reader", cfg.ident, trace=cfg.trace)
    state: dict[str, Any] = {}

    def stats() -> dict[str, Any]:
        snap = tl.snapshot()
        if "links" in state:
            snap["bad_messages"] = state["links"].bad.stats()
        return snap

    def body(links: ChildLinks) -> None:
        state["links"] = links
        arena: Arena | None = None
        reader = LayerReader(list(cfg.serve), direct=cfg.direct, threads=cfg.threads)
        try:
            links.ready({"files": len(cfg.serve)})
            settle()  # (set up: NOTE [ start-up objects frozen ] in proto/child.py)
            while True:
                msg = links.recv()
                if isinstance(msg, AttachArena) and arena is None:
                    arena = Arena.from_wire(msg.desc)
                    continue
                if not isinstance(msg, LoadLayer):
                    if msg is not None:
                        tl.incr("unexpected_messages")
                    continue
                t0 = time.monotonic_ns()
                try:
                    if arena is None:
                        raise RuntimeError(f"LoadLayer {msg.req} came before the arena (AttachArena)")
                    ranges = [ReadRange(cfg.files[f], off, n, so) for f, off, n, so in msg.ranges]
                    view = arena.slot_view(msg.slot)
                    try:
                        n = reader.read_into(ranges, view)
                    finally:
                        view.release()
                except Exception as e:  # noqa: BLE001 - reported to the coordinator, which retries once
                    links.send(ReadFailed(msg.req, msg.layer, msg.slot, f"{type(e).__name__}: {e}"))
                    continue
                dt = time.monotonic_ns() - t0
                tl.add("read", f"read L{msg.layer}", t0, dt, n, layer=msg.layer, slot=msg.slot)
                links.send(LayerStaged(msg.req, msg.layer, msg.slot, n, dt / 1e9, cfg.ident))
        finally:
            reader.close()
            if arena is not None:
                arena.close()

    run_child("reader", cfg.ident, cfg.endpoints, cfg.parent_pid, body, stats)
