"""StreamedLayers: a LayerSource whose layers arrive in staging slots, announced by messages.

NOTE [ slot ownership between compute and coordinator ]
The coordinator announces `LayerReady(step, [[layer, slot], ...])` once a reader (or the host
cache) has the layers' bytes in their staging slots. From then on the compute process owns
such a slot until it gives it back in a `LayerDone(step, [[layer, slot], ...])`, which it does
as soon as the layer's bytes are copied out of it (to VRAM on CUDA, to private memory on the
CPU), or, in expert steps, a few at a time (compute_proc.py, NOTE [ slots given back ]). The
coordinator never reuses or evicts a slot it has announced and not got back.

On CUDA, copies of announced layers are issued ahead on their own stream into a ring of VRAM
slots; the compute stream waits on each copy's event. With quantized weights the layer's
matmuls read their blocks straight from the VRAM slot, so the slot is overwritten only after
the layer's last kernel (the copy stream waits on the event recorded at `release`); with dense
weights, only after the dequantization that read it. The host waits only for copy events,
never for the compute stream, so kernels of earlier layers keep the GPU busy while it waits.

NOTE [ copies across the step's end ]
Once every streamed layer of step n has its copy issued, a VRAM slot that frees (the release of
one of n's last layers) takes the first streamed layer of step n + 1, if the coordinator has
announced it (it does once n's layers are all announced and n + 1 was sent: NOTE [ one step
behind ] in coordinator/core.py). Without this the copy engine idled from the end of n's last
copy until the host launched n + 1 (the last layer's compute, the head, the sampling, the next
Forward's own host work), a fixed cost in every pass of a copy-bound plan (BENCHMARKS.md). These
copies are held apart (`VramRing.ahead`) until `set_step(n + 1)`; a step that fails or is
skipped gives them back to `ready` like its own (`abandon`). Each is the whole layer: right for
any CPU share of the next step (a split layer's device rows are a prefix of each matrix's bytes,
and its CPU rows are packed from the staging slot), so they are made only where this step takes
no share (a step that does copies less). Not with expert steps, whose copies follow the router.

Expert steps of MoE layers (NOTE [ expert streaming ]) are expert_stream.py's; the CPU's share
of the others, cpu/share.py's (NOTE [ the CPU share ]).
"""

from __future__ import annotations

import functools
import time
from typing import Callable

import numpy as np
import torch

from layerstream.compute.cpu.share import CpuShare, copy_ranges
from layerstream.compute.expert_layout import EXPERT_TENSORS
from layerstream.compute.expert_stream import ExpertStream
from layerstream.compute.model import LayerWeights
from layerstream.compute.vram_ring import VramRing
from layerstream.compute.weights import layer_weights
from layerstream.loader.layout import LayerLayout
from layerstream.proto.timeline import Timeline


def _without_experts(lay: LayerLayout) -> list[tuple[int, int]]:
    """The slot ranges of every tensor of a layer but its experts."""
    return copy_ranges(lay, {t.name: t.shape[0] for t in lay.tensors if t.name in EXPERT_TENSORS})


class StreamedLayers:
    """LayerSource over staging slots; `ready` maps (step, layer) to a slot, `pump(block)` fills it."""

    def __init__(self, layouts: list[LayerLayout], slot_array: Callable[[int], np.ndarray],
                 ready: dict[tuple[int, int], int], pump: Callable[[bool], None],
                 layer_done: Callable[[int, int, int], None],
                 device, dtype, resident: set[int], vram_slots: int, timeline: Timeline,
                 quantized: bool = False, share: CpuShare | None = None, experts: ExpertStream | None = None):
        self.layouts = layouts
        self.experts = experts  # expert steps of MoE layers (None: their layers stream whole)
        self.share = share  # the CPU's share of the layers without experts (None: none)
        self.slot_array, self.ready, self.pump, self.layer_done = slot_array, ready, pump, layer_done
        self.device, self.dtype = torch.device(device), dtype
        self.quantized = quantized
        self.resident_ids = set(resident)
        self.resident: dict[int, LayerWeights] = {}
        self.tl = timeline
        self.step_no = 0
        # whether the step has put work on the device yet: until then the compute process's pumps
        # answer no finished step (NOTE [ answers after the step's first launch ] in compute_proc.py)
        self.launched = True
        self.launched_ns = self.released_ns = 0  # the step's first launched work; its last layer's release
        self._first: int | None = None  # the step's first layer asked for
        self._copies_due = False  # the step's copies wait for its first launch (NOTE [ a step's copies after its first launch ])
        self.cuda = self.device.type == "cuda"
        nbytes = max(lay.nbytes for lay in layouts)  # (the room: NOTE [ the layer slots lent to the expert cache ])
        room = experts.cache.store.room(nbytes) if experts is not None and experts.cache.lendable else None
        self.ring = VramRing(self.device, nbytes, vram_slots, room) if self.cuda else None

    @property
    def expert_step(self) -> bool:
        """Whether this step fetches only the chosen experts of streamed MoE layers."""
        return self.experts is not None and self.experts.step

    @property
    def expert_cache(self):
        """The device's expert cache (None: none)."""
        return self.experts.cache if self.experts is not None else None

    def set_step(self, step: int, tokens: int = 0) -> None:
        """The step whose LayerReady messages the next layers wait for, and its token count (which
        sets the CPU's share)."""
        self.launched, self._first, self.launched_ns = False, None, 0
        self.step_no = step
        self._copies_due = self.cuda  # NOTE [ a step's copies after its first launch ]
        if self.share is not None:
            self.share.set_step(tokens)
        if self.experts is not None:
            self.experts.set_step(tokens)
        if self.cuda:
            self.ring.stream = torch.cuda.current_stream(self.device)
            if self.experts is not None:
                self.experts.cache.stream = self.ring.stream
        if self.experts is not None:
            self.experts.lend_room(self.ring, len(self.resident) == len(self.resident_ids))

    def _start_copies(self) -> None:
        """NOTE [ a step's copies after its first launch ]
        A step's copies (those the step before issued ahead, taken over, and the next announced
        layers' started in free VRAM slots) begin once the step's first work is on the device:
        after its resident layers' graph is launched, else at its first layer. Done in set_step,
        that host work came before the graph's launch, in the device's idle time between steps
        (the streamed layers keep the host in step with the device: NOTE [ decode graphs ] in
        graphs.py); the first streamed layers still cross while the resident ones compute."""
        if self._copies_due:
            self._copies_due = False
            self._take_ahead(self.step_no)
            self._issue_copies(0)

    def fixed(self, i: int) -> LayerWeights | None:
        """A resident layer's weights, once loaded (NOTE [ decode graphs ] in graphs.py)."""
        return self.resident.get(i)

    times_graphs = True  # the replays' events go into the compute timeline

    def graph_ran(self, first: int, stop: int, start, end) -> None:
        self._launching()
        self._start_copies()
        if start is not None:
            self.ring.gpu_events.append(("compute", first, start, end, 0))
        self.tl.incr("graph_layers", stop - first)

    def _rows(self, i: int) -> dict[str, int]:
        """The CPU's rows of layer i in this step (none for resident layers)."""
        if self.share is None or not self.share.frac or i in self.resident_ids:
            return {}
        return self.share.rows(i, self.layouts[i], self.share.frac)

    def _experts_of(self, i: int) -> bool:
        """Whether layer i fetches only its chosen experts in this step."""
        return self.experts is not None and self.experts.of(i)

    def _kept(self, i: int) -> bool:
        """Whether layer i's expert step needs nothing copied ahead (its dense part is kept)."""
        return self.experts is not None and self.experts.kept(i)

    def _keep(self, i: int, raw: torch.Tensor) -> None:
        if self.experts is not None:
            self.experts.keep(i, raw)

    def _with_experts(self, i: int, w: LayerWeights, slot: int) -> LayerWeights:
        return self.experts.with_experts(i, w, slot, self._prefetch_experts)

    def moe_graph_key(self, i: int) -> bool | None:
        """For a streamed MoE layer whose attention and router read only kept tensors in this
        step (so they may run before layer(i) is asked for: graphs.py, NOTE [ the next router
        early ]), whether its step also predicts the next layer's experts; None for any other."""
        return self.experts.graph_key(i) if self.experts is not None else None

    def _prefetch_experts(self, j: int, experts: list[int]) -> None:
        """Copy layer j's predicted `experts` ahead, from its staging slot if it is announced
        (experts.py, NOTE [ expert prefetch ])."""
        slot = self._staged_slot(j)
        if slot is None:  # its announcement may be queued on the socket
            self.pump(False)
            slot = self._staged_slot(j)
        if slot is None:  # not staged yet: the layer's fetch copies what it chooses
            self.tl.incr("expert_prefetch_unstaged")
            return
        self.experts.cache.prefetch(j, experts, self.layouts[j], self.slot_array(slot),
                                    self.ring.copy_stream if self.cuda else None)

    def _staged_slot(self, j: int) -> int | None:
        """The staging slot of this step's layer j, if it is announced (its copies issued or not)."""
        got = self.ring.copies.get(j) if self.cuda else None
        return got[1] if got is not None and got[0] is None else self.ready.get((self.step_no, j))

    def _split(self, i: int, w: LayerWeights, slot: int) -> LayerWeights:
        """Pack layer i's CPU rows (first time, from its staging slot) and split its matrices."""
        rows = self._rows(i)
        if self.share is not None and i not in self.resident_ids:
            self.share.pack(i, self.layouts[i], self.slot_array(slot))
        return self.share.split(i, w, rows) if rows else w

    def layer(self, i: int) -> LayerWeights:
        w = self._layer(i)
        if not self.cuda:
            self._t_layer = time.monotonic_ns()  # the layer's math runs on the host until release()
        return w

    def _layer(self, i: int) -> LayerWeights:
        self._start_copies()
        self.return_slots(wait=False)
        if i in self.resident:
            if self.cuda:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record(self.ring.stream)
                self.ring.layer_start[i] = ev
            return self.resident[i]
        lay = self.layouts[i]
        if self.cuda:
            w = self._layer_cuda(i, lay)
        else:  # the same stages as on CUDA: copy out of staging, give the slot back, dequantize
            slot = self._wait_ready(i)
            host = torch.from_numpy(self.slot_array(slot)[: lay.nbytes])
            if self._kept(i):
                return self._with_experts(i, self.experts.dense[i], slot)
            if self._experts_of(i):  # everything but the experts; they come when the router has run
                part = self.experts.dense_part(i)
                with self.tl.span("copy", f"copy L{i}", nbytes=part.data_nbytes, layer=i):
                    local = torch.empty_like(host)  # the non-expert tensors only, at their slot offsets
                    for a, n in _without_experts(lay):
                        local[a : a + n] = host[a : a + n]
                self._keep(i, local)
                with self.tl.span("dequant", f"dequant L{i}", nbytes=part.data_nbytes, layer=i):
                    w = self._with_experts(i, self.experts.dense_weights(i, local), slot)
                return w
            with self.tl.span("copy", f"copy L{i}", nbytes=lay.nbytes, layer=i):
                local = host.clone()
            self._keep(i, local)
            with self.tl.span("dequant", f"dequant L{i}", nbytes=lay.data_nbytes, layer=i):
                w = self._split(i, layer_weights(local, lay, self.dtype, self.quantized), slot)
            self.layer_done(self.step_no, i, slot)
        if i in self.resident_ids:
            if self.cuda and self.quantized:  # its own copy: the VRAM slot goes back to the ring
                w = layer_weights(self.ring.vram[self.ring.in_use[i]][: lay.nbytes].clone(), lay, self.dtype, True)
            self.resident[i] = w
        return w

    def _launching(self) -> None:
        """The step has put work on the device (NOTE [ answers after the step's first launch ])."""
        if not self.launched:
            self.launched, self.launched_ns = True, time.monotonic_ns()

    def _count_prefetch(self, i: int) -> None:
        """Whether layer i was announced (or already copying) before compute asked for it."""
        if self._first is None:
            self._first = i
        elif i != self._first:  # (the layer before was launched, if not from a graph)
            self._launching()
        self.pump(False)  # take in what is queued on the socket
        ahead = (self.step_no, i) in self.ready or (self.cuda and i in self.ring.copies)
        self.tl.incr("prefetch_hit" if ahead else "prefetch_miss")

    def _wait_ready(self, i: int) -> int:
        key = (self.step_no, i)
        self._count_prefetch(i)
        t0 = time.monotonic_ns()
        while key not in self.ready:
            self.return_slots()  # the coordinator may be waiting for one of them
            self.pump(True)
        self.tl.add("wait_layer", f"wait L{i}", t0, time.monotonic_ns() - t0)
        return self.ready.pop(key)

    def _issue_copies(self, first: int, pump: bool = True) -> None:
        """Start copies of announced layers first, first+1, ... into free VRAM slots, in order
        (`pump`: take in the queued announcements first); once every layer of the step has its
        copy, the next step's first layers (NOTE [ copies across the step's end ])."""
        if pump:
            self.pump(False)
        for j in range(first, len(self.layouts)):
            if j in self.resident:
                continue
            if j in self.ring.copies:
                continue
            key = (self.step_no, j)
            if key not in self.ready:
                return
            if self._kept(j):  # nothing to copy ahead: its experts come from the staging slot
                self.ring.copies[j] = (None, self.ready.pop(key), None, None, 0)
                continue
            if not self.ring.free_vram:
                return
            lay = self.layouts[j]
            split = self.share is not None and self.share.frac and j not in self.resident_ids
            ranges = self.share.ranges(j, lay, self.share.frac) if split else [(0, lay.nbytes)]
            if self._experts_of(j):  # the experts come after the router, those chosen only
                ranges = _without_experts(lay)
            self.ring.copies[j] = self._start_copy(j, self.ready.pop(key), ranges)
        self._issue_ahead()

    def _issue_ahead(self) -> None:
        """Copies of step n + 1's first streamed layers into the free VRAM slots, where they may
        cross the step's end (NOTE [ copies across the step's end ])."""
        r = self.ring
        if (self.share is not None and self.share.frac) or self.experts is not None or not r.free_vram:
            return
        if len(self.resident) < len(self.resident_ids):
            return  # the first pass, which loads the resident layers through the ring
        nxt = self.step_no + 1
        if r.ahead and r.ahead_step != nxt:
            return
        for j in range(len(self.layouts)):
            if j in self.resident or j in r.ahead:
                continue
            key = (nxt, j)
            if key not in self.ready or not r.free_vram:
                return
            r.ahead[j] = self._start_copy(j, self.ready.pop(key), [(0, self.layouts[j].nbytes)])
            r.ahead_step = nxt
            self.tl.incr("copies_ahead")

    def _take_ahead(self, step: int) -> None:
        """At step `step`'s start: the copies issued for it during the step before become its own;
        any issued for another step (one skipped) go back to `ready`."""
        r = self.ring
        if r.ahead_step == step:
            r.copies.update(r.ahead)
            r.ahead.clear()
        else:
            self._give_back_ahead()

    def _give_back_ahead(self) -> None:
        """The copies issued ahead go back to `ready` under their step, their VRAM slots free (a
        copy into one runs after theirs on the copy stream)."""
        r = self.ring
        for j, (k, slot, *_) in r.ahead.items():
            self.ready[(r.ahead_step, j)] = slot
            r.free_slot(k, None)
        r.ahead.clear()

    def _start_copy(self, j: int, slot: int, ranges: list[tuple[int, int]]) -> tuple:
        """Copy `ranges` of layer j's staging slot into a free VRAM slot on the copy stream, after
        the last reader of that VRAM slot: its `copies` entry."""
        k = self.ring.free_vram.pop(0)
        host = torch.from_numpy(self.slot_array(slot)[: self.layouts[j].nbytes])
        cs = self.ring.copy_stream
        c0, c1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(cs):
            if self.ring.freed[k] is not None:
                cs.wait_event(self.ring.freed[k])  # the dequantization that read slot k has run
            c0.record(cs)
            for a, n in ranges:  # with a CPU share, only the device's rows cross PCIe
                self.ring.vram[k][a : a + n].copy_(host[a : a + n], non_blocking=True)
            c1.record(cs)
        return k, slot, c0, c1, sum(n for _, n in ranges)

    def _layer_cuda(self, i: int, lay: LayerLayout) -> LayerWeights:
        self._count_prefetch(i)  # (takes in the queued announcements)
        t0 = time.monotonic_ns()
        self._issue_copies(i, pump=False)
        while i not in self.ring.copies:
            self.return_slots()  # the coordinator may be waiting for one of them
            self.pump(True)
            self._issue_copies(i)
        self.tl.add("wait_layer", f"wait L{i}", t0, time.monotonic_ns() - t0)
        k, slot, c0, c1, copied = self.ring.copies.pop(i)
        if k is None:  # a kept dense part: the layer starts at once
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(self.ring.stream)
            self.ring.layer_start[i] = ev
            return self._with_experts(i, self.experts.dense[i], slot)
        t0 = time.monotonic_ns()
        c1.synchronize()  # the staging slot may be reused once the copy is done
        self.tl.add("wait_copy", f"wait copy L{i}", t0, time.monotonic_ns() - t0)
        if self.share is not None and i not in self.resident_ids:
            self.share.pack(i, lay, self.slot_array(slot))  # before the slot goes back
        experts = self._experts_of(i)
        if not experts:
            self.layer_done(self.step_no, i, slot)
        cur = self.ring.stream
        cur.wait_event(c1)
        d0, d1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        d0.record(cur)
        self.ring.layer_start[i] = d0
        rows = self._rows(i)
        if experts or not rows:  # (a split layer's slot holds only the device's rows)
            self._keep(i, self.ring.vram[k])
        if experts:
            w = self._with_experts(i, self.experts.dense_weights(i, self.ring.vram[k]), slot)
        else:
            w = layer_weights(self.ring.vram[k], lay, self.dtype, self.quantized)
        if rows:
            early = self.quantized and self.share.early_slot(i, lay, self.share.frac)
            w = self.share.split(i, w, rows, functools.partial(self._free_early, i) if early else None)
        d1.record(cur)
        self.ring.gpu_events.append(("copy", i, c0, c1, copied))
        if self.quantized:  # the matmuls read the slot: it is free after the layer (release)
            self.ring.in_use[i] = k
        else:
            self.ring.gpu_events.append(("dequant", i, d0, d1, lay.data_nbytes))
            self.ring.free_slot(k, d1)  # dequantize wrote fresh tensors
            self._issue_copies(i + 1)  # the freed slot takes the next announced layer at once
        return w

    def return_slots(self, wait: bool = True) -> None:
        """Give back the staging slots held for experts whose layers' work is done
        (ExpertStream.return_slots; `wait`: all of them, waiting for the device)."""
        if self.experts is not None:
            self.experts.return_slots(wait)

    def _free_early(self, i: int) -> None:
        """NOTE [ early slot ]: a layer whose whole FFN is the CPU's reads its VRAM slot for the last
        time before the FFN. The CPU's FFN waits for the device to get there (its input), so the
        slot is free then, not at release(): the next copy runs while the CPU computes, where it
        would wait for the CPU to finish."""
        k = self.ring.in_use.pop(i, None)
        if k is None:
            return
        ev = torch.cuda.Event()
        ev.record(self.ring.stream)
        self.ring.free_slot(k, ev)
        self.tl.incr("early_slot")
        self._issue_copies(i + 1)

    def abandon(self, step: int, reset_experts: bool) -> None:
        """Forget what `step` left half-done, once the device has run everything queued (NOTE [ a
        failed step ] in compute_proc.py): layers whose copies were issued ahead go back to `ready`
        (their staging slots still lent), the VRAM slots those and the layer in use held are free,
        the step's events go, the experts' staging slots go back; with `reset_experts` (the step
        raised) the expert cache starts empty, since an entry may name a copy never issued."""
        self.step_no = step
        if self.cuda:
            r = self.ring
            for j, (_, slot, *_) in r.copies.items():
                self.ready[(step, j)] = slot
            self._give_back_ahead()  # (issued for the step after the one running)
            r.copies.clear()
            r.in_use.clear()
            # every VRAM slot is free, one a raise lost before it was recorded too
            r.free_vram, r.freed = list(range(len(r.vram))), [None] * len(r.vram)
            r.layer_start.clear()
            r.gpu_events.clear()
        if self.share is not None:
            self.share.meter.take()  # (the failed layer's CPU work is no later layer's)
        ex = self.experts
        if ex is None:
            return
        ex.return_slots(wait=True)
        for i, slot in ex.held.items():
            self.layer_done(step, i, slot)
        ex.held.clear()
        if reset_experts:
            ex.cache.reset()
            ex.sets.clear()

    def load_resident(self, i: int) -> None:
        """Load resident layer i out of its announced staging slot without running it: the
        coordinator announces a resident layer once, so a failed step still loads it."""
        self.layer(i)
        self.release(i)
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.abandon(self.step_no, False)  # (copies it issued for later layers go back to `ready`)

    def release(self, i: int) -> None:
        """The layer's math is done (CPU) or enqueued (CUDA: timed with events for the trace)."""
        self.released_ns = time.monotonic_ns()
        end = None
        if self.cuda:  # one event: the layer's end for the trace, and what frees what it read
            end = torch.cuda.Event(enable_timing=True)
            end.record(self.ring.stream)
        if self.experts is not None:
            self.experts.release(i, end, self.step_no, self.cuda)
        if self.share is not None:
            self.share.account(i, self.tl)
        if not self.cuda:
            self.tl.add("compute", f"compute L{i}", self._t_layer, time.monotonic_ns() - self._t_layer, layer=i)
        else:
            start = self.ring.layer_start.pop(i, None)
            if start is not None:
                self.ring.gpu_events.append(("compute", i, start, end, 0))
            k = self.ring.in_use.pop(i, None)
            if k is not None:
                self.ring.free_slot(k, end)
                self._issue_copies(i + 1)
