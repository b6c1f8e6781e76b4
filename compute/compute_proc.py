"""The compute process: maps the staging arena, runs forward steps, keeps the KV cache."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from layerstream.compute.cpu.config import CpuShareConfig
from layerstream.compute.cpu.factory import make_cpu_parts
from layerstream.compute.device import keeps_quantized
from layerstream.compute.expert_stream import make_expert_stream
from layerstream.compute.model import SeqStep
from layerstream.compute.qlinear import FUSED_MIN_OF_TYPES, model_scratch_elems, reserve_scratch
from layerstream.compute.runner import ModelRunner
from layerstream.compute.streamed import StreamedLayers
from layerstream.compute.weights import GlobalWeights
from layerstream.loader.arena import Arena
from layerstream.loader.gguf_index import open_model
from layerstream.loader.layout import LayerLayout
from layerstream.proto.child import ChildEndpoints, ChildLinks, run_child
from layerstream.proto.messages import ArenaDesc, Forward, ForwardDone, LayerDone, LayerReady
from layerstream.proto.timeline import Timeline

DONE_BATCH = 2  # staging slots given back in one message in expert steps (NOTE [ slots given back ])


@dataclass(frozen=True)
class ComputeConfig:
    """Everything the compute process needs, built once by the coordinator."""

    ident: str
    model_path: str
    device: str
    dtype: str
    ctx: int
    max_seqs: int
    resident: tuple[int, ...]  # layers kept on the device after their first load
    vram_slots: int  # VRAM ring slots for streamed layers
    kv_device_layers: int  # layers 0..n-1 whose KV stays on the device; the rest in host memory
    arena: ArenaDesc
    layouts: list[Any]  # LayerLayout.to_wire() per layer
    endpoints: ChildEndpoints
    parent_pid: int
    trace: bool = False
    sliding: bool = False  # the KV ring slides: K is stored unrotated
    weights: str = "auto"  # auto (blocks on CUDA), quantized or dense: see device.keeps_quantized
    budget_bytes: int | None = None  # the plan's device budget: torch's allocator is capped at it
    step_tokens: int = 512  # tokens of one step at most (sizes the prompt path's scratch)
    cpu_share: CpuShareConfig = CpuShareConfig()  # the CPU's share of the streamed layers (compute/cpu/)
    cpu_threads: int | None = None  # torch's CPU threads (default: all cores but one)
    index: Any = None  # the coordinator's ModelIndex (parsed once; None: open model_path here)
    expert_cache_bytes: int = 0  # device memory for streamed experts (0: experts stream with their layer)
    dense_resident: bool = False  # streamed MoE layers keep all but their experts on the device
    expert_policy: str = "lfu"  # the expert cache's eviction (experts.ExpertCache)
    expert_prefetch: int = 0  # experts predicted and copied ahead a layer (experts.py, NOTE [ expert prefetch ])
    done_batch: int = 1  # slots given back a message in expert steps (NOTE [ slots given back ])


class ComputeWorker:
    """The compute role's logic over its links: one Forward at a time, layers as they are staged."""

    def __init__(self, cfg: ComputeConfig, links: ChildLinks):
        self.cfg, self.links = cfg, links
        self.tl = Timeline("compute", cfg.ident, trace=cfg.trace)
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = getattr(torch, cfg.dtype)
        self.arena = Arena.from_wire(cfg.arena)
        self.registered = False
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            if cfg.budget_bytes is not None:  # NOTE [ the plan counts every byte ] in plan.py
                total = torch.cuda.get_device_properties(self.device).total_memory
                torch.cuda.set_per_process_memory_fraction(min(1.0, cfg.budget_bytes / total), self.device)
            self._register_arena()
        index = cfg.index if cfg.index is not None else open_model(cfg.model_path)
        quantized = keeps_quantized(self.device, cfg.weights)
        if quantized and self.device.type == "cuda" and max(cfg.step_tokens, cfg.max_seqs) > FUSED_MIN_OF_TYPES:
            reserve_scratch(self.device, self.dtype, model_scratch_elems(index))
        self.glob = GlobalWeights(index, self.device, self.dtype, quantized=quantized)
        self.ready_slots: dict[tuple[int, int], int] = {}  # (step, layer) -> staging slot
        self.done: list[list[int]] = []  # [layer, slot] given back, not yet sent (NOTE [ slots given back ])
        self.done_step = 0
        layouts = [LayerLayout.from_wire(w) for w in cfg.layouts]
        resident = set(cfg.resident)
        cpu = make_cpu_parts(cfg.cpu_share, [lay for i, lay in enumerate(layouts) if i not in resident],
                             self.device, self.dtype, self.tl)
        self.share, self.cpu_experts = cpu.share, cpu.experts
        hp = index.hparams
        experts = make_expert_stream(layouts, resident, (hp.n_expert, hp.n_expert_used), cfg.expert_cache_bytes,
                                     cfg.dense_resident, cfg.expert_policy, cfg.expert_prefetch, self.cpu_experts,
                                     self.device, self.dtype, quantized, self.tl, self.arena.slot_array,
                                     self._layer_done)
        self.source = StreamedLayers(layouts, self.arena.slot_array, self.ready_slots, self._pump, self._layer_done,
                                     self.device, self.dtype, resident, cfg.vram_slots, self.tl, quantized=quantized,
                                     share=self.share, experts=experts)
        self.expert_steps = self.expert_tokens = 0
        self.runner = ModelRunner(index.hparams, self.glob, self.source, self.device, self.dtype,
                                  ctx=cfg.ctx, max_seqs=cfg.max_seqs, kv_device_layers=cfg.kv_device_layers,
                                  sliding=cfg.sliding, triton_attention=quantized,
                                  graph_max_tokens=FUSED_MIN_OF_TYPES if quantized else 0)

    def _register_arena(self) -> None:
        """Pin the staging arena for DMA (cudaHostRegister), so copies run at full PCIe speed."""
        base, size = self.arena.slot_address(0), self.arena.nbytes
        err = torch.cuda.cudart().cudaHostRegister(base, size, 0)
        self.registered = int(err) == 0 if not isinstance(err, tuple) else int(err[0]) == 0

    def _pump(self, block: bool) -> None:
        """Take in one message (waiting for it when `block`), or all that are queued."""
        if block:
            self._send_done()  # the coordinator may be waiting for them
        while True:
            msg = self.links.recv(None if block else 0)
            if msg is None:
                return
            self._take(msg)
            if block:
                return

    def _take(self, msg) -> None:
        """Note a LayerReady (also one sent early for the next step); count anything else."""
        if isinstance(msg, LayerReady):
            for layer, slot in msg.ready:
                self.ready_slots[(msg.step, layer)] = slot
        else:  # a Forward in the middle of a step is out of order: counted and dropped
            self.tl.incr("unexpected_messages")

    def _layer_done(self, step: int, layer: int, slot: int) -> None:
        """NOTE [ slots given back ]
        A streamed MoE layer's staging slot goes back after its work on the device, one layer or
        more behind. Where the host cache holds every streamed layer (the plan says so:
        `done_batch` > 1), no reader waits for a slot and the coordinator does not wait for it.
        A MoE decode step is bound by the host, and a profile of it gave an eighth of a streamed
        layer's host time to its two messages
        (this one and the LayerReady it answers), so in expert steps slots then go back DONE_BATCH
        at a time, and the rest before compute waits for the coordinator and at the step's end.
        Each message lets the coordinator announce up to `prefetch` more cached layers at once
        (stream_core.py), so announcements still run ahead of compute: a layer copies the next
        layer's predicted experts only if that layer is announced. With 4 a message and
        announcements one message late, they fell behind, and fewer experts were copied ahead
        (a third of the chosen experts against a half). Other steps give each
        slot back at once, as do all steps where layers are read from disk: a reader may be
        waiting for the slot."""
        self.done.append([layer, slot])
        self.done_step = step
        if len(self.done) >= self.cfg.done_batch or not self.source.expert_step:
            self._send_done()

    def _send_done(self) -> None:
        if self.done:
            self.links.send(LayerDone(self.done_step, self.done))
            self.done = []

    def stats(self) -> dict[str, Any]:
        snap = self.tl.snapshot()
        snap["bad_messages"] = self.links.bad.stats()
        snap["pinned"] = self.registered
        if self.device.type == "cuda":
            snap["device_peak_bytes"] = torch.cuda.max_memory_reserved(self.device)
        cache = self.source.expert_cache
        if cache is not None:
            snap["experts"] = {"policy": cache.kept.policy, "hits": cache.hits, "misses": cache.misses,
                               "bytes": cache.bytes_moved, "prefetch_hits": cache.ahead.hits, "prefetched": cache.ahead.copied,
                               "steps": self.expert_steps, "tokens": self.expert_tokens}
        if self.cpu_experts is not None:
            ce = self.cpu_experts
            snap["experts"]["cpu"] = ce.computed
            snap["cpu_experts"] = (f"{ce.balancer.describe()}; {ce.computed} computed; "
                                   f"packed {ce.packed_bytes / 2**30:.2f} GiB")
        if self.share is not None:
            snap["cpu_share"] = (f"{self.share.balancer.describe()}; {torch.get_num_threads()} threads; "
                                 f"packed {sum(p.nbytes for d in self.share.packed.values() for p in d.values()) / 2**30:.2f} GiB")
        return snap

    def _gpu_timeline(self) -> tuple[float, int]:
        """Turn the step's CUDA event pairs into timeline intervals (one sync per step); returns
        the seconds and bytes of the step's host-to-device copies."""
        evs = self.source.ring.gpu_events if self.device.type == "cuda" else []
        copy_s, copy_bytes = 0.0, 0
        if not evs:
            return copy_s, copy_bytes
        torch.cuda.synchronize(self.device)
        ref = torch.cuda.Event(enable_timing=True)
        ref.record()
        ref.synchronize()
        ref_ns = time.monotonic_ns()
        for cat, layer, a, b, nbytes in evs:
            t0 = ref_ns - int(a.elapsed_time(ref) * 1e6)
            dur = int(a.elapsed_time(b) * 1e6)
            self.tl.add(cat, f"{cat} L{layer}", t0, dur, nbytes, layer=layer)
            if cat == "copy":
                copy_s, copy_bytes = copy_s + dur / 1e9, copy_bytes + nbytes
        evs.clear()
        return copy_s, copy_bytes

    def forward(self, msg: Forward):
        seqs = [SeqStep(s.row, s.tokens, s.slots, s.positions, s.kv_pos) for s in msg.seqs]
        tokens = sum(len(s.tokens) for s in seqs)
        self.source.set_step(msg.step, tokens)
        if self.source.expert_step:
            self.expert_steps, self.expert_tokens = self.expert_steps + 1, self.expert_tokens + tokens
        t0 = time.monotonic_ns()
        logits = self.runner.step(seqs, msg.want_logits)
        out = None if logits is None else logits.float().cpu().numpy()
        self.source.return_slots()
        self._send_done()
        self.tl.add("step", f"step {msg.step}", t0, time.monotonic_ns() - t0, step=msg.step, tokens=tokens)
        copy_s, copy_bytes = self._gpu_timeline()
        pass_s = (time.monotonic_ns() - t0) / 1e9
        if self.source.expert_step and self.cpu_experts is not None:  # (its dense layers are not split)
            sec, nbytes, _ = self.cpu_experts.meter.take()  # (a pass's packing is a one-off: left out)
            self.cpu_experts.balancer.observe(tokens, pass_s - self.cpu_experts.take_pack_s(), sec, nbytes, 0.0, 0)
        elif self.share is not None:
            self.share.balancer.observe(tokens, pass_s - self.share.take_pack_s(), self.share.step_s,
                                        self.share.step_bytes, copy_s, copy_bytes)
        shape = [] if out is None else list(out.shape)
        self.links.send(ForwardDone(msg.step, shape, "float32", {}), extra=[] if out is None else [out.data])

    def run(self) -> None:
        self.links.ready({"pinned": self.registered, "device": str(self.device)})
        while True:
            msg = self.links.recv()
            if isinstance(msg, Forward):
                self.forward(msg)
            elif msg is not None:
                self._take(msg)

    def close(self) -> None:
        if self.registered:
            torch.cuda.cudart().cudaHostUnregister(self.arena.slot_address(0))
        self.arena.close()


def main(cfg: ComputeConfig) -> None:
    """Process entry point (multiprocessing spawn target)."""
    worker: list[ComputeWorker] = []

    def body(links: ChildLinks) -> None:
        # NOTE: OpenMP threads spin at barriers; sharing the cores with the coordinator and the
        # readers, a compute process using every core stalls each op (measured here: 40 ms instead
        # of 2 ms per dequantized tensor on 2 cores). Leave one core to the other processes.
        torch.set_num_threads(cfg.cpu_threads or max(1, (os.cpu_count() or 2) - 1))
        w = ComputeWorker(cfg, links)
        worker.append(w)
        try:
            w.run()
        finally:
            w.close()

    run_child("compute", cfg.ident, cfg.endpoints, cfg.parent_pid, body,
              stats=lambda: worker[0].stats() if worker else {})

