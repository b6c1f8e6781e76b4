"""How many of a layer's missing experts the CPU computes in a decode step: a cost model over each
link's measured cost an expert at the step's batch size (NOTE [ the experts' split ])."""

from __future__ import annotations

import statistics
from collections import deque

from layerstream.compute.cpu.balancer import bucket

SEEN_MIN = 3  # the run's own timings of a bucket that replace its timing at start


class ExpertSplit:
    """NOTE [ the experts' split ]
    A streamed MoE layer's missing experts reach the device's kernels over PCIe, a copy each, or
    are computed by the CPU from host memory (NOTE [ CPU experts ] in cpu/experts.py). Both run at
    once and the layer waits for the slower, so with m of its n missing experts on the CPU the
    experts take about

        max(host_s + m * cpu_s[b], (n - m) * link_s)        (n * link_s where m = 0)

    cpu_s[b]: the CPU's seconds an expert at the step's batch bucket b (it reads each expert once
    for all of its tokens, so an expert costs more where it has more tokens); link_s: a copy's
    seconds an expert; host_s: what the CPU's share adds to the layer (its activations to the
    host, its sum back). Each layer of a step takes the m that minimises this, the fewest on a
    tie: every expert copied where one CPU expert costs more than the copies it would save, an
    even split where both are timed equal. cpu_s starts from a timing at start (cpu/calibrate.py:
    warmed, the median of several, on the run's own path) and then follows the CPU's own timings
    in the run: the median of the last `window` layers' at that bucket, once SEEN_MIN are in (with a
    moving average, a few slow layers, a thread off its core, set the split for the next several).
    link_s comes from the link's GB/s measured at
    start. Whether the split beats no CPU at all in whole passes (the CPU's work
    holds the host, which launches the device's next work) is the Balancer's to time."""

    def __init__(self, cpu_s: dict[int, float], link_s: float, host_s: float = 0.0, window: int = 15):
        self.cpu_s, self.link_s, self.host_s, self.window = dict(cpu_s), link_s, host_s, window
        self.start = dict(cpu_s)  # the timing at start, for describe()
        self.seen: dict[int, deque[float]] = {}  # bucket -> the last `window` seconds an expert in the run

    def count(self, tokens: int, n: int, already: int = 0) -> int:
        """The CPU's share of a layer's `n` missing experts in a step of `tokens` tokens, beside
        `already` experts it computes there (held back from the copy ahead)."""
        b = bucket(tokens)
        c = self.cpu_s.get(b) if b is not None else None
        if not n or not c or self.link_s <= 0:
            return 0
        best, best_t = 0, max(self.host_s + already * c if already else 0.0, n * self.link_s)
        for m in range(1, n + 1):
            t = max(self.host_s + (already + m) * c, (n - m) * self.link_s)
            if t < best_t:
                best, best_t = m, t
        return best

    def observe(self, tokens: int, experts: int, seconds: float) -> None:
        """The CPU computed `experts` experts of one layer in `seconds`, in a step of `tokens`."""
        b = bucket(tokens)
        if b is None or experts <= 0 or seconds <= 0:
            return
        seen = self.seen.setdefault(b, deque(maxlen=self.window))
        seen.append(seconds / experts)
        if len(seen) >= SEEN_MIN:
            self.cpu_s[b] = statistics.median(seen)

    def describe(self) -> str:
        def one(b: int, s: float) -> str:
            start, n = self.start.get(b), len(self.seen.get(b, ()))
            more = f"at start {start * 1e6:.0f}" if start else "not timed at start"
            return f"batch {b} {s * 1e6:.0f} ({more}; {n} layers timed)" if n else f"batch {b} {s * 1e6:.0f} ({more})"

        cpu = ", ".join(one(b, s) for b, s in sorted(self.cpu_s.items()))
        return f"an expert on the CPU {cpu} us, copied {self.link_s * 1e6:.0f} us, round trip {self.host_s * 1e6:.0f} us"
