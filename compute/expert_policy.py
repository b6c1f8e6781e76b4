"""Which streamed experts the device's cache keeps: LFU or LRU within its bytes and slots."""

from __future__ import annotations

import heapq
from collections import Counter, OrderedDict

EXPERT_POLICIES = ("lfu", "lru")


class ExpertPolicy:
    """The cache's entries, (layer, expert) -> (gate, up, down, bytes, pool slot), kept within
    `capacity` bytes and, for a pool (NOTE [ the expert pool ] in expert_pool.py), its `slots`
    cache slots (None: no pool; entries hold tensors of their own).

    Two policies, chosen by measured hit rate (`bin/bench experts`, BENCHMARKS.md):
    - "lfu" (the default): every expert's uses are counted, also while it is not cached. A
      newcomer is kept only in place of a cached expert used less often than it (of those, the
      least used, then the least recent); otherwise it serves its step and is dropped. Ties keep
      the cached expert: in a cycle of layers whose experts are used equally often, admitting on
      a tie would evict each expert before its next use, as LRU does.
    - "lru": least recently used first out. A decode pass visits the layers in order, so once the
      cache holds less than one pass's experts, LRU evicts each expert just before its next use:
      no hits at all (measured on the Qwen3-30B-A3B shape at 8 GiB).
    """

    def __init__(self, capacity: int, policy: str = "lfu", slots: int | None = None):
        if policy not in EXPERT_POLICIES:
            raise ValueError(f"expert cache policy {policy!r}: use one of {', '.join(EXPERT_POLICIES)}")
        self.capacity, self.policy, self.slots = capacity, policy, slots
        self.entries: "OrderedDict[tuple[int, int], tuple]" = OrderedDict()  # (layer, expert) -> (g, u, d, bytes, slot)
        self.uses: Counter = Counter()  # (layer, expert) -> times chosen (lfu)
        self.stamp: dict[tuple[int, int], tuple[int, int]] = {}  # cached key -> its (uses, tick) in the heap (lfu)
        self.heap: list[tuple[int, int, tuple[int, int]]] = []  # (uses, tick, key), stale entries skipped (lfu)
        self.tick = 0
        self.used = 0
        self.free = list(range(slots or 0))  # the pool's cache slots no entry holds
        self.lent: set[int] = set()  # slots lent for now beside the cache's own (lend)

    def __contains__(self, key) -> bool:
        return key in self.entries

    def lookup(self, key) -> tuple | None:
        """A use of `key`, counted: its entry, made the most recent, if it is kept."""
        self.tick += 1
        self.uses[key] += 1
        hit = self.entries.get(key)
        if hit is not None:
            self.entries.move_to_end(key)
            if self.policy == "lfu":
                self._stamp(key)
        return hit

    def count(self, key) -> None:
        """A use of `key` without a fetch (the CPU computed it): LFU counts it."""
        self.tick += 1
        self.uses[key] += 1

    def put(self, key, entry, serving: set, nbytes: int | None = None) -> int | None:
        """Keep `key` if the policy admits it (evicting as it says, but none of `serving`): its
        pool slot, or None where it is not kept (or the cache has no pool)."""
        pooled = self.slots is not None
        nbytes = entry[3] if entry is not None else nbytes
        if nbytes > self.capacity or (pooled and not self.slots):
            return None
        while self.entries and (self.used + nbytes > self.capacity or (pooled and not self.free)):
            if self.policy == "lru":
                victim = next(iter(self.entries))
            else:
                uses, _, victim = self._victim()
                if uses >= self.uses[key]:
                    return None  # no cached expert is used less often: the newcomer is not kept
            if victim in serving:
                return None  # this fetch serves it: its slot must hold until the layer is done
            if self.policy == "lfu":
                heapq.heappop(self.heap)
                del self.stamp[victim]
            old = self.entries.pop(victim)
            self.used -= old[3]
            if old[4] is not None:
                self.free.append(old[4])
        slot = self.free.pop() if pooled else None
        self.entries[key] = entry if entry is not None else (None, None, None, nbytes, slot)
        self.used += nbytes
        if self.policy == "lfu":
            self._stamp(key)
        return slot

    def lend(self, slots: tuple[int, ...], nbytes: int) -> None:
        """Room lent for a while: `slots`, pool slots of `nbytes` each, join the free ones (NOTE
        [ the layer slots lent to the expert cache ] in expert_stream.py)."""
        self.lent = set(slots)
        self.free[:0] = slots  # (taken last: the cache's own slots fill first, and a prompt drops fewer)
        self.slots = (self.slots or 0) + len(slots)
        self.capacity += len(slots) * nbytes

    def reclaim(self, nbytes: int) -> int:
        """The lent room taken back: the entries in its slots are dropped (their uses stay
        counted); returns how many."""
        lent, self.lent = self.lent, set()
        gone = [k for k, v in self.entries.items() if v[4] in lent]
        for k in gone:
            self.used -= self.entries.pop(k)[3]
            self.stamp.pop(k, None)  # (its heap entry is stale from now: _victim skips it)
        self.free = [s for s in self.free if s not in lent]
        self.slots -= len(lent)
        self.capacity -= len(lent) * nbytes
        return len(gone)

    def _stamp(self, key) -> None:
        self.stamp[key] = (self.uses[key], self.tick)
        heapq.heappush(self.heap, (*self.stamp[key], key))

    def _victim(self):
        """The cached expert LFU would evict first (its heap entry stays until popped)."""
        while self.heap and self.stamp.get(self.heap[0][2]) != self.heap[0][:2]:
            heapq.heappop(self.heap)  # stale: re-stamped since, or evicted
        return self.heap[0]
