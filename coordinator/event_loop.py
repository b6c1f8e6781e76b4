"""The coordinator's asyncio loop (uvloop where it exists) and a bounded run of one coroutine on it."""

from __future__ import annotations

import asyncio
import contextlib
import logging

log = logging.getLogger("layerstream.pipeline")


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # uvloop does not exist on Windows
        return asyncio.new_event_loop()


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


def run_task(loop: asyncio.AbstractEventLoop, coro):
    """`loop.run_until_complete(coro)`, except that a signal raised out of one of the loop's
    callbacks (the handler's KeyboardInterrupt escapes `run_until_complete` and leaves the task
    pending) settles the task before the signal goes on: otherwise the next run of the loop, the
    stop's, would resume it, and its failure there would be reported as never retrieved."""
    task = loop.create_task(coro)
    try:
        return loop.run_until_complete(task)
    except BaseException:
        settle(loop, task)
        raise


def settle(loop: asyncio.AbstractEventLoop, task: asyncio.Task) -> None:
    """Cancel `task` if still pending and let it unwind; retrieve its outcome, so that asyncio does
    not report it again when the task is collected ('Task exception was never retrieved')."""
    if not task.done():
        task.cancel()
        with contextlib.suppress(BaseException):
            loop.run_until_complete(task)
    if task.done() and not task.cancelled():
        task.exception()
