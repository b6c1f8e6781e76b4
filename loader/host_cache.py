"""HostCache: which layers stay in host RAM between forward passes, and in which arena slot.

The cache stores nothing itself: a cached layer simply stays in the staging slot it was
read into, so a hit costs no copy at all (the compute process copies it to VRAM straight
from the slot, as it would a freshly read layer). The cache is bookkeeping over slot ids:
the arena is sized with the streaming slots plus `capacity_layers` slots for the cache, and
whoever owns the slots (the scheduler) hands a slot to the cache with `insert` and gets a
slot back when a layer is evicted.

Policies:
- "lru" evicts the least recently used unpinned layer.
- "static" never evicts to admit: once full, a new layer is not cached (insert hands its
  slot straight back). Decode walks the layers in the same cyclic order every token, and on
  a cyclic scan longer than the cache LRU hits never (it always evicts the layer needed
  soonest); "static" keeps a fixed set and hits `capacity_layers` layers every pass.
"""

from __future__ import annotations

from collections import OrderedDict

from layerstream.errors import ConfigError

POLICIES = ("lru", "static")


class HostCache:
    """Bookkeeping of layers held in arena slots: lookup, insert with eviction, pin/unpin."""

    def __init__(self, capacity_bytes: int, slot_bytes: int, policy: str = "lru"):
        if policy not in POLICIES:
            raise ConfigError(f"host cache policy {policy!r} is unknown; use one of {', '.join(POLICIES)}")
        if slot_bytes <= 0 or capacity_bytes < 0:
            raise ConfigError(f"host cache needs slot_bytes > 0 and capacity >= 0 (got {slot_bytes}, {capacity_bytes})")
        self.capacity_layers = capacity_bytes // slot_bytes
        self.slot_bytes = slot_bytes
        self.policy = policy
        self._slots: OrderedDict[int, int] = OrderedDict()  # layer -> slot, least recent first
        self._pins: dict[int, int] = {}  # layer -> pin count
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, layer: int) -> bool:
        return layer in self._slots

    def lookup(self, layer: int) -> int | None:
        """The slot holding `layer` (and mark it most recently used), or None; counts hit/miss."""
        slot = self._slots.get(layer)
        if slot is None:
            self.misses += 1
            return None
        self.hits += 1
        self._slots.move_to_end(layer)
        return slot

    def insert(self, layer: int, slot: int, pin: bool = False) -> tuple[int, int] | None:
        """Cache `layer` held in `slot`; returns the (layer, slot) given up, whose slot the caller reuses.

        That is the evicted layer, or (layer, slot) itself when the cache is full and cannot
        make room (capacity 0, every entry pinned, or the static policy); None when nothing
        was given up.
        """
        if layer in self._slots:
            if self._slots[layer] != slot:
                raise ValueError(f"layer {layer} is already cached in slot {self._slots[layer]}, not {slot}")
            self._slots.move_to_end(layer)
            if pin:
                self.pin(layer)
            return None
        if slot in self._slots.values():
            raise ValueError(f"slot {slot} already holds a cached layer")
        given_up = None
        if len(self._slots) >= self.capacity_layers:
            victim = self._victim()
            if victim is None:
                return (layer, slot)
            given_up = (victim, self._slots.pop(victim))
            self.evictions += 1
        self._slots[layer] = slot
        if pin:
            self.pin(layer)
        return given_up

    def _victim(self) -> int | None:
        if self.policy == "static":
            return None
        return next((x for x in self._slots if not self._pins.get(x)), None)

    def pin(self, layer: int) -> None:
        """Keep `layer` from eviction while compute reads its slot (pins nest)."""
        if layer not in self._slots:
            raise KeyError(f"layer {layer} is not cached")
        self._pins[layer] = self._pins.get(layer, 0) + 1

    def unpin(self, layer: int) -> None:
        n = self._pins.get(layer, 0)
        if n <= 0:
            raise ValueError(f"layer {layer} is not pinned")
        if n == 1:
            del self._pins[layer]
        else:
            self._pins[layer] = n - 1

    def pinned(self, layer: int) -> bool:
        return bool(self._pins.get(layer))

    def remove(self, layer: int) -> int | None:
        """Drop `layer` from the cache (it must not be pinned); returns its slot, or None if absent."""
        if self._pins.get(layer):
            raise ValueError(f"layer {layer} is pinned")
        return self._slots.pop(layer, None)

    def layers(self) -> list[int]:
        """Cached layers, least recently used first."""
        return list(self._slots)

    def stats(self) -> dict:
        return {
            "layers": len(self._slots),
            "capacity_layers": self.capacity_layers,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "pinned": len(self._pins),
        }
