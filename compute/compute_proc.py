"""The compute process: maps the staging arena, runs forward steps, keeps the KV cache.

NOTE [ a failed step ]
A step that raises (an out-of-memory error on a burst of prefills, a bad input, any exception
in a layer) fails alone: the process answers it with StepFailed and goes on, and the coordinator
fails that step's requests. What ends the process is what ends a process: a Shutdown, a broken
link, the parent gone, an error while cleaning up after the step (the device left unusable: the
coordinator then sees it die). After a failed step:
- the device finishes everything queued (the steps before it are answered; no copy reads a
  staging slot any more); after an out-of-memory error the CUDA cache is emptied;
- the layer source forgets the step's half-done state (streamed.py, `abandon`): VRAM ring slots,
  copies issued ahead, events, the experts' held slots (and their cache, whose entries may name
  copies never issued);
- every staging slot of the step goes back, including those of its layers not yet announced:
  the coordinator announces every layer of a step in order before it starts the next step's
  order (stream_core.py), so the process waits for the rest of the step's announcements and
  gives each slot back at once. A resident layer is announced once in the run: one that the step
  had not loaded yet is loaded then. The next step then starts clean, and readers and the
  coordinator's schedule go on unchanged (what the failed step asked for is read as it would
  have been).
The steps sent behind a failed one (one or two: NOTE [ one step behind ] in core.py) may feed
their rows the ids the failed step never sampled and attend to the KV it left half written.
The rule: a Forward sent before the coordinator knew of the failure fails too, without running
(`Forward.failed` is the last failed step the coordinator had passed on; the process fails every
Forward whose `failed` is older than the last step that raised here). The engine core fails the
requests of every step in flight when one fails, so no result of such a step is ever wanted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
import zmq

from layerstream.compute.compute_config import ComputeConfig
from layerstream.compute.cpu.factory import make_cpu_parts
from layerstream.compute.dequant import have_triton
from layerstream.compute.device import computing_form, cuda_visible
from layerstream.compute.embedding import mapped_embedding
from layerstream.compute.expert_stream import make_expert_stream, reserve_prompt_scratch
from layerstream.compute.qlinear import model_scratch_elems
from layerstream.compute.runner import ModelRunner
from layerstream.compute.slot_returns import SlotReturns
from layerstream.compute.step_meta import SeqStep
from layerstream.compute.stepper import Launched, Stepper
from layerstream.compute.streamed import StreamedLayers
from layerstream.compute.weights import GlobalWeights
from layerstream.cpus import usable_cpus
from layerstream.loader.arena import Arena
from layerstream.loader.gguf_index import open_model
from layerstream.loader.layout import LayerLayout
from layerstream.proto.child import ChildLinks, ShutdownRequested, run_child, settle
from layerstream.proto.messages import ArenaDesc, AttachArena, Forward, ForwardDone, LayerReady, StepFailed
from layerstream.proto.timeline import Timeline

log = logging.getLogger("layerstream.compute")

POLL_S = 1e-4  # how often the loop looks at the step on the device and the socket while both are idle


@dataclass
class _InFlight:
    """A step launched on the device, not yet answered: what its ForwardDone and timings need."""

    step: int
    tokens: int
    want: str
    rows: list[int]  # per sequence: its KV row where it samples, else -1
    launched: Launched
    t0: int  # when its launch began (monotonic ns)
    own_s: float | None = None  # the step's own seconds on the CPU (its launch ran it); None: from start
    start: Any = None  # CUDA event recorded as its launch began: where the device starts it
    events: list = field(default_factory=list)  # its CUDA event pairs (streamed.py)
    observed: tuple = ()  # the CPU share's figures of its launch


@dataclass
class StepCount:
    """Steps and their tokens, counted."""

    steps: int = 0
    tokens: int = 0

    def add(self, tokens: int) -> None:
        self.steps, self.tokens = self.steps + 1, self.tokens + tokens


class ComputeWorker:
    """The compute role's logic over its links: Forwards launched in turn, the next one while the
    last still runs on the device, layers as they are staged (NOTE [ ids one step behind ] in
    stepper.py)."""

    def __init__(self, cfg: ComputeConfig, links: ChildLinks):
        self.cfg, self.links = cfg, links
        self.tl = Timeline("compute", cfg.ident, trace=cfg.trace)
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = dtype = getattr(torch, cfg.dtype)
        plan = cfg.plan
        self.arena: Arena | None = None  # mapped when AttachArena comes (attach)
        self.source: StreamedLayers | None = None
        self.registered = False
        t0 = time.monotonic()
        if self.device.type == "cuda":  # (the CUDA context is made here, while staging makes the arena)
            torch.cuda.set_device(self.device)
            if plan.budget_bytes is not None:  # NOTE [ the plan counts every byte ] in plan.py
                total = torch.cuda.get_device_properties(self.device).total_memory
                torch.cuda.set_per_process_memory_fraction(min(1.0, plan.budget_bytes / total), self.device)
        self.index = index = cfg.index if cfg.index is not None else open_model(cfg.model_path)
        self.form = form = computing_form(self.device, cfg.weights)
        quantized = form == "triton"  # the Triton kernels' blocks (their attention, graphs and experts' paths)
        # the prompts' dequantization scratch, reserved in attach (the expert pool's room may hold it)
        self.scratch = model_scratch_elems(index) if quantized and self.device.type == "cuda" and plan.dequant_scratch else 0
        t1 = time.monotonic()
        self.glob = GlobalWeights(index, self.device, dtype, quantized=form)
        # two parts of its start, for the launcher's -v line (Ready's info)
        self.start_s = {"device set-up": round(t1 - t0, 3), "global weights": round(time.monotonic() - t1, 3)}
        self.ready_slots: dict[tuple[int, int], int] = {}  # (step, layer) -> staging slot
        self.returns = SlotReturns(links.send, cfg.experts.done_batch)
        self.layouts = layouts = [LayerLayout.from_wire(w) for w in cfg.layouts]
        resident = set(plan.resident)
        self.cpu = make_cpu_parts(cfg.cpu_share, [lay for i, lay in enumerate(layouts) if i not in resident],
                                  self.device, dtype, self.tl, index.hparams.moe.n_expert_used)
        self.expert_count = StepCount()  # the steps that fetched only the chosen experts
        self.embed = mapped_embedding(self.glob, self.device, dtype)  # NOTE [ the embedding on the device ]
        self.queued: deque[Forward] = deque()  # taken in, not yet launched
        self.resolved: dict[int, list[SeqStep]] = {}  # a queued step's sequences, its meta built ahead
        self.inflight: deque[_InFlight] = deque()  # launched, ForwardDone not yet sent
        self.host_ids: dict[int, int] = {}  # KV row -> the id it sampled last, once read back
        self.announced: dict[int, set[int]] = {}  # step -> its layers announced so far (NOTE [ a failed step ])
        self.last_raised = 0  # the last step that raised here (NOTE [ a failed step ])

    def attach(self, arena: ArenaDesc) -> None:
        """Map the staging arena (pinned on CUDA) and build what reads its slots: the layer source
        and the runner over it (NOTE [ the arena after Ready ] in coordinator/pipeline.py)."""
        cfg, plan, dtype, form = self.cfg, self.cfg.plan, self.dtype, self.form
        quantized = form == "triton"
        graphs = plan.graph_max_tokens(quantized)  # the decode batches captured (0: none)
        self.arena = Arena.from_wire(arena)
        if self.device.type == "cuda":
            self._register_arena()
        hp, ex, resident = self.index.hparams, cfg.experts, set(plan.resident)
        experts = make_expert_stream(self.layouts, resident, (hp.moe.n_expert, hp.moe.n_expert_used), ex.cache_bytes,
                                     ex.dense_resident, ex.policy, ex.prefetch, self.cpu.experts,
                                     self.device, dtype, quantized, self.tl, self.arena.slot_array,
                                     self._layer_done, plan.vram_slots,
                                     (self.scratch * dtype.itemsize, plan.fused_rows))
        reserve_prompt_scratch(experts, self.device, dtype, self.scratch)
        self.source = StreamedLayers(self.layouts, self.arena.slot_array, self.ready_slots, self._pump,
                                     self._layer_done, self.device, dtype, resident, plan.vram_slots, self.tl,
                                     quantized=form, share=self.cpu.share, experts=experts)
        self.runner = ModelRunner(hp, self.glob, self.source, self.device, dtype,
                                  ctx=cfg.ctx, max_seqs=cfg.max_seqs, kv_device_layers=plan.kv_device_layers,
                                  sliding=cfg.sliding, triton_attention=quantized,
                                  graph_max_tokens=graphs, embed=self.embed, head_chunk=plan.logit_rows)
        # one row's sampling graphs in the decode graphs' pool, where the plan counts it (memory.Sizes.graphs)
        self.stepper = Stepper(self.runner.step, hp.n_vocab, cfg.max_seqs, self.device,
                               capture=self.runner.capture if graphs else None, clear_row=self.runner.kv.clear_row)

    def _register_arena(self) -> None:
        """Pin the staging arena for DMA (cudaHostRegister), so copies run at full PCIe speed."""
        base, size = self.arena.slot_address(0), self.arena.nbytes
        err = torch.cuda.cudart().cudaHostRegister(base, size, 0)
        self.registered = int(err) == 0 if not isinstance(err, tuple) else int(err[0]) == 0

    def _pump(self, block: bool) -> None:
        """Answer the steps the device finished (not before the step's first launch, unless about
        to wait); take in one message (waiting for it when `block`), or all that are queued."""
        if block or self.source.launched:
            self._answer_finished()
        if block:
            self.returns.flush()  # the coordinator may be waiting for them
        while True:
            msg = self.links.recv(None if block else 0)
            if msg is None:
                return
            self._take(msg)
            if block:
                return

    def _take(self, msg) -> None:
        """Note a LayerReady (also one sent early for the next step) or queue a Forward (one that
        comes while a step runs is launched next); count anything else."""
        if isinstance(msg, LayerReady):
            for layer, slot in msg.ready:
                self.ready_slots[(msg.step, layer)] = slot
            self.returns.lend(msg.step, msg.ready)
            self.announced.setdefault(msg.step, set()).update(layer for layer, _ in msg.ready)
        elif isinstance(msg, Forward):
            self.queued.append(msg)
            if self.source is not None and (self.embed is not None or self.glob.embd_dev is not None):
                try:  # (its own launch builds it, and raises, where this cannot)
                    self.runner.prepare(seqs := self._resolve(msg))
                    self.resolved[msg.step] = seqs
                except Exception:  # noqa: BLE001 - NOTE [ a step's meta built ahead ] in runner.py
                    pass
        else:
            self.tl.incr("unexpected_messages")

    def _layer_done(self, step: int, layer: int, slot: int) -> None:
        """Give a staging slot back (NOTE [ slots given back ] in slot_returns.py): held only for the
        step running, as an earlier step's holds back the next step's announcements."""
        self.returns.add(step, layer, slot, batched=self.source.expert_step and step == self.source.step_no)

    def stats(self) -> dict[str, Any]:
        snap = self.tl.snapshot()
        snap["bad_messages"] = self.links.bad.stats()
        snap["pinned"] = self.registered
        if self.device.type == "cuda":
            snap["device_peak_bytes"] = torch.cuda.max_memory_reserved(self.device)
        cache = None if self.source is None else self.source.expert_cache
        if cache is not None:
            snap["experts"] = cache.stats() | {"steps": self.expert_count.steps, "tokens": self.expert_count.tokens}
        if self.cpu.experts is not None:
            ce = self.cpu.experts
            snap.setdefault("experts", {})["cpu"] = ce.computed  # (before the arena came: no cache yet)
            snap["cpu_experts"] = (f"{ce.balancer.describe()}; {ce.computed} computed; "
                                   f"packed {ce.packed_bytes / 2**30:.2f} GiB")
        share = self.cpu.share
        if share is not None:
            snap["cpu_share"] = (f"{share.balancer.describe()}; {torch.get_num_threads()} threads; "
                                 f"packed {sum(p.nbytes for d in share.packed.values() for p in d.values()) / 2**30:.2f} GiB")
        return snap

    def _gpu_timeline(self, evs: list, end) -> tuple[float, int]:
        """Turn a finished step's CUDA event pairs into timeline intervals, placed against its end
        event when tracing (complete: no sync); returns the seconds and bytes of its host-to-device
        copies. (Without a trace, only each pair's length is read: half the driver calls, on the
        host's time between the step's launches.)"""
        copy_s, copy_bytes = 0.0, 0
        if not evs:
            return copy_s, copy_bytes
        end.synchronize()
        ref_ns, trace = time.monotonic_ns(), self.tl.trace  # (when its end was seen: a little after it happened)
        for cat, layer, a, b, nbytes in evs:
            dur = int(a.elapsed_time(b) * 1e6)
            if trace:
                self.tl.add(cat, f"{cat} L{layer}", ref_ns - int(a.elapsed_time(end) * 1e6), dur, nbytes, layer=layer)
            else:  # (the totals only: no event is kept, so none is named)
                self.tl.add(cat, cat, 0, dur, nbytes)
            if cat == "copy":
                copy_s, copy_bytes = copy_s + dur / 1e9, copy_bytes + nbytes
        return copy_s, copy_bytes

    def _resolve(self, msg: Forward) -> list[SeqStep]:
        """The step's sequences; a -1 token is its row's last sampled id, which the runner takes on
        the device (NOTE [ the embedding on the device ]); only where the embedding stays a host
        gather does it become that id on the host, after the steps in flight are answered (an
        in-process sync, no round trip to the coordinator)."""
        seqs = [SeqStep(s.row, s.tokens, s.slots, s.positions, s.kv_positions()) for s in msg.seqs]
        if self.embed is not None or self.glob.embd_dev is not None or all(t >= 0 for s in msg.seqs for t in s.tokens):
            return seqs
        while self.inflight:
            self._answer(self.inflight.popleft())
        for s in seqs:
            if any(t < 0 for t in s.tokens):
                if s.row not in self.host_ids:
                    raise ValueError(f"step {msg.step}: KV row {s.row} feeds its last sampled id, but it sampled none")
                s.tokens = [self.host_ids[s.row] if t < 0 else t for t in s.tokens]
        return seqs

    def launch(self, msg: Forward) -> None:
        """Start one step on the device (on the CPU: run it); its ForwardDone goes once it is done."""
        t0 = time.monotonic_ns()
        seqs = self.resolved.pop(msg.step, None) or self._resolve(msg)
        tokens = sum(len(s.tokens) for s in seqs)
        # NOTE [ answers after the step's first launch ]
        # Answering a finished step turns its layers' CUDA events into the timeline (driver calls for
        # each layer): host time the device spends idle where nothing of this step is queued on it.
        # So until the step's first launch (the resident layers' graph, a streamed MoE layer's
        # experts, or a layer launched eagerly: the layer source's `launched`), the pumps only take
        # messages in; the first one after it answers, while the device works (with no streamed
        # layer, the loop, once the launch returns).
        try:
            self.source.set_step(msg.step, tokens)
            if self.source.expert_step:
                self.expert_count.add(tokens)
            start = None
            if self.device.type == "cuda":  # the step's own time starts where the device reaches it
                start = torch.cuda.Event(enable_timing=True)
                start.record()
            launched = self.stepper.launch(seqs, [s.sample for s in msg.seqs], msg.starts, msg.want_logits)
            src, now = self.source, time.monotonic_ns()  # the host's set-up, and its tail after the last layer
            if src.launched_ns > t0:
                self.tl.add("step_setup", "set-up", t0, src.launched_ns - t0)
            if src.released_ns > t0:
                self.tl.add("step_tail", "tail", src.released_ns, now - src.released_ns)
        finally:
            self.source.launched = True  # (a step that raised: the pumps that clean up answer)
        self._give_back(wait=False)  # NOTE [ the step's end does not wait ] in expert_stream.py
        evs = self.source.ring.gpu_events if self.device.type == "cuda" else []
        step = _InFlight(msg.step, tokens, msg.want_logits, [s.row if s.sample else -1 for s in msg.seqs], launched,
                         t0, None if start is not None else (time.monotonic_ns() - t0) / 1e9, start, list(evs))
        evs.clear()
        ce, share = self.cpu.experts, self.cpu.share
        if self.source.expert_step and ce is not None:  # (its dense layers are not split)
            sec, nbytes, _ = ce.meter.take()  # (a pass's packing is a one-off: left out)
            step.observed = ("experts", sec, nbytes, ce.take_pack_s(), ce.frac)
        elif share is not None:
            step.observed = ("share", share.step_s, share.step_bytes, share.take_pack_s(), share.frac)
        self.inflight.append(step)

    def _launch(self, msg: Forward) -> None:
        """Launch a step, or answer it with StepFailed where it raises or was sent before the
        coordinator knew of the last failure here (NOTE [ a failed step ])."""
        if msg.failed < self.last_raised:
            self.resolved.pop(msg.step, None)
            self._fail_step(msg.step, f"step {self.last_raised} before it failed", oom=False)
            return
        try:
            self.launch(msg)
            return
        except (ShutdownRequested, zmq.ZMQError):
            raise
        except Exception as e:  # noqa: BLE001 - the step's own failure: its requests fail, the process goes on
            self.last_raised = msg.step
            why = f"{type(e).__name__}: {e}".splitlines()[0] if str(e) else type(e).__name__
            oom = isinstance(e, torch.OutOfMemoryError)
        # (here, not in the except clause: its traceback holds the step's tensors until then)
        log.warning("step %d failed, its requests fail: %s", msg.step, why)
        self._fail_step(msg.step, why, oom)

    def _fail_step(self, n: int, why: str, oom: bool) -> None:
        """Clean up after step n (NOTE [ a failed step ]) and answer it with StepFailed."""
        self.tl.incr("steps_failed")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        while self.inflight:  # (finished: the device ran everything queued)
            self._answer(self.inflight.popleft())
        self.source.abandon(n, reset_experts=n == self.last_raised)
        if oom and self.device.type == "cuda":
            torch.cuda.empty_cache()  # (its blocks are cached but free now: the next step may need them whole)
        for j in range(len(self.source.layouts)):  # the rest of its slots, as they are announced
            if j in self.source.resident:
                continue  # loaded in an earlier step (or in this one): not announced again
            while j not in self.announced.get(n, ()):
                self._pump(True)
            slot = self.ready_slots.pop((n, j), None)
            slot = self.returns.lent.get((n, j)) if slot is None else slot
            if slot is None:
                continue  # given back during the step
            if j in self.source.resident_ids:
                self.ready_slots[(n, j)] = slot
                self.source.load_resident(j)
            else:
                self._layer_done(n, j, slot)
        self.announced.pop(n, None)
        self.returns.flush()
        self.links.send(StepFailed(n, why))

    def _answer_finished(self) -> None:
        """Send ForwardDone for every step in flight the device has finished, oldest first."""
        while self.inflight and Stepper.done(self.inflight[0].launched):
            self._answer(self.inflight.popleft())

    def _answer(self, st: _InFlight) -> None:
        """Read a step's ids back (waiting for it) and send its ForwardDone; feed the balancers."""
        res = Stepper.result(st.launched)
        self.announced.pop(st.step, None)
        for row, tok in zip(st.rows, res.ids):
            if row >= 0:
                self.host_ids[row] = tok
        now = time.monotonic_ns()
        self.tl.add("step", f"step {st.step}", st.t0, now - st.t0, step=st.step, tokens=st.tokens)
        copy_s, copy_bytes = self._gpu_timeline(st.events, st.launched.event)
        pass_s = self._own_s(st, now)
        if st.observed and st.observed[0] == "experts":
            _, sec, nbytes, pack_s, frac = st.observed
            self.cpu.experts.balancer.observe(st.tokens, max(0.0, pass_s - pack_s), sec, nbytes, 0.0, 0, frac)
        elif st.observed:
            _, step_s, step_bytes, pack_s, frac = st.observed
            self.cpu.share.balancer.observe(st.tokens, max(0.0, pass_s - pack_s), step_s, step_bytes, copy_s,
                                            copy_bytes, frac)
        out = None if res.logits is None else res.logits.numpy()
        shape = [] if out is None else list(out.shape)
        self.links.send(ForwardDone(st.step, shape, "float32", {}, res.ids, res.bad, res.accepted or []),
                        extra=[] if out is None else [out.data])

    @staticmethod
    def _own_s(st: _InFlight, now: int) -> float:
        """The step's own seconds, for the balancers: from where the device began it to its end
        event, not from its launch, which the step before may still hold up (two in flight). (The
        host's packing time the callers take off may have overlapped the step before on the device,
        so they clamp the difference at 0.)"""
        if st.own_s is not None:
            return st.own_s
        if st.start is not None and st.launched.event is not None:
            return st.start.elapsed_time(st.launched.event) / 1e3  # (the end event is complete: no wait)
        return (now - st.t0) / 1e9

    def run(self) -> None:
        """Launch Forwards as they come, the next before the last is done; answer each once done."""
        self.links.ready({"device": str(self.device), "start_s": self.start_s})
        while self.source is None:  # (a message before the arena, which the coordinator never sends first, waits)
            msg = self.links.recv()
            if isinstance(msg, AttachArena):
                self.attach(msg.desc)
            elif msg is not None:
                self._take(msg)
        settle()  # (set up: NOTE [ start-up objects frozen ] in proto/child.py)
        while True:
            if self.queued:
                self._launch(self.queued.popleft())
                continue
            if self.inflight:
                self._answer_finished()
                if not self.inflight:
                    continue
                self._give_back(wait=False)
                msg = self.links.recv(0)
                if msg is None:
                    time.sleep(POLL_S)
                    continue
            else:
                self._give_back(wait=True)
                msg = self.links.recv()
            if msg is not None:
                self._take(msg)

    def _give_back(self, wait: bool) -> None:
        """Give back the staging slots whose layers are done (`wait`: all, waiting for the device)."""
        self.source.return_slots(wait)
        self.returns.flush()

    def close(self) -> None:
        if self.registered:
            torch.cuda.cudart().cudaHostUnregister(self.arena.slot_address(0))
        if self.arena is not None:
            self.arena.close()


def prepare_warm(device: str = "auto") -> None:
    """What a compute process spawned ahead does while the launcher plans (NOTE [ warm starts ] in
    supervisor.py), unless --device is the CPU or no CUDA device is visible: the Triton kernels'
    modules imported and the CUDA driver started, which would otherwise wait for the config
    (BENCHMARKS.md, "The 8B's start-up")."""
    if device == "cpu" or not cuda_visible():
        return
    if have_triton():
        import layerstream.compute.attn_kernels  # noqa: F401
        import layerstream.compute.norm_kernels  # noqa: F401
        import layerstream.compute.qkernels  # noqa: F401
        threading.Thread(target=warm_triton, name="ls-triton-warm", daemon=True).start()
    torch.cuda.init()


def warm_triton() -> None:
    """What Triton does on a process's first kernel launch, even with its cache full, done ahead (on
    a thread of the warm compute process, beside the rest of its start): its cache key hashes
    Triton's own sources and its library of hundreds of megabytes, and its launcher imports the
    gluon language. A profile of run-pipeline on an H200 put both on the first step's path
    (BENCHMARKS.md). A Triton without either, or a failure here, leaves them to that launch."""
    try:
        import importlib

        import triton

        try:
            importlib.import_module("triton.experimental.gluon")
        except ImportError:
            pass
        for where in ("triton.runtime.cache", "triton.compiler.compiler"):  # (Triton 3.x's homes of it)
            key = getattr(importlib.import_module(where), "triton_key", None)
            if key is not None:
                key()
                return
        log.debug("Triton %s has no triton_key: its first launch computes its cache key", triton.__version__)
    except Exception as e:  # noqa: BLE001 - only a head start: the first launch does the same and reports
        log.debug("Triton's warm-up failed (%s); its first launch does it", e)


def main(cfg: ComputeConfig) -> None:
    """Process entry point (multiprocessing spawn target)."""
    worker: list[ComputeWorker] = []

    def body(links: ChildLinks) -> None:
        # NOTE: OpenMP threads spin at barriers; sharing the cores with the coordinator and the
        # readers, a compute process using every core stalls each op. Leave one core to the other
        # processes (launch.compute_threads sets fewer, or every core, where that measured faster).
        torch.set_num_threads(cfg.cpu_threads or max(1, usable_cpus() - 1))
        w = ComputeWorker(cfg, links)
        worker.append(w)
        try:
            w.run()
        finally:
            w.close()

    run_child("compute", cfg.ident, cfg.endpoints, cfg.parent_pid, body,
              stats=lambda: worker[0].stats() if worker else {})

