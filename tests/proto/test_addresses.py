"""Run directory, ipc/tcp addresses, endpoints and binding."""

import os
import stat

import pytest
import zmq

from layerstream.proto import (
    ENDPOINT_NAMES,
    IPC_PATH_MAX,
    RUN_DIR_PREFIX,
    AddressError,
    bind,
    check_connectable,
    cleanup_run_dir,
    ipc_address,
    make_endpoints,
    make_run_dir,
    tcp_address,
    temporary_run_dir,
)


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.term()


def test_run_dir_is_private(tmp_path):
    path = make_run_dir(tmp_path)
    try:
        assert os.path.basename(path).startswith(RUN_DIR_PREFIX)
        assert os.path.dirname(path) == str(tmp_path)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    finally:
        cleanup_run_dir(path)
    assert not os.path.exists(path)
    cleanup_run_dir(path)  # already gone: fine


def test_run_dir_default_base(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    with temporary_run_dir() as path:
        assert os.path.dirname(path) == str(tmp_path)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    assert not os.path.exists(path)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "missing"))
    with temporary_run_dir() as path:
        assert os.path.isdir(path)


def test_cleanup_refuses_other_dirs(tmp_path):
    with pytest.raises(AddressError, match="not a run directory"):
        cleanup_run_dir(tmp_path)
    assert tmp_path.exists()


def test_ipc_address(tmp_path):
    assert ipc_address(tmp_path, "control") == f"ipc://{tmp_path}/control.sock"
    with pytest.raises(AddressError, match="bad socket name"):
        ipc_address(tmp_path, "../x")


def test_ipc_path_too_long(tmp_path):
    deep = tmp_path / ("d" * (IPC_PATH_MAX + 10))
    with pytest.raises(AddressError, match=rf"ipc socket path is \d+ bytes, the OS limit is {IPC_PATH_MAX}.*transport='tcp'"):
        ipc_address(deep, "control")
    with pytest.raises(AddressError, match="ipc socket path"):
        make_endpoints("ipc", deep)


def test_tcp_address():
    assert tcp_address() == "tcp://127.0.0.1:0"
    assert tcp_address("::1", 5555) == "tcp://[::1]:5555"
    with pytest.raises(AddressError, match="out of range"):
        tcp_address(port=70000)
    # a caller's `except LayerstreamError` takes it (it was a bare ValueError: a Python API probe's)
    from layerstream.errors import ConfigError

    with pytest.raises(ConfigError, match="out of range"):
        tcp_address(port=70000)


def test_tcp_binds_random_port_on_loopback(ctx):
    eps = make_endpoints("tcp")
    assert eps.control == "tcp://127.0.0.1:0"
    with pytest.raises(AddressError, match="bind first"):
        check_connectable(eps.control)
    sock = ctx.socket(zmq.ROUTER)
    try:
        bound = bind(sock, eps.control)
        host, port = bound[len("tcp://"):].rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        assert sock.last_endpoint.decode() == bound
        eps = eps.bound(control=bound)
        assert eps.control == bound and check_connectable(bound) == bound
    finally:
        sock.close(linger=0)


def test_ipc_endpoints(tmp_path):
    eps = make_endpoints("ipc", tmp_path)
    assert eps.transport == "ipc"
    for name in ENDPOINT_NAMES:
        assert getattr(eps, name) == f"ipc://{tmp_path}/{name}.sock"
    assert eps.for_role("reader") == (eps.control, eps.readers)
    assert eps.for_role("compute") == (eps.control, eps.compute)
    assert eps.for_role("staging") == (eps.control, eps.readers)
    assert eps.as_dict()["run_dir"] == str(tmp_path)
    with pytest.raises(AddressError, match="no endpoints for role"):
        eps.for_role("tokenizer")
    with pytest.raises(AddressError, match="unknown endpoint names"):
        eps.bound(nope="x")


def test_make_endpoints_errors():
    with pytest.raises(AddressError, match="need a run_dir"):
        make_endpoints("ipc")
    with pytest.raises(AddressError, match="unknown transport"):
        make_endpoints("udp")


def test_stale_run_dir_of_a_killed_launcher_is_removed_by_the_next_run(tmp_path):
    """kill -9 of a launcher leaves its run directory; the next run removes it (its pid is gone),
    and leaves alone a live one and a directory without a pid file."""
    import subprocess

    from layerstream.proto.addresses import make_run_dir

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live, unknown = (tmp_path / f"layerstream-{n}" for n in ("stale", "live", "unknown"))
    for d in (stale, live, unknown):
        d.mkdir()
    (stale / "owner.pid").write_text(str(dead.pid))
    (live / "owner.pid").write_text(str(os.getpid()))
    new = make_run_dir(tmp_path)
    assert not stale.exists() and live.exists() and unknown.exists()
    assert open(os.path.join(new, "owner.pid")).read() == str(os.getpid())


def test_long_tmpdir_falls_back_to_a_short_base(tmp_path, monkeypatch):
    from layerstream.proto.addresses import IPC_PATH_MAX, cleanup_run_dir, ipc_address, make_run_dir

    deep = tmp_path / ("d" * 120)
    deep.mkdir()
    monkeypatch.setenv("TMPDIR", str(deep))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    d = make_run_dir()
    try:
        assert len(ipc_address(d, "readers").encode()) - len("ipc://") <= IPC_PATH_MAX
    finally:
        cleanup_run_dir(d)
