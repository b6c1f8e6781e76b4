"""The CPU share's parts for the compute process, made in one place from its typed config."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layerstream.compute.cpu import balancer as bal
from layerstream.compute.cpu.calibrate import expert_seconds
from layerstream.compute.cpu.config import CpuShareConfig
from layerstream.compute.cpu.expert_split import ExpertSplit
from layerstream.compute.cpu.experts import CpuExperts
from layerstream.compute.cpu.packing import pack_ratio
from layerstream.compute.cpu.share import CpuShare
from layerstream.compute.cpu.sizing import (
    expert_cpu_layers,
    expert_packed_bytes,
    ffn_int4_fraction,
    int4_fraction,
    row_layers,
)
from layerstream.compute.expert_layout import EXPERT_TENSORS
from layerstream.loader.layout import LayerLayout
from layerstream.proto.timeline import Timeline


@dataclass(frozen=True)
class CpuParts:
    """The CPU's share of the dense streamed layers and of the streamed experts (None: none)."""

    share: CpuShare | None
    experts: CpuExperts | None


def make_cpu_parts(cfg: CpuShareConfig, streamed: list[LayerLayout], device: torch.device, dtype: torch.dtype,
                   timeline: Timeline, n_used: int | None = None) -> CpuParts:
    """The CPU's parts over the `streamed` layers; the CPU computes in bf16 beside a GPU, in the
    compute dtype on a CPU-only machine. n_used: the experts a token uses (None: not known)."""
    cpu_dtype = torch.bfloat16 if device.type == "cuda" else dtype
    return CpuParts(_make_share(cfg, streamed, device, cpu_dtype, timeline),
                    _make_experts(cfg, streamed, device, cpu_dtype, timeline, n_used))


def _make_experts(cfg: CpuShareConfig, streamed: list[LayerLayout], device: torch.device, dtype: torch.dtype,
                  timeline: Timeline, n_used: int | None = None) -> CpuExperts | None:
    """The CPU's share of a decode step's missing streamed experts (NOTE [ CPU experts ] in
    cpu/experts.py): a fixed fraction of each layer's, or on CUDA a count per layer and step from
    the experts' cost model (NOTE [ the experts' split ]: an expert's CPU time at each batch size,
    the link's GB/s and the host's round trip measured here, the CPU's time then followed in the
    run), kept where the passes' own timings show it faster than none."""
    lays = expert_cpu_layers(streamed)
    what = "missing experts of a decode step"
    if cfg.off or not cfg.pack_max or not lays:
        return None
    ratio = pack_ratio()
    split = None
    if cfg.auto:
        lay = lays[0]
        E, _, n_embd = lay.tensor(EXPERT_TENSORS[0]).shape
        per = sum(lay.tensor(n).nbytes for n in EXPERT_TENSORS) // E
        t_cpu = expert_seconds(lay, dtype, n_used)
        link = bal.measure_link_gbs(device)
        split = ExpertSplit(t_cpu, per / (link * 1e9), bal.measure_round_trip_s(device, n_embd))
        # (five passes a share: a decode pass takes tens of ms, and one share's passes differ)
        balancer = bal.Balancer({}, link, 1.0, ratio, 1.0, every=5, what=what, propose=1.0, detail=split.describe)
    else:
        f = min(cfg.fraction, 1.0)
        balancer = bal.Balancer({}, 0.0, 1.0, ratio, f, fixed=cfg.fixed(), what=what)
    size = torch.empty((), dtype=dtype).element_size()
    return CpuExperts(balancer, expert_packed_bytes(lays, size), dtype, timeline, split)


def _make_share(cfg: CpuShareConfig, streamed: list[LayerLayout], device: torch.device, dtype: torch.dtype,
                timeline: Timeline) -> CpuShare | None:
    """The CPU share (NOTE [ the CPU share ] in cpu/share.py): a fixed fraction, or on CUDA
    balanced from the CPU's int4 GB/s and the link's GB/s measured here, then from the passes' own
    timings. Only layers without experts are split (a MoE layer's share is its experts)."""
    streamed = row_layers(streamed)
    layers = cfg.split == "layers"
    c = ffn_int4_fraction(streamed) if layers else int4_fraction(streamed)
    what = "layers' 4-bit FFN matrices" if layers else "4-bit rows"
    if cfg.off or cfg.experts_only or not c or not cfg.pack_max:  # (the default share is experts' alone)
        return None
    ratio = pack_ratio()
    if cfg.auto:
        cpu, link = bal.measure_cpu_gbs(), bal.measure_link_gbs(device)
        f1 = bal.balanced_frac(cpu[1], link, c, ratio)
        pack = min(cfg.pack_max, 1.25 * f1)
        balancer = bal.Balancer(cpu, link, c, ratio, pack, what=what)
    else:
        pack = min(cfg.fraction, cfg.pack_max)
        balancer = bal.Balancer({}, 0.0, c, ratio, pack, fixed=cfg.fixed(), what=what)  # (each share at most pack)
    if not pack:
        return None
    return CpuShare(balancer, pack, dtype, timeline, cfg.split, streamed)
