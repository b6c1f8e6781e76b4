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
from layerstream.compute.qlinear import FUSED_TYPES, QuantWeight
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


def max_in_flight(n_expert: int, n_used: int) -> int:
    """Experts one layer of the largest expert step can choose: what a step may hold on the
    device beyond the cache (the newcomers the cache does not keep serve their step and go)."""
    t_max = max(t for t in range(1, n_expert + 1) if streams_experts(n_expert, n_used, t))
    return min(n_expert, n_used * t_max)


ALIGN = 256  # an expert's gate, up and down each start at a multiple of this in its pool slot


def _parts(lay: LayerLayout) -> list[tuple[object, int, int, int, int]]:
    """(tensor, bytes an expert, offset in a pool slot, rows, cols) of each expert tensor of a layer."""
    out, off = [], 0
    for name in EXPERT_TENSORS:
        t = lay.tensor(name)
        n_exp, rows, cols = t.shape
        per = t.nbytes // n_exp
        out.append((t, per, off, rows, cols))
        off += -(-per // ALIGN) * ALIGN
    return out


def slot_bytes(layouts: list[LayerLayout]) -> int:
    """Bytes of one expert's pool slot: the largest expert (gate, up and down) of any layer."""
    return max((sum(-(-p[1] // ALIGN) * ALIGN for p in _parts(lay)) for lay in layouts
                if any(t.name == EXPERT_TENSORS[0] for t in lay.tensors)), default=0)


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

    def __init__(self, capacity_bytes: int, device, dtype, quantized: bool, timeline: Timeline, policy: str = "lfu",
                 slot: int = 0, in_flight: int = 0):
        if policy not in EXPERT_POLICIES:
            raise ValueError(f"expert cache policy {policy!r}: use one of {', '.join(EXPERT_POLICIES)}")
        self.capacity, self.device, self.dtype, self.quantized, self.tl = capacity_bytes, device, dtype, quantized, \
            timeline
        self.policy = policy
        self.entries: "OrderedDict[tuple[int, int], tuple]" = OrderedDict()  # (layer, expert) -> (g, u, d, bytes, slot)
        self.uses: Counter = Counter()  # (layer, expert) -> times chosen (lfu)
        self.stamp: dict[tuple[int, int], tuple[int, int]] = {}  # cached key -> its (uses, tick) in the heap (lfu)
        self.heap: list[tuple[int, int, tuple[int, int]]] = []  # (uses, tick, key), stale entries skipped (lfu)
        self.tick = 0
        self.used = 0
        self.hits = self.misses = 0
        self.bytes_moved = 0
        self.copied: dict[int, torch.cuda.Event] = {}  # layer -> event after its expert copies (CUDA)
        # NOTE [ the expert pool ]
        # Block experts (what the grouped kernel reads) live in one device buffer of equal slots,
        # `slot` bytes each: the cache's slots, then `in_flight` slots for the newcomers the cache
        # does not keep. Copies land in place, with no allocation, and every expert sits at a
        # byte offset from one fixed anchor, the pool, so a CUDA graph can read whichever experts
        # a step chose from offsets in a tensor (runner.py, NOTE [ decode graphs ]). A fetch never
        # evicts an expert that the same fetch serves. Dense experts (dequantized) are tensors of
        # their own, as before.
        self.slot = slot if quantized else 0
        self.n_cached = capacity_bytes // self.slot if self.slot else 0
        self.pool = torch.empty((self.n_cached + in_flight) * self.slot, dtype=torch.uint8, device=device) \
            if self.slot else None
        self.free = list(range(self.n_cached))
        self.in_flight = in_flight
        self.layer_parts: dict[int, list] = {}  # layer -> _parts of its layout
        self.kernel_parts: dict[int, tuple] = {}  # layer -> ExpertSet.parts

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
            serving = {(i, e) for e in experts}
            parts = self._parts(lay) if self.pool is not None else None
            flight = iter(range(self.n_cached, self.n_cached + self.in_flight))
            dsts, srcs = [], []  # the pool's copies, issued at once
            src = torch.from_numpy(host) if parts is not None else None
            for e in missing:
                if parts is None:
                    mats, nbytes = self._tensors(e, lay, host)
                    self._put((i, e), (*mats, nbytes, None), serving)
                else:
                    nbytes = sum(p[1] for p in parts)
                    slot = self._put((i, e), None, serving, nbytes)
                    slot = next(flight, None) if slot is None else slot
                    if slot is None:
                        raise RuntimeError(f"layer {i}: more new experts in one step than the pool's {self.in_flight}")
                    mats = self._place(e, slot, parts, src, dsts, srcs)
                    if (i, e) in self.entries:
                        self.entries[(i, e)] = (*mats, nbytes, slot)
                out[e] = tuple(mats)
                moved += nbytes
            if dsts:
                torch._foreach_copy_(dsts, srcs, non_blocking=True)
            self.bytes_moved += moved
            if self.device.type == "cuda":
                ev = torch.cuda.Event()
                ev.record(torch.cuda.current_stream(self.device))
                self.copied[i] = ev
            self.tl.add("expert_copy", f"experts L{i}", t0, time.monotonic_ns() - t0, moved, layer=i,
                        experts=len(missing))
        return out

    def _tensors(self, e: int, lay: LayerLayout, host: np.ndarray) -> tuple[list, int]:
        """Expert e's gate, up and down as tensors of their own (dense, or blocks off the pool)."""
        mats, nbytes = [], 0
        for t, per, _, rows, cols in _parts(lay):  # expert e of each [E, N, K] tensor: one byte range
            raw = torch.from_numpy(host[t.slot_offset + e * per : t.slot_offset + (e + 1) * per])
            raw = raw.to(self.device, non_blocking=True) if self.device.type == "cuda" else raw.clone()
            mats.append(device_weight(raw, dataclasses.replace(t, shape=(rows, cols), nbytes=per),
                                      self.dtype, self.quantized))
            nbytes += per
        return mats, nbytes

    def _parts(self, lay: LayerLayout) -> list:
        got = self.layer_parts.get(lay.layer)
        if got is None:
            got = self.layer_parts[lay.layer] = _parts(lay)
        return got

    def _place(self, e: int, slot: int, parts, src: torch.Tensor, dsts: list, srcs: list) -> list[QuantWeight]:
        """Expert e's blocks in pool slot `slot` (NOTE [ the expert pool ]): their copies out of
        the staging bytes `src` are added to dsts and srcs."""
        base = slot * self.slot
        mats = []
        for t, per, off, rows, cols in parts:
            dst = self.pool[base + off : base + off + per]
            dsts.append(dst)
            srcs.append(src[t.slot_offset + e * per : t.slot_offset + (e + 1) * per])
            mats.append(QuantWeight(dst, t.qtype, (rows, cols)))
        return mats

    def _stamp(self, key) -> None:
        self.stamp[key] = (self.uses[key], self.tick)
        heapq.heappush(self.heap, (*self.stamp[key], key))

    def _victim(self):
        """The cached expert LFU would evict first (its heap entry stays until popped)."""
        while self.heap and self.stamp.get(self.heap[0][2]) != self.heap[0][:2]:
            heapq.heappop(self.heap)  # stale: re-stamped since, or evicted
        return self.heap[0]

    def _put(self, key, entry, serving: set, nbytes: int | None = None) -> int | None:
        """Keep `key` if the policy admits it (evicting as it says, but none of `serving`): its
        pool slot, or None where it is not kept (or the cache has no pool)."""
        nbytes = entry[3] if entry is not None else nbytes
        if nbytes > self.capacity or (self.pool is not None and not self.n_cached):
            return None
        while self.entries and (self.used + nbytes > self.capacity or (self.pool is not None and not self.free)):
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
        slot = self.free.pop() if self.pool is not None else None
        self.entries[key] = entry if entry is not None else (None, None, None, nbytes, slot)
        self.used += nbytes
        if self.policy == "lfu":
            self._stamp(key)
        return slot


class ExpertSet:
    """What moe_block sees of a layer whose experts stream: `fetch(ids)` -> {expert: (gate, up, down)}.
    `dense_fixed`: the layer's other tensors stay at fixed device addresses (kept, not in a
    VRAM slot), so a CUDA graph may hold its attention and router (runner.py)."""

    def __init__(self, cache: ExpertCache, i: int, lay: LayerLayout, host: np.ndarray, dense_fixed: bool = False):
        self.cache, self.i, self.lay, self.host, self.dense_fixed = cache, i, lay, host, dense_fixed

    @property
    def grouped(self) -> bool:
        """Whether the fetched experts are blocks the grouped kernel reads (NOTE [ grouped experts ])."""
        return self.cache.pool is not None and all(p[0] in FUSED_TYPES for p in self.parts)

    @property
    def parts(self) -> tuple:
        """(qtype, rows, cols) of an expert's gate, up and down."""
        got = self.cache.kernel_parts.get(self.i)
        if got is None:
            got = self.cache.kernel_parts[self.i] = tuple((p[0].qtype, p[3], p[4]) for p in _parts(self.lay))
        return got

    def fetch(self, experts: list[int]) -> dict[int, tuple]:
        return self.cache.fetch(self.i, experts, self.lay, self.host)

    def grouped_offsets(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """Fetch the experts of the step's (token, choice) pairs `ids`: the pool, each pair's gate,
        up and down byte offsets from it ([3, len(ids)] int64 on the host) and the parts."""
        mats = self.fetch(sorted(set(ids)))
        base = self.cache.pool.data_ptr()
        offs = torch.tensor([[mats[e][j].raw.data_ptr() - base for e in ids] for j in range(3)], dtype=torch.int64)
        return self.cache.pool, offs, self.parts
