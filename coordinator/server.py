"""The OpenAI-compatible HTTP server: Starlette on uvicorn (uvloop), over the engine core.

NOTE [ server threads ]
The engine (its core, and the streaming pipeline, which runs its own asyncio loop inside each
step) lives in a thread of its own. HTTP handlers run on uvicorn's loop and reach it only
through a command queue (add, abort) and per-request asyncio queues that the engine thread
fills with `call_soon_threadsafe`. Nothing of the engine is touched from the event loop, and
a handler whose client goes away, streamed or not, aborts its requests, which frees their KV
rows at once. Parsing a body and tokenizing its prompt run in a small thread pool, so a
megabyte prompt does not hold up the loop (`/health` included).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import secrets
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import uvicorn
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from layerstream.compute.sampling import SamplingParams
from layerstream.coordinator.core import RequestOutput
from layerstream.coordinator.http_guard import Guard, Limits, guarded_protocol, is_loopback
from layerstream.coordinator.openai_api import SEED_RANGE, ApiError, GenRequest, parse_json, parse_request
from layerstream.errors import LayerstreamError

log = logging.getLogger("layerstream.server")
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context_full": "length", "abort": "abort"}


@dataclass
class _Failure:
    """A request that could not run: refused when added (400), or the engine failed (503)."""

    message: str
    status: int = 400


class EngineWorker(threading.Thread):
    """The engine's own thread: takes add/abort commands, steps the core, hands out outputs.

    NOTE: a pass costs about the same for one sequence as for many, and a request that misses
    one waits a whole pass (0.7 s for a 70B at 8 GiB). So when a request wakes an idle engine,
    the first pass waits for the requests arriving with it: until none has come for `gather_gap_s`,
    and at most a quarter of the last pass's time. A burst of clients then shares its first pass,
    as it does when the bare engine is given its requests at once. A lone request waits only
    `gather_gap_s`.

    A step that fails fails its own requests (the core reports them with finish_reason "error")
    and the worker goes on, unless the backend is closed (a pipeline process died): then the
    engine has failed, and every request is answered 503 until a restart.
    """

    GATHER_GAP_S = 0.005
    GATHER_PASS_SHARE = 0.25
    GATHER_FIRST_S = 0.02  # the most it waits before any pass has been timed

    def __init__(self, engine, loop: asyncio.AbstractEventLoop, metrics: "Metrics", max_queue: int,
                 gather_gap_s: float = GATHER_GAP_S, gather_first_s: float = GATHER_FIRST_S):
        super().__init__(name="layerstream-engine", daemon=True)
        self.engine, self.core, self.loop, self.metrics = engine, engine.core, loop, metrics
        self.max_queue = max_queue  # requests waiting for a row at most: the one queue limit
        self.gather_gap_s, self.gather_first_s = gather_gap_s, gather_first_s
        self.last_pass_s: float | None = None
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.outputs: dict[str, asyncio.Queue] = {}
        self.pending_adds = 0
        self.failure: str | None = None
        self.stopping = threading.Event()

    def queued(self) -> int:
        return self.pending_adds + len(self.core.waiting)

    def submit(self, rids: list[str] | str, prompt: list[int], params, q: asyncio.Queue | None = None) -> asyncio.Queue:
        """Queue requests (one a choice) whose outputs go to one asyncio queue; 503/429 at once."""
        rids = [rids] if isinstance(rids, str) else rids
        params = params if isinstance(params, list) else [params] * len(rids)
        if self.failure:
            raise ApiError(503, f"the engine failed: {self.failure}", kind="server_error")
        if self.queued() + len(rids) > self.max_queue:
            raise ApiError(429, f"{self.queued()} requests are waiting, the most this server queues is "
                                f"{self.max_queue}; retry later", kind="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"})
        q = q if q is not None else asyncio.Queue()
        for rid, p in zip(rids, params):
            self.outputs[rid] = q
            self.pending_adds += 1
            self.commands.put(("add", rid, prompt, p))
        return q

    def abort(self, rid: str) -> None:
        self.commands.put(("abort", rid))

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
            self.pending_adds -= 1
            try:
                self.core.add_request(rid, prompt, params)
            except LayerstreamError as e:
                self._post(rid, _Failure(str(e)))
                self.outputs.pop(rid, None)
        elif cmd[0] == "abort":
            self.core.abort(cmd[1])
            self.outputs.pop(cmd[1], None)

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
        try:
            return self.core.step()
        except Exception as e:
            if getattr(self.engine, "backend", None) is not None and getattr(self.engine.backend, "closed", False):
                raise  # the backend cannot go on: the engine has failed
            why = str(e) if isinstance(e, LayerstreamError) else f"{type(e).__name__}: {e}"
            log.error("a step failed, its requests are answered 500: %s", why)
            return []

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                idle = not self.core.has_unfinished()
                self._take_commands(block=idle)
                if not self.core.has_unfinished():
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
            self.failure = f"{type(e).__name__}: {e}" if not isinstance(e, LayerstreamError) else str(e)
            log.error("engine failed: %s", self.failure)
            for rid in list(self.outputs):
                self._post(rid, _Failure(self.failure, 503))


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


class Server:
    """Routes and request handling; `app` is the ASGI application (behind the Guard middleware)."""

    def __init__(self, engine, model_id: str, api_key: str | None = None, max_queue: int = 256,
                 limits: Limits = Limits(), host: str = "127.0.0.1"):
        self.engine, self.model_id, self.api_key, self.max_queue = engine, model_id, api_key, max_queue
        self.limits = limits
        self.metrics = Metrics()
        self.worker: EngineWorker | None = None
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="layerstream-parse")  # bodies and prompts
        self.created = int(time.time())
        self.max_prompt_bytes = engine.cfg.ctx * _longest_piece(engine)
        errors = {404: self._not_found, 405: self._not_allowed, Exception: self._internal}
        self.app = Guard(Starlette(routes=[
            Route("/health", self.health),
            Route("/metrics", self.prometheus),
            Route("/v1/models", self.models),
            Route("/v1/models/{model_id:path}", self.model),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
        ], lifespan=self.lifespan, exception_handlers=errors), check_host=api_key is None, bound=host, log=log)

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        self.worker = EngineWorker(self.engine, asyncio.get_running_loop(), self.metrics, self.max_queue)
        self.worker.start()
        yield
        self.worker.stop()
        self.worker.join(timeout=30)
        self.pool.shutdown(wait=False, cancel_futures=True)

    # -- plumbing ----------------------------------------------------------------------------------

    @staticmethod
    def _error(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    async def _not_found(self, request: Request, exc: HTTPException) -> Response:
        return self._error(ApiError(404, f"no route {request.method} {request.url.path}; this server serves "
                                         "/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics",
                                    kind="invalid_request_error", code="not_found"))

    async def _not_allowed(self, request: Request, exc: HTTPException) -> Response:
        return self._error(ApiError(405, f"{request.method} is not allowed on {request.url.path}",
                                    code="method_not_allowed", headers=dict(exc.headers or {})))

    async def _internal(self, request: Request, exc: Exception) -> Response:
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        log.debug("the failure's traceback", exc_info=exc)
        return self._error(ApiError(500, f"internal error: {type(exc).__name__}", kind="server_error"))

    def _auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not secrets.compare_digest(got.encode(), f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           kind="authentication_error", code="invalid_api_key")

    async def _read_body(self, request: Request) -> bytes:
        """The body, read as it comes: 415 unless JSON, 413 past the size cap, 408 past the deadline."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(415, f"the body must be JSON, sent with 'Content-Type: application/json' (got "
                                f"{ctype[:60] or 'none'!r})", code="unsupported_media_type")
        cap = self.limits.body_bytes
        declared = request.headers.get("content-length", "")
        too_big = ApiError(413, f"the request body is larger than {cap >> 20} MiB", code="request_too_large",
                           headers={"Connection": "close"})
        if declared.isdigit() and int(declared) > cap:
            raise too_big
        chunks, size = [], 0

        async def read():
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > cap:
                    raise too_big
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), self.limits.body_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the body did not arrive within {self.limits.body_timeout_s:g} s",
                           code="request_timeout", headers={"Connection": "close"}) from None
        return b"".join(chunks)

    def _prepare(self, raw: bytes, kind: str) -> tuple[GenRequest, list[int]]:
        """Parse, check and tokenize a body (in the pool: off the event loop)."""
        body = parse_json(raw)
        model = body.get("model")
        if isinstance(model, str) and model != self.model_id:
            raise ApiError(404, f"model {model[:100]!r} does not exist; this server runs {self.model_id!r}", "model",
                           code="model_not_found")
        req = parse_request(body, kind, self.engine.hparams.n_vocab)
        ctx = self.engine.cfg.ctx
        where = "prompt" if kind == "completion" else "messages"
        size = sum(len(m["content"].encode()) for m in req.messages) if kind == "chat" else len((req.text or "").encode())
        if size > self.max_prompt_bytes:  # more tokens than the context holds, surely: not tokenized (_longest_piece)
            raise ApiError(400, f"the prompt is {size} bytes, more than this server's context of {ctx} tokens can hold",
                           where, code="context_length_exceeded")
        if kind == "chat":
            if self.engine.chat_template is None:
                raise ApiError(400, "this model's GGUF has no chat template; use /v1/completions", "messages")
            try:
                ids = self.engine.encode_chat(req.messages)
            except LayerstreamError as e:
                raise ApiError(400, str(e), "messages") from None
        else:
            ids = req.ids if req.ids is not None else self.engine.tokenizer.encode(req.text)
        if not ids:
            raise ApiError(400, "the prompt is empty", where)
        if len(ids) >= ctx:
            raise ApiError(400, f"the prompt is {len(ids)} tokens; this server's context is {ctx} tokens "
                                "(the prompt must leave room to generate)", where, code="context_length_exceeded")
        return req, ids

    @staticmethod
    def _choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
        """A seeded request's choices take seeds seed, seed+1, ... (each reproducible, not all alike)."""
        if params.seed is None:
            return [params] * n
        return [replace(params, seed=params.seed + i if params.seed + i <= SEED_RANGE[1] else params.seed - i)
                for i in range(n)]

    async def _generate(self, request: Request, kind: str, chunk, final) -> Response:
        """Check, submit one request a choice, then stream (SSE) or collect; chunk(i, text, reason) -> dict,
        final(texts, reasons, usage) -> dict."""
        self._auth(request)
        raw = await self._read_body(request)
        req, ids = await asyncio.get_running_loop().run_in_executor(self.pool, self._prepare, raw, kind)
        rids = [f"cmpl-{secrets.token_hex(12)}" for _ in range(req.n)]
        q = self.worker.submit(rids, ids, self._choice_params(req.params, req.n))
        index = {rid: i for i, rid in enumerate(rids)}
        usage = {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
        request.scope["layerstream.usage"] = (len(ids), 0)

        async def outputs():
            left = set(rids)
            try:
                while left:
                    item = await q.get()
                    if isinstance(item, _Failure):
                        raise ApiError(item.status, item.message,
                                       kind="server_error" if item.status >= 500 else "invalid_request_error")
                    if item.finish_reason == "error":
                        raise ApiError(500, f"the request failed: {item.error}", kind="server_error")
                    if item.finished:
                        left.discard(item.request_id)
                        usage["completion_tokens"] += item.completion_tokens
                        usage["total_tokens"] += item.completion_tokens
                        request.scope["layerstream.usage"] = (len(ids), usage["completion_tokens"])
                    yield index[item.request_id], item
            finally:
                for rid in left:  # the client went away (or an error): their rows go back at once
                    self.worker.abort(rid)

        if req.stream:
            def event(d: dict) -> str:
                return f"data: {json.dumps(d)}\n\n"

            async def sse():
                try:
                    async for i, o in outputs():
                        if o.text or o.token_ids or o.finished:  # a chunk a token, as OpenAI (text may be "")
                            c = chunk(i, o.text, FINISH.get(o.finish_reason) if o.finished else None)
                            yield event(c | {"usage": None} if req.include_usage else c)
                    if req.include_usage:
                        yield event(chunk(0, "", None) | {"choices": [], "usage": usage})
                    yield "data: [DONE]\n\n"
                except ApiError as e:
                    yield event(e.body())

            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        async def collect() -> Response:
            texts, reasons = [""] * req.n, ["stop"] * req.n
            async for i, o in outputs():
                texts[i] += o.text
                if o.finished:
                    reasons[i] = FINISH.get(o.finish_reason, "stop")
            return JSONResponse(final(texts, reasons, usage))

        async def gone() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        # a client that goes away before its answer aborts its requests, as a stream's does
        work, watch = asyncio.ensure_future(collect()), asyncio.ensure_future(gone())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError, ApiError):
                    await work  # its outputs() aborts what is left
            watch.cancel()
        if work.cancelled():
            return Response(status_code=499)  # nobody reads it
        return work.result()

    async def _handle(self, request: Request, kind: str, chunk, final) -> Response:
        try:
            return await self._generate(request, kind, chunk, final)
        except ApiError as e:
            return self._error(e)
        except ClientDisconnect:
            return Response(status_code=499)

    # -- endpoints ---------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        if self.worker is not None and self.worker.failure:
            return JSONResponse({"status": "error", "error": self.worker.failure}, status_code=503)
        return JSONResponse({"status": "ok", "model": self.model_id})

    async def prometheus(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type="text/plain; version=0.0.4")

    def _model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "layerstream"}

    async def models(self, request: Request) -> Response:
        try:
            self._auth(request)
        except ApiError as e:
            return self._error(e)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        try:
            self._auth(request)
            name = request.path_params["model_id"]
            if name != self.model_id:
                raise ApiError(404, f"model {name[:100]!r} does not exist; this server runs {self.model_id!r}",
                               "model", code="model_not_found")
        except ApiError as e:
            return self._error(e)
        return JSONResponse(self._model_card())

    async def completions(self, request: Request) -> Response:
        cid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())

        def chunk(i, text, reason):
            return {"id": cid, "object": "text_completion", "created": created, "model": self.model_id,
                    "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}]}

        def final(texts, reasons, usage):
            return {"id": cid, "object": "text_completion", "created": created, "model": self.model_id,
                    "choices": [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                                for i, (t, r) in enumerate(zip(texts, reasons))], "usage": usage}

        return await self._handle(request, "completion", chunk, final)

    async def chat(self, request: Request) -> Response:
        cid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        started: set[int] = set()

        def chunk(i, text, reason):
            delta = {"role": "assistant", "content": text} if i not in started else ({"content": text} if text else {})
            started.add(i)
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.model_id,
                    "choices": [{"index": i, "delta": delta, "finish_reason": reason}]}

        def final(texts, reasons, usage):
            return {"id": cid, "object": "chat.completion", "created": created, "model": self.model_id,
                    "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r}
                                for i, (t, r) in enumerate(zip(texts, reasons))], "usage": usage}

        return await self._handle(request, "chat", chunk, final)


def _longest_piece(engine) -> int:
    """Bytes of the vocabulary's longest token. A text of more than ctx times this many bytes has more
    than ctx tokens whatever it says, so it is refused untokenized: the tokenizer holds the GIL (and
    so the event loop) while it runs, about 15 s for 1 MB on a 2-core CPU."""
    tok = engine.tokenizer
    longest = 1
    for i in range(engine.hparams.n_vocab):
        with contextlib.suppress(Exception):  # ids past the tokenizer's vocabulary hold no text
            longest = max(longest, len(tok.token_bytes(i)))
    return longest


def uvicorn_config(server: Server, host: str, port: int, grace_s: float = 30.0) -> uvicorn.Config:
    """uvicorn's settings for a Server: its limits (NOTE [ HTTP limits ]), graceful stop within grace_s."""
    lim = server.limits
    return uvicorn.Config(server.app, host=host, port=port, loop="uvloop", http=guarded_protocol(lim),
                          log_level="warning", timeout_keep_alive=lim.keep_alive_s,
                          timeout_graceful_shutdown=grace_s, lifespan="on", access_log=False)


def serve(engine, model_path: str, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
          max_queue: int = 256, grace_s: float = 30.0, limits: Limits = Limits()) -> int:
    """Serve until SIGTERM or SIGINT: then stop accepting, let requests finish within `grace_s`.

    The exit status is the CLI's rule for both: uvicorn re-raises the signal once it has drained,
    and the CLI exits 128 + its number (130 for Ctrl-C, 143 for SIGTERM)."""
    model_id = os.path.basename(model_path).removesuffix(".gguf")
    if not api_key and not is_loopback(host):
        print(f"layerstream: warning: serving on {host} without an API key: anyone who can reach port {port} can "
              "use the model; give a key with --api-key-file FILE or LAYERSTREAM_API_KEY", file=sys.stderr, flush=True)
    server = Server(engine, model_id, api_key or None, max_queue, limits, host)
    print(f"layerstream: serving {model_id} on http://{host}:{port}/v1", flush=True)
    uvicorn.Server(uvicorn_config(server, host, port, grace_s)).run()
    return 0
