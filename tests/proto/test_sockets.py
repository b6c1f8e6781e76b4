"""A real ROUTER/DEALER pair over ipc in a private run dir."""

import os

import pytest
import zmq

from layerstream.proto import (
    PROTOCOL_VERSION,
    BadMessageCounter,
    ForwardDone,
    LayerStaged,
    LoadLayer,
    MalformedMessage,
    Ready,
    Shutdown,
    make_dealer,
    make_endpoints,
    make_router,
    recv_envelope,
    recv_msg,
    send_msg,
    temporary_run_dir,
)

TIMEOUT_MS = 2000


@pytest.fixture
def endpoints():
    with temporary_run_dir() as path:
        yield make_endpoints("ipc", path)


@pytest.fixture
def pair(endpoints):
    ctx = zmq.Context()
    router, address = make_router(ctx, endpoints.readers)
    dealer = make_dealer(ctx, address, "reader-0")
    yield router, dealer
    dealer.close()
    router.close()
    ctx.term()


def test_exchange_over_ipc(endpoints, pair):
    router, dealer = pair
    assert os.path.exists(endpoints.readers[len("ipc://"):])
    assert router.getsockopt(zmq.LINGER) == 0 and dealer.getsockopt(zmq.LINGER) == 0
    send_msg(dealer, Ready("reader", "reader-0", os.getpid(), {}))
    ident, msg = recv_msg(router, TIMEOUT_MS)
    assert ident == b"reader-0"
    assert msg == Ready("reader", "reader-0", os.getpid(), {})
    load = LoadLayer(1, 0, 2, [[0, 128, 4096, 0]])
    send_msg(router, load, ident=ident)
    assert recv_msg(dealer, TIMEOUT_MS) == load
    assert recv_msg(dealer, 10) is None  # timeout


def test_garbage_frame_is_counted_and_survived(pair, caplog):
    router, dealer = pair
    counter = BadMessageCounter("coordinator.readers")
    dealer.send_multipart([bytes((PROTOCOL_VERSION, 0x0B)), b"\xc1not msgpack"])
    dealer.send(b"garbage")
    dealer.send_multipart([bytes((PROTOCOL_VERSION + 1, 0x0B)), b"\x90"])  # wrong version
    staged = LayerStaged(1, 0, 2, 4096, 0.001, "reader-0")
    send_msg(dealer, staged)
    assert recv_msg(router, TIMEOUT_MS, counter) == (b"reader-0", staged)
    assert counter.total == 3
    assert counter.by_kind == {"MalformedMessage": 2, "VersionMismatch": 1}
    assert "dropped bad message from b'reader-0'" in caplog.text


def test_bad_frame_raises_without_counter(pair):
    router, dealer = pair
    dealer.send(b"garbage")
    with pytest.raises(MalformedMessage, match="at least 2 frames"):
        recv_msg(router, TIMEOUT_MS)


def test_extra_frames_and_router_needs_ident(pair):
    router, dealer = pair
    logits = memoryview(bytearray(range(256)) * 1024)
    send_msg(dealer, ForwardDone(3, [1, 1024 * 256], "float32", {}), extra=[logits])
    env = recv_envelope(router, TIMEOUT_MS, copy=False)
    assert env.ident == b"reader-0" and env.msg.step == 3
    assert bytes(env.extra[0]) == bytes(logits)
    with pytest.raises(ValueError, match="needs the peer's ident"):
        send_msg(router, Shutdown("x"))
    with pytest.raises(ValueError, match="only for ROUTER"):
        send_msg(dealer, Shutdown("x"), ident=b"x")
    with pytest.raises(zmq.ZMQError):  # ROUTER_MANDATORY: unknown peers are an error, not a silent drop
        send_msg(router, Shutdown("x"), ident=b"nobody")


def test_a_tcp_host_that_is_no_address_here_is_one_line_naming_it():
    """A probe's: ProcessOptions(transport="tcp", host="nonexistent.invalid") ended Engine.open with
    pyzmq's ZMQError traceback; the router's bind now says what failed and what to give."""
    from layerstream.proto.addresses import AddressError

    ctx = zmq.Context()
    try:
        with pytest.raises(AddressError, match=r"^cannot bind the run's links to 'tcp://nonexistent\.invalid:0' \(.+\); "
                                               r"give an address of this machine, such as 127\.0\.0\.1$"):
            make_router(ctx, "tcp://nonexistent.invalid:0")
        sock, addr = make_router(ctx, "tcp://127.0.0.1:0")  # (a good one still binds)
        assert addr.startswith("tcp://127.0.0.1:") and not addr.endswith(":0")
        sock.close(linger=0)
    finally:
        ctx.term()
