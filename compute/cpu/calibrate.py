"""The CPU's seconds for a layer's call of experts at each batch bucket, timed at start on the run's own path
(CpuExperts.compute over blocks of the model's expert types and shapes): where the experts' split
starts (NOTE [ the experts' split ] in cpu/expert_split.py)."""

from __future__ import annotations

import math
import statistics
import time

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType as QT

from layerstream.compute.cpu import native
from layerstream.compute.cpu.balancer import Balancer
from layerstream.compute.cpu.config import BUCKETS
from layerstream.compute.cpu.expert_split import Cost, fit
from layerstream.compute.cpu.experts import CpuExperts
from layerstream.compute.cpu.packing import cpu_matrix_bytes
from layerstream.compute.expert_layout import EXPERT_TENSORS, expected_experts
from layerstream.loader.layout import LayerLayout, SlotTensor
from layerstream.proto.timeline import Timeline

WORKING_SET = 192 << 20  # bytes of experts cycled through: more than a host's last-level cache, as in a run
CPU_EXPERTS = 4  # experts a timed layer gives the CPU (at batch 1, about half of 8 missing)
# host bytes the timing holds at most (the experts' blocks and any packed copies): Mixtral 8x7B's
# eight experts cycled whole would take 0.85 GiB, so wider experts are timed cut (timed_layout)
MEMORY = 256 << 20
# where each block type keeps its float16 scales (d, and dmin where it has one): set to 2**-7, so
# that random blocks compute as real ones do (random bytes there make infinities and subnormals)
_SCALES = {int(QT.Q4_0): (0,), int(QT.Q4_1): (0, 2), int(QT.Q8_0): (0,), int(QT.Q4_K): (0, 2),
           int(QT.Q5_K): (0, 2), int(QT.Q6_K): (208,)}


def tokens_an_expert(batch: int, n_expert: int, n_used: int | None) -> int:
    """The tokens a chosen expert has in a step of `batch` tokens with uniform routing: the step's
    pairs over its distinct experts (expected_experts; 1 where k is not known)."""
    if not n_used or not n_expert:
        return 1
    distinct = expected_experts(n_expert, n_used, batch)
    return max(1, min(batch, round(batch * n_used / distinct)))


def expert_layout(n_expert: int, n_ff: int, n_embd: int, qtypes: tuple[int, int, int], layer: int = 0) -> LayerLayout:
    """The layout of a layer of `n_expert` experts (gate and up n_ff x n_embd, down n_embd x n_ff,
    of `qtypes`), no other tensor: what expert_seconds times, for a shape without its file
    (Qwen3-30B-A3B: 128, 768, 2048, (Q4_K, Q4_K, Q6_K))."""
    tensors, off = [], 0
    for name, qt, (r, c) in zip(EXPERT_TENSORS, qtypes, ((n_ff, n_embd), (n_ff, n_embd), (n_embd, n_ff))):
        bk, bs = GGML_QUANT_SIZES[QT(int(qt))]
        nbytes = n_expert * r * (c // bk) * bs
        tensors.append(SlotTensor(name, int(qt), (n_expert, r, c), off, nbytes, "f", 0))
        off += nbytes
    return LayerLayout(layer, tuple(tensors), off)


def random_expert_layer(lay: LayerLayout, n: int, seed: int = 0) -> tuple[LayerLayout, np.ndarray]:
    """A layer of `n` experts of `lay`'s expert types and shapes, random blocks with sane scales:
    its layout and bytes (one expert's random bytes repeated: the kernel's time does not depend on
    the values)."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lay.tensor(name).nbytes // lay.tensor(name).shape[0] for name in EXPERT_TENSORS) * n
    host = np.empty(total, dtype=np.uint8)
    tensors, off = [], 0
    for name in EXPERT_TENSORS:
        t = lay.tensor(name)
        _, N, K = t.shape
        per = t.nbytes // t.shape[0]
        b = torch.randint(0, 256, (per,), dtype=torch.uint8, generator=g).numpy()
        blocks = b.reshape(-1, GGML_QUANT_SIZES[QT(t.qtype)][1])
        for at in _SCALES[t.qtype]:
            blocks[:, at : at + 2] = (0x00, 0x20)  # (float16 2**-7, little-endian)
        tensors.append(SlotTensor(name, t.qtype, (n, N, K), off, n * per, "f", 0))
        host[off : off + n * per].reshape(n, per)[:] = b
        off += n * per
    return LayerLayout(lay.layer, tuple(tensors), off), host


def _expert_bytes(lay: LayerLayout) -> int:
    return sum(lay.tensor(n).nbytes for n in EXPERT_TENSORS) // lay.tensor(EXPERT_TENSORS[0]).shape[0]


def timed_layout(lay: LayerLayout, in_place: bool, dtype_size: int) -> tuple[LayerLayout, int]:
    """The experts expert_seconds times for `lay` and how many it cycles through, holding at most
    MEMORY bytes with their packed copies (none where read in place; else of `dtype_size`-byte
    values): `lay`'s own, or where those do not fit, experts of the same types and model width
    whose FFN width is cut to a multiple of QK_K (gate and up keep whole rows, fewer of them; down
    keeps its rows, shorter). The kernels' time follows the bytes they read, so a cut expert's time
    times the ratio of the bytes stands for a whole one's. (The bound holds for model widths up to
    about 18,000 with packed float32 copies and 60,000 read in place: past that even the narrowest
    cut is larger.)"""
    E, n_ff, n_embd = lay.tensor(EXPERT_TENSORS[0]).shape
    qtypes = tuple(lay.tensor(n).qtype for n in EXPERT_TENSORS)
    for f in (n_ff, *range((n_ff - 1) // QK_K * QK_K, 0, -QK_K)):  # whole, then cut
        cut = lay if f == n_ff else expert_layout(E, f, n_embd, qtypes, lay.layer)
        per = _expert_bytes(cut)
        n = max(2 * CPU_EXPERTS, min(16 * CPU_EXPERTS, math.ceil(WORKING_SET / per))) if in_place else 2 * CPU_EXPERTS
        packed = 0 if in_place else sum(cpu_matrix_bytes(t.qtype, *t.shape[1:], dtype_size) for t in cut.tensors)
        if n * (per + packed) <= MEMORY:
            break
    return cut, n


def expert_seconds(lay: LayerLayout, dtype: torch.dtype, n_used: int | None = None, reps: int = 9,
                   clock=time.perf_counter) -> dict[int, Cost]:
    """{bucket: the CPU's seconds for a call of m experts, fixed + m * each} for layer `lay`'s
    experts read as blocks in place (NOTE [ CPU experts ]): CpuExperts.compute of CPU_EXPERTS
    experts and of one, each with its share of a step's tokens (tokens_an_expert), on this
    process's threads; the line through the two (NOTE [ the experts' split ]; no fixed part where
    one expert's call costs no more an expert than the larger one). The experts cycle through WORKING_SET
    bytes, so each is read from memory, as in a run, and the timing holds at most MEMORY bytes
    (wide experts timed cut: timed_layout). Warmed (the kernel loaded, its threads started, its
    scratch grown), then the median of `reps` per bucket and size."""
    E, _, n_embd = lay.tensor(EXPERT_TENSORS[0]).shape
    cpu = CpuExperts(Balancer({}, 0.0, 1.0, 1.0, 1.0, fixed=1.0), 1 << 62, dtype, Timeline("calibrate", "t"))
    in_place = cpu.in_place(0, lay)  # (loads the native kernel, outside the timings)
    timed, n = timed_layout(lay, in_place, torch.empty((), dtype=dtype).element_size())
    scale = _expert_bytes(lay) / _expert_bytes(timed)  # a whole expert's bytes over a timed one's
    fake, host = random_expert_layer(timed, n)
    if not in_place:  # packed copies (no native kernel): made first, as a run keeps them
        cpu.pack(0, fake, host, range(n))
    g = torch.Generator().manual_seed(1)
    out, next_e = {}, 0
    for b in BUCKETS:
        r = tokens_an_expert(b, E, n_used)
        cpu.set_step(b)  # (its workers kept awake between calls, as in a run's steps with a share)
        call = {}
        for m in (CPU_EXPERTS, 1):
            k = math.ceil(m * r / b)
            ts = []
            for rep in range(reps + 2):
                experts = [(next_e + j) % n for j in range(m)]
                next_e = (next_e + m) % n
                rows = [[] for _ in range(b)]  # each expert's r pairs on r distinct tokens
                for j, e in enumerate(experts):
                    for s in range(r):
                        rows[(j * r + s) % b].append(e)
                ids = [e for row in rows for e in row + [-1] * (k - len(row))]
                h = torch.randn(b, n_embd, generator=g)
                w = torch.rand(b, k, generator=g)
                t0 = clock()
                cpu.compute(0, fake, host, experts, ids, h, w)
                dt = clock() - t0
                if rep >= 2:  # (two rounds warm the bucket: the kernel's scratch, the lanes path)
                    ts.append(dt)
            call[m] = statistics.median(ts)
        line = fit([(CPU_EXPERTS, call[CPU_EXPERTS], 1), (1, call[1], 1)]) or Cost(0.0, call[CPU_EXPERTS] / CPU_EXPERTS)
        out[b] = Cost(line.fixed, line.each * scale)  # (a cut expert's bytes scale its part, not the call's)
    native.spin(0.0)  # (the workers' spin back to the kernel's default: the run's steps set their own)
    return out
