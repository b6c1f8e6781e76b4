"""The CPU's share of the streamed layers without experts: packed rows, the split weights, the
slot ranges the device still needs.

NOTE [ the CPU share ]
Streaming alone is bound by PCIe, while the host's DRAM bandwidth sits idle. So each streamed
layer's 4-bit matrices are split by output rows: rows [0, n_dev) are copied to the device and
computed there with the block kernels; rows [n_dev, N) never cross PCIe and are computed by
the CPU (the native kernel on the blocks, or aten's int4 matmul on packed nibbles, at DRAM
speed). Only activations cross between the two, a few KB a matmul, and the outputs are
joined on the device.

- The CPU's rows are copied once, when the layer is first staged, out of its staging slot:
  as their GGUF blocks where the native kernel is built (every type it reads: Q4_0, Q4_1,
  Q8_0, Q4_K, Q5_K, Q6_K; NOTE [ native blocks ] in cpu/packing.py), else repacked into aten's
  int4 layout with one (scale, zero) per 32 values, w = (q - 8) * scale + zero, which holds
  Q4_0, Q4_1 and Q4_K exactly (Q4_K: scale = d * sc, zero = 8 * d * sc - dmin * m) but for the
  rounding of scale and zero to the CPU dtype; without the kernel other types stay on the device.
- Rows are packed for the largest share the run may use (`pack_frac`); a smaller share uses the
  tail of the packed rows, so re-balancing never repacks.
- The share per batch size comes from bandwidths measured at start, then from the timings of
  the run's own passes (`Balancer`): the CPU's GB/s falls with the batch (the int4 kernel is a
  GEMV), so larger batches and prompts get a smaller share, and none above `MAX_TOKENS`.

Two ways to split (`--cpu-split`):
- "layers" (the default): the CPU takes every row of the 4-bit FFN matrices (gate, up, and down
  where it is 4-bit) of a share of the streamed layers, spread evenly among them (`cpu_layers`).
  Those matrices never cross PCIe, and the copy engine fills the VRAM ring with the next
  layers while the CPU works. A CPU layer waits for the host once: its FFN runs on the CPU in
  one go (`SplitWeight.ffn`; where down is not 4-bit, the device computes it from the CPU's
  gate and up), milliseconds of large matmuls that the CPU reads at its best rate.
- "rows": the last rows of every 4-bit matrix of every streamed layer. Each of a layer's four
  matmul groups waits for the host, for a part that is small (measured: 20 to 47 GB/s inside a
  pass against 50 to 73 alone, BENCHMARKS.md), so every streamed layer pays the waits.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from layerstream.compute.cpu.balancer import Balancer
from layerstream.compute.cpu.packing import cpu_matrix, cpu_rows, split_types
from layerstream.compute.cpu.sizing import FFN_MATRICES, cpu_layers, ffn_int4
from layerstream.compute.cpu.split import Meter, SplitWeight
from layerstream.compute.model import LayerWeights
from layerstream.compute.qlinear import QuantWeight
from layerstream.loader.layout import LayerLayout
from layerstream.proto.timeline import Timeline


class CpuShare:
    """The CPU share of the streamed layers (NOTE [ the CPU share ]): the packed
    weights of each layer, made when it is first staged, and the balancer that picks the share.
    `split` "layers": whole 4-bit FFN matrices of some layers (`streamed`: the streamed layers,
    which it chooses from); "rows": the last rows of every 4-bit matrix."""

    def __init__(self, balancer: Balancer, pack_frac: float, dtype: torch.dtype, timeline: Timeline,
                 split: str = "rows", streamed: list[LayerLayout] | None = None):
        self.balancer, self.pack_frac, self.dtype, self.tl = balancer, pack_frac, dtype, timeline
        self.split_by = split
        self.streamed = streamed or []
        self.packed: dict[int, dict] = {}  # layer -> matrix name -> its CPU rows (packing.cpu_matrix)
        self.meter = Meter()
        self._rows: dict[tuple[int, float], dict[str, int]] = {}
        self._ranges: dict[tuple[int, float], list[tuple[int, int]]] = {}
        self._layers: dict[float, frozenset[int]] = {}
        self._early: dict[tuple[int, float], bool] = {}
        self.packing = Meter()  # packing time and bytes since the last take_pack_s()
        self.frac = 0.0  # this step's share (0: the device computes every row)
        self.step_s, self.step_bytes = 0.0, 0  # the CPU's work in this step

    def set_step(self, tokens: int) -> None:
        """A step of `tokens` tokens: the balancer's share for it, and no work yet."""
        self.frac = self.balancer.share(tokens)
        self.step_s, self.step_bytes = 0.0, 0

    def account(self, i: int, timeline: Timeline) -> None:
        """Layer i is done: the CPU's work on it goes into the step's and the timeline."""
        sec, nbytes, t0 = self.meter.take()
        if nbytes:
            timeline.add("cpu_share", f"cpu L{i}", t0, int(sec * 1e9), nbytes, layer=i)
            self.step_s += sec
            self.step_bytes += nbytes

    def take_pack_s(self) -> float:
        """Seconds spent packing since the last call: a one-off cost, which the balancer leaves
        out of a pass's time (tens of seconds for a 70B's rows, spread over the first passes)."""
        return self.packing.take()[0]

    def cpu_layers(self, frac: float) -> frozenset[int]:
        """The "layers" split: the layers the CPU takes at share `frac`, among those packed."""
        got = self._layers.get(frac)
        if got is None:
            packed = cpu_layers(self.streamed, self.pack_frac)
            got = self._layers[frac] = frozenset(cpu_layers(self.streamed, frac, within=packed))
        return got

    def _matrices(self, lay: LayerLayout, frac: float):
        """The matrices of layer `lay` the CPU takes part of at share `frac`, with its rows of each."""
        if self.split_by == "layers":
            return [(t, t.shape[0]) for t in ffn_int4(lay)] if lay.layer in self.cpu_layers(frac) else []
        types = split_types()
        return [(t, cpu_rows(t.shape[0], frac)) for t in lay.tensors if t.qtype in types and len(t.shape) == 2]

    def pack(self, i: int, lay: LayerLayout, slot: np.ndarray) -> None:
        """Pack layer i's CPU rows out of its staging slot, once."""
        if i in self.packed:
            return
        out = {}
        t0 = time.monotonic_ns()
        with self.tl.span("cpu_pack", f"pack L{i}", layer=i):
            for t, n in self._matrices(lay, self.pack_frac):
                if n:
                    N, K = t.shape
                    rb = t.nbytes // N
                    raw = torch.from_numpy(slot[t.slot_offset + (N - n) * rb : t.slot_offset + t.nbytes])
                    out[t.name] = cpu_matrix(raw, t.qtype, n, K, self.dtype)
        self.packed[i] = out
        self.packing.add(t0, time.monotonic_ns() - t0, sum(p.nbytes for p in out.values()))

    def rows(self, i: int, lay: LayerLayout, frac: float) -> dict[str, int]:
        """CPU rows of each split matrix of layer i at share `frac` (worked out once per share)."""
        key = (i, frac)
        r = self._rows.get(key)
        if r is None:
            r = {t.name: n for t, n in self._matrices(lay, frac) if n}
            self._rows[key] = r
            self._ranges[key] = copy_ranges(lay, r) if r else [(0, lay.nbytes)]
        return r

    def ranges(self, i: int, lay: LayerLayout, frac: float) -> list[tuple[int, int]]:
        """The slot ranges the device needs of layer i at share `frac` (see copy_ranges)."""
        self.rows(i, lay, frac)
        return self._ranges[(i, frac)]

    def split(self, i: int, w: LayerWeights, rows: dict[str, int], on_host=None) -> LayerWeights:
        """Layer weights with each split matrix's device rows and the CPU's packed tail; `on_host`
        is called once the CPU has the FFN's input, where the CPU computes the whole FFN."""
        w = dict(w)
        for name, n_cpu in rows.items():
            full = w[name]
            N = full.shape[0]
            n_dev = N - n_cpu
            if isinstance(full, QuantWeight):
                dev = QuantWeight(full.raw[: n_dev * (full.nbytes // N)], full.qtype, (n_dev, full.shape[1]), full.native)
            else:
                dev = full[:n_dev]
            w[name] = SplitWeight(dev if n_dev else None, self.packed[i][name].tail(n_cpu), self.meter,
                                  on_host if name == FFN_MATRICES[0] else None)
        return w

    def early_slot(self, i: int, lay: LayerLayout, frac: float) -> bool:
        """`whole_ffn` of layer i at share `frac`, worked out once per share (a streamed layer asks
        at every step)."""
        key = (i, frac)
        got = self._early.get(key)
        if got is None:
            got = self._early[key] = self.whole_ffn(lay, self.rows(i, lay, frac))
        return got

    @staticmethod
    def whole_ffn(lay: LayerLayout, rows: dict[str, int]) -> bool:
        """Whether the CPU computes layer `lay`'s whole FFN at these rows, and the layer reads no
        weight after it: once the host has the FFN's input, the device is done with the layer's
        weights (NOTE [ early slot ] in streamed.py)."""
        names = {t.name: t for t in lay.tensors}
        return all(n in names and rows.get(n) == names[n].shape[0] for n in FFN_MATRICES) and \
            "post_ffw_norm.weight" not in names



def copy_ranges(lay: LayerLayout, rows: dict[str, int], gap: int = 4096) -> list[tuple[int, int]]:
    """The (slot offset, bytes) ranges of a layer the device needs when `rows` of its matrices are
    the CPU's (the last rows: each matrix's device part is a prefix of its bytes); ranges closer
    than `gap` are copied as one."""
    out: list[list[int]] = []
    for t in lay.tensors:
        n_cpu = rows.get(t.name, 0)
        nb = t.nbytes - n_cpu * (t.nbytes // t.shape[0]) if n_cpu else t.nbytes
        if not nb:
            continue
        if out and t.slot_offset - (out[-1][0] + out[-1][1]) < gap:
            out[-1][1] = t.slot_offset + nb - out[-1][0]
        else:
            out.append([t.slot_offset, nb])
    return [(a, b) for a, b in out]
