"""The compute process's config: built once by the coordinator (launch.py), pickled to the child at spawn;
the arena comes later, in a message (NOTE [ the arena after Ready ] in coordinator/pipeline.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from layerstream.compute.cpu.config import CpuShareConfig
from layerstream.loader.gguf_index import ModelIndex
from layerstream.proto.child import ChildEndpoints


@dataclass(frozen=True)
class DevicePlan:
    """The plan's figures the compute process applies (coordinator/plan.py, make_plan)."""

    resident: tuple[int, ...] = ()  # layers kept on the device after their first load
    vram_slots: int = 2  # VRAM ring slots for streamed layers
    kv_device_layers: int = 0  # layers 0..n-1 whose KV stays on the device; the rest in host memory
    budget_bytes: int | None = None  # the plan's device budget: torch's allocator is capped at it
    step_tokens: int = 512  # tokens of one step at most (sizes the prompt path's scratch)
    graph_rows: int = 1  # decode steps of up to this many rows replay graphs (the plan counted their memory)
    logit_rows: int = 64  # rows of logits a step holds at once, wider heads in chunks (plan.py; 64: qlinear.HEAD_CHUNK)
    dequant_scratch: bool = True  # reserve the prompt path's dequantization buffer (the plan counted it)
    fused_rows: int = 0  # a step of up to this many rows dequantizes nothing: the buffer may be lent meanwhile

    def graph_max_tokens(self, quantized: bool) -> int:
        """The largest decode batch the runner captures: the plan's, whose memory it counted
        (memory.Sizes.graphs; a verifying step's rows beyond it run eagerly: runner.py NOTE [ drafts
        verified as decode rows ]); none without the Triton kernels' blocks."""
        return self.graph_rows if quantized else 0


@dataclass(frozen=True)
class ExpertStreamConfig:
    """How streamed MoE layers' experts reach the device (compute/expert_stream.py)."""

    cache_bytes: int = 0  # device memory for streamed experts (0: experts stream with their layer)
    dense_resident: bool = False  # streamed MoE layers keep all but their experts on the device
    policy: str = "lfu"  # the expert cache's eviction (experts.ExpertCache)
    prefetch: int = 0  # experts predicted and copied ahead a layer (experts.py, NOTE [ expert prefetch ])
    done_batch: int = 1  # slots given back a message in expert steps (slot_returns.py, NOTE [ slots given back ])


@dataclass(frozen=True)
class ComputeConfig:
    """Everything the compute process needs, built once by the coordinator."""

    ident: str
    model_path: str
    device: str
    dtype: str
    ctx: int
    max_seqs: int
    layouts: list[Any]  # LayerLayout.to_wire() per layer
    endpoints: ChildEndpoints
    parent_pid: int
    plan: DevicePlan = DevicePlan()
    trace: bool = False
    sliding: bool = False  # the KV ring slides: K is stored unrotated
    weights: str = "auto"  # auto (blocks on CUDA), quantized or dense: see device.keeps_quantized
    cpu_share: CpuShareConfig = CpuShareConfig()  # the CPU's share of the streamed layers (compute/cpu/)
    cpu_threads: int | None = None  # torch's CPU threads (default: all cores but one)
    index: ModelIndex | None = None  # the coordinator's (parsed once; None: open model_path here)
    experts: ExpertStreamConfig = ExpertStreamConfig()
