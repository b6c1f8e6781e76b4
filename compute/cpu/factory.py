"""The CPU share's parts for the compute process, made in one place from its typed config."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layerstream.compute.cpu import balancer as bal
from layerstream.compute.cpu.config import CpuShareConfig
from layerstream.compute.cpu.experts import CpuExperts
from layerstream.compute.cpu.packing import pack_ratio
from layerstream.compute.cpu.share import CpuShare
from layerstream.compute.cpu.sizing import (
    expert_int4_layers,
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
                   timeline: Timeline) -> CpuParts:
    """The CPU's parts over the `streamed` layers; the CPU computes in bf16 beside a GPU, in the
    compute dtype on a CPU-only machine."""
    cpu_dtype = torch.bfloat16 if device.type == "cuda" else dtype
    return CpuParts(_make_share(cfg, streamed, device, cpu_dtype, timeline),
                    _make_experts(cfg, streamed, device, cpu_dtype, timeline))


def _make_experts(cfg: CpuShareConfig, streamed: list[LayerLayout], device: torch.device, dtype: torch.dtype,
                  timeline: Timeline) -> CpuExperts | None:
    """The CPU's share of a decode step's missing streamed experts (NOTE [ CPU experts ] in
    cpu/experts.py): fixed, or on CUDA proposed from one expert's CPU time and the link's GB/s
    measured here, then chosen from the passes' own timings."""
    lays = expert_int4_layers(streamed)
    what = "missing experts of a decode step"
    if cfg.off or not cfg.pack_max or not lays:
        return None
    ratio = pack_ratio()
    if cfg.auto:
        _, n_ff, n_embd = lays[0].tensor("ffn_gate_exps.weight").shape
        per = sum(lays[0].tensor(n).nbytes for n in EXPERT_TENSORS) // lays[0].tensor(EXPERT_TENSORS[0]).shape[0]
        t_cpu = bal.measure_expert_s(n_ff, n_embd, dtype)
        cpu = per * ratio / t_cpu / 1e9  # as packed GB/s, which is what the balancer weighs
        # (five passes a share: a decode pass takes tens of ms, and one share's passes differ)
        balancer = bal.Balancer({b: cpu for b in bal.BUCKETS}, bal.measure_link_gbs(device), 1.0, ratio, 1.0,
                                every=5, what=what)
    else:
        f = min(cfg.fraction, 1.0)
        balancer = bal.Balancer({}, 0.0, 1.0, ratio, f, fixed=f, what=what)
    return CpuExperts(balancer, expert_packed_bytes(lays), dtype, timeline)


def _make_share(cfg: CpuShareConfig, streamed: list[LayerLayout], device: torch.device, dtype: torch.dtype,
                timeline: Timeline) -> CpuShare | None:
    """The CPU share (NOTE [ the CPU share ] in cpu/share.py): a fixed fraction, or on CUDA
    balanced from the CPU's int4 GB/s and the link's GB/s measured here, then from the passes' own
    timings. Only layers without experts are split (a MoE layer's share is its experts)."""
    streamed = row_layers(streamed)
    layers = cfg.split == "layers"
    c = ffn_int4_fraction(streamed) if layers else int4_fraction(streamed)
    what = "layers' 4-bit FFN matrices" if layers else "4-bit rows"
    if cfg.off or not c or not cfg.pack_max:
        return None
    ratio = pack_ratio()
    if cfg.auto:
        cpu, link = bal.measure_cpu_gbs(), bal.measure_link_gbs(device)
        f1 = bal.balanced_frac(cpu[1], link, c, ratio)
        pack = min(cfg.pack_max, 1.25 * f1)
        balancer = bal.Balancer(cpu, link, c, ratio, pack, what=what)
    else:
        pack = min(cfg.fraction, cfg.pack_max)
        balancer = bal.Balancer({}, 0.0, c, ratio, pack, fixed=pack, what=what)
    if not pack:
        return None
    return CpuShare(balancer, pack, dtype, timeline, cfg.split, streamed)
