"""Staging slots the compute process gives back to the coordinator (LayerDone), one or a few a message."""

from __future__ import annotations

from typing import Callable

from layerstream.proto.messages import LayerDone

DONE_BATCH = 1 << 16  # in expert steps: held until compute flushes (NOTE [ slots given back ])


class SlotReturns:
    """NOTE [ slots given back ]
    A streamed MoE layer's staging slot goes back after its work on the device, one layer or
    more behind. Where the host cache holds every streamed layer (the plan says so:
    `done_batch` > 1), no reader waits for a slot.
    A MoE decode step is bound by the host, and a profile of it gave an eighth of a streamed
    layer's host time to its two messages (this one and the LayerReady it answers); given back
    two a message, the layers whose step sent one took about 180 µs more host time (BENCHMARKS.md,
    AQ9). The coordinator stages every cached layer that compute has given back and announces
    them in order, as many as are staged (scheduler.py, NOTE [ cached layers outside the window ]),
    so in expert steps the slots of the step running are held (DONE_BATCH: more than any model's
    layers) until compute flushes: before it waits for the coordinator, at the step's end, and as
    it polls the step in flight. A slot of an earlier step goes at once: the next step's
    announcements stop at its layer (compute runs a step behind the coordinator, which begins the
    next step once this one's layers are all announced), and held, it kept that step's last layer
    waiting for a round trip. (When the announcements came only as slots went back, 4 a message let
    them fall behind, and fewer experts were copied ahead: a layer copies the next layer's predicted
    experts only if that layer is announced.) Other steps give each slot back at once, as do all steps where layers
    are read from disk: a reader may be waiting for the slot.

    `lent` keeps every slot announced and not yet given back, so that a failed step gives back
    what its layers still held (NOTE [ a failed step ] in compute_proc.py)."""

    def __init__(self, send: Callable[[LayerDone], None], batch: int = 1):
        self.send, self.batch = send, batch
        self.pending: list[list[int]] = []  # [layer, slot] given back, not yet sent
        self.step = 0
        self.lent: dict[tuple[int, int], int] = {}  # (step, layer) -> its staging slot, announced, not given back

    def lend(self, step: int, ready: list[list[int]]) -> None:
        """A LayerReady's [layer, slot] pairs of `step`: the compute process holds them now."""
        for layer, slot in ready:
            self.lent[(step, layer)] = slot

    def add(self, step: int, layer: int, slot: int, batched: bool) -> None:
        """Give `slot` back; held until `batch` are pending where `batched` (an expert step). A
        message names one step: what another step left pending goes first."""
        self.lent.pop((step, layer), None)
        if self.pending and step != self.step:
            self.flush()
        self.pending.append([layer, slot])
        self.step = step
        if len(self.pending) >= self.batch or not batched:
            self.flush()

    def flush(self) -> None:
        """Send what is pending, if anything."""
        if self.pending:
            self.send(LayerDone(self.step, self.pending))
            self.pending = []
