"""The CPU's share of streamed layers: the last rows of each 4-bit matrix, computed from host memory.

NOTE [ the CPU share ]
Streaming alone is bound by PCIe, while the host's DRAM bandwidth sits idle. So each streamed
layer's 4-bit matrices are split by output rows: rows [0, n_dev) are copied to the device and
computed there with the block kernels; rows [n_dev, N) never cross PCIe and are computed by
the CPU (aten's int4 matmul, `_weight_int4pack_mm_for_cpu`, which reads packed nibbles at
DRAM speed). Only activations cross between the two, a few KB a matmul, and the outputs are
joined on the device.

- The CPU's rows are repacked once, when the layer is first staged, into aten's int4 layout
  with one (scale, zero) per 32 values: w = (q - 8) * scale + zero. Q4_0, Q4_1 and Q4_K are
  exactly that form (Q4_K: scale = d * sc, zero = 8 * d * sc - dmin * m), so the only loss is
  the rounding of scale and zero to the CPU dtype (bf16 beside a GPU, the compute dtype on a
  CPU-only machine). Other types (Q6_K, Q5_K, Q8_0, ...) have no exact int4 form and stay on
  the device; the split of the 4-bit matrices makes up for them.
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

import functools
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT

from layerstream.compute.model import EXPERT_TENSORS
from layerstream.compute.qlinear import linear

INT4_TYPES = frozenset(int(t) for t in (QT.Q4_0, QT.Q4_1, QT.Q4_K))
GROUP = 32  # values per (scale, zero): every 4-bit type's sub-block
ROW_ALIGN = 64  # CPU rows come in multiples of this: aten's CPU int4 pack holds rows in blocks of 64,
# so a tail of a packed matrix is a row slice only at such a boundary (tails_slice() checks it)
MAX_TOKENS = 8  # tokens of a step above which the CPU computes nothing (its int4 GEMV stops paying)
BUCKETS = (1, 2, 4, 8)  # batch sizes the share is balanced for (a step takes the next bucket up)


# -- packing -------------------------------------------------------------------------------------

def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 -> float32 (little-endian half)."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def int4_parts(raw: torch.Tensor, qtype: int, n: int, K: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n rows of 4-bit blocks -> (q [n, K] uint8 in 0..15, scale [n, K/32], zero [n, K/32]) in
    float32, with value = (q - 8) * scale + zero."""
    if qtype == QT.Q4_K:
        b = raw.view(n, K // 256, 144)
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        s = b[..., 4:16]  # (uint8 throughout: a mixed int and float product costs several times more)
        sc = torch.cat([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], -1).float()
        m = torch.cat([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], -1).float()
        qs = b[..., 16:].reshape(n, K // 256, 4, 1, 32)
        q = torch.cat([qs & 15, qs >> 4], 3).reshape(n, K)  # a chunk of 64: 32 low, 32 high
        scale = (d.unsqueeze(-1) * sc).reshape(n, K // GROUP)
        zero = (8 * d.unsqueeze(-1) * sc - dmin.unsqueeze(-1) * m).reshape(n, K // GROUP)
        return q, scale, zero
    bs = 18 if qtype == QT.Q4_0 else 20
    b = raw.view(n, K // 32, bs)
    d = _f16(b[..., 0:2])
    qs = b[..., bs - 16:].unsqueeze(2)
    q = torch.cat([qs & 15, qs >> 4], 2).reshape(n, K)
    if qtype == QT.Q4_0:
        return q, d, torch.zeros_like(d)
    return q, d, _f16(b[..., 2:4]) + 8 * d


@dataclass
class PackedRows:
    """Rows of a matrix in aten's CPU int4 layout; `tail(n)` is its last n rows (cached)."""

    w: torch.Tensor  # [n, K / 2] uint8
    sz: torch.Tensor  # [K / 32, n, 2] scale and zero
    _tails: dict = field(default_factory=dict, repr=False)

    @property
    def rows(self) -> int:
        return self.w.shape[0]

    @property
    def nbytes(self) -> int:
        return self.w.numel() + self.sz.numel() * self.sz.element_size()

    def tail(self, n: int) -> "PackedRows":
        if n == self.rows:
            return self
        if n % ROW_ALIGN or not tails_slice():
            raise ValueError(f"no tail of {n} rows of a packed matrix of {self.rows}")
        t = self._tails.get(n)
        if t is None:
            self._tails.clear()  # one share in use at a time
            t = self._tails[n] = PackedRows(self.w[self.rows - n:], self.sz[:, self.rows - n:].contiguous())
        return t

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(self.sz.dtype), self.w, GROUP, self.sz)


@functools.cache
def tails_slice() -> bool:
    """Whether the last rows of a packed matrix (from a ROW_ALIGN boundary) are the packing of
    those rows: true of the layouts measured (torch 2.11, 2.13); checked once per process, as
    the layout is aten's own. Without it the share cannot shrink below the packed rows."""
    q = torch.randint(0, 16, (3 * ROW_ALIGN, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    return torch.equal(whole[ROW_ALIGN:], torch.ops.aten._convert_weight_to_int4pack_for_cpu(q[ROW_ALIGN:], 1))


def _layout(q: torch.Tensor) -> torch.Tensor:
    """aten's CPU int4 layout of q [N, K] (uint8 in 0..15, N a multiple of 64), in uint8 ops:
    each 64 rows are K x 32 bytes, byte (k, j) holding row j's value k in its low nibble and
    row j + 32's in its high one."""
    N, K = q.shape
    qb = q.view(N // ROW_ALIGN, 2, ROW_ALIGN // 2, K)
    return (qb[:, 0] | (qb[:, 1] << 4)).transpose(1, 2).contiguous().view(N, K // 2)


@functools.cache
def layout_matches() -> bool:
    """Whether `_layout` is aten's packing (`_convert_weight_to_int4pack_for_cpu`): true of the
    layouts read (torch 2.13); checked once per process, as the layout is aten's own."""
    q = torch.randint(0, 16, (2 * ROW_ALIGN, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return torch.equal(_layout(q), torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))


def int4_pack(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] (uint8 in 0..15) in aten's CPU int4 layout: built directly where `_layout` is
    aten's (several times faster than widening q to int32 for aten's own packing), else by aten."""
    if q.shape[0] % ROW_ALIGN == 0 and layout_matches():
        return _layout(q)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)


def pack_rows(raw: torch.Tensor, qtype: int, n: int, K: int, dtype: torch.dtype) -> PackedRows:
    """Repack n rows of 4-bit GGUF blocks (host bytes) for the CPU's int4 matmul."""
    q, scale, zero = int4_parts(raw, qtype, n, K)
    w = int4_pack(q)
    sz = torch.stack([scale, zero], -1).transpose(0, 1).to(dtype).contiguous()
    return PackedRows(w, sz)


def cpu_rows(N: int, frac: float) -> int:
    """Rows of an N-row matrix the CPU computes at share `frac` (a multiple of ROW_ALIGN)."""
    return min(N, int(N * frac) // ROW_ALIGN * ROW_ALIGN)


def random_packed(N: int, K: int, g: torch.Generator, dtype: torch.dtype = torch.bfloat16) -> PackedRows:
    """An [N, K] matrix of random 4-bit values and small scales in the CPU's packed form (for
    timing the CPU's matmuls: measured at start, and by layerstream-bench cpu-worker)."""
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=g)
    return PackedRows(int4_pack(q), (torch.rand(K // GROUP, N, 2, generator=g) / 64).to(dtype))


def packed_swiglu(gate: PackedRows, up: PackedRows, down: PackedRows, x: torch.Tensor, act=F.silu) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) on the CPU's packed matrices: an FFN or an expert."""
    return down.matmul(act(gate.matmul(x)) * up.matmul(x))


# -- the split matmul ----------------------------------------------------------------------------

class Meter:
    """CPU seconds and packed bytes read by the CPU share since the last `take()`."""

    def __init__(self):
        self.seconds, self.nbytes, self.t0 = 0.0, 0, None

    def add(self, t0: int, ns: int, nbytes: int) -> None:
        """The CPU read `nbytes` packed bytes in `ns` nanoseconds from monotonic time t0."""
        self.seconds += ns / 1e9
        self.nbytes += nbytes
        self.t0 = t0 if self.t0 is None else self.t0

    def take(self) -> tuple[float, int, int | None]:
        out = (self.seconds, self.nbytes, self.t0)
        self.seconds, self.nbytes, self.t0 = 0.0, 0, None
        return out


@dataclass(frozen=True)
class SplitWeight:
    """An [N, K] matrix whose rows [0, n_dev) are on the compute device (dense or blocks) and rows
    [n_dev, N) on the CPU; `linear` joins both outputs on the device (qlinear.linear calls it)."""

    dev: object  # torch.Tensor | QuantWeight of rows [0, n_dev), or None when the CPU takes every row
    cpu: PackedRows
    meter: Meter
    on_host: object = None  # called by ffn() once the host has x: the device's queue so far has run

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return split_linear(x, [self], [bias])[0]

    @property
    def cpu_only(self) -> bool:
        """Whether the CPU takes every row (the "layers" split)."""
        return self.dev is None

    def ffn(self, x: torch.Tensor, up: "SplitWeight", down: "SplitWeight", act) -> torch.Tensor:
        """down(act(self(x)) * up(x)) wholly on the CPU (self: the gate): one wait for x on the
        host and one copy back, where matmul by matmul would wait twice."""
        x_cpu = x.to("cpu")  # waits for x
        if self.on_host is not None:  # (the VRAM slot of the layer may take the next copy now)
            self.on_host()
        t0 = time.monotonic_ns()
        y = packed_swiglu(self.cpu, up.cpu, down.cpu, x_cpu, act)
        self.meter.add(t0, time.monotonic_ns() - t0, self.cpu.nbytes + up.cpu.nbytes + down.cpu.nbytes)
        return y.to(x.device, x.dtype)


def split_linear(x: torch.Tensor, ws: list, biases: list) -> list[torch.Tensor]:
    """x @ w.T (+ bias) for matrices of one input, some of them SplitWeights: one wait for x on
    the host, every device part launched, then every CPU part computed while the device works,
    then the outputs joined. Matrices sharing an input (q, k, v; gate, up) go together."""
    x_cpu = x.to("cpu")  # waits for x: the device's queue is empty while the CPU works below
    dev = []
    for w, b in zip(ws, biases):
        if isinstance(w, SplitWeight):
            n_dev = 0 if w.dev is None else w.dev.shape[0]
            dev.append(None if w.dev is None else linear(x, w.dev, None if b is None else b[:n_dev]))
        else:
            dev.append(linear(x, w, b))
    out = []
    for w, b, y_dev in zip(ws, biases, dev):  # the device computes y_dev meanwhile
        if not isinstance(w, SplitWeight):
            out.append(y_dev)
            continue
        t0 = time.monotonic_ns()
        y_cpu = w.cpu.matmul(x_cpu)
        w.meter.add(t0, time.monotonic_ns() - t0, w.cpu.nbytes)
        y_cpu = y_cpu.to(x.device, x.dtype)
        if b is not None:
            y_cpu = y_cpu + b[b.shape[0] - y_cpu.shape[-1]:]
        out.append(y_cpu if y_dev is None else torch.cat([y_dev, y_cpu], -1))
    return out


# -- how much the CPU takes ----------------------------------------------------------------------

def balanced_frac(cpu_gbs: float, link_gbs: float, int4_fraction: float, pack_ratio: float) -> float:
    """The share of each 4-bit matrix's rows for the CPU that makes both sides take equal time.

    A layer of S bytes, of which `int4_fraction` are 4-bit matrices: the device's part moves
    (1 - f * c) * S bytes over the link, the CPU reads f * c * S * pack_ratio packed bytes;
    equal times give f = 1 / (c * (1 + pack_ratio * link / cpu))."""
    if cpu_gbs <= 0 or int4_fraction <= 0:
        return 0.0
    return min(1.0, 1.0 / (int4_fraction * (1.0 + pack_ratio * link_gbs / cpu_gbs)))


def bucket(tokens: int) -> int | None:
    """The batch bucket a step of `tokens` tokens is balanced in; None above MAX_TOKENS."""
    return next((b for b in BUCKETS if tokens <= b), None)


# A share is kept only if its passes' median is this much below no share's: passes of one
# setting differ by several per cent, and a share costs host memory and CPU time that no share
# does not (BENCHMARKS.md, ninth session).
SHARE_MARGIN = 0.05


class Balancer:
    """The share per batch bucket: proposed from measured bandwidths, then chosen by timing passes.

    A share pays only while the pass waits on PCIe; where the device's own work or latency bounds
    the pass, the CPU's matmuls add to it. So each bucket times its first passes at the share the
    bandwidths propose, then at the share the rates those passes achieved propose (both sides
    running at once, as in a pass), then at no share, `every` passes each, and keeps the fastest
    where it beats no share by SHARE_MARGIN: the share is never slower than none, as measured on
    this machine."""

    def __init__(self, cpu_gbs: dict[int, float], link_gbs: float, int4_fraction: float, pack_ratio: float,
                 pack_frac: float, every: int = 3, fixed: float | None = None, what: str = "4-bit rows"):
        self.link_gbs, self.c, self.ratio, self.pack_frac, self.every = link_gbs, int4_fraction, pack_ratio, \
            pack_frac, every
        self.cpu_gbs = dict(cpu_gbs)
        self.fixed = fixed
        self.what = what  # what the share is a share of, for describe()
        self.frac = {b: self._frac(self.cpu_gbs.get(b, 0.0), link_gbs) for b in BUCKETS}
        # shares still to time per bucket, and the pass seconds of each share timed
        self.trials: dict[int, list[float]] = {b: ([f, 0.0] if f else []) for b, f in self.frac.items()}
        self.times: dict[int, dict[float, list[float]]] = {b: {} for b in BUCKETS}
        self.rates: dict[int, list[tuple[float, int, float, int]]] = {b: [] for b in BUCKETS}
        self.warm: set[int] = set()  # buckets whose first pass has been seen (and left out)

    def _frac(self, cpu_gbs: float, link_gbs: float) -> float:
        if self.fixed is not None:
            return min(self.fixed, self.pack_frac)
        f = balanced_frac(cpu_gbs, link_gbs, self.c, self.ratio)
        return min(f, self.pack_frac) if f >= 0.02 else 0.0

    def share(self, tokens: int) -> float:
        b = bucket(tokens)
        if b is None:
            return 0.0
        trials = self.trials[b]
        return trials[0] if trials else self.frac[b]

    def observe(self, tokens: int, pass_s: float, cpu_s: float, cpu_bytes: int, link_s: float,
                link_bytes: int) -> None:
        """One pass of `tokens` tokens took `pass_s`; the CPU read `cpu_bytes` in `cpu_s`, the link
        moved `link_bytes` in `link_s`."""
        b = bucket(tokens)
        if b is None or self.fixed is not None or not self.trials[b]:
            return
        if b not in self.warm:  # a bucket's first pass reads layers into the host cache and captures graphs
            self.warm.add(b)
            return
        f = self.trials[b][0]
        self.times[b].setdefault(f, []).append(pass_s)
        if f and cpu_s > 0 and link_s > 0:
            self.rates[b].append((cpu_s, cpu_bytes, link_s, link_bytes))
        if len(self.times[b][f]) < self.every:
            return
        self.trials[b].pop(0)
        seen = self.rates[b]
        if f and seen and len(self.times[b]) == 1:  # after the first share: what its passes achieved
            cpu = sum(x[1] for x in seen) / sum(x[0] for x in seen) / 1e9
            self.link_gbs = sum(x[3] for x in seen) / sum(x[2] for x in seen) / 1e9
            self.cpu_gbs[b] = cpu
            g = self._frac(cpu, self.link_gbs)
            g = g if g and abs(g - f) >= 0.05 else f / 2
            if cpu_rows(1 << 16, g):
                self.trials[b].insert(0, g)
        if not self.trials[b]:  # every share timed: keep the fastest, if it is clearly faster than none
            med = {k: statistics.median(v) for k, v in self.times[b].items()}
            best = min(med, key=med.get)
            none = med.get(0.0)
            self.frac[b] = best if none is None or med[best] <= none * (1 - SHARE_MARGIN) else 0.0

    def describe(self) -> str:
        if self.fixed is not None:
            return f"CPU share fixed at {self.pack_frac:.0%} of the {self.what}, batches up to {MAX_TOKENS}"

        def one(b: int) -> str:
            timed = ", ".join(f"{k:.0%} {statistics.median(v) * 1e3:.0f} ms" for k, v in sorted(self.times[b].items()))
            state = "timing" if self.trials[b] else "chosen"
            return f"batch {b}: {self.frac[b]:.0%} {state} (CPU {self.cpu_gbs.get(b, 0):.0f} GB/s" + \
                (f"; passes {timed})" if timed else ")")

        return f"CPU share of the {self.what}: {'; '.join(one(b) for b in BUCKETS)}; link {self.link_gbs:.0f} GB/s"


# -- measured at start ---------------------------------------------------------------------------

def measure_cpu_gbs(K: int = 8192, N: int = 8192, reps: int = 5) -> dict[int, float]:
    """The CPU's int4 matmul GB/s of packed bytes at each bucket's batch size (median of reps)."""
    g = torch.Generator().manual_seed(0)
    p = random_packed(N, K, g)
    out = {}
    for b in BUCKETS:
        x = torch.randn(b, K, generator=g).to(torch.bfloat16)
        p.matmul(x)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            p.matmul(x)
            ts.append(time.perf_counter() - t0)
        out[b] = p.nbytes / sorted(ts)[len(ts) // 2] / 1e9
    return out


def measure_link_gbs(device: torch.device, nbytes: int = 256 << 20) -> float:
    """Pinned host-to-device copy GB/s."""
    h = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    d = torch.empty(nbytes, dtype=torch.uint8, device=device)
    d.copy_(h, non_blocking=True)
    torch.cuda.synchronize(device)
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        d.copy_(h, non_blocking=True)
        torch.cuda.synchronize(device)
        ts.append(time.perf_counter() - t0)
    return nbytes / min(ts) / 1e9


def measure_expert_s(n_ff: int, n_embd: int, dtype: torch.dtype = torch.bfloat16, reps: int = 9) -> float:
    """Seconds the CPU takes for one expert at batch 1 (int4 gate, up and down of an n_ff x n_embd
    SwiGLU), the median of reps over 16 experts in turn (NOTE [ CPU experts ] in experts.py)."""
    g = torch.Generator().manual_seed(0)
    experts = [(random_packed(n_ff, n_embd, g, dtype), random_packed(n_ff, n_embd, g, dtype),
                random_packed(n_embd, n_ff, g, dtype)) for _ in range(16)]
    x = torch.randn(1, n_embd, generator=g).to(dtype)
    ts = []
    for r in range(reps + 1):
        t0 = time.perf_counter()
        for gate, up, down in experts:
            packed_swiglu(gate, up, down, x)
        if r:  # the first round warms up
            ts.append((time.perf_counter() - t0) / len(experts))
    return sorted(ts)[len(ts) // 2]


def expert_int4_layers(layouts) -> list:
    """The layers whose experts the CPU can take: gate, up and down all 4-bit."""
    out = []
    for lay in layouts:
        ts = {t.name: t for t in lay.tensors if t.name in EXPERT_TENSORS}
        if len(ts) == 3 and all(t.qtype in INT4_TYPES for t in ts.values()):
            out.append(lay)
    return out


def expert_packed_bytes(layouts) -> int:
    """Host bytes of every 4-bit expert of these layers, packed (what the CPU's experts may take)."""
    n = 0
    for lay in expert_int4_layers(layouts):
        for t in lay.tensors:
            if t.name in EXPERT_TENSORS:
                E, N, K = t.shape
                n += E * N * (K // 2 + K // GROUP * 4)
    return n


def pack_ratio() -> float:
    """Packed CPU bytes per GGUF byte of Q4_K (4 bits + a bf16 scale and zero per 32 values,
    against 4.5 bits): the other 4-bit types are within a few percent."""
    return (0.5 + 4 / GROUP) / (144 / 256)


def int4_fraction(layouts) -> float:
    """The share of the layers' bytes that are 4-bit matrices (what the CPU can take)."""
    total = sum(t.nbytes for lay in layouts for t in lay.tensors)
    int4 = sum(t.nbytes for lay in layouts for t in lay.tensors if t.qtype in INT4_TYPES and len(t.shape) == 2)
    return int4 / total if total else 0.0


SPLITS = ("layers", "rows")
FFN_MATRICES = ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")


def ffn_int4(lay) -> list:
    """The 4-bit FFN matrices of a layer (what the CPU takes of a layer in the "layers" split)."""
    return [t for t in lay.tensors if t.name in FFN_MATRICES and t.qtype in INT4_TYPES and len(t.shape) == 2]


def cpu_layers(layouts, frac: float, within: list[int] | None = None) -> list[int]:
    """The "layers" split: the layers whose 4-bit FFN matrices the CPU computes at share `frac`,
    frac * m (rounded) of the m layers with any, spread evenly (a CPU layer's compute overlaps
    the copies of the device's layers around it). `within`: choose among these layers only
    (those packed for the largest share), as evenly."""
    elig = [lay.layer for lay in row_layers(layouts) if ffn_int4(lay)]
    n = min(len(elig), int(frac * len(elig) + 0.5))
    pool = elig if within is None else [i for i in elig if i in set(within)]
    n = min(n, len(pool))
    return [pool[int((k + 0.5) * len(pool) / n)] for k in range(n)] if n else []


def ffn_int4_fraction(layouts) -> float:
    """The share of the layers' bytes that are 4-bit FFN matrices (what the "layers" split can take)."""
    total = sum(t.nbytes for lay in layouts for t in lay.tensors)
    return sum(t.nbytes for lay in layouts for t in ffn_int4(lay)) / total if total else 0.0


def row_layers(layouts) -> list:
    """The layers whose matrices the row share splits: those without experts (a MoE layer's
    CPU share is its experts, NOTE [ CPU experts ]; its attention is kept on the device)."""
    return [lay for lay in layouts if not any(t.name in EXPERT_TENSORS for t in lay.tensors)]


def packed_bytes(layouts, frac: float, split: str = "layers") -> int:
    """Host bytes the CPU's packed weights take at share `frac`: the layers without experts' 4-bit
    rows (`split` "rows") or the chosen layers' 4-bit FFN matrices ("layers"), and, at any
    share, its packed experts (every 4-bit expert may be packed in time)."""
    n = expert_packed_bytes(layouts) if frac else 0
    if split == "layers":
        chosen = set(cpu_layers(layouts, frac))
        return n + sum(t.shape[0] * (t.shape[1] // 2 + t.shape[1] // GROUP * 4)
                       for lay in layouts if lay.layer in chosen for t in ffn_int4(lay))
    for lay in row_layers(layouts):
        for t in lay.tensors:
            if t.qtype in INT4_TYPES and len(t.shape) == 2:
                N, K = t.shape
                n += cpu_rows(N, frac) * (K // 2 + K // GROUP * 4)
    return n


def threads_default() -> int:
    """CPU threads for the share: measured on a 16-core host, 12 threads read 73 GB/s and 8 read
    50 (int4, batch 1); the other processes (readers, coordinator) keep the rest."""
    import os

    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, n - 4) if n >= 8 else max(1, n - 1)


def np_rows(slot: np.ndarray, offset: int, row_bytes: int, r0: int, r1: int) -> torch.Tensor:
    """Rows [r0, r1) of a tensor at `offset` of a staging slot, as a uint8 tensor (no copy)."""
    return torch.from_numpy(slot[offset + r0 * row_bytes : offset + r1 * row_bytes])

