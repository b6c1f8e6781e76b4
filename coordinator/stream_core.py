"""The streaming pipeline's scheduling as plain logic: decoded messages in, messages to send out.

`StreamCore` decides which layer each reader loads into which staging slot, when compute is
told a layer is ready, and how failed or orphaned reads are retried. It owns no socket and no
process: `Pipeline` (pipeline.py) is the loop that feeds it the messages its children send and
sends what it returns. So the retry and restart rules are testable in one process.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from layerstream.coordinator.plan import Plan
from layerstream.coordinator.scheduler import Load, Scheduler
from layerstream.errors import STALLED
from layerstream.loader.host_cache import HostCache
from layerstream.proto.messages import LayerReady, LayerStaged, LoadLayer, Message

log = logging.getLogger("layerstream.pipeline")

# (link, peer ident, message): what the loop sends; links are "readers" and "compute"
Send = tuple[str, str, Message]


@dataclass
class PendingRead:
    """A layer load in flight: its part for each reader, the readers yet to answer, the tries."""

    load: Load
    parts: dict[str, LoadLayer]  # reader ident -> its LoadLayer
    left: set[str]  # readers that have not staged their part yet
    issued: float  # when it was sent last (the clock's time), for the stall watchdog
    tries: int = 1


class StreamCore:
    """Prefetch, host-cache and retry decisions of one pipeline run."""

    def __init__(self, plan: Plan, n_layer: int, clock: Callable[[], float] = time.monotonic):
        self.plan, self.n_layer, self.clock = plan, n_layer, clock
        self.sched = Scheduler(plan.n_slots, plan.prefetch,
                               HostCache(plan.cache_layers * plan.slot_bytes, plan.slot_bytes, "static"),
                               no_cache=frozenset(plan.resident))
        self.reads: list[dict[str, list]] = []  # per layer: reader ident -> its ranges (set_reads)
        self.ready_readers: set[str] = set()
        self.step_no = 0
        self.need: deque[int] = deque()
        self.delivered: set[int] = set()  # resident layers the compute process holds
        self.cycle = [i for i in range(n_layer) if i not in set(plan.resident)]
        self.pending: dict[int, PendingRead] = {}  # req -> the read in flight
        self.loaded: set[int] = set()  # layers read once at least (the start's progress)
        self.failure: str | None = None

    def set_reads(self, reads: list[dict[str, list]]) -> list[Send]:
        """Each layer's reads per reader (fixed for the run); start loading the first layers."""
        self.reads = reads
        return self.advance()

    def begin_step(self) -> list[Send]:
        """A new forward pass: every layer not held resident is needed, in order."""
        self.step_no += 1
        self.need = deque(i for i in range(self.n_layer) if i not in self.delivered)
        return self.advance()

    # -- messages from the children ----------------------------------------------------------------

    def reader_ready(self, reader: str, restarted: bool) -> list[Send]:
        """A reader is up; a restarted one gets the reads its predecessor had not finished."""
        self.ready_readers.add(reader)
        if not restarted:
            return []
        out: list[Send] = []
        for p in list(self.pending.values()):
            if reader in p.left:
                out += self._retry(p, reader, f"reader {reader} died")
        return out

    def reader_down(self, reader: str) -> None:
        self.ready_readers.discard(reader)

    def on_staged(self, reader: str, msg: LayerStaged) -> list[Send]:
        p = self.pending.get(msg.req)
        if p is None:
            return []  # a retried read answered twice
        p.left.discard(reader)
        if p.left:
            return []
        del self.pending[msg.req]
        self.sched.on_staged(msg.layer)
        self.loaded.add(msg.layer)
        return self.advance()

    def on_layer_done(self, done: list[list[int]]) -> list[Send]:
        """Compute gave these [layer, slot] back."""
        for layer, slot in done:
            self.sched.on_done(layer, slot)
        return self.advance()

    def on_read_failed(self, reader: str, req: int, error: str) -> list[Send]:
        p = self.pending.get(req)
        return [] if p is None else self._retry(p, reader, error)

    def blocking_read(self) -> PendingRead | None:
        """The read in flight that compute waits for, if any: that of the next layer it needs, or,
        where compute holds no slot (so it can only be waiting), the oldest one."""
        if not self.need:
            return None
        mine = [p for p in self.pending.values() if p.load.layer == self.need[0]]
        if not mine and not self.sched.lent and self.pending:
            mine = [min(self.pending.values(), key=lambda p: p.issued)]
        return mine[0] if mine else None

    def stall_blame(self, quiet: float, now: float, timeout: float) -> tuple[str | None, float, frozenset[str]]:
        """The watchdog's verdict on a pending step (Pipeline._run_until): who stalls it, if anyone,
        when to look again, and whom it blames. Compute (last heard at `quiet`) stalls when it sent
        nothing for `timeout` s, unless it waits for a read: then the readers owing that read stall
        once it is `timeout` s old (and compute has been quiet as long)."""
        read = self.blocking_read()
        if read is None:
            if now - quiet > timeout:
                return f"the compute process sent nothing for {timeout:g} s while a step was pending {STALLED}", now, \
                    frozenset({"compute"})
            return None, quiet + timeout, frozenset()  # (per layer message: no new set)
        since = max(quiet, read.issued)
        if now - since <= timeout:
            return None, since + timeout, frozenset()
        late = sorted(read.left)
        who = f"the reader process {late[0]}" if len(late) == 1 else f"the reader processes {', '.join(late)}"
        return (f"{who} did not read layer {read.load.layer} into staging slot {read.load.slot} for {timeout:g} s "
                f"while the compute process waited for it {STALLED}"), now, frozenset(late)

    # -- decisions -----------------------------------------------------------------------------------

    def _retry(self, p: PendingRead, reader: str, why: str) -> list[Send]:
        """Send a failed read again, once; a second failure ends the run."""
        p.tries += 1
        if p.tries > 2:
            self.failure = f"reading layer {p.load.layer} failed twice: {why}"
            return []
        log.warning("read of layer %d failed (%s); retrying once", p.load.layer, why)
        p.issued = self.clock()
        return [("readers", reader, p.parts[reader])]

    def _issue(self, load: Load) -> list[Send]:
        parts = {ident: LoadLayer(load.req, load.layer, load.slot, ranges)
                 for ident, ranges in self.reads[load.layer].items()}
        self.pending[load.req] = PendingRead(load, parts, set(parts), self.clock())
        return [("readers", ident, msg) for ident, msg in parts.items() if ident in self.ready_readers]

    def _announce(self) -> list[list[int]]:
        """Lend the staged layers that come next in order to compute: their [layer, slot]."""
        ready = []
        while self.need and self.need[0] in self.sched.staged:
            layer = self.need.popleft()
            ready.append([layer, self.sched.take(layer)])
            if layer in self.plan.resident:
                self.delivered.add(layer)
        return ready

    def advance(self) -> list[Send]:
        """Announce staged layers to compute in order; issue loads for the upcoming ones."""
        out: list[Send] = []
        ready = self._announce()
        if self.step_no == 0:  # before the first pass: every layer once, resident ones too
            upcoming = [i for i in range(self.n_layer) if i not in self.delivered]
        else:
            upcoming = list(self.need)
        for load in self.sched.plan_loads(upcoming + self.cycle):
            out += self._issue(load)
        ready += self._announce()  # host cache hits are staged at once: they need not wait for a message
        if ready:  # one message for all (compute's host time bounds MoE decode)
            out.insert(0, ("compute", "compute", LayerReady(self.step_no, ready)))
        return out
