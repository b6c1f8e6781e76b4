"""The child harness: a failing child's error reaches the coordinator (NOTE [ child lifecycle ])."""

import os
import subprocess
import sys
import time

import pytest
import zmq

from layerstream.proto import Failed, make_router, recv_msg, temporary_run_dir

pytestmark = pytest.mark.timeout(60)

FAILING_CHILD = """
from layerstream.proto.child import ChildEndpoints, run_child

def body(links):
    raise ValueError("staging arena needs 8 GiB, /dev/shm has 1 GiB free")

run_child("staging", "staging", ChildEndpoints({control!r}, {work!r}), {parent}, body)
"""


def test_a_child_that_fails_while_still_connecting_still_reports_its_error():
    """A child that fails at once may send its Failed before its link is up (here the
    coordinator's socket appears only after the child has failed): the frame still arrives, with
    the error's text, and the child exits 1."""
    with temporary_run_dir() as run_dir:
        control, work = f"ipc://{run_dir}/control.sock", f"ipc://{run_dir}/work.sock"
        code = FAILING_CHILD.format(control=control, work=work, parent=os.getpid())
        p = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
        ctx = zmq.Context()
        try:
            time.sleep(0.5)  # the child has failed and is closing its links by now
            router, _ = make_router(ctx, control)
            got = recv_msg(router, 5000)
            router.close(linger=0)
            assert got is not None, "the failing child's Failed frame was lost"
            ident, msg = got
            assert ident == b"staging" and isinstance(msg, Failed)
            assert msg.error == "ValueError: staging arena needs 8 GiB, /dev/shm has 1 GiB free"
            assert p.wait(10) == 1
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            ctx.term()


def test_a_shutdown_raised_inside_a_decode_is_not_taken_for_a_bad_message(monkeypatch):
    """A ShutdownRequested raised inside the codec's `except Exception` around msgpack (as staging's
    SIGTERM handler once raised it wherever its main thread was) became a MalformedMessage: the
    message counted as bad and dropped, the stop lost. It is a BaseException, so it goes on."""
    from layerstream.proto import codec
    from layerstream.proto.child import ShutdownRequested
    from layerstream.proto.messages import Shutdown

    frames = codec.encode(Shutdown("run finished"))

    def interrupted(*args, **kwargs):
        raise ShutdownRequested("terminated")

    monkeypatch.setattr(codec.msgpack, "unpackb", interrupted)
    with pytest.raises(ShutdownRequested):
        codec.decode_extra(frames)
