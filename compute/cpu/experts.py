"""The CPU's share of a decode step's streamed experts, computed from their staging bytes."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from layerstream.compute.cpu import native
from layerstream.compute.cpu.balancer import Balancer
from layerstream.compute.cpu.expert_split import ExpertSplit
from layerstream.compute.cpu.packing import cpu_matrix, swiglu_many
from layerstream.compute.cpu.sizing import expert_cpu_layers, experts_in_place
from layerstream.compute.cpu.split import Meter
from layerstream.compute.expert_layout import expert_bytes, expert_parts
from layerstream.loader.layout import LayerLayout
from layerstream.proto.timeline import Timeline

SPIN_S = 0.002  # seconds the native kernel's workers stay awake after a call, in a step with a share


class CpuExperts:
    """The CPU's share of a decode step's streamed experts.

    NOTE [ CPU experts ]
    Expert streaming moves only the chosen experts, but they cannot cross PCIe before the router
    has run, so each layer waits for its copies (a third of a streamed layer's time). The host's
    DRAM can feed the CPU at the same time (measured on an H200 host: 46 GB/s of int4 matmul
    beside 51 GB/s of copies). So, with `--cpu-share`, a share of each
    step's missing experts (those not in the device cache) is computed on the CPU, straight from
    the staging bytes, while the copy engine moves the others and the device computes them: the
    CPU's experts are left out of the device's grouped launches (their pairs weigh 0 there) and
    their weighted sum is added on the device afterwards.
    - Where the native kernel reads all three matrices' block types (cpu/native.py), the CPU reads
      each expert's blocks in place, in the layer's staging slot, which the step holds until the
      layer's release (NOTE [ expert streaming ]): nothing is copied or packed, and the plan
      counts no host memory for it (copied out, they would cost a copy per expert on first use
      and host memory the size of the streamed experts, for the same reads).
    - Without the native kernel, 4-bit matrices (Q4_0, Q4_1, Q4_K) go to aten's int4 matmul,
      exact but for the rounding of their scales to the CPU's dtype (cpu/packing.py), and the
      other block types (a Q4_K_M file's Q6_K downs, Q5_K, Q8_0, ...) are dequantized once into
      the CPU's dtype (DenseRows). Such an expert is packed the first time the CPU takes it, and
      kept, within `budget` bytes of host memory (the plan counts every expert of those layers
      as packed); past it, only packed experts go to the CPU. A layer takes part when all three
      of its expert matrices are of types the CPU computes.
    - The CPU computes each of its experts once for all of its tokens (their rows gathered).
    - Where the next layer's experts are copied ahead on a prediction (NOTE [ expert prefetch ] in
      experts.py), nearly every chosen expert is on the device by its router's time and none would
      be left to the CPU: the copy engine alone would bound the layer. So the CPU's share is taken
      from the prediction (`reserve`): the least named of the predicted experts that are not
      cached are held back from the copy ahead, and the CPU computes those the router then
      chooses, with its share of any the prediction missed.
    - The share per batch bucket is fixed (that fraction of each layer's missing experts), or,
      with `split` (`--cpu-share auto`), each layer's count comes from the experts' cost model
      (NOTE [ the experts' split ]) while `Balancer` times passes with it against passes without
      any, and keeps it only where it is faster (never slower than none, as with the rows of
      dense layers).
    """

    def __init__(self, balancer: Balancer, budget: int, dtype: torch.dtype, timeline: Timeline,
                 split: ExpertSplit | None = None, clock=time.monotonic_ns):
        self.balancer, self.budget, self.dtype, self.tl = balancer, budget, dtype, timeline
        self.split, self.clock = split, clock  # (clock: nanoseconds, a stand-in in tests)
        self.tokens = 1  # tokens of this step (set_step)
        self.frac = 0.0  # this step's share (set_step), the balancer's to time
        self.packed: dict[tuple[int, int], tuple] = {}  # (layer, expert) -> gate, up, down in the CPU's form
        self.packed_bytes = 0
        self.meter = Meter()
        self.computed = 0  # experts computed by the CPU (counting each layer's once a step)
        self.packing = Meter()  # packing time and bytes since the last take_pack_s()
        self.reserved: dict[int, list[int]] = {}  # layer -> predicted experts held back from the copy ahead
        self._eligible: dict[int, bool] = {}
        self._in_place: dict[int, bool] = {}
        self._addr: dict[int, tuple] = {}  # layer -> its experts' addresses in place (_addresses)
        self.spin = None  # the workers' spin last asked of the native kernel (set_step)

    def eligible(self, i: int, lay: LayerLayout) -> bool:
        got = self._eligible.get(i)
        if got is None:
            got = self._eligible[i] = bool(expert_cpu_layers([lay]))
        return got

    def in_place(self, i: int, lay: LayerLayout) -> bool:
        """Whether the CPU reads layer i's experts in place, as blocks (NOTE [ CPU experts ])."""
        got = self._in_place.get(i)
        if got is None:
            got = self._in_place[i] = experts_in_place(lay)
        return got

    def set_step(self, tokens: int) -> float:
        """A decode step of `tokens` tokens: its share (the balancer's)."""
        self.tokens = tokens
        self.reserved.clear()  # (a step that failed part-way may leave some)
        share = self.frac = self.balancer.share(tokens)
        # a call a layer: the native kernel's workers kept awake between them (where cores are few,
        # waking them cost a lone expert's call more than its dots; an H200 host's 16 lost little)
        spin = SPIN_S if share > 0 else 0.0
        if spin != self.spin:  # (a library call only when it changes, not every step)
            native.spin(spin)
            self.spin = spin
        return share

    def take_pack_s(self) -> float:
        """Seconds spent packing experts since the last call: a one-off cost, which the balancer
        leaves out of a pass's time (measured on an H200 host: 7.5 to 17.6 ms an expert of the
        Qwen3-30B-A3B shape, tens of experts a pass while the share is new)."""
        return self.packing.take()[0]

    def count(self, n: int, frac: float, already: int = 0) -> int:
        """How many of n missing experts the CPU takes at share `frac`, beside `already` of its own
        (with a cost model: as many as it gives, up to that share)."""
        m = max(0, int(frac * (n + already) + 1e-9) - already)  # rounded down: a lone expert copies faster
        if m and self.split is not None:
            m = min(m, self.split.count(self.tokens, n, already))
        return m

    def reserve(self, i: int, lay: LayerLayout, new: list[int], frac: float) -> list[int]:
        """Of layer i's predicted experts that are not cached, `new` (the most named first), those
        held back from the copy ahead for the CPU (NOTE above): its share of them, the least named;
        only where it reads the blocks in place."""
        m = self.count(len(new), frac) if self.eligible(i, lay) and self.in_place(i, lay) else 0
        self.reserved[i] = got = new[len(new) - m :] if m else []
        return got

    def take_reserved(self, i: int) -> list[int]:
        """Layer i's experts held back for the CPU (reserve), once."""
        return self.reserved.pop(i, [])

    def choose(self, i: int, lay: LayerLayout, missing: list[int], frac: float, already: int = 0) -> list[int]:
        """The CPU's experts among a step's `missing` ones of layer i at share `frac`, beside
        `already` it holds: packed ones first, then ones that still fit the budget."""
        n = self.count(len(missing), frac, already)
        if not n or not self.eligible(i, lay):
            return []
        if self.in_place(i, lay):
            return sorted(missing[:n])
        have = [e for e in missing if (i, e) in self.packed]
        if len(have) < n and self.packed_bytes < self.budget:
            have += [e for e in missing if (i, e) not in self.packed][: n - len(have)]
        return sorted(have[:n])

    def _experts(self, i: int, e: int, parts: list, host: np.ndarray) -> tuple:
        """Expert e's gate, up and down packed in the CPU's form (`parts`: the layer's
        expert_parts), made now where they are not yet (a layer not read in place)."""
        got = self.packed.get((i, e))
        if got is None:
            mats = []
            t0 = self.clock()
            with self.tl.span("cpu_pack", f"pack L{i} E{e}", layer=i):
                for t, per, _, rows, cols in parts:
                    raw = torch.from_numpy(expert_bytes(host, t, per, e))
                    mats.append(cpu_matrix(raw, t.qtype, rows, cols, self.dtype))
            got = self.packed[(i, e)] = tuple(mats)
            nbytes = sum(m.nbytes for m in got)
            self.packing.add(t0, self.clock() - t0, nbytes)
            self.packed_bytes += nbytes
        return got

    def pack(self, i: int, lay: LayerLayout, host: np.ndarray, experts) -> None:
        """Make the packed copies of layer i's `experts` now (where they are not read in place)."""
        parts = expert_parts(lay)
        for e in experts:
            self._experts(i, e, parts, host)

    def compute(self, i: int, lay: LayerLayout, host: np.ndarray, experts: list[int], ids: list[int],
                h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """sum over the step's (token, choice) pairs whose expert is one of `experts` of weight *
        expert(h[token]): [T, n_embd] float32 on the host. ids: each pair's expert (row-major
        [T, k]); h, weight: [T, n_embd] and [T, k] on the host."""
        return self.start(i, lay, host, experts, ids, h, weight)()

    def start(self, i: int, lay: LayerLayout, host: np.ndarray, experts: list[int], ids: list[int],
              h: torch.Tensor, weight: torch.Tensor, post=None) -> Callable[[], torch.Tensor]:
        """As compute(), begun now and finished by the function returned, which gives the sum:
        where the native kernel reads the blocks in place, the call runs on its own thread
        meanwhile (NOTE [ experts beside the device's work ] in qdot.c), so the caller launches the
        device's work before it waits; else the sum is computed here. `host` (the staging slot)
        must stay unchanged until the sum is taken. `post` (a host_wait.Mailbox, its flag set to
        expect a post): the sum also goes there, and its end is posted (NOTE [ the CPU's sum posted
        to the device ] in qdot.c)."""
        k = weight.shape[1]
        t0 = self.clock()
        if self.in_place(i, lay):
            addr, qtypes, n_ff, n_embd, per, per_expert = self._addresses(i, lay)
            # the router's output as it is: the kernel's thread makes the experts' table (NOTE [ the
            # router's pairs grouped by the kernel ] in qdot.c; the prologue is the call's fixed cost)
            wait = native.experts_routed_start(host.ctypes.data, addr, per, np.asarray(experts, dtype=np.int64),
                                               np.asarray(ids, dtype=np.int64).reshape(-1, k),
                                               weight.float().contiguous().numpy(), qtypes, n_ff, n_embd, h,
                                               post=None if post is None else post.post)
            real = self.clock is time.monotonic_ns
            prologue = self.clock() - t0 if real else 0
            nbytes = len(experts) * per_expert

            def finish() -> torch.Tensor:
                out, c0, c1 = wait()
                # the host's part, then the kernel's on its thread (a caller that waits late adds
                # nothing); a stand-in clock (tests) times the call from start to finish
                dt = prologue + c1 - c0 if real else self.clock() - t0
                self._observe(i, experts, nbytes, t0, dt)
                return out
            return finish
        parts = expert_parts(lay)
        pairs: dict[int, list[int]] = {e: [] for e in experts}
        for p, e in enumerate(ids):
            if e in pairs:
                pairs[e].append(p)
        mats = [self._experts(i, e, parts, host) for e in experts]  # (packing is not the CPU share's time)
        t0 = self.clock()
        out = self._packed_sum(mats, experts, pairs, k, h, weight)
        self._observe(i, experts, sum(m.nbytes for ms in mats for m in ms), t0, self.clock() - t0)
        if post is not None:
            post.posted(out)
        return lambda: out

    def _observe(self, i: int, experts: list[int], nbytes: int, t0: int, dt: int) -> None:
        """A call's time `dt` (nanoseconds from `t0`) for the meter, the cost model and the trace."""
        self.meter.add(t0, dt, nbytes)
        if self.split is not None:
            self.split.observe(self.tokens, len(experts), dt / 1e9)
        self.computed += len(experts)
        self.tl.add("cpu_experts", f"cpu experts L{i}", t0, dt, nbytes, layer=i, experts=len(experts))

    def _addresses(self, i: int, lay: LayerLayout) -> tuple:
        """Layer i's experts as the native call reads them in place: the slot offsets of expert 0's
        gate, up and down and each one's bytes an expert ([3] int64 each), their types, n_ff,
        n_embd and an expert's bytes (once a layer)."""
        got = self._addr.get(i)
        if got is None:
            parts = expert_parts(lay)
            per = np.array([per for _, per, *_ in parts], dtype=np.int64)
            got = self._addr[i] = (np.array([t.slot_offset for t, *_ in parts], dtype=np.int64),
                                   tuple(t.qtype for t, *_ in parts), parts[0][3], parts[0][4], per, int(per.sum()))
        return got

    @staticmethod
    def _packed_sum(mats: list[tuple], experts: list[int], pairs: dict[int, list[int]], k: int, h: torch.Tensor,
                    weight: torch.Tensor) -> torch.Tensor:
        """The experts' weighted sum from their packed copies (aten's int4 matmul, dense rows)."""
        T = weight.shape[0]
        order = [p for e in experts for p in pairs[e]]  # the CPU's pairs, by expert
        # the host's part in numpy, which starts no threads: torch's index_add_ (a scatter_add) entered
        # an OpenMP parallel region at any size, whose barrier waits for every OpenMP thread while
        # the CPU's matmuls hold the cores (milliseconds a call where it alone takes microseconds)
        hx = h.float().numpy()
        rows = np.array([p // k for p in order], dtype=np.int64)  # each of the CPU's pairs' token
        x_all = torch.from_numpy(hx[rows]) if T > 1 else h.float()  # one gather a layer, not one an expert
        xs, a = [], 0
        for e in experts:
            b = a + len(pairs[e])
            xs.append(x_all[a:b] if T > 1 else x_all)  # each expert once for its tokens
            a = b
        y = np.concatenate([t.float().numpy() for t in swiglu_many(list(mats), xs)])  # [pairs, n_embd]
        y *= weight.float().numpy().reshape(-1)[order][:, None]
        if T == 1:
            return torch.from_numpy(y.sum(0, keepdims=True))
        out = np.zeros((T, hx.shape[1]), dtype=np.float32)
        np.add.at(out, rows, y)
        return torch.from_numpy(out)
