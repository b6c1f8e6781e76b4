"""The engine's own thread behind the HTTP server, and the server's Prometheus metrics.

NOTE [ server threads ] in server.py says how the HTTP loop and this thread meet.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from layerstream.coordinator.core import RequestOutput
from layerstream.coordinator.openai_api import STOPPING, ApiError
from layerstream.errors import LayerstreamError

log = logging.getLogger("layerstream.server")


@dataclass(frozen=True)
class Cut:
    """A request ended by the server, not the engine (EngineWorker.cut_all): finish_reason "abort"."""

    request_id: str


class EngineWorker(threading.Thread):
    """The engine's own thread: takes add/abort commands, steps the core, hands out outputs.

    NOTE: a pass costs about the same for one sequence as for many, and a request that misses
    one waits a whole pass (0.7 s for a 70B at 8 GiB). So when a request wakes an idle engine,
    the first pass waits for the requests arriving with it: until none has come for `gather_gap_s`,
    and at most a quarter of the last pass's time. A burst of clients then shares its first pass,
    as it does when the bare engine is given its requests at once. A lone request waits only
    `gather_gap_s`.

    A step that fails fails its own requests (the core reports them with finish_reason "error")
    and the worker goes on, unless the backend is closed (a pipeline process died, seen in a step
    or, while idle, by its `check`) or
    MAX_FAILED_STEPS steps in a row failed (a device left unusable): then the engine has failed,
    every request is answered 503 (ended as a Cut where the server stops already), and `on_failure`
    is called on the loop (the server stops and exits non-zero, so that whatever supervises it
    starts it again).
    """

    MAX_FAILED_STEPS = 3

    GATHER_GAP_S = 0.005
    GATHER_PASS_SHARE = 0.25
    GATHER_FIRST_S = 0.02  # the most it waits before any pass has been timed

    def __init__(self, engine, loop: asyncio.AbstractEventLoop, metrics: "Metrics", max_queue: int,
                 gather_gap_s: float = GATHER_GAP_S, gather_first_s: float = GATHER_FIRST_S,
                 on_failure: Callable[[], None] | None = None):
        super().__init__(name="layerstream-engine", daemon=True)
        self.engine, self.core, self.loop, self.metrics = engine, engine.core, loop, metrics
        self.max_queue = max_queue  # requests waiting for a row at most: the one queue limit
        self.gather_gap_s, self.gather_first_s = gather_gap_s, gather_first_s
        self.last_pass_s: float | None = None
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.outputs: dict[str, asyncio.Queue] = {}
        self.failure: str | None = None
        self.on_failure = on_failure
        self.failed_steps = 0  # in a row
        self.stopping = threading.Event()
        self.closing = False  # abort_all was called: requests submitted from now on are refused (503)
        self.draining = False  # the server stops (Server.stop_began): a failure from now on ends requests as a Cut
        # the backend's look at its processes between steps (Pipeline.check), every half second while idle
        self.check: Callable[[], None] | None = getattr(getattr(engine, "backend", None), "check", None)
        # what the backend sees of its processes at once, from any thread (Pipeline.unwell)
        self.unwell: Callable[[], str | None] | None = getattr(getattr(engine, "backend", None), "unwell", None)

    def trouble(self) -> str | None:
        """Why the engine cannot serve now, or None (the server's /health): its failure, or a process of its
        backend dead or stopped, seen at once, before the idle check or a step fails the engine for it."""
        return self.failure or (self.unwell() if self.unwell is not None else None)

    def rows(self) -> int:
        """Requests the engine runs at once (its KV rows)."""
        return self.core.max_seqs

    def queued(self) -> int:
        """Requests waiting beyond those the engine runs at once: every request submitted and not yet
        answered (self.outputs: queued adds, waiting and running alike), less the engine's rows. The
        core's own waiting list is no measure: a burst's requests sit there, or in the command queue,
        for the pass or two before their rows are taken, though rows are free for them."""
        return max(len(self.outputs) - self.rows(), 0)

    def submit(self, rids: list[str] | str, prompt: list[int], params, q: asyncio.Queue | None = None) -> asyncio.Queue:
        """Queue requests (one a choice) whose outputs go to one asyncio queue; 503/429 at once."""
        rids = [rids] if isinstance(rids, str) else rids
        params = params if isinstance(params, list) else [params] * len(rids)
        if self.failure:
            raise ApiError(503, f"the engine failed: {self.failure}", kind="server_error")
        if self.closing:
            raise ApiError(503, STOPPING, kind="server_error", code="server_stopping")
        most = self.max_queue + self.rows()
        if len(rids) > most:  # (never admitted: a retry would be refused again)
            raise ApiError(400, f"n={len(rids)} asks for more choices than this server runs and queues at once "
                                f"({self.rows()} rows, --max-queue {self.max_queue}); ask for at most {most}",
                           param="n", code="invalid_value")
        waiting = max(len(self.outputs) + len(rids) - self.rows(), 0)
        if waiting > self.max_queue:
            now = self.queued()
            raise ApiError(429, f"{now} {'request is' if now == 1 else 'requests are'} waiting beyond the "
                                f"{self.rows()} this server runs at once, and it queues at most {self.max_queue} "
                                "(--max-queue); retry later", kind="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"})
        q = q if q is not None else asyncio.Queue()
        for rid, p in zip(rids, params):
            self.outputs[rid] = q
            self.commands.put(("add", rid, prompt, p))
        return q

    def abort(self, rid: str) -> None:
        self.commands.put(("abort", rid))

    def abort_all(self) -> None:
        """Abort every request (the server's grace ran out): each is answered with what it has, its
        last output finish_reason "abort", after the step in flight; later submits are refused."""
        self.closing = True
        self.commands.put(("abort_all",))

    def cut_all(self) -> None:
        """On the loop, where the engine did not answer abort_all (stuck in a step): each request still
        waiting gets a Cut, which its handler answers as the engine's abort (NOTE [ server shutdown ])."""
        for rid, q in list(self.outputs.items()):
            q.put_nowait(Cut(rid))

    def stop(self) -> None:
        self.stopping.set()
        self.commands.put(("wake",))

    def _post(self, rid: str, item) -> None:
        q = self.outputs.get(rid)
        if q is not None:
            self.loop.call_soon_threadsafe(q.put_nowait, item)

    def _apply(self, cmd) -> None:
        if cmd[0] == "add":
            _, rid, prompt, params = cmd
            try:
                self.core.add_request(rid, prompt, params)
            except Exception as e:  # refused (a LayerstreamError: 400), or a fault of this request alone
                bad = isinstance(e, LayerstreamError)
                self._post(rid, ApiError(400, str(e)) if bad else
                           ApiError(500, f"{type(e).__name__}: {e}", kind="server_error"))
                self.outputs.pop(rid, None)
        elif cmd[0] == "abort":
            self.core.abort(cmd[1])
            self.outputs.pop(cmd[1], None)
        elif cmd[0] == "abort_all":  # (their outputs stay: the next step reports the aborts to them)
            for rid in list(self.outputs):
                self.core.abort(rid)

    def _take_commands(self, block: bool) -> None:
        try:
            cmd = self.commands.get(timeout=0.5) if block else self.commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(cmd)
            try:
                cmd = self.commands.get_nowait()
            except queue.Empty:
                return

    def _gather(self) -> None:
        """From idle: take the requests arriving with the first (see the class NOTE)."""
        cap = self.gather_first_s if self.last_pass_s is None else self.GATHER_PASS_SHARE * self.last_pass_s
        deadline = time.perf_counter() + cap
        while not self.stopping.is_set():
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            try:
                cmd = self.commands.get(timeout=min(self.gather_gap_s, left))
            except queue.Empty:
                return
            self._apply(cmd)

    def _step(self) -> list[RequestOutput]:
        """One core step; a failed one is logged and its requests come out of the next (class NOTE)."""
        ran = self.core.steps
        try:
            outs = self.core.step()
        except Exception as e:
            self.failed_steps += 1
            if getattr(getattr(self.engine, "backend", None), "closed", False) \
                    or self.failed_steps >= self.MAX_FAILED_STEPS:
                raise  # the backend cannot go on: the engine has failed
            why = str(e) if isinstance(e, LayerstreamError) else f"{type(e).__name__}: {e}"
            log.error("a step failed, its requests are answered 500: %s", why)
            return []
        if self.core.steps != ran:  # a backend step ran, and did not fail
            self.failed_steps = 0
        return outs

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                idle = not self.core.has_unfinished()
                self._take_commands(block=idle)
                if not self.core.has_unfinished():
                    if idle and self.check is not None:  # a child that died while idle fails the engine now
                        self.check()
                    continue
                if idle:
                    self._gather()
                t0 = time.perf_counter()
                outs = self._step()
                self.last_pass_s = time.perf_counter() - t0
                self.metrics.step(self.last_pass_s, outs, self.core)
                for o in outs:
                    self._post(o.request_id, o)
                    if o.finished:
                        self.outputs.pop(o.request_id, None)
        except BaseException as e:  # noqa: BLE001 - the engine is gone: every waiting client is told
            if self.stopping.is_set():  # the server stops and closes the engine under a step: no failure
                log.debug("the engine's step ended with the server: %s: %s", type(e).__name__, e)
                return
            self.failure = f"{type(e).__name__}: {e}" if not isinstance(e, LayerstreamError) else str(e)
            self.loop.call_soon_threadsafe(self._failed)

    def _failed(self) -> None:
        """On the loop, once the engine failed: each request still waiting is answered 503, or, where the
        server stops already (the watchdog's verdict within the stop's grace), ends as the stop ends the
        others, a Cut (NOTE [ server shutdown ]); then on_failure."""
        # the stop that on_failure starts ends with the one line that says it (serve raises it), where an error
        # here was a second; a stop for a signal ends with its own line, and this one says why the engine failed
        said = self.on_failure is not None and not self.draining
        log.log(logging.DEBUG if said else logging.ERROR, "engine failed: %s", self.failure)
        for rid, q in list(self.outputs.items()):
            q.put_nowait(Cut(rid) if self.draining else ApiError(503, self.failure, kind="server_error"))
        if self.on_failure is not None:
            self.on_failure()


class Metrics:
    """Prometheus gauges and counters of the engine (one registry a server)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue = Gauge("layerstream_queue_length", "requests waiting for a KV row", registry=r)
        self.running = Gauge("layerstream_running_sequences", "sequences holding a KV row", registry=r)
        self.pass_s = Histogram("layerstream_pass_seconds", "seconds of one engine step (a forward pass)", registry=r,
                                buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10))
        self.tokens = Counter("layerstream_generated_tokens", "tokens generated", registry=r)
        self.requests = Counter("layerstream_finished_requests", "requests finished, by reason", ["reason"],
                                registry=r)
        self.reused = Counter("layerstream_prefix_reused_tokens",
                              "prompt tokens whose KV an earlier request left in its row (not prefilled again)", registry=r)
        self._reused_seen = 0
        # speculative decoding (lookup.LookupStats): acceptance = accepted / drafted, tokens a pass =
        # spec tokens / spec passes, the drafting's share = draft seconds over the passes' seconds
        self.spec = {k: Counter(f"layerstream_spec_{k}", help_, registry=r) for k, help_ in (
            ("passes", "decode passes of sequences that may draft"), ("tokens", "tokens those passes gave"),
            ("drafted", "drafted tokens sent to be verified"), ("accepted", "drafted tokens accepted"),
            ("draft_s", "seconds spent proposing drafts"))}
        self._spec_seen: dict[str, float] = dict.fromkeys(self.spec, 0)

    def step(self, seconds: float, outs: list[RequestOutput], core) -> None:
        self.pass_s.observe(seconds)
        self.tokens.inc(sum(len(o.token_ids) for o in outs))
        for o in outs:
            if o.finished:
                self.requests.labels(o.finish_reason or "unknown").inc()
        self.queue.set(len(core.waiting))
        self.running.set(len(core.running))
        self.reused.inc(core.reused_tokens - self._reused_seen)
        self._reused_seen = core.reused_tokens
        spec = getattr(core, "spec", None)
        for k, c in self.spec.items() if spec is not None else ():
            now = getattr(spec, k)
            c.inc(now - self._spec_seen[k])
            self._spec_seen[k] = now


