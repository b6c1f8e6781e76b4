"""The device's cache of streamed experts (NOTE [ expert streaming ] in streamed.py): what the
cache keeps, and what a layer's math sees."""

from __future__ import annotations

import dataclasses
import heapq
import time
from collections import Counter, OrderedDict

import numpy as np
import torch

from layerstream.compute.cpu.experts import CpuExperts
from layerstream.compute.expert_layout import expert_bytes, expert_parts
from layerstream.compute.h2d import DriverCopies
from layerstream.compute.moe import experts_grouped
from layerstream.compute.qlinear import FUSED_TYPES, QuantWeight
from layerstream.compute.weights import device_weight
from layerstream.loader.layout import LayerLayout
from layerstream.proto.timeline import Timeline


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
                 slot: int = 0, in_flight: int = 0, prefetch: int = 0):
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
        self.stream = None  # the compute stream, set by the owner once a step (None: looked up)
        # NOTE [ the expert pool ]
        # Block experts (what the grouped kernel reads) live in one device buffer of equal slots,
        # `slot` bytes each: the cache's slots, then `in_flight` slots for the newcomers the cache
        # does not keep. Copies land in place, with no allocation, and every expert sits at a
        # byte offset from one fixed anchor, the pool, so a CUDA graph can read whichever experts
        # a step chose from offsets in a tensor (graphs.py, NOTE [ decode graphs ]). A fetch never
        # evicts an expert that the same fetch serves. Dense experts (dequantized) are tensors of
        # their own, as before.
        self.slot = slot if quantized else 0
        self.n_cached = capacity_bytes // self.slot if self.slot else 0
        # zeros: a pair the CPU takes reads the pool's start with weight 0 (NOTE [ CPU experts ]),
        # which must be finite before any expert lands there (zero blocks are zero matrices)
        # past the in-flight slots, two sets of `prefetch` slots for the experts predicted for the
        # next layer, copied ahead on a side stream (NOTE [ expert prefetch ])
        self.prefetch_slots = prefetch if self.slot else 0
        self.pool = torch.zeros((self.n_cached + in_flight + 2 * self.prefetch_slots) * self.slot, dtype=torch.uint8,
                                device=device) if self.slot else None
        self.free = list(range(self.n_cached))
        self.in_flight = in_flight
        self.prefetched: dict[int, tuple[dict[int, int], object]] = {}  # layer -> ({expert: slot}, copies' event)
        self.set_free: list = [None, None]  # per prefetch set: event after the last read of its slots
        self.reading: dict[int, int] = {}  # layer -> the prefetch set its step reads
        self.prefetch_hits = 0  # chosen experts that a prefetch had copied
        self.prefetch_copied = 0  # experts copied ahead (hits or not)
        self.driver = DriverCopies.open() if self.pool is not None and self.device.type == "cuda" else None
        self.pool_ptr = self.pool.data_ptr() if self.pool is not None else 0  # (the pool never moves)
        self.layer_parts: dict[int, list] = {}  # layer -> expert_parts of its layout
        self.dst_views: dict[tuple[int, int, int], torch.Tensor] = {}  # (slot, offset, bytes) -> pool view
        self.src_views: dict[tuple[int, int], tuple] = {}  # (layer, staging address) -> (views, bytes)
        self.kernel_parts: dict[int, tuple] = {}  # layer -> ExpertSet.parts
        self.part_offsets: dict[int, tuple] = {}  # layer -> ExpertSet.offsets
        self.copy_groups: dict[int, list] = {}  # layer -> _groups

    def fetch(self, i: int, experts: list[int], lay: LayerLayout, host: np.ndarray) -> dict[int, tuple]:
        """Layer i's `experts` on the device, copying the missing ones out of its staging bytes:
        {expert: (gate, up, down)}."""
        if self.pool is None:
            return self._fetch(i, experts, lay, host)
        parts = self._parts(lay)
        return {e: tuple(QuantWeight(self._dst(slot, p[2], p[1]), p[0].qtype, (p[3], p[4])) for p in parts)
                for e, slot in self._fetch(i, experts, lay, host).items()}

    def fetch_slots(self, i: int, experts: list[int], lay: LayerLayout, host: np.ndarray) -> dict[int, int]:
        """As fetch, for a cache with a pool: {expert: its pool slot} (NOTE [ the expert pool ])."""
        return self._fetch(i, experts, lay, host)

    def _fetch(self, i: int, experts: list[int], lay: LayerLayout, host: np.ndarray) -> dict[int, object]:
        """Layer i's `experts`: {expert: pool slot} with a pool, else {expert: (gate, up, down)}.
        The missing ones are copied, in one call with a pool, from views made once (making them
        each step doubled a layer's fetch time)."""
        out, missing, ahead = {}, [], []
        pre, pre_event = self.prefetched.pop(i, ({}, None))
        cur = self._stream() if self.device.type == "cuda" else None
        if pre_event is not None:  # its copies read this layer's staging slot: they come first
            cur.wait_event(pre_event)
        for e in experts:
            key = (i, e)
            self.tick += 1
            self.uses[key] += 1
            hit = self.entries.get(key)
            if hit is not None:
                self.entries.move_to_end(key)
                if self.policy == "lfu":
                    self._stamp(key)
                out[e] = hit[4] if self.pool is not None else hit[:3]
            elif e in pre:
                ahead.append(e)
            else:
                missing.append(e)
        self.hits += len(out)
        self.misses += len(missing)
        serving = {(i, e) for e in experts}
        if pre:
            self.reading[i] = i % 2
        nbytes = sum(p[1] for p in self._parts(lay)) if self.pool is not None else 0  # an expert's bytes
        for e in ahead:  # predicted and copied ahead: kept as a copy would be (a device-to-device copy)
            self.prefetch_hits += 1
            slot = self._put((i, e), None, serving, nbytes)
            if slot is None:
                out[e] = pre[e]
                continue
            if self.driver is not None:
                self.driver.d2d(self.pool_ptr + slot * self.slot, self.pool_ptr + pre[e] * self.slot, self.slot,
                                cur.cuda_stream if cur is not None else 0)
            else:
                self.pool[slot * self.slot : (slot + 1) * self.slot].copy_(
                    self.pool[pre[e] * self.slot : (pre[e] + 1) * self.slot])
            out[e] = slot
        if missing:
            t0 = time.monotonic_ns()
            if self.pool is None:
                moved = 0
                for e in missing:
                    mats, nbytes = self._tensors(e, lay, host)
                    self._put((i, e), (*mats, nbytes, None), serving)
                    out[e] = tuple(mats)
                    moved += nbytes
            else:
                moved = nbytes * len(missing)
                flight = iter(range(self.n_cached, self.n_cached + self.in_flight))
                items = []  # (slot, expert): the pool's copies, issued at once
                for e in missing:
                    slot = self._put((i, e), None, serving, nbytes)
                    slot = next(flight, None) if slot is None else slot
                    if slot is None:
                        raise RuntimeError(f"layer {i}: more new experts in one step than the pool's {self.in_flight}")
                    items.append((slot, e))
                    out[e] = slot
                self._copy(i, items, lay, host, cur)
            self.bytes_moved += moved
            self.tl.add("expert_copy", f"experts L{i}", t0, time.monotonic_ns() - t0, moved, layer=i,
                        experts=len(missing))
        return out

    def _stream(self):
        """The compute stream: the one set for this step, else the current one."""
        return self.stream if self.stream is not None else torch.cuda.current_stream(self.device)

    def on_device(self, i: int, e: int) -> bool:
        """Whether layer i's expert e needs no copy after its router: cached, or copied ahead."""
        return (i, e) in self.entries or e in self.prefetched.get(i, ({},))[0]

    def prefetch(self, i: int, experts: list[int], lay: LayerLayout, host: np.ndarray, stream=None) -> int:
        """NOTE [ expert prefetch ]
        A streamed MoE layer's experts cannot cross PCIe before its router has run, so the copy
        engine idles through the layer's attention, its router and the host's sync, and the
        device idles through the copies. The router of the next layer, applied to this layer's
        expert input (moe.predict_next), predicts the next layer's choice; those experts that
        are not cached are copied now, on a side stream (`stream`; None: at once), into one of two
        sets of slots past the in-flight ones (the next layer's set; the other is the current
        layer's). Layer i's fetch then serves a predicted expert from its set like a cache hit,
        admitting it to the cache as a copy would be (a device-to-device copy), and copies only
        the experts the prediction missed. A set is overwritten only after the device's last read
        of it (`done`). The prediction never changes what is computed: only where an expert's
        bytes come from. Returns the experts copied."""
        if self.pool is None or not self.prefetch_slots:
            return 0
        want = [e for e in experts if (i, e) not in self.entries][: self.prefetch_slots]
        if not want:
            return 0
        t0 = time.monotonic_ns()
        base = self.n_cached + self.in_flight + (i % 2) * self.prefetch_slots
        slots = {e: base + n for n, e in enumerate(want)}
        ev = None
        if stream is not None and self.set_free[i % 2] is not None:
            stream.wait_event(self.set_free[i % 2])  # the layer that read this set two layers ago
        self._copy(i, [(s, e) for e, s in slots.items()], lay, host, stream)
        if stream is not None:
            ev = torch.cuda.Event()
            ev.record(stream)
        self.prefetched[i] = (slots, ev)
        moved = len(want) * sum(p[1] for p in self._parts(lay))
        self.bytes_moved += moved
        self.prefetch_copied += len(want)
        self.tl.add("expert_prefetch", f"prefetch L{i}", t0, time.monotonic_ns() - t0, moved, layer=i,
                    experts=len(want))
        return len(want)

    def done(self, i: int, event=None) -> None:
        """Layer i's work is enqueued, `event` recorded after it on the compute stream: the
        prefetch set it read may be overwritten once that event has passed."""
        k = self.reading.pop(i, None)
        if k is not None and self.device.type == "cuda":
            if event is None:
                event = torch.cuda.Event()
                event.record(self._stream())
            self.set_free[k] = event

    def drop_prefetched(self) -> None:
        """Forget copies ahead that no fetch took (a step that ended early), once they are done."""
        for _, ev in self.prefetched.values():
            if ev is not None:
                ev.synchronize()
        self.prefetched.clear()

    def _copy(self, i: int, items: list[tuple[int, int]], lay: LayerLayout, host: np.ndarray, stream=None) -> None:
        """Copy each (pool slot, expert) of layer i out of its staging bytes `host`, on `stream`
        (None: the current one): through the driver where it is at hand (h2d.py, NOTE [ driver
        copies ]), else torch's copies from views made once."""
        parts = self._parts(lay)
        if self.driver is not None:
            src, dst, groups = host.ctypes.data, self.pool_ptr, self._groups(lay)
            self.driver.issue([(dst + slot * self.slot + off, src + a + e * per, per, h, dp, sp)
                               for slot, e in items for a, per, off, h, dp, sp in groups],
                              (stream or self._stream()).cuda_stream if self.device.type == "cuda" else 0)
            return
        view = self._sources(i, host)
        dsts = [self._dst(slot, off, per) for slot, e in items for t, per, off, _, _ in parts]
        srcs = [view(e, j, t, per) for slot, e in items for j, (t, per, _, _, _) in enumerate(parts)]
        if stream is None:
            torch._foreach_copy_(dsts, srcs, non_blocking=True)
        else:
            with torch.cuda.stream(stream):
                torch._foreach_copy_(dsts, srcs, non_blocking=True)

    def _groups(self, lay: LayerLayout) -> list[tuple[int, int, int, int, int, int]]:
        """An expert's parts as the driver's copies (h2d.py, NOTE [ driver copies ]): runs of parts
        of the same bytes, evenly spaced in staging and in the pool slot, each as (staging offset
        of the first part's expert 0, bytes a part, offset in the slot, parts, slot pitch,
        staging pitch)."""
        got = self.copy_groups.get(lay.layer)
        if got is None:
            got = []
            for t, per, off, _, _ in self._parts(lay):
                if got:
                    a, p, o, h, dp, sp = got[-1]
                    step, dstep = t.slot_offset - a - (h - 1) * sp, off - o - (h - 1) * dp
                    if p == per and (h == 1 or (step, dstep) == (sp, dp)) and step >= per and dstep >= per:
                        got[-1] = (a, p, o, h + 1, dstep, step)
                        continue
                got.append((t.slot_offset, per, off, 1, 0, 0))
            self.copy_groups[lay.layer] = got
        return got

    def _dst(self, slot: int, off: int, nbytes: int) -> torch.Tensor:
        """`nbytes` bytes at `off` in pool slot `slot`: a part of an expert, as a view made once."""
        key = (slot, off, nbytes)
        v = self.dst_views.get(key)
        if v is None:
            base = slot * self.slot + off
            v = self.dst_views[key] = self.pool[base : base + nbytes]
        return v

    def _sources(self, i: int, host: np.ndarray):
        """A function (e, j, tensor, bytes an expert) -> expert e's part j in layer i's staging
        bytes `host`, as views made once per (layer, staging address)."""
        key = (i, host.ctypes.data)
        views = self.src_views.get(key)
        if views is None:
            if len(self.src_views) > 4 * (len(self.layer_parts) + 1):
                self.src_views.clear()  # staging slots were reassigned: start over
            views = self.src_views[key] = ({}, torch.from_numpy(host))

        def src(e: int, j: int, t, per: int) -> torch.Tensor:
            v = views[0].get((e, j))
            if v is None:
                v = views[0][(e, j)] = expert_bytes(views[1], t, per, e)
            return v

        return src

    def count(self, i: int, experts: list[int]) -> None:
        """Layer i's `experts` were used without a fetch (the CPU computed them): LFU counts them."""
        for e in experts:
            self.tick += 1
            self.uses[(i, e)] += 1

    def _tensors(self, e: int, lay: LayerLayout, host: np.ndarray) -> tuple[list, int]:
        """Expert e's gate, up and down as tensors of their own (dense, or blocks off the pool)."""
        mats, nbytes = [], 0
        for t, per, _, rows, cols in expert_parts(lay):  # expert e of each [E, N, K] tensor: one byte range
            raw = torch.from_numpy(expert_bytes(host, t, per, e))
            raw = raw.to(self.device, non_blocking=True) if self.device.type == "cuda" else raw.clone()
            mats.append(device_weight(raw, dataclasses.replace(t, shape=(rows, cols), nbytes=per),
                                      self.dtype, self.quantized))
            nbytes += per
        return mats, nbytes

    def _parts(self, lay: LayerLayout) -> list:
        got = self.layer_parts.get(lay.layer)
        if got is None:
            got = self.layer_parts[lay.layer] = expert_parts(lay)
        return got

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
    """What moe_block sees of a layer whose experts stream (a moe.ExpertSource): `fetch(ids)` ->
    {expert: (gate, up, down)}, or `grouped_sum` through the pool.
    `dense_fixed`: the layer's other tensors stay at fixed device addresses (kept, not in a
    VRAM slot), so a CUDA graph may hold its attention and router (graphs.py)."""

    def __init__(self, cache: ExpertCache, i: int, lay: LayerLayout, host: np.ndarray, dense_fixed: bool = False,
                 cpu: CpuExperts | None = None, frac: float = 0.0, next_router: dict | None = None,
                 prefetch_next=None):
        self.cache, self.i, self.lay, self.host, self.dense_fixed = cache, i, lay, host, dense_fixed
        self.cpu, self.frac = cpu, frac  # the CPU's experts and its share of this step (NOTE [ CPU experts ])
        # the next layer's norm and router on the device, and what copies its predicted experts
        # ahead (NOTE [ expert prefetch ]); None: no prediction
        self.next_router = next_router if prefetch_next is not None else None
        self.prefetch_next = prefetch_next

    def read_ids(self, ids: torch.Tensor) -> list[int]:
        """The step's expert ids on the host: the layer's sync, which waits for its router (timed
        as `wait_route`: the host waiting on the device)."""
        with self.cache.tl.span("wait_route", f"route L{self.i}", layer=self.i):
            return ids.tolist()

    def prefetch(self, predicted: list[int]) -> None:
        """Copy ahead the next layer's experts that the step's (token, choice) pairs `predicted`
        name, the most often named first (NOTE [ expert prefetch ])."""
        if self.prefetch_next is not None and predicted:
            self.prefetch_next([e for e, _ in Counter(predicted).most_common()])

    @property
    def grouped(self) -> bool:
        """Whether the fetched experts are blocks the grouped kernel reads (NOTE [ grouped experts ])."""
        return self.cache.pool is not None and all(p[0] in FUSED_TYPES for p in self.parts)

    @property
    def parts(self) -> tuple:
        """(qtype, rows, cols) of an expert's gate, up and down."""
        got = self.cache.kernel_parts.get(self.i)
        if got is None:
            got = self.cache.kernel_parts[self.i] = tuple((p[0].qtype, p[3], p[4]) for p in expert_parts(self.lay))
        return got

    @property
    def offsets(self) -> tuple[int, int, int]:
        """Where an expert's gate, up and down start in its pool slot."""
        got = self.cache.part_offsets.get(self.i)
        if got is None:
            got = self.cache.part_offsets[self.i] = tuple(p[2] for p in expert_parts(self.lay))
        return got

    def fetch(self, experts: list[int]) -> dict[int, tuple]:
        return self.cache.fetch(self.i, experts, self.lay, self.host)

    def grouped_sum(self, h: torch.Tensor, weight: torch.Tensor, chosen: torch.Tensor,
                    pred: torch.Tensor | None = None) -> torch.Tensor:
        """moe.ExpertSource.grouped_sum: the chosen experts' cache entries, by address (NOTE
        [ grouped experts ] in moe.py); the predicted ones copied ahead while the device computes."""
        flat = chosen.flatten()
        ids = self.read_ids(flat if pred is None else torch.cat((flat, pred.flatten())))  # the host sync of this layer
        offs, keep, run_cpu = self.prepare(ids[: flat.numel()], h, weight)
        out = experts_grouped(h, weight if keep is None else weight * keep.to(h.device, non_blocking=True),
                              self.cache.pool, offs.to(h.device), self.parts)
        self.prefetch(ids[flat.numel() :])  # while the device computes (NOTE [ expert prefetch ])
        if run_cpu is None:
            return out
        # the device's experts are launched first, then the CPU computes its own (NOTE [ CPU experts ])
        return out + run_cpu().to(h.device, non_blocking=True)

    def cpu_choice(self, ids: list[int]) -> list[int]:
        """The CPU's experts among the step's (token, choice) pairs `ids`: its share of those not on
        the device (NOTE [ CPU experts ]); [] without a share."""
        if self.cpu is None or self.frac <= 0:
            return []
        missing = [e for e in sorted(set(ids)) if not self.cache.on_device(self.i, e)]
        return self.cpu.choose(self.i, self.lay, missing, self.frac)

    def grouped_offsets(self, ids: list[int], out: torch.Tensor | None = None,
                        cpu: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, tuple, list[int]]:
        """Fetch the experts of the step's (token, choice) pairs `ids` but the CPU's share of the
        missing ones (NOTE [ CPU experts ]; `cpu`: that share, when already chosen): the pool, each
        pair's gate, up and down byte offsets from it ([3, len(ids)] int64 on the host, written into
        `out` where it is given; the CPU's pairs point at the pool's start), the parts, and the
        CPU's experts."""
        distinct = sorted(set(ids))
        if cpu is None:
            cpu = self.cpu_choice(ids)
        if cpu:
            self.cache.count(self.i, cpu)
        slots = self.cache.fetch_slots(self.i, [e for e in distinct if e not in cpu] if cpu else distinct, self.lay,
                                       self.host)
        size, starts = self.cache.slot, self.offsets
        base = [slots[e] * size if e in slots else None for e in ids]
        rows = [[0 if b is None else b + a for b in base] for a in starts]
        if out is None:
            return self.cache.pool, torch.tensor(rows, dtype=torch.int64), self.parts, cpu
        view = out.numpy()  # (a pinned buffer: written in place, no tensor made)
        for j, row in enumerate(rows):
            view[j] = row
        return self.cache.pool, out, self.parts, cpu

    def prepare(self, ids: list[int], h: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None):
        """A step's experts for the grouped launches, in the order that lets the CPU work while
        the copies run (NOTE [ CPU experts ]): the CPU's experts are chosen, and where there are
        any, the activations and weights go to the host (a read after the fetch would wait for its
        copies); then the fetch. Returns the pairs' offsets (grouped_offsets), their keep weights
        ([T, k] on the host: 0 for the CPU's pairs; None where the CPU takes none of them), and a
        function computing the CPU's weighted sum ([T, n_embd] float32 on the host; None when the
        CPU takes nothing). Where the CPU takes nothing the layer costs no round trip to the host:
        at batch 1 a share of about 30% of one or two missing experts rounds to none, and with that
        round trip `--cpu-share auto` ran about 10% slower than no share; without it, as fast.
        `out`: where the offsets go."""
        cpu = self.cpu_choice(ids)
        if cpu:
            h_host, w_host = h.float().cpu(), weight.float().cpu()
        _, offs, _, _ = self.grouped_offsets(ids, out, cpu)
        if not cpu:
            return offs, None, None
        keep = torch.tensor([0.0 if e in cpu else 1.0 for e in ids]).view(-1, weight.shape[1])
        return offs, keep, lambda: self.cpu.compute(self.i, self.lay, self.host, cpu, ids, h_host, w_host)
