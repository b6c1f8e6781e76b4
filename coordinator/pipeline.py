"""The streaming pipeline's coordinator loop: processes, sockets, and the scheduling core's messages.

`Pipeline` is a step backend for `Engine` (the same API as the in-process `ModelRunner`): each
`step()` sends a Forward to the compute process and then feeds it layers, asking readers for
the bytes of upcoming layers `prefetch` ahead, across the end of one pass into the next. The
decisions (which layer, which slot, retries, a restarted reader's reads) are `StreamCore`'s
(stream_core.py), plain logic fed decoded messages; this class owns the sockets, the
processes, the message checks and the watchdog. The asyncio loop (uvloop) runs inside
`step()` and during start and stop.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zmq
import zmq.asyncio

from layerstream.compute import compute_proc
from layerstream.compute.cpu import config as cpu_config
from layerstream.compute.cpu import sizing as cpu_sizing
from layerstream.compute.model import SeqStep
from layerstream.coordinator.plan import GiB, Plan, fit_budget, fit_cpu_share, make_plan
from layerstream.coordinator.stream_core import StreamCore
from layerstream.coordinator.supervisor import Supervisor
from layerstream.errors import ConfigError, PipelineError
from layerstream.loader import reader_proc, staging_proc
from layerstream.loader.arena import remove_orphan
from layerstream.loader.gguf_index import ModelIndex
from layerstream.loader.layout import layer_layouts
from layerstream.loader.reader import readers_for
from layerstream.proto.addresses import cleanup_run_dir, make_endpoints, make_run_dir
from layerstream.proto.codec import BadMessageCounter, ProtocolError, encode, from_wire
from layerstream.proto.messages import (
    ArenaDesc, Failed, Forward, ForwardSeq, ForwardDone, LayerDone, LayerStaged, ReadFailed, Ready, Shutdown,
    StatsReply, StatsRequest,
)
from layerstream.proto.timeline import Timeline, stats_table, write_chrome_trace

log = logging.getLogger("layerstream.pipeline")

# which child roles may send each message type to the coordinator (others are dropped)
SENDERS = {
    Ready: {"staging", "reader", "compute"},
    LayerStaged: {"reader"},
    ReadFailed: {"reader"},
    LayerDone: {"compute"},
    ForwardDone: {"compute"},
}


@dataclass(frozen=True)
class PipelineConfig:
    """Budgets and process options of the streaming pipeline."""

    readers: int = 1
    reader_dirs: tuple[str, ...] = ()
    direct: bool = False
    vram_gb: float | None = None
    host_cache_gb: float | None = None
    prefetch: int | None = None
    kv_on_host: bool | None = None
    resident_layers: int | None = None
    step_tokens: int | None = None  # tokens of one forward step at most (default: from the budget)
    transport: str = "ipc"
    host: str = "127.0.0.1"
    trace: bool = False
    ready_timeout_s: float = 180.0
    stall_timeout_s: float = 120.0  # a step with no message from the compute process for so long ends the run
    # the CPU's share of the streamed layers (compute/cpu/): 0 (default), auto (timed and
    # chosen per batch size on CUDA: faster on a 70B, with host memory and packing time to pay,
    # BENCHMARKS.md) or a fraction
    cpu_share: str = "0"
    cpu_split: str = "layers"  # what the share splits: "layers" (whole FFN matrices of some layers) or "rows"
    vram_slots: int | None = None  # the streamed layers' VRAM slots under a budget (plan.make_plan; default 2)
    cpu_threads: int | None = None  # CPU threads of the compute process (default: cpu/sizing.threads_default)
    expert_cache_gb: float | None = None  # device memory for streamed experts (default: one layer's slot)
    moe_dense: str = "resident"  # streamed MoE layers' attention and routers: resident (when they fit) or stream
    expert_policy: str = "lfu"  # the expert cache's eviction: lfu or lru (compute/experts.py, ExpertCache)
    expert_prefetch: int | None = None  # experts predicted and copied ahead a layer (None: the plan's default; 0: off)


AUTO_PACK_MAX = 0.9  # the largest CPU share "auto" may pack (the plan counts its host memory)


def parse_cpu_share(value: str) -> str:
    """'auto', '0' or a fraction in (0, 1] as a canonical string; anything else is a ConfigError."""
    v = str(value).strip().lower()
    if v in ("auto", "0", "off"):
        return "0" if v == "off" else v
    try:
        f = float(v)
    except ValueError:
        f = float("nan")
    if not 0 <= f <= 1:
        raise ConfigError(f"--cpu-share {value!r}: give auto, 0 or a fraction from 0 to 1")
    return "0" if f == 0 else repr(f)


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # uvloop does not exist on Windows
        return asyncio.new_event_loop()


class Pipeline:
    """Step backend over reader, staging and compute processes."""

    def __init__(self, index: ModelIndex, device: torch.device, dtype: torch.dtype, ctx: int, max_seqs: int,
                 cfg: PipelineConfig, sliding: bool = False, weights: str = "auto"):
        self.sliding = sliding
        self.index, self.hparams, self.cfg = index, index.hparams, cfg
        self.ctx, self.max_seqs = ctx, max_seqs
        self.device, self.dtype = device, dtype
        self.layouts = layer_layouts(index)
        if cfg.readers < 1:
            raise ConfigError(f"--readers {cfg.readers}: must be at least 1")
        if cfg.reader_dirs and len(cfg.reader_dirs) != cfg.readers:
            raise ConfigError(f"--reader-dir given {len(cfg.reader_dirs)} times for --readers {cfg.readers}; give one per reader")
        self.reader_plan = readers_for(index.files, cfg.readers, list(cfg.reader_dirs) or None)
        from layerstream.compute.device import keeps_quantized

        self.weights = weights
        self.cpu_share = parse_cpu_share(cfg.cpu_share)
        if self.cpu_share == "auto" and device.type != "cuda":
            self.cpu_share = "0"  # on a CPU-only machine the "device" is the CPU already
        self.cpu_pack_max = AUTO_PACK_MAX if self.cpu_share == "auto" else float(self.cpu_share)
        if cfg.cpu_split not in cpu_sizing.SPLITS:
            raise ConfigError(f"--cpu-split {cfg.cpu_split!r}: use one of {', '.join(cpu_sizing.SPLITS)}")
        if cfg.cpu_threads is not None and cfg.cpu_threads < 1:
            raise ConfigError(f"--cpu-threads {cfg.cpu_threads}: must be at least 1")
        vram = None if cfg.vram_gb is None else int(cfg.vram_gb * GiB)
        if vram is None and device.type == "cuda":
            vram = fit_budget(device)  # fit by default: a model larger than the GPU streams
        self.plan: Plan = make_plan(
            index, self.layouts, vram_bytes=vram,
            host_cache_bytes=None if cfg.host_cache_gb is None else int(cfg.host_cache_gb * GiB),
            dtype_bytes=torch.finfo(dtype).bits // 8, ctx=ctx, max_seqs=max_seqs, prefetch=cfg.prefetch,
            kv_on_host=cfg.kv_on_host, resident_layers=cfg.resident_layers,
            quantized=keeps_quantized(device, weights), step_tokens=cfg.step_tokens,
            max_prefetch=self.hparams.n_layer,
            expert_cache_bytes=None if cfg.expert_cache_gb is None else int(cfg.expert_cache_gb * GiB),
            moe_dense=cfg.moe_dense, vram_slots=cfg.vram_slots, expert_prefetch=cfg.expert_prefetch,
        )
        self.cpu_pack_max = fit_cpu_share(self.plan, self.layouts, self.cpu_pack_max, self.cpu_share != "auto",
                                          cfg.cpu_split)
        if not self.cpu_pack_max:
            self.cpu_share = "0"
        self.plan = dataclasses.replace(self.plan, cpu_share_bytes=cpu_sizing.packed_bytes(
            [self.layouts[i] for i in self.plan.streamed], self.cpu_pack_max, cfg.cpu_split))
        self.step_tokens = self.plan.step_tokens
        log.info("plan: %s", self.plan.describe())
        log.info("plan, device memory: %s", self.plan.breakdown())
        self.tl = Timeline("coordinator", "0", trace=cfg.trace)
        self.core = StreamCore(self.plan, self.hparams.n_layer)  # the scheduling; this class is its loop
        self.sup = Supervisor()
        self.loop = new_loop()
        self.zctx = zmq.asyncio.Context()
        self.socks: dict[str, zmq.asyncio.Socket] = {}
        self.bad = BadMessageCounter("coordinator", log)
        self.run_dir: str | None = None
        self.closed = False
        self.failure: str | None = None
        self.done: Any = None
        self.stats_replies: dict[str, dict] = {}
        self.heard: dict[str, float] = {}  # child -> when its last message came (the watchdog)
        self.t_start = time.monotonic()
        try:
            self.loop.run_until_complete(self._start())
        except BaseException:
            self.close()
            raise
        atexit.register(self.close)  # an API user who never calls close() leaves nothing behind

    # -- start -----------------------------------------------------------------------------------

    async def _start(self) -> None:
        cfg = self.cfg
        self.run_dir = make_run_dir() if cfg.transport == "ipc" else None
        ep = make_endpoints(cfg.transport, self.run_dir, cfg.host)
        bound = {}
        from layerstream.proto.sockets import Curve, make_router

        self.curve = Curve.new() if cfg.transport == "tcp" else None
        # NOTE: the largest legitimate message to the coordinator is a step's logits (float32),
        # or a traced run's stats; to a child, a Forward of step_tokens tokens with every
        # sequence's slot positions.
        hp = self.hparams
        self.max_msg_in = max(self.plan.step_tokens, self.max_seqs) * hp.n_vocab * 4 + (64 << 20)
        self.max_msg_out = (self.plan.step_tokens * 3 + self.max_seqs * (self.ctx + 8)) * 9 + (4 << 20)
        for name in ("control", "readers", "compute"):
            self.socks[name], bound[name] = make_router(self.zctx, getattr(ep, name), self.curve, self.max_msg_in)
        self.ep = ep.bound(**bound)
        self.poller = zmq.asyncio.Poller()
        for s in self.socks.values():
            self.poller.register(s, zmq.POLLIN)
        pid = os.getpid()

        def eps(work: str) -> dict:
            return {"control": self.ep.control, "work": getattr(self.ep, work), "max_msg": self.max_msg_out,
                    "curve": None if self.curve is None else tuple(self.curve.for_client())}

        st = self.sup.start("staging", "staging", staging_proc.main, staging_proc.StagingConfig(
            "staging", self.plan.n_slots, self.plan.slot_bytes, eps("readers"), pid))
        await self._wait_ready([st.ident])
        self.arena = from_wire(ArenaDesc, st.ready.get("arena"))
        files = tuple(self.index.files)
        self.reader_ids = []
        for r in range(self.reader_plan.n_readers):
            ident = f"reader-{r}"
            self.sup.start("reader", ident, reader_proc.main, reader_proc.ReaderConfig(
                ident, files, tuple(self.reader_plan.files[r]), cfg.direct, self.arena, eps("readers"), pid, cfg.trace))
            self.reader_ids.append(ident)
        self.sup.start("compute", "compute", compute_proc.main, compute_proc.ComputeConfig(
            ident="compute", model_path=self.index.path, device=str(self.device), dtype=str(self.dtype).split(".")[-1],
            ctx=self.ctx, max_seqs=self.max_seqs, resident=self.plan.resident, vram_slots=self.plan.vram_slots,
            kv_device_layers=self.plan.kv_device_layers, weights=self.weights, budget_bytes=self.plan.budget_bytes,
            step_tokens=self.plan.step_tokens, arena=self.arena, layouts=[lay.to_wire() for lay in self.layouts],
            cpu_share=cpu_config.parse_cpu_share(self.cpu_share, cfg.cpu_split).with_pack_max(self.cpu_pack_max),
            index=self.index,
            expert_cache_bytes=self.plan.expert_cache_bytes, dense_resident=self.plan.dense_resident,
            expert_policy=cfg.expert_policy, expert_prefetch=self.plan.expert_prefetch,
            done_batch=compute_proc.DONE_BATCH if self.plan.cache_layers >= len(self.plan.streamed) else 1,
            cpu_threads=cfg.cpu_threads or (cpu_sizing.threads_default() if self.cpu_share != "0" and self.plan.streamed
                                            and self.device.type == "cuda" else None),
            endpoints=eps("compute"), parent_pid=pid, trace=cfg.trace, sliding=self.sliding))
        await self._wait_ready(self.reader_ids + ["compute"])
        # each layer's reads, per reader, as they go on the wire: fixed for the run
        fidx = {f: i for i, f in enumerate(files)}
        await self._send_all(self.core.set_reads([  # and start loading the first layers at once
            {self.reader_ids[r]: [[fidx[x.file], x.file_offset, x.nbytes, x.slot_offset] for x in rr]
             for r, rr in self.reader_plan.split(i, lay.ranges()).items()}
            for i, lay in enumerate(self.layouts)
        ]))

    async def _wait_ready(self, idents: list[str]) -> None:
        deadline = time.monotonic() + self.cfg.ready_timeout_s

        def all_ready():
            return all(self.sup.children[i].ready is not None for i in idents)

        await self._run_until(all_ready, deadline, f"start of {', '.join(idents)}")

    # -- the message loop ------------------------------------------------------------------------

    async def _run_until(self, cond, deadline: float | None = None, what: str = "",
                         stall: tuple[str, float] | None = None) -> None:
        """Serve messages until cond(); a `stall` (child, seconds) with no message from that child
        for so long ends the run (the watchdog: a stopped or hung process never hangs the user)."""
        while not cond():
            self.failure = self.failure or self.core.failure
            if self.failure:
                raise PipelineError(self.failure)
            if deadline is not None and time.monotonic() > deadline:
                raise PipelineError(f"timed out waiting for the {what} after {self.cfg.ready_timeout_s:.0f} s; "
                                    "run with -v to see what each process logged")
            if stall is not None and time.monotonic() - self.heard.get(stall[0], time.monotonic()) > stall[1]:
                self.failure = (f"the {stall[0]} process sent nothing for {stall[1]:g} s while a step was pending "
                                f"(stalled: stopped, hung or swapping); raise --stall-timeout if that is expected")
                raise PipelineError(self.failure)
            await self._serve(100)
            await self._check_children()

    async def _serve(self, timeout_ms: int) -> None:
        events = await self.poller.poll(timeout_ms)
        for sock, _ in events:
            frames = await sock.recv_multipart()
            ident, frames = frames[0].decode(errors="replace"), frames[1:]
            self.heard[ident] = time.monotonic()
            dec = self.bad.decode(frames, ident)
            if dec is not None:
                await self._dispatch(ident, dec.msg, dec.extra, sock is self.socks["control"])

    def _refuse(self, ident: str, why: str) -> bool:
        """Count and drop a message that a peer may not send or whose fields are wrong."""
        self.bad.record(ProtocolError(why), ident)
        return False

    def _acceptable(self, ident: str, msg, extra) -> bool:
        """Whether `msg` may come from `ident` (by its role) and its fields are in range."""
        c = self.sup.children.get(ident)
        if c is None:
            return self._refuse(ident, f"{type(msg).__name__} from {ident!r}, which is no child of this run")
        allowed = SENDERS.get(type(msg))
        if allowed is not None and c.role not in allowed:
            return self._refuse(ident, f"{type(msg).__name__} from the {c.role} {ident}, which never sends it")
        if isinstance(msg, ForwardDone):
            shape_ok = all(isinstance(d, int) and d >= 0 for d in msg.shape)
            nbytes = len(memoryview(extra[0])) if extra else 0
            if msg.dtype != "float32" or len(extra) > 1 or not shape_ok or (
                    msg.shape != [] if not extra else len(msg.shape) != 2 or math.prod(msg.shape) * 4 != nbytes):
                return self._refuse(ident, f"ForwardDone with dtype {msg.dtype!r} shape {msg.shape} and "
                                           f"{nbytes} bytes of logits")
        elif isinstance(msg, LayerDone):
            for layer, slot in msg.done:
                if not (layer < self.hparams.n_layer and slot < self.plan.n_slots):
                    return self._refuse(ident, f"LayerDone for layer {layer} slot {slot}, out of range")
        return True

    async def _dispatch(self, ident: str, msg, extra, on_control: bool) -> None:
        log.debug("<- %s %s", ident, msg)
        if not self._acceptable(ident, msg, extra):
            return
        if isinstance(msg, Ready):  # comes on both links; ready once both were heard
            c = self.sup.children.get(ident)
            if c is not None:
                c.links_heard.add("control" if on_control else "work")
                if len(c.links_heard) < 2:
                    return
                c.ready = msg.info
                if c.role == "reader":
                    await self._send_all(self.core.reader_ready(ident, restarted=bool(c.restarts)))
        elif isinstance(msg, LayerStaged):
            await self._send_all(self.core.on_staged(ident, msg))
        elif isinstance(msg, LayerDone):
            await self._send_all(self.core.on_layer_done(msg.done))
        elif isinstance(msg, ForwardDone):
            if msg.step == self.core.step_no:
                a = np.frombuffer(extra[0], dtype=msg.dtype).reshape(msg.shape) if extra else None
                self.done = ("ok", a)
        elif isinstance(msg, ReadFailed):
            await self._send_all(self.core.on_read_failed(ident, msg.req, msg.error))
        elif isinstance(msg, Failed):
            c = self.sup.children.get(ident)
            where = msg.role if msg.ident == msg.role else f"{msg.role} {msg.ident}"
            if c is not None and c.role == "reader":
                log.warning("%s failed: %s", where, msg.error)  # its exit is handled as a reader death
                c.last_error = msg.error
            else:
                self.failure = f"the {where} process failed: {msg.error}"
                if c is not None:
                    c.last_error = msg.error
        elif isinstance(msg, StatsReply):
            self.stats_replies[msg.ident] = msg.stats
        else:
            self.tl.incr("unexpected_messages")

    async def _send_all(self, sends) -> None:
        for link, ident, msg in sends:
            await self._send(link, ident, msg)

    async def _send(self, sock: str, ident: str, msg, quiet: bool = False) -> bool:
        """Send msg to child `ident`; False where it is not connected (gone, or still starting)."""
        log.debug("-> %s %s", ident, msg)
        try:
            await self.socks[sock].send_multipart([ident.encode()] + encode(msg))
            return True
        except zmq.ZMQError as e:  # ROUTER_MANDATORY: the peer is gone; the death check reports it
            (log.debug if quiet else log.warning)("could not send %s to %s: %s", type(msg).__name__, ident, e)
            return False

    # -- children ----------------------------------------------------------------------------------

    async def _check_children(self) -> None:
        for c in self.sup.dead():
            code = c.proc.exitcode
            if c.role == "reader" and c.restarts == 0 and not self.closed:
                log.warning("%s died (exit code %s); restarting it and retrying its reads", c.ident, code)
                c.restarts += 1
                self.core.reader_down(c.ident)
                self.sup.start(c.role, c.ident, c.target, c.cfg)
                continue
            if not self.failure and not c.last_error:  # its last words may still be on the socket
                for _ in range(3):
                    await self._serve(100)
            err = c.last_error
            if c.role == "staging" and getattr(self, "arena", None):
                remove_orphan(self.arena.name)  # its own cleanup never ran
            if code == -signal.SIGBUS:
                err = (err or "") + (f"SIGBUS: a memory-mapped model file shrank or vanished during the run "
                                     f"({', '.join(self.index.files)}); check the file and do not rewrite it while it runs")
            self.failure = self.failure or (
                f"the {c.role} process {c.ident} died (exit code {code})" + (f": {err}" if err else "")
                + ("; it was restarted once already" if c.restarts else ""))
            raise PipelineError(self.failure)

    # -- the step backend API ----------------------------------------------------------------------

    def step(self, seqs: list[SeqStep], want: str = "last") -> torch.Tensor | None:
        if self.closed:
            raise PipelineError(self.failure or "the pipeline is closed")
        try:
            return self.loop.run_until_complete(self._step(seqs, want))
        except PipelineError:
            self.close()
            raise

    async def _step(self, seqs: list[SeqStep], want: str):
        self.done = None
        announce = self.core.begin_step()
        wire = [ForwardSeq(s.row, s.tokens, s.slots, s.positions, s.kv_pos) for s in seqs]
        await self._send("compute", "compute", Forward(self.core.step_no, wire, want))
        await self._send_all(announce)
        self.heard["compute"] = time.monotonic()
        await self._run_until(lambda: self.done is not None, stall=("compute", self.cfg.stall_timeout_s))
        _, a = self.done
        return None if a is None else torch.from_numpy(a.copy())

    # -- stats and stop ------------------------------------------------------------------------------

    def collect_stats(self, timeout_s: float = 3.0) -> list[dict]:
        """Every process's stage timeline (StatsRequest to each child, then the coordinator's own)."""
        if self.closed:
            return list(self.stats_replies.values())

        async def ask():
            self.stats_replies = {}
            live = [i for i, c in self.sup.children.items() if c.proc.exitcode is None]
            for i in live:
                await self._send("control", i, StatsRequest())
            try:
                await self._run_until(lambda: all(i in self.stats_replies for i in live),
                                      time.monotonic() + timeout_s, "stats replies")
            except PipelineError as e:
                log.warning("%s", e)

        self.loop.run_until_complete(ask())
        snap = self.tl.snapshot()
        snap["count"].update({"prefetch_reads": self.core.sched.reads, "host_cache_hits": self.core.sched.hits})
        return list(self.stats_replies.values()) + [snap]

    def stats_table(self, snaps: list[dict]) -> str:
        c = {k: v for s in snaps for k, v in s.get("count", {}).items() if k.startswith(("prefetch", "host_cache"))}
        peak = max((s.get("device_peak_bytes", 0) for s in snaps), default=0)
        extra = {"device memory peak": f"{peak / GiB:.2f} GiB (torch's reserved memory)"} if peak else {}
        ex = next((s["experts"] for s in snaps if s.get("experts")), None)
        ahead, copied_ahead = (ex.get("prefetch_hits", 0), ex.get("prefetched", 0)) if ex else (0, 0)
        if ex and ex["hits"] + ex["misses"] + ahead:
            n = ex["hits"] + ex["misses"] + ahead
            pre = (f"; {ahead} ({ahead / n:.0%}) copied ahead on the previous layer's prediction, of {copied_ahead} "
                   f"copied ahead ({ahead / max(copied_ahead, 1):.0%} used)") if copied_ahead else ""
            extra["experts"] = (f"{ex['hits']} of {n} fetched experts were in the device cache ({ex['hits'] / n:.0%}, "
                                f"{ex.get('policy', 'lfu')}){pre}; "
                                f"{ex['bytes'] / 1e6:.1f} MB moved over {ex['steps']} steps with expert streaming "
                                f"({ex['bytes'] / max(ex['tokens'], 1) / 1e6:.2f} MB a token)")
        share = next((s["cpu_share"] for s in snaps if s.get("cpu_share")), None)
        if share:
            extra["CPU share"] = share
        cpu_ex = next((s["cpu_experts"] for s in snaps if s.get("cpu_experts")), None)
        if cpu_ex:
            extra["CPU experts"] = cpu_ex
        return stats_table(snaps, time.monotonic() - self.t_start, extra | {
            "plan": self.plan.describe(),
            "plan, device memory": self.plan.breakdown(),
            "host cache": f"{c.get('host_cache_hits', 0)} hits, {c.get('prefetch_reads', 0)} reads from disk",
            "prefetch": f"{c.get('prefetch_hit', 0)} layers ready before compute asked, {c.get('prefetch_miss', 0)} waited",
        })

    def write_trace(self, path: str, snaps: list[dict]) -> int:
        return write_chrome_trace(path, snaps)

    def close(self) -> None:
        """Stop every process (ask, wait, SIGTERM, SIGKILL), staging last; remove the run directory."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.close)
        workers = [i for i, c in self.sup.children.items() if c.role != "staging"]
        asked: set[str] = set()  # children the Shutdown reached; the others are not connected yet

        async def ask_stop():
            for i in workers + ["staging"]:
                c = self.sup.children.get(i)
                if c is not None and c.proc.exitcode is None and \
                        await self._send("control", i, Shutdown("run finished"), quiet=True):
                    asked.add(i)

        try:
            if not self.loop.is_closed() and not self.loop.is_running():
                self.loop.run_until_complete(asyncio.wait_for(ask_stop(), 1.0))
        except BaseException as e:  # noqa: BLE001 - stopping goes on whatever happened
            log.debug("asking children to stop failed: %s", e)
        # a child that was not asked cannot stop by itself: it is terminated at once, not waited for
        self.sup.stop(workers, 2.0, asked)
        self.sup.stop(["staging"], 2.0, asked)
        for s in self.socks.values():
            s.close(linger=0)
        self.zctx.term()
        if not self.loop.is_closed() and not self.loop.is_running():
            self.loop.close()
        if self.run_dir:
            cleanup_run_dir(self.run_dir)


def pipeline_backend(index: ModelIndex, ecfg, pcfg: PipelineConfig) -> Pipeline:
    from layerstream.compute.device import resolve_device, resolve_dtype
    from layerstream.compute.weights import check_model_quants

    check_model_quants(index)
    device = resolve_device(ecfg.device)
    return Pipeline(index, device, resolve_dtype(ecfg.dtype, device, index.hparams.arch), ecfg.ctx, ecfg.max_seqs, pcfg,
                    sliding=ecfg.on_context_full == "slide", weights=ecfg.weights)

