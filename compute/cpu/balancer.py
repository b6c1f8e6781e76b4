"""How much the CPU takes: the share per batch bucket, proposed from measured bandwidths, then
chosen by timing the run's own passes (NOTE [ the CPU share ] in cpu/share.py)."""

from __future__ import annotations

import statistics
import time

import torch
from gguf import GGMLQuantizationType as QT

from layerstream.compute.cpu.config import BUCKETS
from layerstream.compute.cpu.packing import cpu_rows, random_cpu_matrix

MAX_TOKENS = 8  # tokens of a step above which the CPU computes nothing (its int4 GEMV stops paying)


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
# does not.
SHARE_MARGIN = 0.05
# After a bucket's choice, its share and the other setting (none, or the best share timed) are
# timed again after RECHECK_FIRST passes, and again at twice the interval while the choice holds,
# up to RECHECK_MAX; a choice that changes starts the interval over.
RECHECK_FIRST = 16
RECHECK_MAX = 256


class Balancer:
    """The share per batch bucket: proposed from measured bandwidths, then chosen by timing passes.

    A share pays only while the pass waits on PCIe; where the device's own work or latency bounds
    the pass, the CPU's matmuls add to it. So each bucket times its first passes at the share the
    bandwidths propose, then at the share the rates those passes achieved propose (both sides
    running at once, as in a pass), then at no share, `every` passes each, and keeps the fastest
    where it beats no share by SHARE_MARGIN: the share is never slower than none, as measured on
    this machine. A choice is not final: a few passes of each setting are a noisy sample, and what
    a share costs moves with the run (the experts' cost model learns the CPU's speed, the host's
    other work comes and goes; an experts' share chosen at batch 8 from faster passes then ran
    slower than none, BENCHMARKS.md). So the chosen setting and the other are timed again after
    RECHECK_FIRST passes, then at doubling intervals while the choice holds (each re-check costs
    `every` passes of the losing setting).
    `fixed`: a share for every bucket, or {bucket: share}, never timed (`--cpu-share F`, `B:F,...`);
    `propose`: the share each bucket times first, instead of the bandwidths'
    (the CPU's experts: 1, each layer's count then left to their cost model, cpu/expert_split.py);
    `detail`: more for describe()."""

    def __init__(self, cpu_gbs: dict[int, float], link_gbs: float, int4_fraction: float, pack_ratio: float,
                 pack_frac: float, every: int = 3, fixed: float | dict[int, float] | None = None,
                 what: str = "4-bit rows",
                 propose: float | None = None, detail=None):
        self.link_gbs, self.c, self.ratio, self.pack_frac, self.every = link_gbs, int4_fraction, pack_ratio, \
            pack_frac, every
        self.cpu_gbs = dict(cpu_gbs)
        self.fixed, self.propose, self.detail = fixed, propose, detail
        self.what = what  # what the share is a share of, for describe()
        self.frac = {b: self._frac(self.cpu_gbs.get(b, 0.0), link_gbs, b) for b in BUCKETS}
        # shares still to time per bucket, and the pass seconds of each share timed
        self.trials: dict[int, list[float]] = {b: ([f, 0.0] if f else []) for b, f in self.frac.items()}
        self.times: dict[int, dict[float, list[float]]] = {b: {} for b in BUCKETS}
        self.rates: dict[int, list[tuple[float, int, float, int]]] = {b: [] for b in BUCKETS}
        self.warm: set[int] = set()  # buckets whose first pass has been seen (and left out)
        self.other: dict[int, float] = {}  # chosen bucket -> the setting its re-check times beside the choice
        self.interval: dict[int, int] = {}  # chosen bucket -> passes between its re-checks now
        self.left: dict[int, int] = {}  # chosen bucket -> passes until its next re-check
        self.rechecking: set[int] = set()  # buckets timing their choice and its other setting again

    def _frac(self, cpu_gbs: float, link_gbs: float, b: int) -> float:
        if self.fixed is not None:  # (one share for every batch size, or one each)
            return min(self.fixed.get(b, 0.0) if isinstance(self.fixed, dict) else self.fixed, self.pack_frac)
        if self.propose is not None:
            return min(self.propose, self.pack_frac)
        f = balanced_frac(cpu_gbs, link_gbs, self.c, self.ratio)
        return min(f, self.pack_frac) if f >= 0.02 else 0.0

    def share(self, tokens: int) -> float:
        b = bucket(tokens)
        if b is None:
            return 0.0
        trials = self.trials[b]
        return trials[0] if trials else self.frac[b]

    def observe(self, tokens: int, pass_s: float, cpu_s: float, cpu_bytes: int, link_s: float,
                link_bytes: int, share: float | None = None) -> None:
        """One pass of `tokens` tokens took `pass_s`; the CPU read `cpu_bytes` in `cpu_s`, the link
        moved `link_bytes` in `link_s`; `share`: the share it ran at, where known. A pass is observed
        once the next is launched, so the first after a change of setting ran at the one before:
        such a pass counts for neither."""
        b = bucket(tokens)
        if b is None or self.fixed is not None:
            return
        if not self.trials[b]:
            self._count_down(b)
            return
        if b not in self.warm:  # a bucket's first pass reads layers into the host cache and captures graphs
            self.warm.add(b)
            return
        f = self.trials[b][0]
        if share is not None and share != f:
            return
        self.times[b].setdefault(f, []).append(pass_s)
        if f and cpu_s > 0 and link_s > 0 and b not in self.rechecking:  # (a re-check proposes nothing)
            self.rates[b].append((cpu_s, cpu_bytes, link_s, link_bytes))
        if len(self.times[b][f]) < self.every:
            return
        self.trials[b].pop(0)
        seen = self.rates[b]
        if f and seen and len(self.times[b]) == 1 and self.propose is None and b not in self.rechecking:
            # after the first share: what its passes achieved
            cpu = sum(x[1] for x in seen) / sum(x[0] for x in seen) / 1e9
            self.link_gbs = sum(x[3] for x in seen) / sum(x[2] for x in seen) / 1e9
            self.cpu_gbs[b] = cpu
            g = self._frac(cpu, self.link_gbs, b)
            g = g if g and abs(g - f) >= 0.05 else f / 2
            if cpu_rows(1 << 16, g):
                self.trials[b].insert(0, g)
        if not self.trials[b]:
            self._choose(b)

    def _choose(self, b: int) -> None:
        """Every setting of bucket b timed: keep the fastest share if it is clearly faster than none,
        and set when the choice is timed again. A re-check drops a chosen share only where none is
        clearly faster (SHARE_MARGIN each way): a share within the passes' noise of none keeps
        whichever was chosen, instead of flipping with each sample."""
        med = {k: statistics.median(v) for k, v in self.times[b].items()}
        best = min(med, key=med.get)
        none = med.get(0.0)
        before, rechecked = self.frac[b], b in self.rechecking
        self.rechecking.discard(b)
        if rechecked and before and before in med and none is not None:
            self.frac[b] = 0.0 if none <= med[before] * (1 - SHARE_MARGIN) else before
        else:
            self.frac[b] = best if none is None or med[best] <= none * (1 - SHARE_MARGIN) else 0.0
        shares = {k: v for k, v in med.items() if k}
        other = 0.0 if self.frac[b] else min(shares, key=shares.get) if shares else None
        if other is None:  # (no share was ever timed: nothing to time again)
            return
        self.other[b] = other
        held = rechecked and self.frac[b] == before
        self.interval[b] = min(2 * self.interval[b], RECHECK_MAX) if held else RECHECK_FIRST
        self.left[b] = self.interval[b]

    def _count_down(self, b: int) -> None:
        """A pass of chosen bucket b: at the end of its interval, time its choice and the other setting
        again (`every` passes each), fresh."""
        if b not in self.other:
            return
        self.left[b] -= 1
        if self.left[b] <= 0:
            self.trials[b] = [self.frac[b], self.other[b]]
            self.times[b] = {}
            self.rechecking.add(b)

    def describe(self) -> str:
        """The share in words, after the label that names it (--stats: "CPU share: ...", "CPU experts: ...")."""
        if self.fixed is not None and len(set(self.frac.values())) > 1:
            return f"fixed by batch, of the {self.what}: " + ", ".join(f"batch {b} {f:.0%}" for b, f in self.frac.items())
        if self.fixed is not None:
            return f"fixed at {self.pack_frac:.0%} of the {self.what}, batches up to {MAX_TOKENS}"

        def one(b: int) -> str:
            timed = ", ".join(f"{k:.0%} {statistics.median(v) * 1e3:.0f} ms" for k, v in sorted(self.times[b].items()))
            state = "re-timing" if b in self.rechecking else "timing" if self.trials[b] else "chosen"
            cpu = f"CPU {self.cpu_gbs[b]:.0f} GB/s" if self.cpu_gbs.get(b) else ""
            more = "; ".join(x for x in (cpu, f"passes {timed}" if timed else "") if x)
            return f"batch {b}: {self.frac[b]:.0%} {state}" + (f" ({more})" if more else "")

        more = f"; {self.detail()}" if self.detail is not None else ""
        return f"timed per batch, of the {self.what}: {'; '.join(one(b) for b in BUCKETS)}; link {self.link_gbs:.0f} GB/s{more}"


def measure_cpu_gbs(K: int = 8192, N: int = 8192, reps: int = 5) -> dict[int, float]:
    """The CPU's Q4_K matmul GB/s of the bytes it reads (blocks, or aten's int4 layout) at each
    bucket's batch size (median of reps)."""
    g = torch.Generator().manual_seed(0)
    p = random_cpu_matrix(int(QT.Q4_K), N, K, g)
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
    """Pinned host-to-device copy GB/s. The device buffer goes back to the driver: left in torch's
    cache, the plan's later small allocations split its block, and what they leave of it, reserved
    but too small for a resident layer, counts against the budget (a 70B whose plan filled its
    budget failed its first step so)."""
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
    del d
    torch.cuda.empty_cache()
    return nbytes / min(ts) / 1e9


def measure_round_trip_s(device: torch.device, n_embd: int, tokens: int = 8, reps: int = 9) -> float:
    """Seconds of what the CPU's experts add to a layer beside their compute: activations
    [tokens, n_embd] to the host and their sum back (median of reps; 0 off CUDA)."""
    if device.type != "cuda":
        return 0.0
    x = torch.randn(tokens, n_embd, device=device)
    ts = []
    for r in range(reps + 1):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        y = x.cpu().to(device, non_blocking=True)
        torch.cuda.synchronize(device)
        if r:
            ts.append(time.perf_counter() - t0)
    del y
    return sorted(ts)[len(ts) // 2]
