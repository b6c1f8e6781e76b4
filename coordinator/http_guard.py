"""The server's limits at the HTTP layer: connections, request heads, hosts, and the access log.

NOTE [ HTTP limits ]
uvicorn (0.54, h11) times out only idle keep-alive connections: a connection that sends part of a
request head and then nothing is held forever, and `limit_concurrency` counts only connections that
got as far as a whole head, so about 20,000 half-open connections made every request fail.
`guarded_protocol` subclasses uvicorn's h11 protocol with the two things missing: a deadline for
each request head (armed when the connection opens and again after each response, it closes the
connection when h11 still waits for a head: their_state IDLE), and a cap on open connections (one
more is answered 503 and closed at once). Bodies are read by the handlers, incrementally, under a
size cap, a deadline and a limit on a stall between pieces (http_body.py: 408, connection closed),
and all connections' bodies together under `bodies_bytes` (BodyBudget): each body's bytes are taken
from it as they come and given back once the body is parsed, and a body whose declared
Content-Length would not fit beside the bytes held is answered 503 at once, unread (60 connections
each holding a 15 MB body one byte short took 850 MB, 15 GB at the connection cap). A declared
length is not itself taken: sixteen connections that each declared 16 MiB and sent a byte now and
then held the whole budget, and every other POST was refused. uvicorn buffers at most 64 KiB of a
body the handler has not read yet (its flow control pauses the socket). An answer that closes a
connection whose body is still arriving (413, 408, 503) lingers as h11's own refusals do
(half-closed, what still comes dropped for LINGER_S): closed with bytes unread, the connection was
reset and a client read the reset, not the answer. A head past `head_bytes` is a 431 from the same
path as h11's own refusals (_Recording), since h11 refuses only a head still incomplete. A client
that shuts its side down once its request is sent (shutdown(SHUT_WR): `nc -N`) is taken for gone and
gets no answer: its end of data cannot be told from a close until the server writes, and a client
that closed has its row freed at once rather than generating for no one (a non-streamed request's
handler watches for that close). These rest on uvicorn's H11Protocol attributes (`conn`,
`connections`, `transport`, `loop`, `on_response_complete`), which the tests exercise.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import time
from dataclasses import dataclass
from urllib.parse import unquote

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")
ABSOLUTE_FORM = re.compile(rb"(?i)https?://([^/]*)")  # a request-target's scheme and authority (RFC 9112 3.2.2)


@dataclass(frozen=True)
class Limits:
    """What one client may take of the server; README's server section states them."""

    body_bytes: int = 16 << 20  # a request body at most
    body_timeout_s: float = 60.0  # to send the whole body
    # between two pieces of a body: a client that sends part of its body and then nothing holds a
    # connection and its declared bytes of the budget; 30 s is far past any pause of a live client
    # on a slow link (a TCP retransmission backs off to about 15 s after four losses)
    body_stall_s: float = 30.0
    header_timeout_s: float = 10.0  # to send a request head, from connecting or from the last response
    max_connections: int = 1024  # open at once; one more is answered 503
    bodies_bytes: int = 256 << 20  # request bodies held at once, all connections together; past it 503
    keep_alive_s: int = 5  # an idle keep-alive connection is closed after this
    head_bytes: int = 16 << 10  # a request head at most (_Recording: h11's own limit holds only while it is incomplete)


class BodyBudget:
    """Bytes of request bodies the server holds at once, across connections (NOTE above); used on the
    event loop only."""

    def __init__(self, total: int):
        self.total, self.held = total, 0

    def take(self, n: int) -> bool:
        """Hold n more bytes, or False (holding nothing more) where that would pass the total."""
        if self.held + n > self.total:
            return False
        self.held += n
        return True

    def give(self, n: int) -> None:
        self.held -= n


def _busy_response() -> bytes:
    body = json.dumps({"error": {"message": "too many open connections; retry later", "type": "server_error",
                                 "param": None, "code": "too_many_connections"}}).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"retry-after: 1\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class _Recording(h11.Connection):
    """h11's connection, keeping the protocol error it raised last (uvicorn's handler drops it), and
    refusing as one a request of an HTTP version other than 1.x (h11 parsed an HTTP/2 preface's first
    line, `PRI * HTTP/2.0`, as a request, answered 404, and its `SM` line 400 after it) and a head past
    `head_bytes` (h11's own limit holds only for a head still incomplete: one that came in one or two
    reads was taken whole)."""

    error: h11.RemoteProtocolError | None = None
    head_bytes: int = Limits.head_bytes

    def next_event(self):
        try:
            event = super().next_event()
            if isinstance(event, h11.Request):
                if not event.http_version.startswith(b"1."):
                    version = event.http_version.decode("ascii")
                    raise h11.RemoteProtocolError(f"HTTP/{version} is not served here: this server speaks HTTP/1.1; "
                                                  "send the request in HTTP/1.1", error_status_hint=505)
                head = len(event.method) + len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
                if head > self.head_bytes:
                    raise h11.RemoteProtocolError(f"the request head is {head} bytes, more than "
                                                  f"{self.head_bytes >> 10} KiB", error_status_hint=431)
            return event
        except h11.RemoteProtocolError as e:
            self.error = e
            raise


# Statuses h11 hints for a request it cannot parse that a client reads as what it did wrong.
_PARSE_STATUSES = {400: b"Bad Request", 413: b"Content Too Large", 414: b"URI Too Long",
                   431: b"Request Header Fields Too Large", 505: b"HTTP Version Not Supported"}
LINGER_S = 2.0  # a refused request's unread bytes are read and dropped this long before the close


def guarded_protocol(limits: Limits) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a request-head deadline, a connection cap (NOTE above), and
    requests h11 cannot parse answered in OpenAI's JSON (uvicorn answers plain text) with h11's
    status (431 for a head past its buffer), the connection half-closed and its unread bytes
    dropped for LINGER_S before the close, so that the client reads the answer rather than a reset."""
    busy = _busy_response()

    class GuardedH11(H11Protocol):
        _head_timer = None
        _lingering = False

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.conn.__class__ = _Recording
            self.conn.head_bytes = limits.head_bytes
            self.logger = _UnparsedSaidOnce(self.logger)

        def data_received(self, data: bytes) -> None:
            if not self._lingering:
                super().data_received(data)

        def _unsupported_upgrade_warning(self) -> None:
            """(uvicorn's two warnings, the second telling to install a WebSocket library, for every
            client's Upgrade: header: any client could fill the log; the request is served as plain HTTP)"""
            self.logger.debug("an Upgrade request, served as plain HTTP")

        def send_400_response(self, msg: str) -> None:
            e = self.conn.error
            status = e.error_status_hint if e is not None and e.error_status_hint in _PARSE_STATUSES else 400
            # (h11 words a line it cannot parse as a bytearray's repr: quoted as text instead)
            said = re.sub(r"bytearray\(b(['\"])(.*)\1\)", r"'\2'", str(e or msg))
            what = said if status == 505 else f"malformed HTTP request: {said}"
            peer = self.client[0] if self.client else "-"  # (the request line logged as the others are: -v)
            logging.getLogger("layerstream.server").info("%s unparsed request %d: %s", peer, status, said[:200])
            body = json.dumps({"error": {"message": what, "type": "invalid_request_error", "param": None,
                                         "code": "invalid_http_request"}}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            try:
                for event in (h11.Response(status_code=status, headers=headers, reason=_PARSE_STATUSES[status]),
                              h11.Data(data=body), h11.EndOfMessage()):
                    self.transport.write(self.conn.send(event))
            except h11.LocalProtocolError:  # an answer had begun: nothing more can be said on it
                self.transport.close()
                return
            self._linger()

        def _linger(self) -> None:
            """Half-close, drop what the client still sends for LINGER_S, then close."""
            self._lingering = True
            self.flow.resume_reading()  # (paused by a pipelined request: the drop reads on)
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            # an answer that closes the connection while the client still sends its body (a 413, a 408)
            # lingers too: closed with bytes unread, the connection was reset, and some clients read the
            # reset instead of the answer
            self.transport = _LingerOnClose(transport, self)
            if len(self.connections) > limits.max_connections:
                transport.write(busy)
                transport.close()
                return
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            if not self.transport.is_closing():
                self._head_timer = self.loop.call_later(limits.header_timeout_s, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11


class _UnparsedSaidOnce:
    """uvicorn's logger for a connection, less its bare "Invalid HTTP request received." warning
    for each request h11 cannot parse (no peer, no reason, outside the server's format: any client
    could fill the log with it): send_400_response logs the request with its peer and h11's reason
    on the server's logger instead, at -v as every request's line."""

    def __init__(self, logger: logging.Logger):
        self._logger = logger

    def warning(self, msg, *args, **kwargs) -> None:
        if msg != "Invalid HTTP request received.":
            self._logger.warning(msg, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._logger, name)


class _LingerOnClose:
    """A connection's transport whose close lingers (GuardedH11._linger) while the client is still
    sending a request body; everything else is the transport's own."""

    def __init__(self, transport, proto):
        self._transport, self._proto = transport, proto

    def close(self) -> None:
        p = self._proto
        if p.conn.their_state is h11.SEND_BODY and not p._lingering and not self._transport.is_closing():
            p._linger()
        else:
            self._transport.close()

    def __getattr__(self, name):
        return getattr(self._transport, name)


def is_loopback(host: str) -> bool:
    h = host.strip("[]").lower()
    if h in LOOPBACK_NAMES or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def host_allowed(header: str | None, bound: str) -> bool:
    """A Host header a keyless server answers: a loopback name, any IP address, or the bound host.
    A DNS-rebinding page reaches the server under its own domain name, which is none of these."""
    if not header:
        return True  # HTTP/1.0 without Host: no browser sends that
    h = header.strip().lower()
    if h.startswith("["):  # [IPv6]:port
        name = h[1:h.find("]")] if "]" in h else h
    else:
        name = h.split(":")[0] if h.count(":") == 1 else h
    if is_loopback(name) or name == bound.strip("[]").lower():
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


BODY_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions"})  # (elsewhere a POST is a 404 or 405 as ever)


class Guard:
    """ASGI middleware: refuses a request framed two ways (Content-Length and Transfer-Encoding, which a
    proxy and this server could read differently), a body in a Content-Encoding (gzip: it was read as
    if plain), and Host headers a keyless server must not answer (DNS rebinding); serves a target in
    absolute form as its path (origin_form); writes one access line a request (method, path, status,
    tokens, seconds) at INFO."""

    def __init__(self, app, *, check_host: bool, bound: str, log: logging.Logger):
        self.app, self.check_host, self.bound, self.log = app, check_host, bound, log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [0]

        async def send_(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        scope, authority = origin_form(scope)
        try:
            heads = dict(scope["headers"])
            host = heads[b"host"].decode("latin-1") if b"host" in heads else None
            host = host if authority is None else authority  # (RFC 9112 3.2.2: the target's, not Host's)
            coding = heads.get(b"content-encoding", b"identity").decode("latin-1").strip().lower()
            if b"content-length" in heads and b"transfer-encoding" in heads:  # (RFC 9112 6.3: request smuggling)
                await _json(send_, 400, "the request has both Content-Length and Transfer-Encoding; send one",
                            "invalid_framing", close=True)
            elif (scope["method"] == "POST" and scope["path"] in BODY_ROUTES and b"content-length" not in heads
                  and b"transfer-encoding" not in heads):  # (RFC 9110 15.5.12: a body of no length is a 411)
                await _json(send_, 411, "the request has no Content-Length (nor a chunked body); send the body's "
                                        "length", "length_required", close=True)
            elif coding != "identity":  # (RFC 9110 15.5.16: a coding the server does not take is a 415)
                await _json(send_, 415, f"the body is encoded (Content-Encoding: {coding[:40]}); send it as plain "
                                        "JSON", "unsupported_media_type", close=True)
            elif self.check_host and not host_allowed(host, self.bound):
                await _json(send_, 400, f"Host {host[:100]!r} is not served here: a server without an API key "
                                        "answers only loopback names and IP addresses (pass --api-key to serve "
                                        "others)", "invalid_host")
            else:
                await self.app(scope, receive, send_)
        except Exception as e:  # Starlette re-raises what its 500 handler answered: logged there, no traceback
            if not status[0]:
                self.log.error("%s %s failed: %s: %s", scope["method"], _logged(scope["path"]), type(e).__name__, e)
                await _json(send_, 500, f"internal error: {type(e).__name__}", None, "server_error")
        finally:
            if self.log.isEnabledFor(logging.INFO):
                p, c = scope.get("layerstream.usage", ("-", "-"))
                self.log.info("%s %s %d prompt=%s completion=%s %.3fs", scope["method"], _logged(scope["path"]),
                              status[0], p, c, time.perf_counter() - t0)


def origin_form(scope: dict) -> tuple[dict, str | None]:
    """A request-target in absolute form (`GET http://host:port/health`, the form a proxy is sent, which
    RFC 9112 3.2.2 has a server take too) as the path it names, and its authority, which stands for
    the Host header; (scope, None) for a target in origin form. It was answered 404 naming the URL."""
    m = ABSOLUTE_FORM.match(scope.get("raw_path") or b"")
    if m is None:
        return scope, None
    raw = scope["raw_path"][m.end():] or b"/"
    host = m.group(1).decode("latin-1").rpartition("@")[2]  # (a userinfo@ before the host is no part of it)
    return scope | {"path": unquote(raw.decode("ascii")), "raw_path": raw}, host


def _logged(path: str, most: int = 200) -> str:
    """A path for the log, cut to `most` characters (a 100 KB URL makes no log line of 100 KB)."""
    return path if len(path) <= most else f"{path[:most]}...({len(path) - most} more)"


async def _json(send, status: int, message: str, code: str | None, kind: str = "invalid_request_error",
                close: bool = False) -> None:
    """An OpenAI-style JSON error; `close`: and the connection closed after it (its body left unread)."""
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status,
                "headers": headers + [(b"connection", b"close")] * close})
    await send({"type": "http.response.body", "body": body})
