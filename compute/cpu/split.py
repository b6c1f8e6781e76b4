"""A matrix split between the compute device and the CPU, and its matmuls (NOTE [ the CPU share ]
in cpu/share.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from layerstream.compute.cpu import native
from layerstream.compute.cpu.packing import BlockRows, PackedRows, packed_swiglu
from layerstream.compute.qlinear import linear


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
    [n_dev, N) on the CPU; `linear` joins both outputs on the device (qlinear.linear and
    qlinear.linear_many call its methods)."""

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

    def linear_many(self, x: torch.Tensor, ws: list, biases: list) -> list[torch.Tensor]:
        """qlinear.linear_many where some of `ws` are split: see split_linear."""
        return split_linear(x, ws, biases)


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
    blocks = [w for w in ws if isinstance(w, SplitWeight) and isinstance(w.cpu, BlockRows)]
    if blocks:  # the device computes its parts meanwhile; the CPU's blocks in one native call
        t0 = time.monotonic_ns()
        ys = iter(native.matmuls([w.cpu.job(x_cpu) for w in blocks]))
        blocks[0].meter.add(t0, time.monotonic_ns() - t0, sum(w.cpu.nbytes for w in blocks))
    out = []
    for w, b, y_dev in zip(ws, biases, dev):  # the device computes y_dev meanwhile
        if not isinstance(w, SplitWeight):
            out.append(y_dev)
            continue
        if isinstance(w.cpu, BlockRows):
            y_cpu = next(ys)
        else:
            t0 = time.monotonic_ns()
            y_cpu = w.cpu.matmul(x_cpu)
            w.meter.add(t0, time.monotonic_ns() - t0, w.cpu.nbytes)
        y_cpu = y_cpu.to(x.device, x.dtype)
        if b is not None:
            y_cpu = y_cpu + b[b.shape[0] - y_cpu.shape[-1]:]
        out.append(y_cpu if y_dev is None else torch.cat([y_dev, y_cpu], -1))
    return out
