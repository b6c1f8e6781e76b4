"""What a pipeline run starts: the plan, the readers' share of the files, each child's config.

`make_launch` decides everything that is fixed for a run before a process starts (plan.py's
residency plan, the CPU share that fits, which reader reads what); `Launch` then makes the
configs the staging, reader and compute processes are spawned with (all at once: the arena
comes to the others in a message, NOTE [ the arena after Ready ] in pipeline.py), and the reads
of each layer as they go on the wire. Pipeline (pipeline.py) only starts them and runs the messages.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch

from layerstream.compute.compute_config import ComputeConfig, DevicePlan, ExpertStreamConfig
from layerstream.compute.cpu.config import DEFAULT_MIN_THREADS, CpuShareConfig
from layerstream.compute.cpu.sizing import experts_read_in_place, packed_bytes, threads_default
from layerstream.compute.slot_returns import DONE_BATCH
from layerstream.coordinator.pipeline_config import PipelineConfig
from layerstream.coordinator.plan import GiB, Plan, fit_budget, fit_cpu_share, make_plan
from layerstream.cpus import usable_cpus
from layerstream.loader import reader_proc, staging_proc
from layerstream.loader.gguf_index import ModelIndex
from layerstream.loader.layout import LayerLayout, layer_layouts
from layerstream.loader.reader import ReaderPlan, default_threads, readers_for
from layerstream.proto.child import ChildEndpoints
from layerstream.proto.messages import ByteRange

log = logging.getLogger("layerstream.pipeline")

# per layer: reader ident -> its ranges ([file index, offset, nbytes, slot offset] each)
LayerReads = dict[str, list[ByteRange]]


def compute_threads(asked: int | None, cuda: bool, share_off: bool, streams: bool, one_job: bool = False) -> int | None:
    """torch's CPU threads in the compute process: as --cpu-threads asks; beside a GPU, with a CPU
    share of streamed layers, threads_default(); on a GPU where nothing streams and the CPU computes
    no share, 1 (the process's own CPU work is each step's bookkeeping, and idle OpenMP threads
    slowed it: BENCHMARKS.md, R4); on the CPU for `one_job` (one prompt or a chat, no draft model:
    Budget.job) where nothing streams, every core: the readers are done after the load and the
    coordinator waits while a step computes, so the core the default leaves them sat idle
    (BENCHMARKS.md, V3); else None (the compute process's own default, all cores but one). A server
    keeps that core: its HTTP and tokenizing run beside the steps, and with the cores busy elsewhere
    too an all-core compute process's OpenMP waits held a stream's next token past a second."""
    if asked:
        return asked
    if cuda and not share_off and streams:
        return threads_default()
    if not cuda and not streams and one_job:
        return usable_cpus()
    return 1 if cuda and share_off and not streams else None


@dataclass(frozen=True)
class Launch:
    """A run's fixed decisions: the model, its device and sizes, the plan and the CPU share."""

    index: ModelIndex
    device: torch.device
    dtype: torch.dtype
    ctx: int
    max_seqs: int
    cfg: PipelineConfig
    sliding: bool  # the KV ring slides (--on-context-full slide)
    weights: str  # auto, quantized or dense (compute/device.py, keeps_quantized)
    layouts: tuple[LayerLayout, ...]
    readers: ReaderPlan
    plan: Plan
    cpu: CpuShareConfig  # the CPU share this run packs: the plan's fit of cfg.cpu.parsed

    @property
    def read_threads(self) -> int:
        """Each reader's threads: as asked, else the default's share among the readers, 2 at least
        (NOTE [ parallel reads ])."""
        return self.cfg.readers.threads or max(2, default_threads() // self.readers.n_readers)

    @property
    def whole_on_gpu(self) -> bool:
        """Every layer and its KV stay on a GPU: nothing streams."""
        return self.device.type == "cuda" and not self.plan.streamed and not self.plan.kv_on_host

    @property
    def steps_ahead(self) -> int:
        """Steps the engine core submits ahead of the one it collects (NOTE [ one step behind ] in
        core.py): 2 where the model is whole on a GPU (a small model's decode step can be shorter
        than a Forward's round trip through the sockets and the coordinator's loop), else 1 (on the
        CPU each step runs to its end, and a request's discarded step costs a whole pass)."""
        return 2 if self.whole_on_gpu else 1

    @property
    def warm_up_pays(self) -> bool:
        """Whether the engine warms up at start (NOTE [ warm-up ] in warm_up.py): where the model is
        whole on a GPU (a streamed model's pass would read every streamed layer once more)."""
        return self.whole_on_gpu

    @property
    def reader_ids(self) -> list[str]:
        return [f"reader-{r}" for r in range(self.readers.n_readers)]

    @property
    def max_msg_in(self) -> int:
        """The largest message a child may send: a step's logits (float32), or a traced run's stats."""
        return max(self.plan.step_tokens, self.max_seqs) * self.index.hparams.n_vocab * 4 + (64 << 20)

    @property
    def max_msg_out(self) -> int:
        """The largest message to a child: a Forward of step_tokens tokens with every sequence's
        slot positions."""
        return (self.plan.step_tokens * 3 + self.max_seqs * (self.ctx + 8)) * 9 + (4 << 20)

    def staging_config(self, endpoints: ChildEndpoints, parent_pid: int) -> staging_proc.StagingConfig:
        return staging_proc.StagingConfig("staging", self.plan.n_slots, self.plan.slot_bytes, endpoints, parent_pid,
                                          populate_threads=default_threads())

    def reader_config(self, r: int, endpoints: ChildEndpoints, parent_pid: int) -> reader_proc.ReaderConfig:
        return reader_proc.ReaderConfig(self.reader_ids[r], tuple(self.index.files), tuple(self.readers.files[r]),
                                        self.cfg.readers.direct, self.read_threads, endpoints, parent_pid,
                                        self.cfg.procs.trace)

    def compute_config(self, endpoints: ChildEndpoints, parent_pid: int) -> ComputeConfig:
        plan, cfg = self.plan, self.cfg
        threads = compute_threads(cfg.cpu.threads, self.device.type == "cuda", self.cpu.off, bool(plan.streamed),
                                  cfg.budget.job is not None)
        on_device = DevicePlan(plan.resident, plan.vram_slots, plan.kv_device_layers, plan.budget_bytes,
                               plan.step_tokens, plan.graph_rows, plan.logit_rows, plan.dequant_scratch,
                               plan.fused_rows)
        experts = ExpertStreamConfig(plan.expert_cache_bytes, plan.dense_resident, cfg.experts.policy,
                                     plan.expert_prefetch,
                                     DONE_BATCH if plan.cache_layers >= len(plan.streamed) else 1)
        return ComputeConfig(
            ident="compute", model_path=self.index.path, device=str(self.device),
            dtype=str(self.dtype).split(".")[-1], ctx=self.ctx, max_seqs=self.max_seqs, plan=on_device,
            weights=self.weights, layouts=[lay.to_wire() for lay in self.layouts], cpu_share=self.cpu,
            index=self._compute_index(), experts=experts, cpu_threads=threads, endpoints=endpoints,
            parent_pid=parent_pid, trace=cfg.procs.trace, sliding=self.sliding)

    def _compute_index(self) -> ModelIndex:
        """The index as the compute process gets it: without the tokenizer's metadata, which it never
        reads (Gemma 3's 262k-token vocabulary made a 5 MiB config to pickle and unpickle at start)."""
        return dataclasses.replace(self.index, metadata={k: v for k, v in self.index.metadata.items()
                                                         if not k.startswith("tokenizer.")})

    def reads(self) -> list[LayerReads]:
        """Each layer's reads, per reader, as they go on the wire (fixed for the run)."""
        fidx = {f: i for i, f in enumerate(self.index.files)}
        ids = self.reader_ids
        return [{ids[r]: [[fidx[x.file], x.file_offset, x.nbytes, x.slot_offset] for x in rr]
                 for r, rr in self.readers.split(i, lay.ranges()).items()}
                for i, lay in enumerate(self.layouts)]


def _gib(x: float | None) -> int | None:
    return None if x is None else int(x * GiB)


def make_launch(index: ModelIndex, device: torch.device, dtype: torch.dtype, ctx: int, max_seqs: int,
                cfg: PipelineConfig, sliding: bool = False, weights: str = "auto", draft=None,
                draft_tokens: int = 0) -> Launch:
    """Plan the run (ConfigError where the budgets cannot work); `draft`: a draft model's draft_plan.DraftMemory;
    `draft_tokens`: the tokens a sequence drafts a step (the draft model's or prompt lookup's; 0: none)."""
    from layerstream.compute.device import first_compile_note, keeps_quantized, weights_form

    layouts = layer_layouts(index)
    budget = cfg.budget
    readers = readers_for(index.files, cfg.readers.count, list(cfg.readers.dirs) or None)
    vram = _gib(budget.vram_gb)
    if vram is None and device.type == "cuda":
        vram = fit_budget(device)  # fit by default: a model larger than the GPU streams
    plan = make_plan(
        index, layouts, vram_bytes=vram, host_cache_bytes=_gib(budget.host_cache_gb),
        dtype_bytes=torch.finfo(dtype).bits // 8, ctx=ctx, max_seqs=max_seqs, prefetch=budget.prefetch,
        kv_on_host=budget.kv_on_host, resident_layers=budget.resident_layers,
        quantized=keeps_quantized(device, weights), device_type=device.type, step_tokens=budget.step_tokens,
        max_prefetch=index.hparams.n_layer, expert_cache_bytes=_gib(cfg.experts.cache_gb),
        moe_dense=cfg.experts.moe_dense, vram_slots=budget.vram_slots, expert_prefetch=cfg.experts.prefetch,
        draft=draft, draft_tokens=draft_tokens, evaluates=budget.evaluates, job=budget.job,
    )
    cpu, plan = fit_share(cfg.cpu.parsed, device.type, plan, layouts, cfg.cpu.threads)
    log.info("plan: %s", plan.describe())
    log.info("plan, device memory: %s", plan.breakdown())
    note = first_compile_note(weights_form(device, weights)) if device.type == "cuda" else None
    if note:
        log.warning(note)
    if plan.draft is not None and plan.draft.cost is not None and plan.draft.cost.warns():
        log.warning("%s; a larger --vram-gb keeps those layers, and --lookup drafts without memory", plan.draft.line())
    return Launch(index, device, dtype, ctx, max_seqs, cfg, sliding, weights, tuple(layouts), readers, plan, cpu)


def fit_share(asked: CpuShareConfig, device_type: str, plan: Plan, layouts: list[LayerLayout],
              threads: int | None = None) -> tuple[CpuShareConfig, Plan]:
    """The CPU share a run takes (none off CUDA for auto and the default), and the plan counting the
    host memory it packs: the default (cpu/config.py) only where the CPU reads every streamed
    layer's experts in place, packing nothing, with DEFAULT_MIN_THREADS threads at least (`threads`,
    --cpu-threads; None: the share's default); another share as much of it as fits beside the
    host cache (fit_cpu_share)."""
    cpu = asked.for_device(device_type)
    streamed = [layouts[i] for i in plan.streamed]
    if cpu.experts_only:
        n, in_place = threads or threads_default(), experts_read_in_place(streamed)
        if n < DEFAULT_MIN_THREADS and in_place:
            log.info("no CPU share by default: %d CPU threads for it, fewer than %d (--cpu-threads %d or more "
                     "takes it)", n, DEFAULT_MIN_THREADS, DEFAULT_MIN_THREADS)
        return (cpu if in_place and n >= DEFAULT_MIN_THREADS else CpuShareConfig(split=cpu.split)), plan
    cpu = cpu.with_pack_max(fit_cpu_share(plan, layouts, cpu.pack_max, not cpu.auto, cpu.split))
    return cpu, dataclasses.replace(plan, cpu_share_bytes=packed_bytes(streamed, cpu.pack_max, cpu.split))


class StartProgress:
    """How far a pipeline's start is, told to its PipelineConfig.on_progress: children ready, then
    layers read once (-v logs when every layer was, and at what rate)."""

    def __init__(self, launch: Launch, t_start: float):
        self.launch, self.t_start = launch, t_start
        self.reported: dict[str, int] = {}  # what -> done, as last reported

    def __call__(self, what: str, done: int) -> None:
        la = self.launch
        total = len(la.reader_ids) + 2 if what == "processes" else la.index.hparams.n_layer
        if not self.reported.get(what, -1) < done <= total:
            return
        self.reported[what] = done
        if what == "layers" and done == total:
            took = time.monotonic() - self.t_start
            gb = sum(lay.data_nbytes for lay in la.layouts) / 1e9
            log.info("every layer read once %.2f s after the pipeline's start (%.2f GB; %.2f GB/s since the start)",
                     took, gb, gb / max(took, 1e-9))
        if la.cfg.on_progress is not None:
            la.cfg.on_progress(done, total, what)
