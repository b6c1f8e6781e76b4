"""The coordinator's sockets (coordinator/links.py): what is queued is answered without the loop's
poll, what is not is still waited for, and sends go at once or say the peer is gone."""

import asyncio
import os
import threading
import time

import pytest
import uvloop
import zmq

from layerstream.coordinator.links import CoordinatorLinks
from layerstream.proto.codec import decode, encode
from layerstream.proto.messages import Shutdown
from layerstream.proto.sockets import make_dealer, make_router


@pytest.fixture
def linked():
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)  # (the tests' asyncio.gather, called outside the loop, takes the current one)
    links = CoordinatorLinks("ipc", "127.0.0.1", 1 << 20, 1 << 20)
    ctx = zmq.Context()
    child = make_dealer(ctx, links.ep.compute, "compute")
    try:
        yield loop, links, child
    finally:
        child.close(0)
        ctx.term()
        links.close()
        asyncio.set_event_loop(None)
        loop.close()


def _until_queued(links, name="compute"):
    end = time.monotonic() + 5
    while not links.socks[name].getsockopt(zmq.EVENTS) & zmq.POLLIN:
        assert time.monotonic() < end, "the child's message never arrived"
        time.sleep(0.001)


def test_queued_messages_are_taken_at_once_in_order(linked, monkeypatch):
    loop, links, child = linked
    for k in range(3):
        child.send_multipart(encode(Shutdown(f"m{k}")))
    _until_queued(links)
    # (messages sent together may reach the socket in more than one read, under load the last ones
    # some time after the first: their sender's I/O thread writes what it has; they are all sent)
    time.sleep(0.5)
    polls = []
    slow = type(links.poller).poll
    monkeypatch.setattr(type(links.poller), "poll", lambda self, t=-1: polls.append(t) or slow(self, t))
    t0 = time.monotonic()
    assert loop.run_until_complete(links.wait(30.0)) == set()
    assert time.monotonic() - t0 < 5 and polls == [0]  # (the loop's poll, with a timeout, never asked)
    got = loop.run_until_complete(links.drain())
    assert [(ident, d.msg.reason, control) for ident, d, control in got] == [
        ("compute", f"m{k}", False) for k in range(3)]
    assert loop.run_until_complete(links.drain()) == []


def test_nothing_queued_waits_for_the_timeout_a_message_or_a_watched_fd(linked):
    loop, links, child = linked
    t0 = time.monotonic()
    assert loop.run_until_complete(links.wait(0.2)) == set()
    assert 0.15 < time.monotonic() - t0 < 5

    async def later():  # a message that comes while the loop waits
        await asyncio.sleep(0.05)
        child.send_multipart(encode(Shutdown("late")))
    loop.run_until_complete(asyncio.gather(links.wait(30.0), later()))
    assert [d.msg.reason for _, d, _ in loop.run_until_complete(links.drain())] == ["late"]
    r, w = os.pipe()
    try:
        links.watch(r)
        os.write(w, b"x")
        assert loop.run_until_complete(links.wait(30.0)) == {r}
        links.unwatch(r)
    finally:
        os.close(r)
        os.close(w)


def test_sends_reach_the_child_or_say_the_peer_is_gone(linked):
    loop, links, child = linked
    child.send_multipart(encode(Shutdown("hello")))  # (a ROUTER knows a peer once it has heard it)
    _until_queued(links)
    loop.run_until_complete(links.drain())
    assert loop.run_until_complete(links.send("compute", "compute", Shutdown("go")))
    assert child.poll(5000) and decode(child.recv_multipart()).reason == "go"
    assert not loop.run_until_complete(links.send("compute", "nobody", Shutdown("lost")))


def test_a_watched_fd_wakes_the_wait_once_and_is_reported_by_every_later_wait(linked):
    """NOTE [ the loop's wake-ups ]: a sentinel stays readable once its child exits; its reader
    removes itself when it fires (no wake-up on every turn of the loop after), and every later
    wait reports it at once until it is unwatched."""
    loop, links, child = linked
    r, w = os.pipe()
    try:
        links.watch(r)
        assert loop.run_until_complete(links.wait(0.05)) == set()  # (the readers are on the loop now)

        async def later():
            await asyncio.sleep(0.05)
            os.write(w, b"x")
        got, _ = loop.run_until_complete(asyncio.gather(links.wait(30.0), later()))
        assert got == {r} and r not in links.fds  # (its reader is gone)
        t0 = time.monotonic()
        assert loop.run_until_complete(links.wait(30.0)) == {r} and time.monotonic() - t0 < 1
        links.unwatch(r)
        assert loop.run_until_complete(links.wait(0.05)) == set()
    finally:
        os.close(r)
        os.close(w)


def _small_queues(monkeypatch, stall_s=None):
    """Links whose compute child (a DEALER, returned with its context) holds one message at most."""
    import layerstream.coordinator.links as links_module

    def small_router(ctx, *args, **kw):  # (a bound socket's connections take the bounds it had at bind)
        ctx.setsockopt(zmq.SNDHWM, 1)
        return make_router(ctx, *args, **kw)
    monkeypatch.setattr(links_module, "make_router", small_router)
    links = CoordinatorLinks("ipc", "127.0.0.1", 1 << 20, 1 << 24, stall_s)
    ctx = zmq.Context()
    child = ctx.socket(zmq.DEALER)
    child.setsockopt(zmq.RCVHWM, 1)  # (before it connects: a pipe takes the bounds it is made with)
    child.setsockopt(zmq.IDENTITY, b"compute")
    child.connect(links.ep.compute)
    return links, ctx, child


def test_a_send_to_a_full_queue_waits_for_room_and_keeps_the_order(monkeypatch):
    """A child that does not read fills its queue: the send waits on the loop (the other sends
    behind it), and every message arrives, in order, once the child reads."""
    loop = uvloop.new_event_loop()
    links, ctx, child = _small_queues(monkeypatch)
    slept = []
    sleep = links._sleep
    links._sleep = lambda lp, t: slept.append(t) or sleep(lp, t)
    got: list[str] = []

    def read_late():
        time.sleep(0.3)
        while len(got) < 20 and child.poll(5000):
            got.append(decode(child.recv_multipart()).reason[:3])
    try:
        child.send_multipart(encode(Shutdown("hello")))
        _until_queued(links)
        loop.run_until_complete(links.drain())
        reader = threading.Thread(target=read_late)
        reader.start()

        async def flood():
            for k in range(20):
                assert await links.send("compute", "compute", Shutdown(f"{k:03d}" + "x" * 200_000))
        t0 = time.monotonic()
        loop.run_until_complete(flood())
        reader.join(10)
        assert got == [f"{k:03d}" for k in range(20)]
        assert slept and time.monotonic() - t0 > 0.25  # (it waited for the reader)
    finally:
        child.close(0)
        ctx.term()
        links.close()
        loop.close()


def test_a_send_to_a_child_that_never_reads_ends_the_run_after_the_stall_timeout(monkeypatch):
    """A hung child's full queue does not hang the coordinator: the send gives up after stall_s
    with a PipelineError naming the child and --stall-timeout; before that it kept waiting."""
    from layerstream.errors import PipelineError

    loop = uvloop.new_event_loop()
    links, ctx, child = _small_queues(monkeypatch, stall_s=0.3)
    try:
        child.send_multipart(encode(Shutdown("hello")))
        _until_queued(links)
        loop.run_until_complete(links.drain())

        async def flood():
            for k in range(20):
                await links.send("compute", "compute", Shutdown(f"{k:03d}" + "x" * 200_000))
        t0 = time.monotonic()
        with pytest.raises(PipelineError, match=r"the compute process took no message for 0.3 s .*--stall-timeout"):
            loop.run_until_complete(flood())
        assert 0.3 <= time.monotonic() - t0 < 5
    finally:
        child.close(0)
        ctx.term()
        links.close()
        loop.close()
