"""The OpenAI-compatible HTTP server: Starlette on uvicorn (uvloop), over the engine core.

NOTE [ server threads ]
The engine (its core, and the streaming pipeline, which runs its own asyncio loop inside each
step) lives in a thread of its own. HTTP handlers run on uvicorn's loop and reach it only
through a command queue (add, abort) and per-request asyncio queues that the engine thread
fills with `call_soon_threadsafe`. Nothing of the engine is touched from the event loop, and
a handler whose client goes away aborts its request, which frees its KV row at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import secrets
import threading
import time
from dataclasses import dataclass

import uvicorn
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from layerstream.compute.sampling import SamplingParams
from layerstream.coordinator.core import RequestOutput
from layerstream.errors import LayerstreamError

log = logging.getLogger("layerstream.server")
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context_full": "length", "abort": "abort"}


class ApiError(Exception):
    """An OpenAI-style error: HTTP status, message, offending parameter."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.status}}, status_code=self.status, headers=self.headers)


@dataclass
class _Failure:
    message: str


class EngineWorker(threading.Thread):
    """The engine's own thread: takes add/abort commands, steps the core, hands out outputs.

    NOTE: a pass costs about the same for one sequence as for many, and a request that misses
    one waits a whole pass (0.7 s for a 70B at 8 GiB). So when a request wakes an idle engine,
    the first pass waits for the requests arriving with it: until none has come for `gather_gap_s`,
    and at most a quarter of the last pass's time. A burst of clients then shares its first pass,
    as it does when the bare engine is given its requests at once. A lone request waits only
    `gather_gap_s`.
    """

    GATHER_GAP_S = 0.005
    GATHER_PASS_SHARE = 0.25
    GATHER_FIRST_S = 0.02  # the most it waits before any pass has been timed

    def __init__(self, engine, loop: asyncio.AbstractEventLoop, metrics: "Metrics", max_queue: int,
                 gather_gap_s: float = GATHER_GAP_S, gather_first_s: float = GATHER_FIRST_S):
        super().__init__(name="layerstream-engine", daemon=True)
        self.engine, self.core, self.loop, self.metrics = engine, engine.core, loop, metrics
        self.max_queue = max_queue
        self.gather_gap_s, self.gather_first_s = gather_gap_s, gather_first_s
        self.last_pass_s: float | None = None
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.outputs: dict[str, asyncio.Queue] = {}
        self.pending_adds = 0
        self.failure: str | None = None
        self.stopping = threading.Event()

    def queued(self) -> int:
        return self.pending_adds + len(self.core.waiting)

    def submit(self, rid: str, prompt: list[int], params: SamplingParams) -> asyncio.Queue:
        if self.failure:
            raise ApiError(503, f"the engine failed: {self.failure}", kind="server_error")
        if self.queued() >= self.max_queue:
            raise ApiError(429, f"{self.queued()} requests are waiting, the most this server queues; retry later",
                           kind="rate_limit_error", headers={"Retry-After": "1"})
        q: asyncio.Queue = asyncio.Queue()
        self.outputs[rid] = q
        self.pending_adds += 1
        self.commands.put(("add", rid, prompt, params))
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
                outs = self.core.step()
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
                self._post(rid, _Failure(self.failure))


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


def _number(body: dict, key: str, default, kind, low=None, high=None):
    v = body.get(key, default)
    if v is None:
        return default
    if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise ApiError(400, f"'{key}' must be an integer", key)
    if kind is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
        raise ApiError(400, f"'{key}' must be a number", key)
    if (low is not None and v < low) or (high is not None and v > high) or (kind is float and v != v):
        raise ApiError(400, f"'{key}' = {v} is out of range [{low}, {high}]", key)
    return kind(v)


def sampling_from(body: dict, max_tokens_default: int) -> SamplingParams:
    """SamplingParams from an OpenAI request body; a bad value is a 400 naming the parameter."""
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 16:
        stop = tuple(stop)
    else:
        raise ApiError(400, "'stop' must be a string or a list of at most 16 strings", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, "'seed' must be an integer", "seed")
    temperature = _number(body, "temperature", 1.0, float, 0.0, 100.0)
    if 0 < temperature < 1e-4:
        temperature = 0.0  # too small to sample with: greedy, as llama.cpp's server does
    return SamplingParams(
        temperature=temperature,
        top_p=_number(body, "top_p", 1.0, float, 0.0, 1.0),
        top_k=_number(body, "top_k", 0, int, 0, 1 << 31),
        min_p=_number(body, "min_p", 0.0, float, 0.0, 1.0),
        repeat_penalty=_number(body, "repeat_penalty", 1.0, float, 1e-6, 100.0),
        seed=seed,
        max_tokens=_number(body, "max_tokens", max_tokens_default, int, 1, 1 << 22),
        stop=stop,
        ignore_eos=bool(body.get("ignore_eos", False)),
    )


class Server:
    """Routes and request handling; `app` is the ASGI application."""

    def __init__(self, engine, model_id: str, api_key: str | None = None, max_queue: int = 256):
        self.engine, self.model_id, self.api_key, self.max_queue = engine, model_id, api_key, max_queue
        self.metrics = Metrics()
        self.worker: EngineWorker | None = None
        self.created = int(time.time())
        self.app = Starlette(routes=[
            Route("/health", self.health),
            Route("/metrics", self.prometheus),
            Route("/v1/models", self.models),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
        ], lifespan=self.lifespan)

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        self.worker = EngineWorker(self.engine, asyncio.get_running_loop(), self.metrics, self.max_queue)
        self.worker.start()
        yield
        self.worker.stop()
        self.worker.join(timeout=30)

    # -- plumbing ----------------------------------------------------------------------------------

    def _auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not secrets.compare_digest(got.encode(), f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           kind="authentication_error")

    async def _body(self, request: Request) -> dict:
        self._auth(request)
        raw = await request.body()
        if len(raw) > 16 << 20:
            raise ApiError(413, "the request body is larger than 16 MiB")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model_id:
            raise ApiError(404, f"model {model!r} does not exist; this server runs {self.model_id!r}", "model",
                           kind="not_found_error")
        return body

    def _check_prompt(self, ids: list[int]) -> None:
        ctx = self.engine.cfg.ctx
        if not ids:
            raise ApiError(400, "the prompt is empty", "prompt")
        if len(ids) >= ctx:
            raise ApiError(400, f"the prompt is {len(ids)} tokens; this server's context is {ctx} tokens "
                                "(the prompt must leave room to generate)", "prompt", kind="context_length_exceeded")

    async def _run(self, ids: list[int], params: SamplingParams, stream: bool, chunk, final):
        """Submit, then stream (SSE) or collect. chunk(text, reason) -> dict; final(text, reason, usage) -> dict."""
        self._check_prompt(ids)
        rid = f"cmpl-{secrets.token_hex(12)}"
        q = self.worker.submit(rid, ids, params)

        async def outputs():
            done = False
            try:
                while True:
                    item = await q.get()
                    if isinstance(item, _Failure):
                        raise ApiError(503 if self.worker.failure else 400, item.message,
                                       kind="server_error" if self.worker.failure else "invalid_request_error")
                    yield item
                    if item.finished:
                        done = True
                        return
            finally:
                if not done:  # the client went away (or an error): its row goes back at once
                    self.worker.abort(rid)

        if stream:
            async def sse():
                try:
                    async for o in outputs():
                        if o.text or o.token_ids or o.finished:  # a chunk a token, as OpenAI (text may be "")
                            yield f"data: {json.dumps(chunk(o.text, FINISH.get(o.finish_reason) if o.finished else None))}\n\n"
                    yield "data: [DONE]\n\n"
                except ApiError as e:
                    yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.kind}})}\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text, last = "", None
        async for o in outputs():
            text += o.text
            last = o
        usage = {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
                 "total_tokens": last.prompt_tokens + last.completion_tokens}
        return JSONResponse(final(text, FINISH.get(last.finish_reason, "stop"), usage))

    # -- endpoints ---------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        if self.worker is not None and self.worker.failure:
            return JSONResponse({"status": "error", "error": self.worker.failure}, status_code=503)
        return JSONResponse({"status": "ok", "model": self.model_id})

    async def prometheus(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type="text/plain; version=0.0.4")

    async def models(self, request: Request) -> Response:
        try:
            self._auth(request)
        except ApiError as e:
            return e.response()
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "layerstream"}]})

    async def completions(self, request: Request) -> Response:
        try:
            body = await self._body(request)
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if isinstance(prompt, str):
                ids = self.engine.tokenizer.encode(prompt)
            elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                             for t in prompt):
                V = self.engine.hparams.n_vocab
                if not all(0 <= t < V for t in prompt):
                    raise ApiError(400, f"'prompt' holds token ids outside 0..{V - 1}", "prompt")
                ids = list(prompt)
            else:
                raise ApiError(400, "'prompt' must be a string or a list of token ids", "prompt")
            params = sampling_from(body, 16)
            stream = bool(body.get("stream", False))
            cid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())

            def chunk(text, reason):
                return {"id": cid, "object": "text_completion", "created": created, "model": self.model_id,
                        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]}

            def final(text, reason, usage):
                return dict(chunk(text, reason), usage=usage)

            return await self._run(ids, params, stream, chunk, final)
        except ApiError as e:
            return e.response()

    async def chat(self, request: Request) -> Response:
        try:
            body = await self._body(request)
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages):
                raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects with "
                                    "string content", "messages")
            if self.engine.chat_template is None:
                raise ApiError(400, "this model's GGUF has no chat template; use /v1/completions", "messages")
            try:
                ids = self.engine.encode_chat([{"role": m["role"], "content": m["content"]} for m in messages])
            except LayerstreamError as e:
                raise ApiError(400, str(e), "messages") from None
            params = sampling_from(body, 256)
            stream = bool(body.get("stream", False))
            cid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
            first = [True]

            def chunk(text, reason):
                delta = {"role": "assistant", "content": text} if first[0] else ({"content": text} if text else {})
                first[0] = False
                return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.model_id,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}

            def final(text, reason, usage):
                return {"id": cid, "object": "chat.completion", "created": created, "model": self.model_id,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "finish_reason": reason}], "usage": usage}

            return await self._run(ids, params, stream, chunk, final)
        except ApiError as e:
            return e.response()


def serve(engine, model_path: str, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
          max_queue: int = 256, grace_s: float = 30.0) -> int:
    """Serve until SIGTERM or SIGINT: then stop accepting, let requests finish within `grace_s`."""
    model_id = os.path.basename(model_path).removesuffix(".gguf")
    server = Server(engine, model_id, api_key, max_queue)
    config = uvicorn.Config(server.app, host=host, port=port, loop="uvloop", log_level="warning",
                            timeout_graceful_shutdown=grace_s, lifespan="on")
    print(f"layerstream: serving {model_id} on http://{host}:{port}/v1", flush=True)
    uvicorn.Server(config).run()
    return 0
