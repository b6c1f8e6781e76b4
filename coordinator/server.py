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
import secrets
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import uvicorn
from prometheus_client import generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from layerstream.compute.sampling import SamplingParams
from layerstream.coordinator.engine_worker import Cut, EngineWorker, Metrics
from layerstream.coordinator.http_body import BodyReader
from layerstream.coordinator.http_guard import Guard, Limits, guarded_protocol, is_loopback
from layerstream.coordinator.listen import bound_socket
from layerstream.coordinator.openai_api import (
    DEFAULTS,
    HEAVY_CONTAINERS,
    SEED_RANGE,
    STOPPING,
    ApiError,
    GenRequest,
    containers,
    parse_json,
    parse_request,
)
from layerstream.coordinator.outputs import RequestOutput
from layerstream.coordinator.server_stop import GRACE_S, GracefulServer
from layerstream.errors import LayerstreamError, PipelineError
from layerstream.proto.signals import RAISED, restore, set_handlers

log = logging.getLogger("layerstream.server")
MAX_QUOTED = 100  # characters of a path an error message quotes
LARGE_BODY = 1 << 20  # bytes from which a body is parsed in the large bodies' own thread (Server.large_pool)
CTX = "context_length_exceeded"  # OpenAI's code for a prompt longer than the context
STUCK_S = 5.0  # how long a stop waits for the engine's thread before it stops the pipeline's processes under it
HURRIED_S = 0.5  # the same after a second signal: a healthy engine's step ends within it, a hung one's never
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context_full": "length", "abort": "abort"}


class Server:
    """Routes and request handling; `app` is the ASGI application (behind the Guard middleware)."""

    def __init__(self, engine, model_id: str, api_key: str | None = None, max_queue: int = 256,
                 limits: Limits = Limits(), host: str = "127.0.0.1", defaults: dict = DEFAULTS):
        self.engine, self.model_id, self.api_key, self.max_queue = engine, model_id, api_key, max_queue
        self.defaults = defaults  # sampling for the fields a request does not set (openai_api.DEFAULTS' keys)
        self.limits = limits
        self.body = BodyReader(limits)
        self.bodies, self.body_reads = self.body.budget, self.body.reads  # (bodies still arriving: end_requests ends them)
        self.metrics = Metrics()
        self.worker: EngineWorker | None = None
        self.on_failure = None  # called on the loop once the engine has failed (serve: stop, exit non-zero)
        self.hurried = lambda: False  # a second signal came (serve: GracefulServer.force_exit)
        self.ending = False  # end_requests was called: the server stops
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="layerstream-parse")  # bodies and prompts
        # bodies of LARGE_BODY bytes or more, or of HEAVY_CONTAINERS arrays and objects, one at a time in a thread
        # of their own: a 16 MiB body of junk JSON takes seconds to parse, and two of them held both threads, so
        # every small request waited (a probe's)
        self.large_pool = ThreadPoolExecutor(1, thread_name_prefix="layerstream-parse-large")
        self.created = int(time.time())
        self.max_prompt_bytes = engine.cfg.ctx * engine.tokenizer.longest_piece
        errors = {404: self._not_found, 405: self._not_allowed, Exception: self._internal}
        self.app = Guard(Starlette(routes=[
            Route("/health", self.health),
            Route("/metrics", self.prometheus),
            Route("/v1/models", self.models),
            Route("/v1/models/{model_id:path}", self.model),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
        ], lifespan=self.lifespan, exception_handlers=errors), check_host=api_key is None, bound=host, log=log)
        self.app.app.router.redirect_slashes = False  # (a 404: Starlette's 307, no body, to the client's Host)

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        self.worker = EngineWorker(self.engine, asyncio.get_running_loop(), self.metrics, self.max_queue,
                                   on_failure=lambda: self.on_failure and self.on_failure())
        self.worker.start()
        yield
        self.worker.stop()
        end = time.monotonic() + STUCK_S
        while self.worker.is_alive() and time.monotonic() < end:
            if self.hurried():  # a second signal: HURRIED_S at most from now
                end = min(end, time.monotonic() + HURRIED_S)
            self.worker.join(timeout=0.05)  # (in slices: a second signal's handler runs between them)
        backend = self.engine.backend
        if self.worker.is_alive() and getattr(backend, "calling", False):
            # its call waits on a hung child (the watchdog would end it after --stall-timeout): the
            # pipeline's close from here stops the children, and the call ends with one line
            if not self.hurried():  # (a second signal asked for just that)
                log.warning("the engine did not stop within %g s; stopping its processes", STUCK_S)
            backend.close()
        self.worker.join(timeout=30)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.large_pool.shutdown(wait=False, cancel_futures=True)

    def stop_began(self) -> None:
        """The server stops (NOTE [ server shutdown ]): an engine that fails from now on ends the requests
        left as the stop does, finish_reason "abort", not with an error event."""
        if self.worker is not None:
            self.worker.draining = True

    def end_requests(self) -> None:
        """The stop's grace ran out (NOTE [ server shutdown ]): the engine aborts its requests, and a body
        still arriving, or one whose reading starts from now on, is answered 503 at once: the stop waits
        past the grace only for the engine's aborts, never for a client's upload."""
        self.ending = True
        if self.worker is not None:
            self.worker.abort_all()
        for t in list(self.body_reads):
            t.cancel()

    def cut_requests(self) -> None:
        """The engine did not answer end_requests' aborts (its step hangs): the requests still waiting are
        answered from here as the engine would, finish_reason "abort" (NOTE [ server shutdown ])."""
        if self.worker is not None:
            self.worker.cut_all()

    # -- plumbing ----------------------------------------------------------------------------------

    @staticmethod
    def _error(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    async def _not_found(self, request: Request, exc: HTTPException) -> Response:
        return self._error(ApiError(404, f"no route {request.method[:20]} {_path(request)}; this server serves "
                                         "/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics",
                                    kind="invalid_request_error", code="not_found"))

    async def _not_allowed(self, request: Request, exc: HTTPException) -> Response:
        return self._error(ApiError(405, f"{request.method[:20]} is not allowed on {_path(request)}",
                                    code="method_not_allowed", headers=dict(exc.headers or {})))

    async def _internal(self, request: Request, exc: Exception) -> Response:
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        log.debug("the failure's traceback", exc_info=exc)
        return self._error(ApiError(500, f"internal error: {type(exc).__name__}", kind="server_error"))

    def _auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        if len(request.headers.getlist("authorization")) > 1:  # (the first one decided, silently)
            raise ApiError(400, "the request has more than one Authorization header; send one", code="invalid_api_key")
        scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
        # the scheme is case-insensitive (RFC 7235: "bearer" is Bearer); the key is not
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", kind="authentication_error",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})  # (RFC 7235 asks it of a 401)

    async def _read_body(self, request: Request) -> tuple[bytes, int]:
        """BodyReader.read; 503 once the server stops (end_requests), a body still arriving included."""
        if self.ending:
            raise _stopping()
        try:
            return await self.body.read(request)
        except asyncio.CancelledError:
            if self.ending and not asyncio.current_task().cancelling():  # (by end_requests, not this handler's)
                raise _stopping() from None
            raise

    def _prepare(self, raw: bytes, kind: str, opens: int) -> tuple[GenRequest, list[int]]:
        """Parse, check and tokenize a body (in the pool: off the event loop); opens: containers(raw)."""
        body = parse_json(raw, opens)
        model = body.get("model")
        if isinstance(model, str) and model != self.model_id:
            raise ApiError(404, f"model {model[:100]!r} does not exist; this server runs {self.model_id!r}", "model",
                           code="model_not_found")
        req = parse_request(body, kind, self.engine.hparams.n_vocab, self.defaults)
        ctx, where = self.engine.cfg.ctx, ("prompt" if kind == "completion" else "messages")
        size = sum(len(m["content"].encode()) for m in req.messages) if kind == "chat" else len((req.text or "").encode())
        if size > self.max_prompt_bytes:  # more tokens than the context holds, surely: not tokenized (Tokenizer.longest_piece)
            raise ApiError(400, f"the prompt is {size} bytes, more than a context of {ctx} tokens holds", where, code=CTX)
        if kind == "chat" and len(req.messages) >= ctx:  # (a token a message at least: refused before its render)
            raise ApiError(400, f"{len(req.messages)} messages, more than a context of {ctx} tokens holds", where, code=CTX)
        if kind == "chat":
            if self.engine.chat_template is None:
                raise ApiError(400, "this model's GGUF has no chat template; use /v1/completions", "messages")
            try:
                ids = self.engine.encode_chat(req.messages, req.add_generation_prompt, req.continue_final)
            except LayerstreamError as e:
                raise ApiError(400, str(e), "messages") from None
        else:
            ids = req.ids if req.ids is not None else self.engine.tokenizer.encode(req.text)
        if not ids:
            raise ApiError(400, "the prompt is empty", where)
        if len(ids) >= ctx:
            raise ApiError(400, f"the prompt is {len(ids)} tokens; this server's context is {ctx} tokens "
                                "(the prompt must leave room to generate)", where, code=CTX)
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
        raw, held = await self._read_body(request)
        try:
            opens = containers(raw)  # (counted once: parse_json's bound reads it too)
            pool = self.large_pool if len(raw) >= LARGE_BODY or opens >= HEAVY_CONTAINERS else self.pool
            req, ids = await asyncio.get_running_loop().run_in_executor(pool, self._prepare, raw, kind, opens)
        finally:
            self.bodies.give(held)
            del raw  # (the prompt lives on in req and ids)
        rids = [f"cmpl-{secrets.token_hex(12)}" for _ in range(req.n)]
        q = self.worker.submit(rids, ids, self._choice_params(req.params, req.n))
        index = {rid: i for i, rid in enumerate(rids)}
        usage = {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
        request.scope["layerstream.usage"] = (len(ids), 0)

        async def outputs():
            left = set(rids)
            made = dict.fromkeys(rids, 0)  # each choice's completion_tokens so far (a cut stream's, for the log)
            try:
                while left:
                    item = await q.get()
                    if isinstance(item, ApiError):  # refused when added, or the engine failed
                        raise item
                    if isinstance(item, Cut):  # the server stops and the engine did not answer
                        if item.request_id not in left:
                            continue
                        item = RequestOutput(item.request_id, "", [], True, "abort",
                                             completion_tokens=made[item.request_id])
                    made[item.request_id] = item.completion_tokens
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
                if left:  # the access log counts what the unfinished choices produced too
                    request.scope["layerstream.usage"] = (len(ids), usage["completion_tokens"]
                                                          + sum(made[r] for r in left))

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
                except ApiError as e:  # an error event, then the end a client waits for (as vLLM's)
                    yield event(e.body())
                    yield "data: [DONE]\n\n"

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
        why = self.worker.trouble() if self.worker is not None else None
        if why:
            return JSONResponse({"status": "error", "error": why}, status_code=503)
        return JSONResponse({"status": "ok", "model": self.model_id})

    async def prometheus(self, request: Request) -> Response:
        try:
            self._auth(request)  # with a key, the counters are the key holder's too (README: security)
        except ApiError as e:
            return self._error(e)
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


def _stopping() -> ApiError:
    """The 503 of a body read once the server stops (Server.end_requests)."""
    return ApiError(503, STOPPING, kind="server_error", code="server_stopping", headers={"Connection": "close"})


def _path(request: Request) -> str:
    """The request's path for an error message, at most MAX_QUOTED characters of it (a 100 KB URL is
    not echoed back)."""
    p = request.url.path
    return p if len(p) <= MAX_QUOTED else f"{p[:MAX_QUOTED]}... ({len(p) - MAX_QUOTED} more characters)"


def uvicorn_config(server: Server, host: str, port: int, grace_s: float = GRACE_S) -> uvicorn.Config:
    """uvicorn's settings for a Server: its limits (NOTE [ HTTP limits ]), graceful stop within grace_s
    (GracefulServer stops it: NOTE [ server shutdown ])."""
    lim = server.limits
    return uvicorn.Config(server.app, host=host, port=port, loop="uvloop", http=guarded_protocol(lim),
                          log_level="warning", timeout_keep_alive=lim.keep_alive_s,
                          timeout_graceful_shutdown=grace_s, lifespan="on", access_log=False)


def serve(engine, model_path: str, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
          max_queue: int = 256, grace_s: float = GRACE_S, limits: Limits = Limits(),
          sock: socket.socket | None = None, defaults: dict = DEFAULTS) -> int:
    """Serve until SIGTERM or SIGINT: then stop accepting, let requests finish within `grace_s`, and
    end the rest with finish_reason "abort" (NOTE [ server shutdown ]; a second signal ends them at once).

    The exit status is the CLI's rule for both: uvicorn re-raises the first signal once it has
    stopped, and the CLI exits 128 + its number (130 for Ctrl-C, 143 for SIGTERM). Where the engine fails
    (a pipeline process died; steps failing in a row), its clients are answered 503 and the server
    stops the same way, then raises PipelineError saying why (the CLI: one line, exit 1). `sock`:
    bound_socket's (the CLI binds before the model loads), else one is bound here. `defaults`: the
    sampling of fields a request does not set (openai_api.DEFAULTS: OpenAI's)."""
    sock = sock if sock is not None else bound_socket(host, port)
    port = sock.getsockname()[1]  # (--port 0: the port the system gave)
    model_id = os.path.basename(model_path).removesuffix(".gguf")
    if not api_key and not is_loopback(host):
        print(f"layerstream: warning: serving on {host} without an API key: anyone who can reach port {port} can "
              "use the model; give a key with --api-key-file FILE or LAYERSTREAM_API_KEY", file=sys.stderr, flush=True)
    server = Server(engine, model_id, api_key or None, max_queue, limits, host, defaults)
    changed = ", ".join(f"{k} {json.dumps(list(v) if isinstance(v, tuple) else v)}"
                        for k, v in defaults.items() if v != DEFAULTS[k])  # (as a request's JSON spells them)
    print(f"layerstream: serving {model_id} on http://{host}:{port}/v1"
          + (f" (requests that do not set them get {changed})" if changed else ""), flush=True)
    http = GracefulServer(uvicorn_config(server, host, port, grace_s), server.end_requests, grace_s,
                          cut_requests=server.cut_requests, stop_began=server.stop_began)
    server.on_failure = lambda: setattr(http, "should_exit", True)
    server.hurried = lambda: http.force_exit
    # a closed terminal (SIGHUP) and a Ctrl-\ (SIGQUIT) stop the server as SIGTERM does (NOTE [ server
    # shutdown ]): at their defaults it ended at once, its clients' streams cut (and SIGQUIT's left the
    # run's shared memory)
    own = set_handlers(set(RAISED) - {signal.SIGTERM}, http.handle_exit)
    try:
        http.run(sockets=[sock])
    finally:
        restore(own)
    if server.worker is not None and server.worker.failure:
        raise PipelineError(f"the server stopped: the engine failed: {server.worker.failure}")
    if http._captured_signals:  # raised again and ignored (a background job's inherited SIGINT): the same status
        first = http._captured_signals[0]
        if callable(own.get(first)):
            own[first](first, None)  # (uvicorn raised it again under its own handler) the CLI's: its one line
        return 128 + int(first)
    return 0
