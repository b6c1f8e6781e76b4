"""A step backend on a virtual device and clock: each launch costs the host `host_s` and queues
`device_s` of work on an in-order device queue; reading a step's ids waits until that work is
done. Logic, not timing: tests check which waits a loop makes, never how fast a machine is."""

from __future__ import annotations

from collections import deque

from layerstream.coordinator.engine import LocalBackend


class VirtualClock:
    """The host's time (seconds) in a test; `perf_counter` stands in for time.perf_counter."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class VirtualDevice:
    """Wraps a LocalBackend (its steps run at once on the CPU) with a device queue on `clock`,
    and records the order of the calls: ("launch", n) and ("read", n), n counting launches."""

    def __init__(self, backend: LocalBackend, clock: VirtualClock, host_s: float, device_s: float):
        self.backend, self.clock, self.host_s, self.device_s = backend, clock, host_s, device_s
        self.free_at = 0.0  # when the device's queue runs dry
        self.done_at: deque[tuple[int, float]] = deque()  # steps in flight: number, when their ids are ready
        self.log: list[tuple[str, int]] = []
        self.launched = 0
        self.max_seqs, self.ctx, self.hparams = backend.max_seqs, backend.ctx, backend.hparams

    def submit(self, seqs, sample, starts, want="none") -> None:
        self.clock.now += self.host_s  # building and launching the step
        self.backend.submit(seqs, sample, starts, want)
        self.free_at = max(self.free_at, self.clock.now) + self.device_s
        self.launched += 1
        self.done_at.append((self.launched, self.free_at))
        self.log.append(("launch", self.launched))

    def collect(self):
        n, ready = self.done_at.popleft()
        self.clock.now = max(self.clock.now, ready)  # the host waits for the step's ids
        self.log.append(("read", n))
        return self.backend.collect()

    def step(self, seqs, want="last"):
        self.submit(seqs, [0] * len(seqs), [], want)
        return self.collect().logits

    def discard(self) -> None:
        self.done_at.clear()
        self.backend.discard()

    def synchronize(self) -> None:
        """What torch.cuda.synchronize does to the host: wait until the queue runs dry."""
        self.clock.now = max(self.clock.now, self.free_at)
