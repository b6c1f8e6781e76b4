"""The coordinator's asyncio loop (uvloop where it exists) and a bounded run of one coroutine on it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading

from layerstream.proto.signals import STOP_SIGNALS, restore, set_handlers

log = logging.getLogger("layerstream.pipeline")


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # uvloop does not exist on Windows
        return asyncio.new_event_loop()


@contextlib.contextmanager
def signals_deferred(which: tuple[str, ...] | None = None, second_at_once: bool = False):
    """The stop signals (STOP_SIGNALS: Ctrl-C, SIGTERM, SIGHUP, SIGQUIT), or those named in `which`,
    held back for the block, then sent again (in the main thread; a no-op elsewhere): a stop's
    clean-up runs whole. A second Ctrl-C that landed in it had cut the children's stop short,
    leaving the staging segment to multiprocessing's tracker and the run directory behind.
    `second_at_once`: a signal that comes again meanwhile meets its own handler at once (a block
    that may wait long: the person insists)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    sigs = STOP_SIGNALS if which is None else [getattr(signal, name) for name in which if hasattr(signal, name)]

    def hold(n, frame):
        if second_at_once and n in got and callable(old[n]):
            got.clear()  # (not sent again: its handler runs now; the finally restores the handlers)
            old[n](n, frame)
            return
        got.append(n)

    old = set_handlers(sigs, hold)
    try:
        yield
    finally:
        restore(old)
        if got:
            os.kill(os.getpid(), got[-1])


def run_briefly(loop: asyncio.AbstractEventLoop, coro, timeout: float, what: str) -> None:
    """Run `coro` on `loop` for at most `timeout` s, whatever happens (a stop goes on after it):
    a failure, or a signal that lands in it, is logged at debug level, and its task's outcome is
    settled (see `settle`)."""
    task = loop.create_task(coro)
    try:
        loop.run_until_complete(asyncio.wait_for(task, timeout))
    except BaseException as e:  # noqa: BLE001 - the caller goes on whatever happened
        log.debug("%s failed: %s", what, e)
    settle(loop, task)


# NOTE [ backend calls without the loop ]
# Each backend call of the pipeline (a step's send, its answer's collection) is one coroutine, and
# entering uvloop's run_until_complete in the main thread costs more than such a call's own work when
# its answer is already queued (the loop sets up and removes its signal wake-up on each entry; see
# `bin/bench links`). So run_task starts the coroutine itself, with the loop set as the running one
# (so that it may make futures and ask for the loop), and enters the loop only if the coroutine waits:
# then a task goes on from that wait as one started with the coroutine would have.


def run_task(loop: asyncio.AbstractEventLoop, coro):
    """`loop.run_until_complete(coro)`, entering the loop only if `coro` waits (NOTE [ backend calls
    without the loop ]). A signal raised out of one of the loop's callbacks (the handler's
    KeyboardInterrupt escapes `run_until_complete` and leaves the task pending) settles the task
    before the signal goes on: otherwise the next run of the loop, the stop's, would resume it, and
    its failure there would be reported as never retrieved."""
    if asyncio._get_running_loop() is not None:  # (inside a running loop: refused as run_until_complete does)
        return loop.run_until_complete(coro)
    go = task = None
    try:  # (one try over it all: a signal's handler runs between any two steps, this one's too)
        asyncio._set_running_loop(loop)
        try:
            waiting = coro.send(None)
        except StopIteration as done:
            return done.value
        finally:
            asyncio._set_running_loop(None)
        go = _go_on(coro, waiting)
        task = loop.create_task(go)
        return loop.run_until_complete(task)
    except BaseException:
        if asyncio._get_running_loop() is loop:
            asyncio._set_running_loop(None)
        if task is None and go is not None:  # (made, perhaps scheduled, not yet named here)
            task = next((t for t in asyncio.all_tasks(loop) if t.get_coro() is go), None)
        if task is not None:
            settle(loop, task)
        elif go is not None:
            go.close()
        with contextlib.suppress(RuntimeError):  # (still suspended where a task never ran: its cleanup now)
            coro.close()
        raise


async def _go_on(coro, waiting):
    """Drive `coro` from its first wait, on `waiting` (a future, or None for a bare yield), as the task
    that runs it would have: a future's outcome is read by the coroutine itself, and a cancel of
    this task reaches it as a CancelledError where it waits."""
    while True:
        err = None
        try:
            if waiting is None:
                await asyncio.sleep(0)
            else:
                waiting._asyncio_future_blocking = False  # (set by the coroutine's yield; a future is awaited once)
                await waiting
        except BaseException as e:  # noqa: BLE001 - it reaches the coroutine below
            err = e
        try:
            if err is None or (waiting is not None and waiting.done() and not waiting.cancelled()
                               and waiting.exception() is err):
                waiting = coro.send(None)  # (the future's result or error, given by the coroutine's own await)
            else:
                waiting = coro.throw(err)
        except StopIteration as done:
            return done.value


def settle(loop: asyncio.AbstractEventLoop, task: asyncio.Task) -> None:
    """Cancel `task` if still pending and let it unwind; retrieve its outcome, so that asyncio does
    not report it again when the task is collected ('Task exception was never retrieved')."""
    if not task.done():
        task.cancel()
        with contextlib.suppress(BaseException):
            loop.run_until_complete(task)
    if task.done() and not task.cancelled():
        task.exception()
