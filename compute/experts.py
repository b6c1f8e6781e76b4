"""The device's cache of streamed experts (NOTE [ expert streaming ] in streamed.py): what the
cache keeps, and what a layer's math sees."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter

import numpy as np
import torch

from layerstream.compute.cpu.experts import CpuExperts
from layerstream.compute.dequant import FUSED_TYPES
from layerstream.compute.expert_layout import LayerParts, expert_bytes, expert_parts
from layerstream.compute.expert_policy import ExpertPolicy
from layerstream.compute.expert_pool import ExpertPool, PrefetchSets
from layerstream.compute.moe import experts_grouped, with_inputs
from layerstream.compute.qlinear import QuantWeight
from layerstream.compute.weights import device_weight
from layerstream.loader.layout import LayerLayout
from layerstream.proto.timeline import Timeline


class ExpertCache:
    """Experts copied to the compute device (NOTE [ expert streaming ]): an entry holds one
    expert's gate, up and down blocks of one layer. What it keeps is `kept`'s (expert_policy.py);
    block experts live in `store`, its pool (expert_pool.py, NOTE [ the expert pool ]); experts
    copied ahead are `ahead`'s (NOTE [ expert prefetch ])."""

    def __init__(self, capacity_bytes: int, device, dtype, quantized: bool, timeline: Timeline, policy: str = "lfu",
                 slot: int = 0, in_flight: int = 0, prefetch: int = 0, room: tuple[int, int] = (0, 0),
                 scratch: int = 0):
        self.device, self.dtype, self.quantized, self.tl = device, dtype, quantized, timeline
        slot = slot if quantized else 0
        n_cached = capacity_bytes // slot if slot else 0
        self.own = (capacity_bytes, n_cached if slot else None)  # (its bytes and slots, the room not lent)
        self.kept = ExpertPolicy(self.own[0], policy, self.own[1])
        self.store = ExpertPool(slot, n_cached, in_flight, prefetch, device, room, scratch) if slot else None
        self.lent = False  # the room's slots are the cache's for now (lend)
        self.lends = self.reclaimed = 0  # times the room was lent; entries dropped when it was taken back
        self.ahead = PrefetchSets(prefetch)
        self.parts = LayerParts()
        self.hits = self.misses = 0
        self.bytes_moved = 0
        self.stream = None  # the compute stream, set by the owner once a step (None: looked up)
        self.misses_issued = None  # event after the last fetch's copies of its misses, for the next copies ahead
        self._misses_event = None  # the one event misses_issued records (made once: a layer's chain makes none)
        self.pending = None  # the last fetch's bookkeeping, left for settle (NOTE [ misses first, bookkeeping after ])

    @property
    def pool(self) -> torch.Tensor | None:
        """The pool's buffer, the anchor of the grouped kernel's offsets (None: no pool)."""
        return self.store.buf if self.store is not None else None

    @property
    def slot(self) -> int:
        """Bytes of a pool slot (0: no pool)."""
        return self.store.slot if self.store is not None else 0

    @property
    def prefetch_slots(self) -> int:
        """Slots of each prefetch set (0: no prefetch)."""
        return self.store.prefetch if self.store is not None else 0

    @property
    def lendable(self) -> bool:
        """Whether the pool has a room to lend the cache (NOTE [ the layer slots lent to the expert cache ])."""
        return self.store is not None and bool(self.store.room_slots)

    def lend(self) -> None:
        """The room's slots join the cache's (its layer slots idle until the next step that copies a layer)."""
        if self.lendable and not self.lent:
            self.kept.lend(self.store.room_slots, self.slot)
            self.lent, self.lends = True, self.lends + 1

    def reclaim(self) -> None:
        """The room taken back for layer copies: the experts admitted into it are dropped, once
        the bookkeeping left from the last fetch has run (its moves may write the room)."""
        if self.lent:
            self.settle()
            self.reclaimed += self.kept.reclaim(self.slot)
            self.lent = False

    def reset(self) -> None:
        """Start empty, the room not lent and nothing left to settle (a step raised: an entry may
        name a copy never issued; the device has run everything queued)."""
        self.kept = ExpertPolicy(self.own[0], self.kept.policy, self.own[1])
        self.lent, self.pending = False, None
        self.ahead.layers.clear()
        self.ahead.reading.clear()

    def stats(self) -> dict:
        """The cache's counters over the run (coordinator/stats.py, ExpertStats; the owner adds the steps)."""
        ahead, store = self.ahead, self.store
        return {"policy": self.kept.policy, "hits": self.hits, "misses": self.misses, "bytes": self.bytes_moved,
                "prefetch_hits": ahead.hits, "prefetched": ahead.copied, "prefetch_late": ahead.late,
                "prefetch_limit": ahead.limits / max(ahead.issued, 1), "lends": self.lends, "reclaimed": self.reclaimed,
                "room": store.buf.numel() - store.room_at if self.lendable else 0,
                "room_scratch": store.scratch_bytes if self.lendable else 0}

    def fetch(self, i: int, experts: list[int], lay: LayerLayout, host: np.ndarray) -> dict[int, tuple]:
        """Layer i's `experts` on the device, copying the missing ones out of its staging bytes:
        {expert: (gate, up, down)}."""
        if self.pool is None:
            return self._fetch(i, experts, lay, host)
        parts, slots = self.parts.of(lay), self._fetch(i, experts, lay, host)
        self.settle()  # (its moves write only other layers' slots: these stay as they are)
        return {e: tuple(QuantWeight(self.store.dst(slot, p[2], p[1]), p[0].qtype, (p[3], p[4])) for p in parts)
                for e, slot in slots.items()}

    def fetch_slots(self, i: int, experts: list[int], lay: LayerLayout, host: np.ndarray) -> dict[int, int]:
        """As fetch, for a cache with a pool: {expert: its pool slot} (NOTE [ the expert pool ])."""
        return self._fetch(i, experts, lay, host)

    def _fetch(self, i: int, experts: list[int], lay: LayerLayout, host: np.ndarray) -> dict[int, object]:
        """Layer i's `experts`: {expert: pool slot} with a pool, else {expert: (gate, up, down)}.
        The missing ones are copied, in one call with a pool, from views made once (making them
        each step doubled a layer's fetch time). With a pool the cache's bookkeeping waits for
        `settle` (NOTE [ misses first, bookkeeping after ]).

        NOTE [ misses before copies ahead ]
        A layer's missed experts are on its chain: its experts wait for them, and the next layer's
        router for those. Its copies ahead (NOTE [ expert prefetch ]) are not, until its experts
        run. So the misses' copies are issued before the compute stream waits for the copies ahead
        of this layer (they share the link with any still running, where the copy engines run
        both streams at once, rather than queue behind them), and the next layer's copies ahead
        wait for the misses' copies (`misses_issued`) rather than share the link with them. Only
        the experts and the moves into the cache, which read the copies ahead, wait for them."""
        self.settle()
        entries, out, missing, ahead = self.kept.entries, {}, [], []
        pre, pre_event = self.ahead.layers.pop(i, ({}, None))
        for e in experts:
            hit = entries.get((i, e))
            if hit is not None:
                out[e] = hit[4] if self.pool is not None else hit[:3]
            elif e in pre:
                ahead.append(e)
            else:
                missing.append(e)
        self.hits += len(out)
        self.misses += len(missing)
        if self.pool is None:  # experts of their own, admitted as they are made (none copied ahead)
            self._count_uses(i, experts)
            serving, moved, t0 = {(i, e) for e in experts}, 0, time.monotonic_ns()
            for e in missing:
                mats, nbytes = self._tensors(e, lay, host)
                self.kept.put((i, e), (*mats, nbytes, None), serving)
                out[e] = tuple(mats)
                moved += nbytes
            self._moved(i, len(missing), moved, t0)
            return out
        cur = self._stream() if self.device.type == "cuda" else None
        items = list(zip(self.store.flight(), missing))  # (in-flight slot, expert): copied at once
        if len(items) < len(missing):
            raise RuntimeError(f"layer {i}: more new experts in one step than the pool's {self.store.in_flight - 1}")
        nbytes = self.parts.expert_nbytes(lay)
        if items:
            t0 = time.monotonic_ns()
            self._copy(i, items, lay, host, cur)
            if cur is not None and self.prefetch_slots:  # (NOTE [ misses before copies ahead ])
                if self._misses_event is None:  # (a wait already enqueued keeps the record it saw)
                    self._misses_event = torch.cuda.Event()
                self._misses_event.record(cur)
                self.misses_issued = self._misses_event
            self._moved(i, len(items), nbytes * len(items), t0)
        if pre:
            # (NOTE [ copies ahead that land in time ]: one driver call a layer, in one-token steps only)
            on_time = pre_event is None or not self.ahead.single or pre_event.query()
            self.ahead.landed(on_time, bool(missing) or len(ahead) < len(pre))  # (a copy ahead for nothing)
            self.ahead.reading[i] = i % 2
            self.ahead.hits += len(ahead)
        if pre_event is not None:  # the experts and settle's moves read the copies ahead; the staging
            cur.wait_event(pre_event)  # slot's release comes after the layer's work, so after them too
        landed = [(e, pre[e]) for e in ahead] + [(e, s) for s, e in items]  # where each copied expert is
        out.update(landed)
        self.pending = (i, experts, landed, nbytes, cur)
        return out

    def settle(self) -> None:
        """NOTE [ misses first, bookkeeping after ]
        Nothing runs on the device between a layer's router and its misses' copies, and its
        experts wait for those, so the host's work in between is on the layer's chain. A fetch
        therefore only sorts the chosen experts, issues the misses' copies into in-flight slots
        and serves the experts copied ahead from their set. The cache's bookkeeping, which the
        layer's experts do not need, comes after their launch: each chosen expert's use is
        counted, then each one copied (ahead, or as a miss) is admitted as before, by a copy on
        the device from where it landed, enqueued after the experts that read it. The same uses
        and admissions in the same order as when they came first, so the cache keeps the same
        experts. The layer's owner calls this once its experts are launched; the next fetch,
        copy ahead or release calls it where the owner did not."""
        if self.pending is None:
            return
        (i, experts, landed, nbytes, cur), self.pending = self.pending, None
        self._count_uses(i, experts)
        serving = {(i, e) for e in experts}
        for e, src in landed:
            slot = self.kept.put((i, e), None, serving, nbytes)
            if slot is not None:
                self.store.move(slot, src, cur)

    def _count_uses(self, i: int, experts: list[int]) -> None:
        """A use of each of layer i's `experts` (ExpertPolicy.lookup)."""
        for e in experts:
            self.kept.lookup((i, e))

    def _moved(self, i: int, n: int, moved: int, t0: int) -> None:
        """`n` of layer i's experts were copied after its router, `moved` bytes, issued from t0."""
        self.bytes_moved += moved
        self.tl.add("expert_copy", f"experts L{i}", t0, time.monotonic_ns() - t0, moved, layer=i, experts=n)

    def _stream(self):
        """The compute stream: the one set for this step, else the current one."""
        return self.stream if self.stream is not None else torch.cuda.current_stream(self.device)

    def on_device(self, i: int, e: int) -> bool:
        """Whether layer i's expert e needs no copy after its router: cached, or copied ahead."""
        return (i, e) in self.kept or self.ahead.has(i, e)

    def prefetch(self, i: int, experts: list[int], lay: LayerLayout, host: np.ndarray, stream=None) -> int:
        """NOTE [ expert prefetch ]
        A streamed MoE layer's experts cannot cross PCIe before its router has run, so the copy
        engine idles through the layer's attention, its router and the host's sync, and the
        device idles through the copies. The router of the next layer, applied to this layer's
        expert input (moe.predict_next), predicts the next layer's choice; those experts that
        are not cached, best first and no more than land in time (NOTE [ copies ahead that land in
        time ] in expert_pool.py), are copied now, on a side stream (`stream`; None: at once),
        into one of two sets of slots past the in-flight ones (the next layer's set; the other is
        the current layer's). Layer i's fetch then serves a predicted expert from its set like a cache hit,
        admitting it to the cache as a copy would be (a device-to-device copy), and copies only
        the experts the prediction missed. A set is overwritten only after the device's last read
        of it (`done`). The prediction never changes what is computed: only where an expert's
        bytes come from. Returns the experts copied."""
        if self.pool is None or not self.prefetch_slots:
            return 0
        self.settle()  # (its admissions may evict experts of layer i, and its moves read a set)
        want = [e for e in experts if (i, e) not in self.kept]
        want = want[: self.ahead.take(len(want))]  # (NOTE [ copies ahead that land in time ] in expert_pool.py)
        if not want:
            return 0
        t0 = time.monotonic_ns()
        base = self.store.prefetch_base(i % 2)
        slots = {e: base + n for n, e in enumerate(want)}
        ev = None
        if stream is not None and self.ahead.set_free[i % 2] is not None:
            stream.wait_event(self.ahead.set_free[i % 2])  # the layer that read this set two layers ago
        if stream is not None and self.misses_issued is not None:  # (NOTE [ misses before copies ahead ])
            stream.wait_event(self.misses_issued)
            self.misses_issued = None
        self._copy(i, [(s, e) for e, s in slots.items()], lay, host, stream)
        if stream is not None:
            ev = torch.cuda.Event()
            ev.record(stream)
        self.ahead.layers[i] = (slots, ev)
        moved = len(want) * self.parts.expert_nbytes(lay)
        self.bytes_moved += moved
        self.ahead.copied += len(want)
        self.tl.add("expert_prefetch", f"prefetch L{i}", t0, time.monotonic_ns() - t0, moved, layer=i,
                    experts=len(want))
        return len(want)

    def done(self, i: int, event=None) -> None:
        """Layer i's work is enqueued, `event` recorded after it on the compute stream: the
        prefetch set it read may be overwritten once that event has passed."""
        if self.pending is not None:  # (its moves read the set: the event goes after them)
            self.settle()
            event = None
        k = self.ahead.reading.pop(i, None)
        if k is not None and self.device.type == "cuda":
            if event is None:
                event = torch.cuda.Event()
                event.record(self._stream())
            self.ahead.set_free[k] = event

    def drop_prefetched(self) -> None:
        """Forget copies ahead that no fetch took (a step that ended early), once they are done."""
        self.settle()
        for _, ev in self.ahead.layers.values():
            if ev is not None:
                ev.synchronize()
        self.ahead.layers.clear()

    def _copy(self, i: int, items: list[tuple[int, int]], lay: LayerLayout, host: np.ndarray, stream=None) -> None:
        """Copy each (pool slot, expert) of layer i out of its staging bytes `host`, on `stream`
        (None: the current one): ExpertPool.copy."""
        self.store.copy(i, items, lay, host, self.parts.of(lay), stream, self._stream, len(self.parts.parts))

    def count(self, i: int, experts: list[int]) -> None:
        """Layer i's `experts` were used without a fetch (the CPU computed them): LFU counts them."""
        for e in experts:
            self.kept.count((i, e))

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


class ExpertSet:
    """What moe_block sees of a layer whose experts stream (a moe.ExpertSource): `fetch(ids)` ->
    {expert: (gate, up, down)}, or `grouped_sum` through the pool.
    `dense_fixed`: the layer's other tensors stay at fixed device addresses (kept, not in a
    VRAM slot), so a CUDA graph may hold its attention and router (graphs.py)."""

    def __init__(self, cache: ExpertCache, i: int, lay: LayerLayout, host: np.ndarray, dense_fixed: bool = False,
                 cpu: CpuExperts | None = None, frac: float = 0.0, next_router: dict | None = None,
                 prefetch_next=None, next_lay: LayerLayout | None = None):
        self.cache, self.i, self.lay, self.host, self.dense_fixed = cache, i, lay, host, dense_fixed
        self.cpu, self.frac = cpu, frac  # the CPU's experts and its share of this step (NOTE [ CPU experts ])
        # the next layer's norm and router on the device, and what copies its predicted experts
        # ahead (NOTE [ expert prefetch ]); None: no prediction
        self.next_router = next_router if prefetch_next is not None else None
        self.prefetch_next = prefetch_next
        self.next_lay = next_lay  # the next layer's layout, where it is predicted

    def read_ids(self, ids: torch.Tensor) -> list[int]:
        """The step's expert ids on the host: the layer's sync, which waits for its router (timed
        as `wait_route`: the host waiting on the device)."""
        with self.cache.tl.span("wait_route", f"route L{self.i}", layer=self.i):
            return ids.tolist()

    @property
    def stages_inputs(self) -> bool:
        """Whether the layer's sync also brings its experts' inputs to the host (a CPU share:
        NOTE [ one sync a layer ])."""
        return self.cpu is not None and self.frac > 0

    def read_step(self, ids: torch.Tensor, n: int, h_shape: tuple, w_shape: tuple
                  ) -> tuple[list[int], tuple[torch.Tensor, torch.Tensor]]:
        """As read_ids, of moe.with_inputs' tensor (its `n` ids first): the ids, and the experts'
        inputs on the host, h (`h_shape`) and weight (`w_shape`), float32.

        NOTE [ one sync a layer ]
        With a CPU share, the CPU's experts need the layer's normed input and the router's weights
        on the host, which a copy after the ids' would fetch in a second round trip, on the
        layer's chain, with the device idle. So the router's output carries them: the float32
        bits of both follow the ids in one int64 tensor, and the one copy that waits for the
        router brings all three (n_embd + k floats a token more). Only the ids become Python ints."""
        with self.cache.tl.span("wait_route", f"route L{self.i}", layer=self.i):
            host = ids.cpu()
        a = h_shape[0] * h_shape[1]
        floats = host[n:].view(torch.float32)
        return host[:n].tolist(), (floats[:a].view(h_shape), floats[a : a + w_shape[0] * w_shape[1]].view(w_shape))

    def prefetch(self, predicted: list[int]) -> None:
        """Copy ahead the next layer's experts that the step's (token, choice) pairs `predicted`
        name, the most often named first (NOTE [ expert prefetch ])."""
        if self.prefetch_next is None or not predicted:
            return
        order = [e for e, _ in Counter(predicted).most_common()]
        if self.cpu is not None and self.frac > 0 and self.next_lay is not None:  # the CPU's, held back
            j = self.i + 1
            held = self.cpu.reserve(j, self.next_lay, [e for e in order if (j, e) not in self.cache.kept], self.frac)
            order = [e for e in order if e not in held] if held else order
        self.prefetch_next(order)

    @property
    def grouped(self) -> bool:
        """Whether the fetched experts are blocks the grouped kernel reads (NOTE [ grouped experts ])."""
        return self.cache.pool is not None and all(p[0] in FUSED_TYPES for p in self.parts)

    @property
    def parts(self) -> tuple:
        """(qtype, rows, cols) of an expert's gate, up and down."""
        return self.cache.parts.kernel_parts(self.i, self.lay)

    @property
    def offsets(self) -> tuple[int, int, int]:
        """Where an expert's gate, up and down start in its pool slot."""
        return self.cache.parts.slot_offsets(self.i, self.lay)

    def fetch(self, experts: list[int]) -> dict[int, tuple]:
        return self.cache.fetch(self.i, experts, self.lay, self.host)

    def grouped_sum(self, h: torch.Tensor, weight: torch.Tensor, chosen: torch.Tensor,
                    pred: torch.Tensor | None = None) -> torch.Tensor:
        """moe.ExpertSource.grouped_sum: the chosen experts' cache entries, by address (NOTE
        [ grouped experts ] in moe.py); the predicted ones copied ahead while the device computes."""
        flat = chosen.flatten()
        both = flat if pred is None else torch.cat((flat, pred.flatten()))
        inputs = None
        if self.stages_inputs:  # (NOTE [ one sync a layer ])
            ids, inputs = self.read_step(with_inputs(both, h, weight), both.numel(), h.shape, weight.shape)
        else:
            ids = self.read_ids(both)  # the host sync of this layer
        offs, keep, cpu_sum = self.prepare(ids[: flat.numel()], h, weight, inputs=inputs)
        out = experts_grouped(h, weight if keep is None else weight * keep.to(h.device, non_blocking=True),
                              self.cache.pool, offs.to(h.device), self.parts, aligned=True)  # (ALIGN apart)
        self.cache.settle()  # after the launch (NOTE [ misses first, bookkeeping after ])
        self.prefetch(ids[flat.numel() :])  # while the device computes (NOTE [ expert prefetch ])
        if cpu_sum is None:
            return out
        # the device's experts are launched while the CPU computes its own (NOTE [ CPU experts ])
        with self.cache.tl.span("wait_cpu", f"cpu sum L{self.i}", layer=self.i):  # (the host waiting on the CPU)
            got = cpu_sum()
        return out + got.to(h.device, non_blocking=True)

    def cpu_choice(self, ids: list[int]) -> list[int]:
        """The CPU's experts among the step's (token, choice) pairs `ids`: its share of those not on
        the device (NOTE [ CPU experts ]); [] without a share."""
        if self.cpu is None or self.frac <= 0:
            return []
        missing = [e for e in sorted(set(ids)) if not self.cache.on_device(self.i, e)]
        held = set(self.cpu.take_reserved(self.i)).intersection(missing)  # (held back from the copy ahead)
        rest = [e for e in missing if e not in held]
        return sorted([*held, *self.cpu.choose(self.i, self.lay, rest, self.frac, len(held))])

    def grouped_offsets(self, ids: list[int], out: torch.Tensor | None = None,
                        cpu: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, tuple, list[int]]:
        """Fetch the experts of the step's (token, choice) pairs `ids` but the CPU's share of the
        missing ones (NOTE [ CPU experts ]; `cpu`: that share, when already chosen): the pool, each
        pair's gate, up and down byte offsets from it ([3, len(ids)] int64 on the host, written into
        `out` where it is given; the CPU's pairs point at the slot of zeros, NOTE [ the expert
        pool ]), the parts, and the CPU's experts."""
        distinct = sorted(set(ids))
        if cpu is None:
            cpu = self.cpu_choice(ids)
        if cpu:
            self.cache.count(self.i, cpu)
        slots = self.cache.fetch_slots(self.i, [e for e in distinct if e not in cpu] if cpu else distinct, self.lay,
                                       self.host)
        size, starts, zero = self.cache.slot, self.offsets, self.cache.store.zero
        base = [slots[e] * size if e in slots else None for e in ids]
        rows = [[(0 if zero is None else zero * size + a) if b is None else b + a for b in base] for a in starts]
        if out is None:
            return self.cache.pool, torch.tensor(rows, dtype=torch.int64), self.parts, cpu
        view = out.numpy()  # (a pinned buffer: written in place, no tensor made)
        for j, row in enumerate(rows):
            view[j] = row
        return self.cache.pool, out, self.parts, cpu

    def prepare(self, ids: list[int], h: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None,
                inputs: tuple[torch.Tensor, torch.Tensor] | None = None, post=None):
        """A step's experts for the grouped launches, in the order that lets the CPU work while
        the copies run (NOTE [ CPU experts ]): the CPU's experts are chosen, and where there are
        any, the activations and weights go to the host (a read after the fetch would wait for its
        copies); then the fetch. Returns the pairs' offsets (grouped_offsets), their keep weights
        ([T, k] on the host: 0 for the CPU's pairs; None where the CPU takes none of them), and a
        function giving the CPU's weighted sum ([T, n_embd] float32 on the host; None when the
        CPU takes nothing), which the CPU has begun before the fetch and computes meanwhile.
        Where the CPU takes nothing the layer costs no round trip to the host (at batch 1 a share of
        one or two missing experts often rounds to none, and that round trip made `--cpu-share
        auto` slower than no share). `out`: where the offsets go; `inputs`: h and weight already on
        the host (read_step), else copied there when the CPU takes some; `post`: a host_wait.Mailbox
        the CPU's sum is posted to, told NOTHING where the CPU takes none (NOTE [ the CPU's sum
        posted to the device ] in qdot.c)."""
        cpu = self.cpu_choice(ids)
        finish = None
        if cpu:
            if inputs is None:  # (in one copy: each copy to the host waits for the device)
                with self.cache.tl.span("cpu_to_host", f"to host L{self.i}", layer=self.i):
                    hw = torch.cat((h.float().reshape(-1), weight.float().reshape(-1))).cpu()
                inputs = hw[: h.numel()].view(h.shape), hw[h.numel() :].view(weight.shape)
            h_host, w_host = inputs
            # the CPU begins before the fetch issues the copies (NOTE [ experts beside the device's work ]
            # in qdot.c); the staging slot it reads is held until the layer's release, after its sum
            if post is not None:
                post.expect()
            finish = self.cpu.start(self.i, self.lay, self.host, cpu, ids, h_host, w_host, post=post)
        elif post is not None:
            post.nothing()
        _, offs, _, _ = self.grouped_offsets(ids, out, cpu)
        if not cpu:
            return offs, None, None
        keep = torch.tensor([0.0 if e in cpu else 1.0 for e in ids]).view(-1, weight.shape[1])
        return offs, keep, finish
