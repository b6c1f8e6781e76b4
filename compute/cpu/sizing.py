"""Sizing the CPU share for the plan: which layers and matrices it can take, and the host memory
its packed weights need."""

from __future__ import annotations

from layerstream.compute.cpu import native
from layerstream.compute.cpu.packing import cpu_matrix_bytes, cpu_rows, cpu_types, native_blocks, split_types
from layerstream.compute.expert_layout import EXPERT_TENSORS
from layerstream.cpus import usable_cpus

FFN_MATRICES = ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")


def expert_cpu_layers(layouts) -> list:
    """The layers whose experts the CPU can take: gate, up and down each of a type it computes
    (4-bit packed, or the other block types dequantized: a Q4_K_M file's Q6_K downs)."""
    out, types = [], cpu_types()
    for lay in layouts:
        ts = {t.name: t for t in lay.tensors if t.name in EXPERT_TENSORS}
        if len(ts) == 3 and all(t.qtype in types for t in ts.values()):
            out.append(lay)
    return out


def experts_in_place(lay) -> bool:
    """Whether the CPU reads a layer's experts in place, as blocks: the native kernel reads all three
    of its expert matrices' types (NOTE [ CPU experts ] in cpu/experts.py). The plan's sizing and
    the running experts both ask this."""
    return native_blocks() and all(t.qtype in native.NATIVE_TYPES for t in lay.tensors if t.name in EXPERT_TENSORS)


def experts_read_in_place(layouts) -> bool:
    """Whether the CPU can take experts of these layers and reads every such layer's in place (what
    the default share asks: it packs nothing, NOTE in cpu/config.py)."""
    lays = expert_cpu_layers(layouts)
    return bool(lays) and all(experts_in_place(lay) for lay in lays)


def expert_packed_bytes(layouts, dtype_size: int = 2) -> int:
    """Host bytes of every expert of these layers in the CPU's form (what the CPU's experts may
    take): none where the native kernel reads all three of a layer's expert matrices in place
    (NOTE [ CPU experts ] in cpu/experts.py), else 4-bit matrices packed, others dequantized into
    values of `dtype_size` bytes."""
    n = 0
    for lay in expert_cpu_layers(layouts):
        if experts_in_place(lay):
            continue
        for t in (t for t in lay.tensors if t.name in EXPERT_TENSORS):
            E, N, K = t.shape
            n += E * cpu_matrix_bytes(t.qtype, N, K, dtype_size)
    return n


def int4_fraction(layouts) -> float:
    """The share of the layers' bytes that are matrices the CPU share can take (split_types: every
    type the native kernel reads, or without it the 4-bit ones)."""
    total = sum(t.nbytes for lay in layouts for t in lay.tensors)
    types = split_types()
    int4 = sum(t.nbytes for lay in layouts for t in lay.tensors if t.qtype in types and len(t.shape) == 2)
    return int4 / total if total else 0.0


def ffn_int4(lay) -> list:
    """The FFN matrices of a layer the CPU can take (split_types; what it takes of a layer in the
    "layers" split)."""
    types = split_types()
    return [t for t in lay.tensors if t.name in FFN_MATRICES and t.qtype in types and len(t.shape) == 2]


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
        return n + sum(cpu_matrix_bytes(t.qtype, t.shape[0], t.shape[1])
                       for lay in layouts if lay.layer in chosen for t in ffn_int4(lay))
    types = split_types()
    for lay in row_layers(layouts):
        for t in lay.tensors:
            if t.qtype in types and len(t.shape) == 2:
                N, K = t.shape
                n += cpu_matrix_bytes(t.qtype, cpu_rows(N, frac), K)
    return n


def threads_default() -> int:
    """CPU threads for the share: measured on a 16-core host, 12 threads read 73 GB/s and 8 read
    50 (int4, batch 1); the other processes (readers, coordinator) keep the rest."""
    n = usable_cpus()
    return max(1, n - 4) if n >= 8 else max(1, n - 1)
