"""Which layers a plan keeps resident: the first ones, or, for a mixture of experts whose experts
stream at decode, spread between the streamed ones.

NOTE [ resident layers between streamed ones ]
A streamed MoE layer's experts cannot cross PCIe before a router has named them: its own (the
misses), or the layer before's applied to that layer's input (the copies ahead: compute/experts.py,
NOTE [ expert prefetch ]). With the resident layers first, nothing predicted the first streamed
layer, and the link idled through the resident layers' compute, a good part of a batch-1 step
(BENCHMARKS.md, AG6). Spread between the streamed layers, each resident layer computes while the
link copies ahead the experts of the streamed layer after it, predicted by the streamed layer
before it: two layers ahead, a prediction nearly as good as the next layer's (BENCHMARKS.md, AO1).
Under uniform routing a resident layer holds its experts at the density an expert cache would, so
which layers stay resident barely changes the bytes a step moves; only when they cross.
Only where every layer's KV is on the device (a graph runs each run of resident layers:
compute/graphs.py, NOTE [ decode graphs ]) and the spread layers fit the budget as the first ones
did (a Q4_K_M file's layers differ in size: llama.cpp gives some a Q6_K ffn_down). Layer 0 stays
resident, so the step still starts with the graph that embeds its ids; the others sit at even
intervals after it.
"""

from __future__ import annotations


def spread(n: int, r: int) -> tuple[int, ...]:
    """r of n layers at even intervals, layer 0 first (NOTE above): no two adjacent while r <= n / 2."""
    if r >= n:
        return tuple(range(n))
    if r <= 0:
        return ()
    return (0, *(((k + 1) * n) // r for k in range(r - 1)))


def resident_layers(n: int, r: int, predicts_experts: bool, kv_on_device: bool) -> tuple[int, ...]:
    """The plan's r resident layers of n: spread where a mixture of experts streams its experts at
    decode and predicts them (`predicts_experts`) and its KV is on the device (NOTE above); else
    the first r. (The plan keeps the first r where the spread ones would not fit the budget.)"""
    return spread(n, r) if predicts_experts and kv_on_device else tuple(range(r))


def where(resident: tuple[int, ...]) -> str:
    """The plan line's words for resident layers that are not the first ones ("" where they are)."""
    if resident == tuple(range(len(resident))):
        return ""
    shown = ", ".join(map(str, resident[:4])) + (f" ... {resident[-1]}" if len(resident) > 4 else "")
    return f" (layers {shown}, between the streamed ones)"
