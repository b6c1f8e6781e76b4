"""The harness every pipeline child runs in: links to the coordinator, Ready, Failed, shutdown.

NOTE [ child lifecycle ]
A child connects two DEALERs with its identity: `control` (lifecycle, stats) and `work`
(its role's messages). It sends `Ready` once set up; the coordinator waits for it with a
deadline. Bad frames on either link are counted and logged, never fatal. The child ends when
it gets `Shutdown`, when its parent process is gone (watchdog on the parent's pid), or on an
error, which it reports as a `Failed` message (error and traceback as data) before exiting
non-zero. Sockets close with linger 0, except after a Failed: a child that fails at once
(staging when the arena cannot be made) may still be connecting, and linger 0 would drop the
queued frame, so its error never reached the launcher. It lingers up to FAILED_LINGER_MS for
the frame to go out.
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import pickle
import sys
from dataclasses import dataclass
from typing import Any, Callable

import zmq

from .codec import BadMessageCounter
from .messages import Failed, Message, Ready, Shutdown, StatsReply, StatsRequest
from .signals import ignore_stop_signals
from .sockets import Curve, make_dealer, recv_envelope, send_msg

FAILED_LINGER_MS = 3000  # how long a failing child waits for its Failed frame to go out


# NOTE [ start-up objects frozen ]
# A full collection of CPython's garbage collector walks every object it tracks, and a process that
# imports torch makes a few hundred thousand: run-pipeline's own process ran three full collections
# while it started (BENCHMARKS.md, "Earlier: 32-token steps"), and each would stall a decode step if it came
# later. What a process makes while it starts lives until it ends, so a run's processes start with
# the collector off and, once ready, freeze those objects (gc.freeze) and turn it on: later
# collections walk only what the run made since. Garbage cycles made while starting stay (a
# collection to free them would cost the pause once more); they are the start's, bounded. The
# library's Engine leaves its caller's process as it is; run-pipeline gives an in-process caller
# its collector back as it was when the run ends.
class Settling:
    """The collector off from `with` until `ready()`, then the start's objects frozen (NOTE above);
    on exit unfrozen, and on again if it was. A caller that froze objects of its own keeps them
    frozen, and this freezes nothing (gc.unfreeze would give back the caller's too)."""

    def __enter__(self) -> "Settling":
        self.was, self.froze = gc.isenabled(), False
        gc.disable()
        return self

    def ready(self) -> None:
        if gc.get_freeze_count() == 0:
            gc.freeze()
            self.froze = True
        if self.was:
            gc.enable()

    def __exit__(self, *exc) -> None:
        if self.froze:
            gc.unfreeze()
        if self.was:
            gc.enable()


def settle() -> None:
    """A pipeline child set up (spawned started it with the collector off): its objects frozen,
    the collector on (NOTE [ start-up objects frozen ])."""
    gc.freeze()
    gc.enable()


@dataclass(frozen=True)
class ChildEndpoints:
    """What a child connects to (NOTE [ who binds, who connects ] in addresses.py): its control and
    work links, the run's bound on a message, and the CURVE keys it needs on tcp."""

    control: str
    work: str
    max_msg: int | None = None
    curve: Curve | None = None  # Curve.for_client(): no server secret


class ShutdownRequested(BaseException):
    """The coordinator asked this child to stop, or the parent is gone. A BaseException, as
    KeyboardInterrupt is: a stop passes through any `except Exception` on its way (the codec's,
    around msgpack, would take it for a bad message and drop it)."""


class ChildLinks:
    """A child's two links to the coordinator, with polling that serves control messages."""

    def __init__(self, role: str, ident: str, control: str, work: str, parent_pid: int,
                 stats: Callable[[], dict[str, Any]] | None = None, curve: Curve | None = None,
                 max_msg: int | None = None):
        self.role, self.ident, self.parent_pid = role, ident, parent_pid
        self.stats = stats or (lambda: {})
        self.ctx = zmq.Context()
        self.control = make_dealer(self.ctx, control, ident, curve, max_msg)
        self.work = make_dealer(self.ctx, work, ident, curve, max_msg)
        self.poller = zmq.Poller()
        self.poller.register(self.control, zmq.POLLIN)
        self.poller.register(self.work, zmq.POLLIN)
        self.bad = BadMessageCounter(f"{role} {ident}", logging.getLogger(f"layerstream.{role}"))

    def ready(self, info: dict[str, Any] | None = None) -> None:
        """Ready goes on both links: a ROUTER can route to a peer only after hearing from it."""
        msg = Ready(self.role, self.ident, os.getpid(), info or {})
        send_msg(self.work, msg)
        send_msg(self.control, msg)

    def send(self, msg: Message, extra=()) -> None:
        send_msg(self.work, msg, extra=extra)

    def _check_parent(self) -> None:
        if os.getppid() != self.parent_pid:
            raise ShutdownRequested("the coordinator process is gone")

    def recv(self, timeout_ms: int | None = None, with_extra: bool = False):
        """Next message on the work link (None after timeout_ms); serves control messages meanwhile."""
        waited = 0
        while True:
            slice_ms = 500 if timeout_ms is None else max(0, min(500, timeout_ms - waited))
            events = dict(self.poller.poll(slice_ms))
            if self.control in events:
                env = recv_envelope(self.control, 0, self.bad)
                if env is not None:
                    if isinstance(env.msg, Shutdown):
                        raise ShutdownRequested(env.msg.reason)
                    if isinstance(env.msg, StatsRequest):
                        send_msg(self.control, StatsReply(self.role, self.ident, self.stats()))
            if self.work in events:
                env = recv_envelope(self.work, 0, self.bad, copy=not with_extra)
                if env is not None:
                    return env if with_extra else env.msg
            if not events:
                self._check_parent()
                waited += slice_ms
                if timeout_ms is not None and waited >= timeout_ms:
                    return None

    def fail(self, where: str, exc: BaseException) -> None:
        try:
            send_msg(self.control, Failed.from_exception(self.role, self.ident, where, exc))
        except zmq.ZMQError:
            pass

    def close(self, linger_ms: int = 0) -> None:
        """Close both links; `linger_ms` lets queued frames (a Failed) go out first."""
        for s in (self.control, self.work):
            s.close(linger=linger_ms)
        self.ctx.term()


def _connect(role: str, ident: str, endpoints: ChildEndpoints, parent_pid: int,
             stats: Callable[[], dict[str, Any]] | None = None) -> ChildLinks:
    return ChildLinks(role, ident, endpoints.control, endpoints.work, parent_pid, stats,
                      curve=endpoints.curve, max_msg=endpoints.max_msg)


def spawned(role: str, ident: str, endpoints: ChildEndpoints | None, parent_pid: int, target: str,
            cfg: bytes) -> None:
    """Every child's spawn target: imports its entry point ("module:function") and unpickles its
    config here, inside the harness, so that a failure there (a broken install, a module that
    cannot import) reaches the coordinator as a Failed too, not as a traceback on stderr."""
    ignore_stop_signals()  # (see run_child)
    gc.disable()  # (until its body settles, its imports too: NOTE [ start-up objects frozen ])
    try:
        module, _, name = target.partition(":")
        main = getattr(importlib.import_module(module), name)
        config = pickle.loads(cfg)  # (the spawn pipe's bytes: pickle never crosses a socket)
    except BaseException as e:  # noqa: BLE001 - reported as data, like any error of a child
        if endpoints is None:
            print(f"{role} {ident}: {type(e).__name__}: {e}", file=sys.stderr)
        else:
            links = _connect(role, ident, endpoints, parent_pid)
            links.fail(f"{role} start", e)
            links.close(FAILED_LINGER_MS)
        sys.exit(1)
    main(config)


def run_child(role: str, ident: str, endpoints: ChildEndpoints, parent_pid: int,
              body: Callable[[ChildLinks], None], stats: Callable[[], dict[str, Any]] | None = None) -> None:
    """Run `body(links)` as a pipeline child; report errors as Failed; exit 0 on Shutdown."""
    # Ctrl-C, a closed terminal's SIGHUP and a stop sent to the group reach the whole process group;
    # the coordinator alone decides how to stop (NOTE [ SIGINT while a child starts ] in sigmask.py).
    ignore_stop_signals()
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s {role} {ident}: %(message)s")
    links = _connect(role, ident, endpoints, parent_pid, stats)
    code = 0
    try:
        body(links)
    except ShutdownRequested:
        pass
    except BaseException as e:  # noqa: BLE001 - everything a child dies of is reported as data
        links.fail(role, e)
        code = 1
    finally:
        links.close(FAILED_LINGER_MS if code else 0)
    sys.exit(code)
