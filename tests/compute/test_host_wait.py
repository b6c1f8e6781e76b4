"""The CPU experts' sum added once posted (host_wait.py, NOTE [ the CPU's sum posted to the device ]
in cpu/qdot.c): the kernel under Triton's interpreter, and the host's stand-in."""

import threading

import pytest
import torch

pytest.importorskip("triton")

from layerstream.compute import host_wait  # noqa: E402
from layerstream.compute.host_wait import FAILED, NOTHING, PENDING, POSTED, Mailbox, add_posted  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_kernel_adds_a_posted_sum_and_nothing_else(dtype):
    """Posted: out + sum as torch adds them (in float32, rounded once to out's dtype), over a width
    that is not whole blocks; nothing added where the flag says nothing, failed, or stays pending
    past the polls."""
    g = torch.Generator().manual_seed(4)
    out0 = torch.randn(2, 1500, generator=g).to(dtype)
    src = torch.randn(2, 1500, generator=g)
    for state in (POSTED, NOTHING, FAILED, PENDING):
        out = out0.clone()
        add_posted(torch.tensor([state], dtype=torch.int32), src, out, max_polls=8)
        want = (out0.float() + src).to(dtype) if state == POSTED else out0
        assert torch.equal(out, want), state


def test_the_hosts_stand_in_waits_for_the_post():
    """On the CPU, add_to waits while the flag is pending, then adds what was posted; told that
    the CPU took nothing, it adds nothing; never posted, it stops with an error, not a hang."""
    mail = Mailbox(1, 64, torch.device("cpu"))
    out = torch.ones(1, 64)
    mail.expect()
    posting = threading.Timer(0.05, mail.posted, args=(torch.full((1, 64), 2.0),))
    posting.start()
    mail.add_to(out)  # (returns only after the post)
    posting.join()
    assert torch.equal(out, torch.full((1, 64), 3.0))
    mail.nothing()
    mail.add_to(out)
    assert torch.equal(out, torch.full((1, 64), 3.0))


def test_the_hosts_stand_in_gives_up_on_a_post_that_never_comes(monkeypatch):
    monkeypatch.setattr(host_wait, "HOST_WAIT_S", 0.05)
    mail = Mailbox(1, 8, torch.device("cpu"))
    mail.expect()
    with pytest.raises(RuntimeError, match="posted no sum"):
        mail.add_to(torch.zeros(1, 8))


@pytest.mark.gpu
def test_on_cuda_a_graph_waits_for_the_post_from_the_host():
    """Captured in a CUDA graph, the kernel reads the flag and the sum in pinned host memory: the
    replay does not end while the flag is pending, and ends with the sum added once it is posted
    (as the CPU's call posts it from its own thread). Launched while the CUDA kernels of other
    tests may run, it keeps to this test's stream."""
    import time

    dev = torch.device("cuda")
    mail = Mailbox(1, 2048, dev)
    out = torch.zeros(1, 2048, device=dev, dtype=torch.float16)
    stream = torch.cuda.Stream(dev)
    with torch.cuda.stream(stream):
        mail.add_to(out)  # (warm-up: compiled, the flag says nothing)
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            mail.add_to(out)
        mail.expect()
        graph.replay()
        done = torch.cuda.Event()
        done.record(stream)
    time.sleep(0.2)
    assert not done.query()  # the device still waits for the post
    s = torch.randn(1, 2048, generator=torch.Generator().manual_seed(5))
    threading.Thread(target=mail.posted, args=(s,)).start()
    done.synchronize()
    assert torch.equal(out.cpu(), s.half())
    mail.nothing()
    with torch.cuda.stream(stream):
        graph.replay()
    stream.synchronize()
    assert torch.equal(out.cpu(), s.half())  # nothing added
