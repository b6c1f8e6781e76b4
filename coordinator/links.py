"""The coordinator's sockets: three bound ROUTERs that the asyncio loop awaits, never polls in a loop.

`CoordinatorLinks.wait` returns at once where a message is queued (one zmq_poll of timeout 0), else
sleeps on the loop until a message is queued on any of the sockets, a watched file descriptor (a
child process's sentinel, readable once it exits) is readable, or a timeout: the pipeline's loop
wakes for work and for deaths, and for its deadlines only. Receives and sends go through the
sockets themselves; the loop only wakes the wait (NOTE [ the loop's wake-ups ]).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import zmq

from layerstream.errors import STALLED, PipelineError
from layerstream.proto.addresses import ENDPOINT_NAMES, cleanup_run_dir, make_endpoints, make_run_dir
from layerstream.proto.child import ChildEndpoints
from layerstream.proto.codec import BadMessageCounter, Decoded, encode
from layerstream.proto.messages import Message
from layerstream.proto.sockets import Curve, make_router

log = logging.getLogger("layerstream.pipeline")

# (peer ident, the decoded message or None where it was bad, whether it came on the control link)
Received = tuple[str, Decoded | None, bool]

# NOTE [ the loop's wake-ups ]
# pyzmq's asyncio poller registers a wake-up on every socket and descriptor at each poll, through
# futures of its own, and removes them again: in a profile of the CLI's decode this bookkeeping
# was the largest part of its wait. Here the loop watches each socket's ZMQ_FD for the run (a
# reader that reads ZMQ_EVENTS, which both clears the descriptor and says whether a message is
# queued) and each watched descriptor once (its reader removes itself when it fires: a dead
# child's sentinel stays readable, and the zero-timeout poll before each wait reports it from
# then on). A wake-up only ends the wait's sleep; what is queued is read by a zmq_poll.
SEND_RETRY_S = 0.001  # a send refused for a full queue is tried again after this or a wake-up


class CoordinatorLinks:
    """Binds the control, readers and compute ROUTERs of one run (NOTE [ who binds, who connects ])."""

    def __init__(self, transport: str, host: str, max_msg_in: int, max_msg_out: int,
                 stall_s: float | None = None):
        self.max_msg_out = max_msg_out  # (the children's bound: they refuse larger messages)
        self.stall_s = stall_s  # a send refused for a full queue for so long ends the run (None: never)
        self.run_dir = make_run_dir() if transport == "ipc" else None
        self.zctx = zmq.Context()
        self.curve = Curve.new() if transport == "tcp" else None
        self.socks: dict[str, zmq.Socket] = {}
        self.poller = zmq.Poller()  # the sockets and the watched descriptors, polled with timeout 0
        self.fds: set[int] = set()  # watched descriptors whose reader has not fired yet
        self.loop: asyncio.AbstractEventLoop | None = None  # the loop the readers are on
        self.sleepers: list[asyncio.Future] = []  # waits (and sends) asleep on the loop
        self.bad = BadMessageCounter("coordinator", log)
        try:
            ep = make_endpoints(transport, self.run_dir, host)
            bound = {}
            for name in ENDPOINT_NAMES:
                self.socks[name], bound[name] = make_router(self.zctx, getattr(ep, name), self.curve, max_msg_in)
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
        self.fds.add(fd)
        if self.loop is not None:
            self.loop.add_reader(fd, self._fd_ready, fd)

    def unwatch(self, fd: int) -> None:
        with contextlib.suppress(KeyError):
            self.poller.unregister(fd)
        if fd in self.fds:
            self.fds.discard(fd)
            if self.loop is not None and not self.loop.is_closed():
                self.loop.remove_reader(fd)

    def _on_loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, with the sockets' and watched descriptors' readers on it."""
        loop = asyncio.get_running_loop()
        if loop is not self.loop:
            self._remove_readers()
            self.loop = loop
            for sock in self.socks.values():
                loop.add_reader(sock.getsockopt(zmq.FD), self._socket_ready, sock)
            for fd in self.fds:
                loop.add_reader(fd, self._fd_ready, fd)
        return loop

    def _remove_readers(self) -> None:
        if self.loop is not None and not self.loop.is_closed():
            for sock in self.socks.values():
                if not sock.closed:
                    self.loop.remove_reader(sock.getsockopt(zmq.FD))
            for fd in self.fds:
                self.loop.remove_reader(fd)
        self.loop = None

    def _socket_ready(self, sock: zmq.Socket) -> None:
        # (reading ZMQ_EVENTS clears the descriptor, which stays readable until it is read)
        if sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._wake()

    def _fd_ready(self, fd: int) -> None:
        self.loop.remove_reader(fd)  # (readable for good: the zero-timeout poll reports it from now on)
        self.fds.discard(fd)
        self._wake()

    def _wake(self, *_) -> None:
        for f in self.sleepers:
            if not f.done():
                f.set_result(None)

    async def _sleep(self, loop: asyncio.AbstractEventLoop, timeout_s: float | None) -> None:
        """Until a wake-up or timeout_s (None: no limit)."""
        f = loop.create_future()
        self.sleepers.append(f)
        timer = None if timeout_s is None else loop.call_later(max(timeout_s, 0.0), self._wake)
        try:
            await f
        finally:
            self.sleepers.remove(f)
            if timer is not None:
                timer.cancel()

    async def wait(self, timeout_s: float | None) -> set[int]:
        """Sleep until a message is queued, a watched fd is readable, or timeout_s (None: no limit)
        has passed; returns the watched fds that are readable."""
        events = self.poller.poll(0)  # (what is queued already answers at once: one zmq_poll)
        if not events:
            loop = self._on_loop()
            end = None if timeout_s is None else loop.time() + timeout_s
            while not events and (end is None or loop.time() < end):
                # (at least the loop's timer resolution, a millisecond: a shorter timer fires at once)
                await self._sleep(loop, None if end is None else max(end - loop.time(), 0.001))
                events = self.poller.poll(0)
        return {s for s, _ in events if isinstance(s, int)}

    async def drain(self) -> list[Received]:
        """Every message queued now on the three sockets, without waiting."""
        out: list[Received] = []
        for name, sock in self.socks.items():
            while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                ident = frames[0].decode(errors="replace")
                out.append((ident, self.bad.decode(frames[1:], ident), name == "control"))
        return out

    async def send(self, link: str, ident: str, msg: Message) -> bool:
        """Send msg to child `ident`; False where it is not connected (gone, or still starting)."""
        log.debug("-> %s %s", ident, msg)
        frames = [ident.encode()] + encode(msg)
        since = None
        try:
            while True:
                try:
                    self.socks[link].send_multipart(frames, zmq.NOBLOCK)
                    return True
                except zmq.Again:  # (the child's queue is full: it takes them as it goes, unless it hangs)
                    loop = self._on_loop()
                    since = loop.time() if since is None else since
                    if self.stall_s is not None and loop.time() - since > self.stall_s:
                        raise PipelineError(f"the {ident} process took no message for {self.stall_s:g} s with its "
                                            f"queue full {STALLED}") from None
                    await self._sleep(loop, SEND_RETRY_S)
        except zmq.ZMQError as e:  # ROUTER_MANDATORY: the peer is gone; the death check reports it (a warning
            log.debug("could not send %s to %s: %s", type(msg).__name__, ident, e)  # here printed stray lines)
            return False

    def close(self) -> None:
        """Close the sockets (linger 0) and remove the run directory."""
        self._remove_readers()
        for s in self.socks.values():
            s.close(linger=0)
        self.zctx.term()
        if self.run_dir:
            cleanup_run_dir(self.run_dir)
