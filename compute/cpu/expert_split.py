"""How many of a layer's missing experts the CPU computes in a decode step: a cost model over each
link's measured cost at the step's batch size (NOTE [ the experts' split ])."""

from __future__ import annotations

import statistics
from collections import deque
from typing import NamedTuple

from layerstream.compute.cpu.balancer import bucket

SEEN_MIN = 3  # the run's own timings of a call size that replace the timing at start


class Cost(NamedTuple):
    """The CPU's seconds for a layer's call of m experts: fixed + m * each (0 for none)."""

    fixed: float  # what a call costs whatever its experts (its threads woken, x quantized, the sums)
    each: float  # what each expert adds

    def of(self, m: int) -> float:
        return self.fixed + m * self.each if m else 0.0


def fit(points: list[tuple[int, float, int]]) -> Cost | None:
    """The least-squares line through (experts, seconds, weight) points of two call sizes or more,
    its fixed part at least 0; None where the seconds do not grow with the experts (noise)."""
    w = sum(p[2] for p in points)
    mm = sum(p[2] * p[0] for p in points) / w
    ms = sum(p[2] * p[1] for p in points) / w
    var = sum(p[2] * (p[0] - mm) ** 2 for p in points)
    each = sum(p[2] * (p[0] - mm) * (p[1] - ms) for p in points) / var
    if each <= 0:
        return None
    fixed = ms - each * mm
    if fixed < 0:  # (through the origin instead)
        fixed, each = 0.0, sum(p[2] * p[0] * p[1] for p in points) / sum(p[2] * p[0] ** 2 for p in points)
    return Cost(fixed, each)


class ExpertSplit:
    """NOTE [ the experts' split ]
    A streamed MoE layer's missing experts reach the device's kernels over PCIe, a copy each, or
    are computed by the CPU from host memory (NOTE [ CPU experts ] in cpu/experts.py). Both run at
    once and the layer waits for the slower, so with m of its n missing experts on the CPU the
    experts take about

        max(host_s + fixed[b] + m * each[b], (n - m) * link_s)        (n * link_s where m = 0)

    fixed[b] + m * each[b]: the CPU's seconds for a call of m experts at the step's batch bucket b
    (it reads each expert once for all of its tokens, so an expert costs more where it has more
    tokens). A call has a fixed part (its threads woken and joined twice, x quantized, the sums),
    so its time an expert falls as it takes more of them: a model of seconds an expert alone took
    the time an expert of the calls it had timed for every call size, and gave the CPU more experts
    once a run's calls grew (its time an expert falling) than in the passes the balancer had timed.
    link_s: a copy's seconds an expert; host_s: what the CPU's share adds to the layer (its
    activations to the host, its sum back). Each layer of a step takes the m that minimises this,
    the fewest on a tie: every expert copied where one CPU expert costs more than the copies it
    would save, an even split where both are timed equal. The CPU's cost starts from a timing at
    start (cpu/calibrate.py: calls of one expert and of several, warmed, the median of several, on
    the run's own path) and then follows the run's own calls at that bucket, the last `window`:
    where calls of two sizes or more are each timed SEEN_MIN times, the line through their medians;
    where of one size, the start's line scaled to pass through its median (with a median, not a
    moving average, a few slow layers, a thread off its core, do not set the split for the next
    several). link_s comes from the link's GB/s measured at start. Whether the split beats no CPU
    at all in whole passes (the CPU's work holds the host, which launches the device's next work)
    is the Balancer's to time."""

    def __init__(self, cpu: dict[int, Cost | float], link_s: float, host_s: float = 0.0, window: int = 15):
        # (a bare number: seconds an expert, no fixed part)
        self.cost = {b: c if isinstance(c, Cost) else Cost(0.0, float(c)) for b, c in cpu.items()}
        self.link_s, self.host_s, self.window = link_s, host_s, window
        self.start = dict(self.cost)  # the timing at start: the run's timings scale it; describe()
        self.seen: dict[int, deque[tuple[int, float]]] = {}  # bucket -> the last `window` calls (experts, seconds)

    def count(self, tokens: int, n: int, already: int = 0) -> int:
        """The CPU's share of a layer's `n` missing experts in a step of `tokens` tokens, beside
        `already` experts it computes there (held back from the copy ahead)."""
        b = bucket(tokens)
        c = self.cost.get(b) if b is not None else None
        if not n or c is None or c.each <= 0 or self.link_s <= 0:
            return 0
        best, best_t = 0, max(self.host_s + c.of(already) if already else 0.0, n * self.link_s)
        for m in range(1, n + 1):
            t = max(self.host_s + c.of(already + m), (n - m) * self.link_s)
            if t < best_t:
                best, best_t = m, t
        return best

    def observe(self, tokens: int, experts: int, seconds: float) -> None:
        """The CPU computed `experts` experts of one layer in `seconds`, in a step of `tokens`."""
        b = bucket(tokens)
        if b is None or experts <= 0 or seconds <= 0:
            return
        seen = self.seen.setdefault(b, deque(maxlen=self.window))
        seen.append((experts, seconds))
        sizes: dict[int, list[float]] = {}
        for m, s in seen:
            sizes.setdefault(m, []).append(s)
        timed = [(m, statistics.median(ss), len(ss)) for m, ss in sizes.items() if len(ss) >= SEEN_MIN]
        got = fit(timed) if len(timed) >= 2 else None
        if got is None and timed:  # one size timed (or no line): the start's line through the most timed size
            m, s, _ = max(timed, key=lambda p: p[2])
            start = self.start.get(b)
            if start is None or start.of(m) <= 0:
                start = Cost(0.0, s / m)
            k = s / start.of(m)
            got = Cost(start.fixed * k, start.each * k)
        if got is not None:
            self.cost[b] = got

    def describe(self) -> str:
        def us(c: Cost) -> str:
            return f"{c.each * 1e6:.0f}" + (f" + {c.fixed * 1e6:.0f} a call" if c.fixed else "")

        def one(b: int, c: Cost) -> str:
            start, n = self.start.get(b), len(self.seen.get(b, ()))
            more = f"at start {us(start)}" if start else "not timed at start"
            return f"batch {b} {us(c)} ({more}; {n} layers timed)" if n else f"batch {b} {us(c)} ({more})"

        cpu = ", ".join(one(b, c) for b, c in sorted(self.cost.items()))
        return f"an expert on the CPU {cpu} us, copied {self.link_s * 1e6:.0f} us, round trip {self.host_s * 1e6:.0f} us"
