"""Fixtures of the coordinator's tests: the plan's models of real shapes, made once a session."""

from __future__ import annotations

import pytest

from plans import shaped


@pytest.fixture(scope="session")
def l8():
    return shaped("llama-3.1-8b")


@pytest.fixture(scope="session")
def l70():
    return shaped("llama-3.1-70b")


@pytest.fixture
def no_leftovers():
    """The test leaves no child process and no shared-memory segment of its own."""
    import multiprocessing
    import time

    from procs import leaked, segments

    before = segments()
    yield
    deadline = time.monotonic() + 5
    while (multiprocessing.active_children() or leaked(before)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not multiprocessing.active_children(), "child processes left running"
    assert not leaked(before), f"segments left in /dev/shm: {leaked(before)}"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A 4-layer llama GGUF (Q8_0, Q4_K and Q6_K matrices) for the pipeline's tests."""
    import ggufgen

    path = str(tmp_path_factory.mktemp("pipe") / "tiny.gguf")
    ggufgen.write_model(path, arch="llama", n_layer=4, n_embd=256, n_ff=512, n_head=4, n_head_kv=2,
                        qtype=["Q8_0", "Q4_K", "Q6_K"], seed=3)
    return path
