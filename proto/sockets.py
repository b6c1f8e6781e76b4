"""ROUTER/DEALER helpers: make sockets (LINGER 0), send and receive messages.

The coordinator binds ROUTERs and children connect DEALERs (see NOTE in addresses.py). The
send and receive helpers serve the children's blocking loops; the coordinator's asyncio loop
waits on its sockets' descriptors itself (coordinator/links.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import zmq

from .addresses import bind, check_connectable
from .codec import BadMessageCounter, Buffer, decode_extra, encode
from .messages import Message


class Envelope(NamedTuple):
    """One received message: sender identity (ROUTER side; None on a DEALER), message, extra frames."""

    ident: bytes | None
    msg: Message
    extra: list[Any]


class Curve(NamedTuple):
    """CURVE keys of one run (z85 bytes), made by the coordinator and handed to children at spawn.

    NOTE [ who may talk on tcp ]
    A tcp listener on 127.0.0.1 is open to every local user. With CURVE, a peer must know the
    server's public key to complete the handshake; the keys are made per run and travel to the
    children only through multiprocessing's spawn pipe (never argv, the environment or a file),
    so another user can neither connect nor read the traffic. ipc sockets live in a 0700 run
    directory instead and need no keys.
    """

    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def new(cls) -> "Curve":
        sp, ss = zmq.curve_keypair()
        cp, cs = zmq.curve_keypair()
        return cls(sp, ss, cp, cs)

    def for_client(self) -> "Curve":
        """What a child needs: the server's public key and its own pair (no server secret)."""
        return Curve(self.server_public, b"", self.client_public, self.client_secret)


def _limits(sock: zmq.Socket, max_msg: int | None) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    if max_msg is not None:  # a larger message is dropped by libzmq (and its peer disconnected)
        sock.setsockopt(zmq.MAXMSGSIZE, int(max_msg))


def make_router(ctx: zmq.Context, address: str, curve: Curve | None = None,
                max_msg: int | None = None) -> tuple[zmq.Socket, str]:
    """A bound ROUTER (LINGER 0; sending to an unknown or gone peer raises) and the address bound;
    with `curve`, only peers holding the run's server key can connect; `max_msg` bounds messages."""
    sock = ctx.socket(zmq.ROUTER)
    try:
        _limits(sock, max_msg)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # a restarted child connects under its old identity, maybe before this socket has dropped the
        # dead one's pipe (it does so only when its own thread next touches the socket, which an idle
        # server's does not): without handover the new connection is refused and its Ready lost
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        if curve is not None:
            sock.curve_secretkey = curve.server_secret
            sock.curve_publickey = curve.server_public
            sock.curve_server = True
        return sock, bind(sock, address)
    except BaseException:
        sock.close(linger=0)
        raise


def make_dealer(ctx: zmq.Context, address: str, ident: str | bytes, curve: Curve | None = None,
                max_msg: int | None = None) -> zmq.Socket:
    """A DEALER (LINGER 0) with identity `ident`, connected to `address` (through CURVE with `curve`)."""
    sock = ctx.socket(zmq.DEALER)
    try:
        _limits(sock, max_msg)
        sock.setsockopt(zmq.IDENTITY, ident.encode() if isinstance(ident, str) else ident)
        if curve is not None:
            sock.curve_serverkey = curve.server_public
            sock.curve_publickey = curve.client_public
            sock.curve_secretkey = curve.client_secret
        sock.connect(check_connectable(address))
        return sock
    except BaseException:
        sock.close(linger=0)
        raise


def _frames(sock: zmq.Socket, msg: Message, ident: str | bytes | None, extra: Sequence[Buffer]) -> list[Any]:
    frames = encode(msg, extra)
    if sock.type == zmq.ROUTER:
        if ident is None:
            raise ValueError(f"sending {type(msg).__name__} on a ROUTER needs the peer's ident")
        frames.insert(0, ident.encode() if isinstance(ident, str) else ident)
    elif ident is not None:
        raise ValueError("ident is only for ROUTER sockets")
    return frames


def send_msg(sock: zmq.Socket, msg: Message, ident: str | bytes | None = None, extra: Sequence[Buffer] = ()) -> None:
    """Send one message (to peer `ident` on a ROUTER); extra buffers go as zero-copy frames."""
    sock.send_multipart(_frames(sock, msg, ident, extra), copy=not extra)


def _unwrap(sock: zmq.Socket, frames: list[Any], counter: BadMessageCounter | None) -> Envelope | None:
    ident = None
    if sock.type == zmq.ROUTER:
        ident, frames = bytes(frames[0]), frames[1:]
    if counter is None:
        decoded = decode_extra(frames)  # raises ProtocolError
    else:
        decoded = counter.decode(frames, ident)
        if decoded is None:
            return None
    return Envelope(ident, decoded.msg, decoded.extra)


def _remaining_ms(deadline: float | None) -> int | None:
    if deadline is None:
        return None
    return max(0, int((deadline - time.monotonic()) * 1000))


def recv_envelope(
    sock: zmq.Socket, timeout_ms: int | None, counter: BadMessageCounter | None = None, copy: bool = True
) -> Envelope | None:
    """The next good message within timeout_ms (None: wait forever), or None on timeout.

    With a counter, bad messages are counted, logged and skipped; without one they raise ProtocolError.
    copy=False leaves extra frames as zero-copy zmq.Frame objects.
    """
    deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000
    while True:
        if not sock.poll(_remaining_ms(deadline), zmq.POLLIN):
            return None
        env = _unwrap(sock, sock.recv_multipart(zmq.NOBLOCK, copy=copy), counter)
        if env is not None:
            return env


def _result(env: Envelope | None) -> Any:
    if env is None:
        return None
    return env.msg if env.ident is None else (env.ident, env.msg)


def recv_msg(sock: zmq.Socket, timeout_ms: int | None, counter: BadMessageCounter | None = None) -> Any:
    """The next message, or None on timeout; on a ROUTER, (ident, message)."""
    return _result(recv_envelope(sock, timeout_ms, counter))


__all__ = [
    "Curve",
    "Envelope",
    "make_router",
    "make_dealer",
    "send_msg",
    "recv_envelope",
    "recv_msg",
]
