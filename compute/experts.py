"""The device's cache of streamed experts (NOTE [ expert streaming ] in streamed.py): which
steps fetch only their chosen experts, what the cache keeps, and what a layer's math sees."""

from __future__ import annotations

import dataclasses
import heapq
import time
from collections import Counter, OrderedDict

import numpy as np
import torch

from layerstream.compute.model import EXPERT_TENSORS
from layerstream.compute.qlinear import FUSED_TYPES
from layerstream.compute.runner import device_weight
from layerstream.loader.layout import LayerLayout
from layerstream.proto.timeline import Timeline


def streams_experts(n_expert: int, n_used: int, tokens: int) -> bool:
    """Whether a step of `tokens` tokens fetches only its chosen experts rather than whole layers:
    while the experts it is expected to touch, E * (1 - (1 - k/E)^T) with uniform routing, are at
    most half of them (a prompt touches nearly all: whole layers stream faster)."""
    if not n_expert:
        return False
    return n_expert * (1 - (1 - n_used / n_expert) ** tokens) <= n_expert / 2


EXPERT_POLICIES = ("lfu", "lru")


class ExpertCache:
    """Experts copied to the compute device (NOTE [ expert streaming ]): an entry holds one
    expert's gate, up and down blocks of one layer.

    Two policies, chosen by measured hit rate (`layerstream-bench experts`, BENCHMARKS.md):
    - "lfu" (the default): every expert's uses are counted, also while it is not cached. A
      newcomer is kept only in place of a cached expert used less often than it (of those, the
      least used, then the least recent); otherwise it serves its step and is dropped. Ties keep
      the cached expert: in a cycle of layers whose experts are used equally often, admitting on
      a tie would evict each expert before its next use, as LRU does.
    - "lru": least recently used first out. A decode pass visits the layers in order, so once the
      cache holds less than one pass's experts, LRU evicts each expert just before its next use:
      no hits at all (measured: 0 of 42,222 on the Qwen3-30B-A3B shape at 8 GiB).
    """

    def __init__(self, capacity_bytes: int, device, dtype, quantized: bool, timeline: Timeline, policy: str = "lfu"):
        if policy not in EXPERT_POLICIES:
            raise ValueError(f"expert cache policy {policy!r}: use one of {', '.join(EXPERT_POLICIES)}")
        self.capacity, self.device, self.dtype, self.quantized, self.tl = capacity_bytes, device, dtype, quantized, \
            timeline
        self.policy = policy
        self.entries: "OrderedDict[tuple[int, int], tuple]" = OrderedDict()  # (layer, expert) -> (g, u, d, bytes)
        self.uses: Counter = Counter()  # (layer, expert) -> times chosen (lfu)
        self.stamp: dict[tuple[int, int], tuple[int, int]] = {}  # cached key -> its (uses, tick) in the heap (lfu)
        self.heap: list[tuple[int, int, tuple[int, int]]] = []  # (uses, tick, key), stale entries skipped (lfu)
        self.tick = 0
        self.used = 0
        self.hits = self.misses = 0
        self.bytes_moved = 0
        self.copied: dict[int, torch.cuda.Event] = {}  # layer -> event after its expert copies (CUDA)

    def fetch(self, i: int, experts: list[int], lay: LayerLayout, host: np.ndarray) -> dict[int, tuple]:
        """Layer i's `experts` on the device, copying the missing ones out of its staging bytes."""
        out, missing = {}, []
        for e in experts:
            key = (i, e)
            self.tick += 1
            self.uses[key] += 1
            hit = self.entries.get(key)
            if hit is None:
                missing.append(e)
            else:
                self.entries.move_to_end(key)
                if self.policy == "lfu":
                    self._stamp(key)
                out[e] = hit[:3]
        self.hits += len(out)
        self.misses += len(missing)
        if missing:
            t0 = time.monotonic_ns()
            moved = 0
            for e in missing:
                mats, nbytes = [], 0
                for name in EXPERT_TENSORS:  # expert e of each [E, N, K] tensor: one byte range
                    t = lay.tensor(name)
                    n_exp, rows, cols = t.shape
                    per = t.nbytes // n_exp
                    raw = torch.from_numpy(host[t.slot_offset + e * per : t.slot_offset + (e + 1) * per])
                    raw = raw.to(self.device, non_blocking=True) if self.device.type == "cuda" else raw.clone()
                    mats.append(device_weight(raw, dataclasses.replace(t, shape=(rows, cols), nbytes=per),
                                              self.dtype, self.quantized))
                    nbytes += per
                self._put((i, e), (*mats, nbytes))
                out[e] = tuple(mats)
                moved += nbytes
            self.bytes_moved += moved
            if self.device.type == "cuda":
                ev = torch.cuda.Event()
                ev.record(torch.cuda.current_stream(self.device))
                self.copied[i] = ev
            self.tl.add("expert_copy", f"experts L{i}", t0, time.monotonic_ns() - t0, moved, layer=i,
                        experts=len(missing))
        return out

    def _stamp(self, key) -> None:
        self.stamp[key] = (self.uses[key], self.tick)
        heapq.heappush(self.heap, (*self.stamp[key], key))

    def _victim(self):
        """The cached expert LFU would evict first (its heap entry stays until popped)."""
        while self.heap and self.stamp.get(self.heap[0][2]) != self.heap[0][:2]:
            heapq.heappop(self.heap)  # stale: re-stamped since, or evicted
        return self.heap[0]

    def _put(self, key, entry) -> None:
        nbytes = entry[3]
        if nbytes > self.capacity:
            return
        while self.entries and self.used + nbytes > self.capacity:
            if self.policy == "lru":
                old = self.entries.popitem(last=False)[1]
            else:
                uses, _, victim = self._victim()
                if uses >= self.uses[key]:
                    return  # no cached expert is used less often: the newcomer is not kept
                heapq.heappop(self.heap)
                del self.stamp[victim]
                old = self.entries.pop(victim)
            self.used -= old[3]
        self.entries[key] = entry
        self.used += nbytes
        if self.policy == "lfu":
            self._stamp(key)


class ExpertSet:
    """What moe_block sees of a layer whose experts stream: `fetch(ids)` -> {expert: (gate, up, down)}."""

    def __init__(self, cache: ExpertCache, i: int, lay: LayerLayout, host: np.ndarray):
        self.cache, self.i, self.lay, self.host = cache, i, lay, host

    @property
    def grouped(self) -> bool:
        """Whether the fetched experts are blocks the grouped kernel reads (NOTE [ grouped experts ])."""
        return self.cache.quantized and all(self.lay.tensor(n).qtype in FUSED_TYPES for n in EXPERT_TENSORS)

    def fetch(self, experts: list[int]) -> dict[int, tuple]:
        return self.cache.fetch(self.i, experts, self.lay, self.host)
