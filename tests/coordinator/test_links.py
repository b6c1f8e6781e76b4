"""The coordinator's sockets (coordinator/links.py): what is queued is answered without the loop's
poll, what is not is still waited for, and sends go at once or say the peer is gone."""

import asyncio
import os
import time

import pytest
import uvloop
import zmq

from layerstream.coordinator.links import CoordinatorLinks
from layerstream.proto.codec import decode, encode
from layerstream.proto.messages import Shutdown
from layerstream.proto.sockets import make_dealer


@pytest.fixture
def linked():
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)  # (zmq.asyncio makes its futures on the current loop, as the pipeline's is)
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
    assert not loop.run_until_complete(links.send("compute", "nobody", Shutdown("lost"), quiet=True))
