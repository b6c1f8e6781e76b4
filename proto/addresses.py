"""Where the pipeline's sockets live: a private run directory, ipc/tcp addresses, who binds what.

NOTE [ who binds, who connects ]
The coordinator binds every socket; children only connect. The coordinator starts first and
outlives its children, so addresses are known before any child spawns (for tcp, only after
the coordinator has bound: see `bind`), and a restarted child simply reconnects.

    endpoint  coordinator binds  children connect         carries (message tags)
    control   ROUTER             every child, DEALER      lifecycle 1-9: Ready, Shutdown,
                                                          Failed, Stats*
    readers   ROUTER             each reader, DEALER      10-19: LoadLayer, LayerStaged, ...
    compute   ROUTER             each compute, DEALER     20-29: Forward, LayerDone, ...

A child's DEALER sets its identity (e.g. "reader-0") before connecting, the same identity on
both of its sockets, so the coordinator addresses it by name. Lifecycle messages have their
own link so that a Shutdown or a Failed never waits behind queued per-layer work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import zmq as _zmq

from layerstream.errors import ConfigError

RUN_DIR_PREFIX = "layerstream-"
# Longest ipc path the OS takes (sun_path is 108 bytes on Linux, counting the final NUL).
IPC_PATH_MAX = int(getattr(_zmq, "IPC_PATH_MAX_LEN", 0)) or 107

ENDPOINT_NAMES = ("control", "readers", "compute")
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")


class AddressError(ConfigError, ValueError):
    """An address that cannot be used (ipc path too long, bad name, unbound tcp port): a ConfigError,
    so that a caller's `except LayerstreamError` and the launcher's one line take it."""


def _remove_stale_run_dirs(base: str) -> None:
    """Run directories of ours under `base` whose launcher is gone (a kill -9): removed."""
    with contextlib.suppress(OSError):
        for name in os.listdir(base):
            d = os.path.join(base, name)
            if not name.startswith(RUN_DIR_PREFIX) or not os.path.isdir(d) or os.stat(d).st_uid != os.getuid():
                continue
            try:
                with open(os.path.join(d, "owner.pid")) as f:
                    pid = int(f.read().strip() or 0)
            except (OSError, ValueError):
                continue  # made by an older version, or being made right now: left alone
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                shutil.rmtree(d, ignore_errors=True)
            except PermissionError:
                pass


def make_run_dir(base: str | os.PathLike[str] | None = None) -> str:
    """Create a private (mode 0700) directory for this run's ipc sockets; returns its path.

    It goes under `base`, else the first of $XDG_RUNTIME_DIR, the system temp directory and /tmp
    that is usable and short enough for socket paths (at most IPC_PATH_MAX bytes). It records
    the launcher's pid, so that a later run removes it if the launcher was killed (kill -9).
    """
    if base is None:
        tries = [os.environ.get("XDG_RUNTIME_DIR"), tempfile.gettempdir(), "/tmp"]
        room = IPC_PATH_MAX - len(f"/{RUN_DIR_PREFIX}xxxxxxxx/readers") - 1
        ok = [b for b in tries if b and os.path.isdir(b) and os.access(b, os.W_OK | os.X_OK)
              and len(os.fsencode(b)) <= room]
        if not ok:
            raise AddressError("no usable directory for the run's sockets: $XDG_RUNTIME_DIR, $TMPDIR and /tmp are "
                               "missing, not writable or too long for a socket path; set TMPDIR to a short path")
        base = ok[0]
    base = os.fspath(base)
    _remove_stale_run_dirs(base)
    path = tempfile.mkdtemp(prefix=RUN_DIR_PREFIX, dir=base)
    os.chmod(path, 0o700)  # mkdtemp already does; say it where it matters
    with open(os.path.join(path, "owner.pid"), "w") as f:
        f.write(str(os.getpid()))
    return path


def cleanup_run_dir(path: str | os.PathLike[str]) -> None:
    """Remove a run directory made by make_run_dir and its sockets; missing is fine."""
    path = os.fspath(path)
    if not os.path.basename(os.path.normpath(path)).startswith(RUN_DIR_PREFIX):
        raise AddressError(f"refusing to remove {path!r}: not a run directory (name must start with {RUN_DIR_PREFIX!r})")
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)


@contextlib.contextmanager
def temporary_run_dir(base: str | os.PathLike[str] | None = None) -> Iterator[str]:
    """make_run_dir() for the duration of a with block, removed afterwards."""
    path = make_run_dir(base)
    try:
        yield path
    finally:
        cleanup_run_dir(path)


def ipc_address(run_dir: str | os.PathLike[str], name: str) -> str:
    """"ipc://<run_dir>/<name>.sock"; raises AddressError if the path is too long for the OS."""
    if not _NAME_RE.fullmatch(name):
        raise AddressError(f"bad socket name {name!r}: use letters, digits, '_', '.', '-'")
    path = os.path.join(os.fspath(run_dir), f"{name}.sock")
    size = len(os.fsencode(path))
    if size > IPC_PATH_MAX:
        raise AddressError(
            f"ipc socket path is {size} bytes, the OS limit is {IPC_PATH_MAX}: {path!r}; "
            "make the run dir under a shorter base directory or use transport='tcp'"
        )
    return f"ipc://{path}"


def tcp_address(host: str = "127.0.0.1", port: int = 0) -> str:
    """"tcp://host:port"; port 0 means "bind to a random free port" (see bind)."""
    if not 0 <= port < 65536:
        raise AddressError(f"tcp port {port} out of range 0..65535")
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"tcp://{host}:{port}"


def _tcp_host_port(address: str) -> tuple[str, str] | None:
    if not address.startswith("tcp://"):
        return None
    host, _, port = address[len("tcp://"):].rpartition(":")
    return host, port


def bind(sock: Any, address: str) -> str:
    """Bind a zmq socket and return the address bound (a tcp port 0 or '*' becomes the real port);
    an address the socket cannot bind is an AddressError."""
    if address.startswith("ipc://") and len(os.fsencode(address[len("ipc://"):])) > IPC_PATH_MAX:
        raise AddressError(f"ipc socket path longer than the OS limit of {IPC_PATH_MAX} bytes: {address!r}")
    tcp = _tcp_host_port(address)
    try:
        if tcp is not None and tcp[1] in ("0", "*"):
            return f"tcp://{tcp[0]}:{sock.bind_to_random_port(f'tcp://{tcp[0]}')}"
        sock.bind(address)
    except _zmq.ZMQError as e:  # (a tcp host that is no address of this machine: "No such device")
        raise AddressError(f"cannot bind the run's links to {address!r} ({_zmq.strerror(e.errno)}); give an address "
                           "of this machine, such as 127.0.0.1") from None
    return address


def check_connectable(address: str) -> str:
    """Return the address if a peer can connect to it; an unbound tcp port 0 raises AddressError."""
    tcp = _tcp_host_port(address)
    if tcp is not None and tcp[1] in ("0", "*"):
        raise AddressError(f"cannot connect to {address!r}: bind first (bind() returns the real port) and pass that")
    return address


@dataclasses.dataclass(frozen=True)
class Endpoints:
    """The pipeline's socket addresses; the coordinator binds each, children connect (see NOTE)."""

    transport: str
    run_dir: str | None
    control: str  # coordinator ROUTER <- every child's DEALER: lifecycle and stats
    readers: str  # coordinator ROUTER <- each reader's DEALER: LoadLayer / LayerStaged ...
    compute: str  # coordinator ROUTER <- each compute process's DEALER: Forward / LayerDone ...

    def for_role(self, role: str) -> tuple[str, str]:
        """(control address, work address) that a child of this role connects to (staging, which
        has no work of its own to hear, takes the readers' link)."""
        work = {"reader": self.readers, "staging": self.readers, "compute": self.compute}.get(role)
        if work is None:
            raise AddressError(f"no endpoints for role {role!r}: expected 'staging', 'reader' or 'compute'")
        return self.control, work

    def bound(self, **addresses: str) -> Endpoints:
        """A copy with the addresses actually bound (for tcp port 0), e.g. bound(control=bind(s, e.control))."""
        unknown = set(addresses) - set(ENDPOINT_NAMES)
        if unknown:
            raise AddressError(f"unknown endpoint names {sorted(unknown)}; expected {ENDPOINT_NAMES}")
        return dataclasses.replace(self, **addresses)

    def as_dict(self) -> dict[str, Any]:
        """Plain values, to hand to a spawned child."""
        return dataclasses.asdict(self)


def make_endpoints(transport: str = "ipc", run_dir: str | os.PathLike[str] | None = None, host: str = "127.0.0.1") -> Endpoints:
    """Addresses for every pipeline socket: ipc sockets in `run_dir`, or tcp on `host` with ports to bind."""
    if transport == "ipc":
        if run_dir is None:
            raise AddressError("ipc endpoints need a run_dir (make one with make_run_dir())")
        names = {name: ipc_address(run_dir, name) for name in ENDPOINT_NAMES}
        return Endpoints("ipc", os.fspath(run_dir), **names)
    if transport == "tcp":
        names = {name: tcp_address(host, 0) for name in ENDPOINT_NAMES}
        return Endpoints("tcp", None if run_dir is None else os.fspath(run_dir), **names)
    raise AddressError(f"unknown transport {transport!r}: expected 'ipc' or 'tcp'")


__all__ = [
    "RUN_DIR_PREFIX",
    "IPC_PATH_MAX",
    "ENDPOINT_NAMES",
    "AddressError",
    "make_run_dir",
    "cleanup_run_dir",
    "temporary_run_dir",
    "ipc_address",
    "tcp_address",
    "bind",
    "check_connectable",
    "Endpoints",
    "make_endpoints",
]
