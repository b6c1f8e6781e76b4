"""StreamedLayers: a LayerSource whose layers arrive in staging slots, announced by messages.

NOTE [ slot ownership between compute and coordinator ]
The coordinator announces `LayerReady(step, layer, slot)` once a reader (or the host cache)
has the layer's bytes in staging slot `slot`. From then on the compute process owns that
slot until it answers `LayerDone(step, layer, slot)`: on CUDA as soon as the copy to VRAM has
completed (the copy stream's event), on the CPU after dequantization read it. The coordinator
never reuses or evicts a slot it has announced and not got back.

On CUDA, copies run on their own stream into a ring of VRAM slots; the compute stream waits
on each copy's event, and a VRAM slot is overwritten only after the dequantization that read
it (the copy stream waits on that event; dequantize always writes fresh tensors). The host waits only for copy events, never for the
compute stream, so kernels of earlier layers keep the GPU busy while it waits.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from layerstream.compute.dequant import dequantize
from layerstream.compute.model import LayerWeights
from layerstream.loader.layout import LayerLayout
from layerstream.proto.timeline import Timeline


def dequant_layout(raw: torch.Tensor, layout: LayerLayout, dtype) -> LayerWeights:
    """Dequantize every tensor of a layer from its slot bytes (uint8, on the target device)."""
    return {
        t.name: dequantize(raw[t.slot_offset : t.slot_offset + t.nbytes], t.qtype, t.shape, t.name, dtype)
        for t in layout.tensors
    }


class StreamedLayers:
    """LayerSource over staging slots; `wait_ready(step, layer)` blocks on the coordinator's messages."""

    def __init__(self, layouts: list[LayerLayout], slot_array: Callable[[int], np.ndarray],
                 wait_ready: Callable[[int, int], int], layer_done: Callable[[int, int, int], None],
                 device, dtype, resident: set[int], vram_slots: int, timeline: Timeline):
        self.layouts = layouts
        self.slot_array, self.wait_ready, self.layer_done = slot_array, wait_ready, layer_done
        self.device, self.dtype = torch.device(device), dtype
        self.resident_ids = set(resident)
        self.resident: dict[int, LayerWeights] = {}
        self.tl = timeline
        self.step_no = 0
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            nbytes = max(lay.nbytes for lay in layouts)
            self.vram = [torch.empty(nbytes, dtype=torch.uint8, device=self.device) for _ in range(max(vram_slots, 1))]
            self.copy_stream = torch.cuda.Stream(self.device)
            self.freed = [None] * len(self.vram)  # event: dequant done reading that VRAM slot
            self.next_vram = 0
            self.gpu_events: list[tuple] = []
            self.layer_start: dict[int, torch.cuda.Event] = {}

    def set_step(self, step: int) -> None:
        """The step whose LayerReady messages the next layers wait for."""
        self.step_no = step

    def begin_step(self) -> None:
        pass

    def layer(self, i: int) -> LayerWeights:
        if i in self.resident:
            if self.cuda:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record(torch.cuda.current_stream(self.device))
                self.layer_start[i] = ev
            return self.resident[i]
        t0 = time.monotonic_ns()
        slot = self.wait_ready(self.step_no, i)
        self.tl.add("wait_layer", f"wait L{i}", t0, time.monotonic_ns() - t0)
        lay = self.layouts[i]
        host = torch.from_numpy(self.slot_array(slot)[: lay.nbytes])
        if self.cuda:
            w = self._layer_cuda(i, slot, host, lay)
        else:  # the same stages as on CUDA: copy out of staging, give the slot back, dequantize
            with self.tl.span("copy", f"copy L{i}", nbytes=lay.nbytes, layer=i):
                local = host.clone()
            self.layer_done(self.step_no, i, slot)
            with self.tl.span("dequant", f"dequant L{i}", nbytes=lay.data_nbytes, layer=i):
                w = dequant_layout(local, lay, self.dtype)
        if i in self.resident_ids:
            self.resident[i] = w
        return w

    def _layer_cuda(self, i: int, slot: int, host: torch.Tensor, lay: LayerLayout) -> LayerWeights:
        k = self.next_vram
        self.next_vram = (k + 1) % len(self.vram)
        dev = self.vram[k]
        cs = self.copy_stream
        c0, c1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(cs):
            if self.freed[k] is not None:
                cs.wait_event(self.freed[k])
            c0.record(cs)
            dev[: lay.nbytes].copy_(host, non_blocking=True)
            c1.record(cs)
        t0 = time.monotonic_ns()
        c1.synchronize()  # the staging slot may be reused once the copy is done
        self.tl.add("wait_copy", f"wait copy L{i}", t0, time.monotonic_ns() - t0)
        self.layer_done(self.step_no, i, slot)
        cur = torch.cuda.current_stream(self.device)
        cur.wait_event(c1)
        d0, d1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        d0.record(cur)
        self.layer_start[i] = d0
        w = dequant_layout(dev, lay, self.dtype)
        d1.record(cur)
        self.freed[k] = d1  # dequantize wrote fresh tensors: the VRAM slot is free after it
        self.gpu_events.append(("copy", i, c0, c1, lay.nbytes))
        self.gpu_events.append(("dequant", i, d0, d1, lay.data_nbytes))
        return w

    def release(self, i: int) -> None:
        """The layer's kernels are enqueued; on CUDA, time them for the trace."""
        if self.cuda:
            cur = torch.cuda.current_stream(self.device)
            end = torch.cuda.Event(enable_timing=True)
            end.record(cur)
            start = self.layer_start.pop(i, None)
            if start is not None:
                self.gpu_events.append(("compute", i, start, end, 0))
