"""The coordinator's sockets: three bound ROUTERs that the asyncio loop awaits, never polls in a loop.

`CoordinatorLinks.wait` returns at once where a message is queued (one zmq_poll of timeout 0), else
sleeps on the loop until a message is queued on any of the sockets, a watched file descriptor (a
child process's sentinel, readable once it exits) is readable, or a timeout: the pipeline's loop
wakes for work and for deaths, and for its deadlines only. Receives and sends that need not wait
go through the sockets themselves (`now`), not through the loop's futures.
"""

from __future__ import annotations

import contextlib
import logging
import math

import zmq
import zmq.asyncio

from layerstream.proto.addresses import ENDPOINT_NAMES, cleanup_run_dir, make_endpoints, make_run_dir
from layerstream.proto.child import ChildEndpoints
from layerstream.proto.codec import BadMessageCounter, Decoded, encode
from layerstream.proto.messages import Message
from layerstream.proto.sockets import Curve, make_router

log = logging.getLogger("layerstream.pipeline")

# (peer ident, the decoded message or None where it was bad, whether it came on the control link)
Received = tuple[str, Decoded | None, bool]


class CoordinatorLinks:
    """Binds the control, readers and compute ROUTERs of one run (NOTE [ who binds, who connects ])."""

    def __init__(self, transport: str, host: str, max_msg_in: int, max_msg_out: int):
        self.max_msg_out = max_msg_out  # (the children's bound: they refuse larger messages)
        self.run_dir = make_run_dir() if transport == "ipc" else None
        self.zctx = zmq.asyncio.Context()
        self.curve = Curve.new() if transport == "tcp" else None
        self.socks: dict[str, zmq.asyncio.Socket] = {}
        # the same sockets without the loop, for the receives and sends that need not wait
        self.now: dict[str, zmq.Socket] = {}
        self.poller = zmq.asyncio.Poller()
        self.bad = BadMessageCounter("coordinator", log)
        try:
            ep = make_endpoints(transport, self.run_dir, host)
            bound = {}
            for name in ENDPOINT_NAMES:
                self.socks[name], bound[name] = make_router(self.zctx, getattr(ep, name), self.curve, max_msg_in)
                self.now[name] = zmq.Socket.shadow(self.socks[name].underlying)
                self.poller.register(self.socks[name], zmq.POLLIN)
            self.ep = ep.bound(**bound)
        except BaseException:
            self.close()
            raise

    def endpoints_for(self, role: str) -> ChildEndpoints:
        """What a child of `role` connects to, with the run's message bound and CURVE keys."""
        control, work = self.ep.for_role(role)
        return ChildEndpoints(control, work, self.max_msg_out, None if self.curve is None else self.curve.for_client())

    def watch(self, fd: int) -> None:
        """Wake `wait` when fd is readable (a child's sentinel: it exited)."""
        self.poller.register(fd, zmq.POLLIN)

    def unwatch(self, fd: int) -> None:
        with contextlib.suppress(KeyError):
            self.poller.unregister(fd)

    async def wait(self, timeout_s: float | None) -> set[int]:
        """Sleep until a message is queued, a watched fd is readable, or timeout_s (None: no limit)
        has passed; returns the watched fds that are readable."""
        # what is queued already answers at once: a poll of timeout 0 is one zmq_poll, where the
        # loop's poll registers a wake-up on every socket and descriptor and removes it again
        # (much of the CLI's host time a decode step in a profile: BENCHMARKS.md)
        events = await self.poller.poll(0)
        if not events:
            ms = None if timeout_s is None else max(1, math.ceil(timeout_s * 1000))
            events = await self.poller.poll(ms)
        return {s for s, _ in events if isinstance(s, int)}

    async def drain(self) -> list[Received]:
        """Every message queued now on the three sockets, without waiting (each taken by the socket
        itself: the loop's receive makes and settles a future a message, and one more per socket
        to find it empty)."""
        out: list[Received] = []
        for name, sock in self.now.items():
            while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                ident = frames[0].decode(errors="replace")
                out.append((ident, self.bad.decode(frames[1:], ident), name == "control"))
        return out

    async def send(self, link: str, ident: str, msg: Message, quiet: bool = False) -> bool:
        """Send msg to child `ident`; False where it is not connected (gone, or still starting)."""
        log.debug("-> %s %s", ident, msg)
        frames = [ident.encode()] + encode(msg)
        try:
            try:  # at once where the socket takes it (the loop's send makes a future a message)
                self.now[link].send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:  # (its queue is full: wait for room on the loop)
                await self.socks[link].send_multipart(frames)
            return True
        except zmq.ZMQError as e:  # ROUTER_MANDATORY: the peer is gone; the death check reports it
            (log.debug if quiet else log.warning)("could not send %s to %s: %s", type(msg).__name__, ident, e)
            return False

    def close(self) -> None:
        """Close the sockets (linger 0) and remove the run directory."""
        for s in self.socks.values():
            s.close(linger=0)
        self.zctx.term()
        if self.run_dir:
            cleanup_run_dir(self.run_dir)
