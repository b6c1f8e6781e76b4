"""Scheduler: which layer goes into which staging slot, and when. Plain logic, no I/O.

NOTE [ staging slot states ]
A slot is free, loading (a reader fills it), staged (bytes ready, not yet announced to
compute), lent (announced with LayerReady; compute owns it until LayerDone) or cached (kept
in host RAM for later passes, see HostCache). Loads are issued for the first `prefetch`
layers of the upcoming order (the rest of this pass, then the next pass: decode streams
cyclically), in that order, so the layer compute waits on always gets a slot first and a
freed slot goes to the nearest need.

NOTE [ cached layers outside the window ]
The window bounds the reads in flight and the slots they fill. A layer the host cache holds costs
neither: staging it reads nothing and takes its own cache slot. So cached layers do not count
against `prefetch`: every cached layer that compute has given back stages at once, and is announced
as soon as the layers before it are (StreamCore._announce goes in order). Counted, a decode step
whose streamed layers all sit in the cache got its next announcements only as compute gave slots
back, a LayerDone and a LayerReady every two layers (slot_returns.py), and the layers whose step
sent one took more of the compute process's host time at batch 1 (BENCHMARKS.md, AQ9).
Uncounted, such a step needs no message a layer: compute gives its slots back where it flushes,
but an earlier step's at once (NOTE [ slots given back ]). Batch 1 then ran faster (BENCHMARKS.md,
AR5).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from layerstream.loader.host_cache import HostCache


@dataclass
class Load:
    """A read to issue: fill `slot` with `layer`'s bytes."""

    req: int
    layer: int
    slot: int


@dataclass
class Scheduler:
    n_slots: int
    prefetch: int
    cache: HostCache
    no_cache: frozenset[int] = frozenset()  # layers never cached (resident ones are loaded once)
    free: list[int] = field(default_factory=list)
    loading: dict[int, Load] = field(default_factory=dict)  # layer -> load in flight
    staged: dict[int, int] = field(default_factory=dict)  # layer -> slot
    lent: dict[int, int] = field(default_factory=dict)  # layer -> slot
    next_req: int = 0
    reads: int = 0
    hits: int = 0

    def __post_init__(self):
        self.free = list(range(self.n_slots - 1, -1, -1))

    def plan_loads(self, upcoming: list[int]) -> list[Load]:
        """Loads to issue now for the first `prefetch` upcoming layers that the host cache does not
        hold; every cached upcoming layer stages at once (NOTE [ cached layers outside the window ])."""
        out = []
        seen = set()
        window = 0  # upcoming layers counted so far against `prefetch`
        for layer in upcoming:
            if layer in seen:
                continue
            seen.add(layer)
            cached = layer not in self.no_cache and layer in self.cache
            if not cached:
                if window >= self.prefetch:
                    break
                window += 1
            if layer in self.loading or layer in self.staged or layer in self.lent:
                continue
            slot = self.cache.lookup(layer) if cached else None
            if slot is not None:
                self.cache.pin(layer)
                self.staged[layer] = slot
                self.hits += 1
                continue
            if not self.free:
                break
            load = Load(self.next_req, layer, self.free.pop())
            self.next_req += 1
            self.loading[layer] = load
            self.reads += 1
            out.append(load)
        return out

    def on_staged(self, layer: int) -> None:
        """A reader filled the layer's slot; keep it in the host cache when there is room."""
        load = self.loading.pop(layer)
        self.staged[layer] = load.slot
        if layer in self.no_cache:
            return
        given = self.cache.insert(layer, load.slot, pin=True)
        if given is not None and given != (layer, load.slot):
            self.free.append(given[1])  # an evicted, unpinned layer's slot

    def take(self, layer: int) -> int:
        """Lend a staged layer's slot to compute (it was announced with LayerReady)."""
        slot = self.staged.pop(layer)
        self.lent[layer] = slot
        return slot

    def on_done(self, layer: int, slot: int) -> None:
        """Compute gave the slot back; a cached layer stays, another's slot is free again."""
        if self.lent.get(layer) != slot:
            return  # stale or duplicate LayerDone
        del self.lent[layer]
        if layer in self.cache and self.cache.pinned(layer):
            self.cache.unpin(layer)
        else:
            self.free.append(slot)
