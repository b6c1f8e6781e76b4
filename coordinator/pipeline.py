"""The streaming pipeline's coordinator loop: its children, their messages, the watchdog, a step.

`Pipeline` is a step backend for `Engine` (the same API as the in-process `LocalBackend`): each
`submit()` sends a Forward to the compute process, which samples on its side, and `collect()`
feeds it layers until the oldest step's ids come back, asking readers for the bytes of upcoming
layers `prefetch` ahead, across the end of one pass into the next. Two steps may be in flight
(NOTE [ one step behind ] in core.py): the next step's layers are announced once every layer of
the step before is (StreamCore holds one step's order at a time). What the run starts is decided
before (launch.py: the plan and the children's configs); the scheduling decisions are
`StreamCore`'s (stream_core.py), plain logic fed decoded messages; the sockets are links.py's.
This class dispatches messages, watches the children and stops them. Its asyncio loop (uvloop)
runs the calls that wait (event_loop.run_task), and sleeps until a message, a child's exit or a
deadline wakes it. A step that fails in the compute process (StepFailed) is raised from collect()
as StepError and the run goes on (NOTE [ a failed step ] in compute_proc.py); a child's death
ends the run.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import time
from collections import deque
from typing import Callable

import numpy as np
import torch

from layerstream.compute import compute_proc
from layerstream.compute.step_meta import SeqStep
from layerstream.compute.stepper import StepResult
from layerstream.coordinator.acceptance import Acceptance
from layerstream.coordinator.event_loop import new_loop, run_briefly, run_task, signals_deferred
from layerstream.coordinator.launch import Launch, StartProgress, make_launch
from layerstream.coordinator.links import CoordinatorLinks
from layerstream.coordinator.pipeline_config import PipelineConfig, parse_cpu_share
from layerstream.coordinator.plan import Plan
from layerstream.coordinator.stats import Snapshot, format_stats
from layerstream.coordinator.stream_core import Send, StreamCore
from layerstream.coordinator.supervisor import ASK_WAIT_S, Child, Supervisor, start_parts
from layerstream.errors import LayerstreamError, PipelineError
from layerstream.loader import reader_proc, staging_proc
from layerstream.loader.arena import remove_staging_arena
from layerstream.loader.gguf_index import ModelIndex
from layerstream.loader.reader import ReaderPlan
from layerstream.proto.codec import ProtocolError, from_wire
from layerstream.proto.messages import (
    ArenaDesc,
    AttachArena,
    Failed,
    Forward,
    ForwardDone,
    ForwardSeq,
    LayerDone,
    LayerStaged,
    ReadFailed,
    Ready,
    SamplerStart,
    Shutdown,
    StatsReply,
    StatsRequest,
    StepFailed,
)
from layerstream.proto.timeline import Timeline, trace_report

log = logging.getLogger("layerstream.pipeline")
STALL_CONFIRM_S = 1.0  # the watchdog's last wait before a stall is reported (_run_until)


class StepError(LayerstreamError):
    """A step failed in the compute process: its requests fail, the run goes on."""


class Pipeline:
    """Step backend over reader, staging and compute processes."""

    def __init__(self, launch: Launch):
        self.launch, self.cfg = launch, launch.cfg
        self.tl = Timeline("coordinator", "0", trace=self.cfg.procs.trace)
        self.core = StreamCore(launch.plan, launch.index.hparams.n_layer)  # the scheduling; this class is its loop
        self.sup = Supervisor(self.cfg.warm)
        self.loop = new_loop()
        self.links: CoordinatorLinks | None = None
        self.arena: ArenaDesc | None = None
        self.closed, self.failure = False, None  # (failure: why the run stopped, once it did)
        self.steps_ahead, self.warm_up_pays = launch.steps_ahead, launch.warm_up_pays  # (the engine's, from the plan)
        self.next_step = 1  # the number of the next Forward
        self.expected: dict[int, int] = {}  # step in flight -> its sequences
        hp = launch.index.hparams
        self.accepts = Acceptance(self.expected, hp.n_vocab, hp.n_layer, launch.plan.n_slots, launch.plan.step_tokens)
        self.unbegun: deque[int] = deque()  # steps sent whose layers StreamCore does not order yet
        self.results: dict[int, StepResult] = {}  # ForwardDone of a step in flight, not yet collected
        self.failed_steps: dict[int, str] = {}  # StepFailed of a step in flight, not yet collected: its error
        self.known_failed = 0  # the last step whose failure collect() raised (Forward.failed)
        self.stats_replies: dict[str, Snapshot] = {}
        self.heard: dict[str, float] = {}  # child -> when its last message came (the watchdog)
        self.hung: frozenset[str] = frozenset()  # the children the watchdog blamed: killed at once by close()
        self.t_start = time.monotonic()
        self.progress = StartProgress(launch, self.t_start)
        self.calling = False  # (see _run)
        try:
            self._run(self._start())
        except BaseException:
            self.close()
            raise
        atexit.register(self.close)  # an API user who never calls close() leaves nothing behind

    @property
    def plan(self) -> Plan:
        return self.launch.plan

    @property
    def reader_plan(self) -> ReaderPlan:
        return self.launch.readers

    @property
    def step_tokens(self) -> int:
        return self.launch.plan.step_tokens

    # -- start -----------------------------------------------------------------------------------

    # NOTE [ the arena after Ready ]
    # Every child is spawned at once: their starts (Python, imports; compute's torch, CUDA context,
    # globals) need nothing of staging's arena. A reader or compute sends Ready once started and gets
    # AttachArena on its work link as soon as staging has described the arena, before any other work
    # message (a ROUTER routes only to a peer it has heard from); a restarted reader, after its Ready.
    # The readers start on the first pass's layers once they and staging are Ready, without waiting for
    # compute, which starts last (torch): they fill the free slots meanwhile.

    async def _start(self) -> None:
        la, pid = self.launch, os.getpid()
        procs = self.cfg.procs
        self.links = links = CoordinatorLinks(procs.transport, procs.host, la.max_msg_in, la.max_msg_out,
                                              procs.stall_timeout_s)
        self.progress("processes", 0)
        self._start_child("staging", "staging", staging_proc.main, la.staging_config(links.endpoints_for("staging"), pid))
        for r, ident in enumerate(la.reader_ids):
            self._start_child("reader", ident, reader_proc.main, la.reader_config(r, links.endpoints_for("reader"), pid))
        self._start_child("compute", "compute", compute_proc.main, la.compute_config(links.endpoints_for("compute"), pid))
        deadline = time.monotonic() + procs.ready_timeout_s  # (one for the whole start)
        await self._wait_ready(["staging"] + la.reader_ids, deadline)
        self.progress("layers", 0)
        await self._send_all(self.core.set_reads(la.reads()))
        await self._wait_ready(["compute"], deadline)

    def _start_child(self, role: str, ident: str, target: Callable, cfg) -> Child:
        """Spawn (or respawn) a child; the loop wakes when it exits."""
        old = self.sup.children.get(ident)
        if old is not None and old.proc is not None:
            self.links.unwatch(old.proc.sentinel)
        c = self.sup.start(role, ident, target, cfg)
        self.links.watch(c.proc.sentinel)
        return c

    async def _wait_ready(self, idents: list[str], deadline: float | None = None) -> None:
        deadline = time.monotonic() + self.cfg.procs.ready_timeout_s if deadline is None else deadline
        await self._run_until(lambda: all(self.sup.children[i].ready is not None for i in idents),
                              deadline, f"start of {', '.join(idents)}", self.cfg.procs.stall_timeout_s, idents)

    # -- the message loop ------------------------------------------------------------------------

    async def _run_until(self, cond: Callable[[], bool], deadline: float | None = None, what: str = "",
                         stall: float | None = None, starting: list[str] | None = None) -> None:
        """Serve messages until cond(); with `stall` (seconds), a pending step that makes no
        progress for so long ends the run, naming the stage that is behind (the watchdog: a
        stopped or hung process never hangs the user), as does a child of `starting` that is not
        Ready and uses no CPU for so long (Supervisor.start_blame). A verdict is kept only after
        one more wait of up to STALL_CONFIRM_S with nothing from the stage blamed: this process
        may itself have been stopped with its children (Ctrl-Z, then fg), and they go on once continued."""
        confirm, t0 = None, time.monotonic()  # (when a blame holds if nothing comes before; the wait's start)
        while not cond():
            self.failure = self.failure or self.core.failure
            if self.failure:
                raise PipelineError(self.failure)
            now = time.monotonic()
            if deadline is not None and now > deadline:
                raise PipelineError(f"timed out waiting for the {what} after {now - t0:.3g} s; run with -v (from "
                                    "Python: logging at INFO) to see what each process logged")
            wake = deadline
            if stall is not None:
                blame, at, who = self.sup.start_blame(starting, now, stall) if starting else \
                    self.core.stall_blame(self.heard.get("compute", now), now, stall)
                if blame and confirm is not None and now >= confirm:
                    self.failure, self.hung = blame, who
                    raise PipelineError(blame)
                confirm = (confirm or now + min(stall, STALL_CONFIRM_S)) if blame else None
                at = confirm or at
                wake = at if wake is None else min(wake, at)
            exited = await self.links.wait(None if wake is None else wake - now)
            if wake is not None and time.monotonic() - wake > STALL_CONFIRM_S:  # this process was stopped (and
                self.heard = dict.fromkeys(self.heard, time.monotonic())  # its children with it?): count anew
                self.sup.count_anew(time.monotonic())
            await self._serve()
            await self._begin_steps()
            if exited:
                await self._check_children()

    async def _serve(self) -> None:
        for ident, dec, on_control in await self.links.drain():
            self.heard[ident] = time.monotonic()
            if dec is not None:
                await self.dispatch(ident, dec.msg, dec.extra, on_control)

    def _acceptable(self, ident: str, msg, extra) -> bool:
        """Whether `msg` may come from `ident` (by its role) and its fields are in range (acceptance.py);
        a message that may not is counted and dropped."""
        c = self.sup.children.get(ident)
        why = self.accepts.refusal(None if c is None else c.role, ident, msg, extra)
        if why is not None:
            self.links.bad.record(ProtocolError(why), ident)
        return why is None

    async def dispatch(self, ident: str, msg, extra, on_control: bool) -> None:
        """Act on one decoded message from child `ident`."""
        log.debug("<- %s %s", ident, msg)
        if not self._acceptable(ident, msg, extra):
            return
        c = self.sup.children[ident]
        if isinstance(msg, Ready):  # comes on both links; ready once both were heard
            c.links_heard.add("control" if on_control else "work")
            if len(c.links_heard) < 2:
                return
            c.ready = msg.info
            log.info("%s: ready %.2f s after the pipeline's start%s", ident, time.monotonic() - self.t_start,
                     start_parts(msg.info))
            self.progress("processes", sum(x.ready is not None for x in self.sup.children.values()))
            if c.role == "staging":
                await self._arena_described(msg.info)
            elif self.arena is not None:
                await self._attach(c)
            if c.role == "reader":
                await self._send_all(self.core.reader_ready(ident, restarted=bool(c.restarts)))
        elif isinstance(msg, LayerStaged):
            await self._send_all(self.core.on_staged(ident, msg))
            self.progress("layers", len(self.core.loaded))
        elif isinstance(msg, LayerDone):
            await self._send_all(self.core.on_layer_done(msg.done))
        elif isinstance(msg, StepFailed):
            if msg.step in self.expected and msg.step not in self.results:  # (else a step discarded: dropped)
                self.failed_steps[msg.step] = msg.error
        elif isinstance(msg, ForwardDone):
            if msg.step in self.expected and msg.step not in self.results:  # (else stale: dropped)
                logits = np.frombuffer(extra[0], dtype=msg.dtype).reshape(msg.shape) if extra else None
                self.results[msg.step] = StepResult(list(msg.ids), list(msg.bad),
                                                    None if logits is None else torch.from_numpy(logits.copy()),
                                                    list(msg.accepted) or None)
        elif isinstance(msg, ReadFailed):
            await self._send_all(self.core.on_read_failed(ident, msg.req, msg.error))
        elif isinstance(msg, Failed):
            c.last_error = msg.error
            where = c.role if ident == c.role else f"{c.role} {ident}"
            if c.role == "reader":  # its exit is handled as a reader death
                log.warning("%s failed: %s", where, msg.error)
            else:
                self.failure = self.failure or f"the {where} process failed: {msg.error}"
        elif isinstance(msg, StatsReply):
            self.stats_replies[msg.ident] = {"role": msg.role, "ident": msg.ident} | msg.stats  # (staging's is {})
        else:
            self.tl.incr("unexpected_messages")

    async def _arena_described(self, info: dict) -> None:
        """Staging's Ready: its arena, sent to the children that are Ready already (NOTE [ the arena after Ready ])."""
        try:
            self.arena = from_wire(ArenaDesc, info.get("arena"))
        except ProtocolError as e:
            self.failure = self.failure or f"the staging process described its arena wrongly: {e}"
            return
        for c in list(self.sup.children.values()):
            if c.role != "staging" and c.ready is not None:
                await self._attach(c)

    async def _attach(self, c: Child) -> None:
        """Send a Ready reader or compute the arena, first on its work link (NOTE [ the arena after Ready ])."""
        await self.links.send("readers" if c.role == "reader" else "compute", c.ident, AttachArena.of(self.arena))

    async def _send_all(self, sends: list[Send]) -> None:
        for link, ident, msg in sends:
            await self.links.send(link, ident, msg)

    # -- children ----------------------------------------------------------------------------------

    async def _check_children(self) -> None:
        """Restart a reader that died (once); any other death ends the run with one line saying
        which child died and, where it said so, of what."""
        for c in self.sup.dead():
            code = c.proc.exitcode
            self.links.unwatch(c.proc.sentinel)
            if c.role == "reader" and c.restarts == 0 and not self.closed:
                log.warning("%s died (exit code %s); restarting it and retrying its reads", c.ident, code)
                c.restarts += 1
                self.core.reader_down(c.ident)
                self._start_child(c.role, c.ident, c.target, c.cfg)
                continue
            end = time.monotonic() + 0.5
            while not c.last_error and time.monotonic() < end:  # its last words may still be on the way
                await self.links.wait(end - time.monotonic())
                await self._serve()
            err = c.last_error
            if c.role == "staging":
                remove_staging_arena(self.arena and self.arena.name, c.proc)  # its own cleanup never ran
            if code == -signal.SIGBUS:
                err = (err or "") + (f"SIGBUS: a memory-mapped model file shrank or vanished during the run "
                                     f"({', '.join(self.launch.index.files)}); check the file and do not rewrite "
                                     "it while it runs")
            self.failure = self.failure or (
                f"{c.label} died (exit code {code})" + (f": {err}" if err else "")
                + ("; it was restarted once already" if c.restarts else ""))
            raise PipelineError(self.failure)

    # -- the step backend API ----------------------------------------------------------------------

    def _call(self, coro):
        """Run one backend call's coroutine on the loop; a PipelineError stops the run."""
        if self.closed:  # (a call after the failure: what to do, with what stopped it)
            coro.close()
            raise PipelineError(f"{self.failure}; this pipeline has stopped: close the engine and open another"
                                if self.failure else "the pipeline is closed")
        try:
            return self._run(coro)
        except PipelineError as e:
            self.failure = self.failure or str(e)
            self.close()
            raise

    def _run(self, coro):
        """run_task, marked: the loop runs only once a call waits, and close() on another thread (the
        server's) must not run or close the loop under a call (NOTE [ backend calls without the loop ])."""
        self.calling = True
        try:
            return run_task(self.loop, coro)
        finally:
            self.calling = False
            if self.closed:  # (by another thread, which left the sockets and the loop to this call)
                self._release()

    def submit(self, seqs: list[SeqStep], sample: list[int], starts: list[SamplerStart], want: str = "none") -> None:
        """Send one step to the compute process (sampling the flagged sequences there; a count k > 1
        verifies the chunk's last k - 1 tokens as drafts). A Ctrl-C is held back until the step is
        sent and recorded, which it would leave half done; a second goes through (a stalled send)."""
        with signals_deferred(("SIGINT",), second_at_once=True):
            self._call(self._submit(seqs, sample, starts, want))

    def collect(self) -> StepResult:
        """The oldest step in flight's ids (and logits when asked), once its ForwardDone came."""
        if not self.expected:
            raise PipelineError("collect() with no step in flight")
        return self._call(self._collect())

    def step(self, seqs: list[SeqStep], want: str = "last") -> torch.Tensor | None:
        """One step without sampling, its logits on the host (evaluation); interrupted, its answer dropped."""
        try:
            self.submit(seqs, [False] * len(seqs), [], want)
            return self.collect().logits
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        """Forget the steps in flight (after a failure: the core failed their requests); the
        compute process still takes their layers' slots and answers them, and those answers are
        dropped (NOTE [ a failed step ] in compute_proc.py)."""
        self.expected.clear()
        self.results.clear()
        self.failed_steps.clear()

    def check(self) -> None:
        """Between calls (an idle server): a child's death ends the run now, as in a call (a reader restarts)."""
        if not self.closed and self.sup.dead():
            self._call(self._check_children())

    def unwell(self) -> str | None:
        """Why the pipeline cannot serve now, or None, at once and from any thread (the server's /health):
        its failure, set before close() stops the children, or a child dead or stopped (Supervisor.unwell),
        which the idle check or a call's watchdog ends the run for only later."""
        return (self.failure or self.core.failure or ("the pipeline is closed" if self.closed else None)
                or self.sup.unwell())

    async def _submit(self, seqs: list[SeqStep], sample: list[int], starts: list[SamplerStart], want: str) -> None:
        n, self.next_step = self.next_step, self.next_step + 1
        wire = [ForwardSeq.of(s.row, s.tokens, s.slots, s.positions, s.kv_pos, int(f)) for s, f in zip(seqs, sample)]
        await self.links.send("compute", "compute", Forward(n, wire, want, starts, self.known_failed))
        if not self.expected:
            self.heard["compute"] = time.monotonic()  # (the watchdog counts from the first step sent)
        self.expected[n] = len(seqs)
        self.unbegun.append(n)
        await self._begin_steps()

    async def _begin_steps(self) -> None:
        """Let StreamCore order the next sent step's layers once it announced every layer of the
        step before (it holds one step's order at a time)."""
        while self.unbegun and not self.core.need:
            n = self.unbegun.popleft()
            announce = self.core.begin_step()
            if self.core.step_no != n:
                raise PipelineError(f"internal: step {n} sent, but the layer schedule is at step {self.core.step_no}")
            await self._send_all(announce)

    async def _collect(self) -> StepResult:
        n = min(self.expected)
        await self._run_until(lambda: n in self.results or n in self.failed_steps, stall=self.cfg.procs.stall_timeout_s)
        del self.expected[n]
        if self.expected:
            self.heard["compute"] = time.monotonic()  # (the next step's turn starts now)
        if n in self.failed_steps:
            self.known_failed = n
            raise StepError(f"step {n} failed in the compute process: {self.failed_steps.pop(n)}")
        return self.results.pop(n)

    # -- stats and stop ------------------------------------------------------------------------------

    def collect_stats(self, timeout_s: float = 3.0) -> list[Snapshot]:
        """Every process's stage timeline (StatsRequest to each child, then the coordinator's own)."""
        if self.closed:
            return list(self.stats_replies.values())

        async def ask():
            self.stats_replies = {}
            live = [i for i, c in self.sup.children.items() if c.proc.exitcode is None]
            for i in live:
                await self.links.send("control", i, StatsRequest())
            try:
                await self._run_until(lambda: all(i in self.stats_replies for i in live),
                                      time.monotonic() + timeout_s, "stats replies")
            except PipelineError as e:
                log.warning("%s", e)

        self._run(ask())
        snap = self.tl.snapshot()
        snap["count"].update({"prefetch_reads": self.core.sched.reads, "host_cache_hits": self.core.sched.hits})
        return list(self.stats_replies.values()) + [snap]

    def stats_table(self, snaps: list[Snapshot]) -> str:
        return format_stats(snaps, time.monotonic() - self.t_start, self.plan)

    def write_trace(self, path: str, snaps: list[Snapshot]) -> str:  # (the lines that say so)
        return trace_report(path, snaps)

    def close(self) -> None:
        """Stop every process (ask, wait, SIGTERM, SIGKILL), staging last; remove the run directory
        (whole: a signal meanwhile is held back until it is done, event_loop.signals_deferred)."""
        with signals_deferred():
            self._close()

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.close)
        workers = [i for i, c in self.sup.children.items() if c.role != "staging"]
        asked: set[str] = set()  # children the Shutdown reached; the others are not connected yet

        async def ask_stop():
            for i in workers + ["staging"]:
                c = self.sup.children.get(i)
                if c is not None and c.proc.exitcode is None and i not in self.hung and \
                        await self.links.send("control", i, Shutdown("run finished")):
                    asked.add(i)

        busy = self.calling or self.loop.is_running()  # (a call in progress on another thread)
        if busy:  # (it ends with this line once its wait wakes: the children are stopped below)
            self.failure = self.failure or "the pipeline was closed while a call waited on it"
        if self.links is not None and not self.loop.is_closed() and not busy:
            run_briefly(self.loop, ask_stop(), 1.0, "asking children to stop")
        # a child that was not asked cannot stop by itself: it is terminated at once, not waited for; the
        # others' ASK_WAIT_S counts from the Shutdown, which staging got with them
        end = time.monotonic() + ASK_WAIT_S
        self.sup.stop(workers, ASK_WAIT_S, asked, self.hung)
        self.sup.stop(["staging"], max(0.0, end - time.monotonic()), asked, self.hung)
        staging = self.sup.children.get("staging")
        if staging is not None:  # a staging killed before it could (another child's death ended the run first)
            remove_staging_arena(self.arena and self.arena.name, staging.proc)
        if not busy:
            self._release()

    def _release(self) -> None:
        """The sockets and the loop closed once no call runs on them (where one did, at its end in _run:
        closed under it, its sockets had raised a raw ZMQError in the caller)."""
        links, self.links = self.links, None
        if links is not None:
            links.close()
        if not self.loop.is_closed():
            self.loop.close()


def pipeline_backend(index: ModelIndex, ecfg, pcfg: PipelineConfig) -> Pipeline:
    from layerstream.compute.device import resolve_device, resolve_dtype
    from layerstream.compute.weights import check_model_quants
    from layerstream.coordinator.draft_plan import draft_memory_for, draft_tokens_for

    check_model_quants(index)
    device = resolve_device(ecfg.device)
    dtype = resolve_dtype(ecfg.dtype, device, index.hparams.arch, ecfg.weights)
    launch = make_launch(index, device, dtype, ecfg.ctx, ecfg.max_seqs, pcfg, sliding=ecfg.on_context_full == "slide",
                         weights=ecfg.weights, draft=draft_memory_for(ecfg, device, dtype), draft_tokens=draft_tokens_for(ecfg))
    return Pipeline(launch)


__all__ = ["Pipeline", "PipelineConfig", "StepError", "parse_cpu_share", "pipeline_backend"]
