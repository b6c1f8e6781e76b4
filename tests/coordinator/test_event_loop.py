"""The coordinator's loop helpers: a signal that escapes the loop leaves no task to run on."""

import asyncio
import gc
import logging

import pytest

from layerstream.coordinator.event_loop import new_loop, run_briefly, run_task


class _Signal(KeyboardInterrupt):
    pass


def _raise_signal():
    raise _Signal  # as the CLI's SIGTERM handler does, inside whatever callback the loop runs


def test_a_signal_out_of_a_callback_settles_the_task_before_the_stop_runs_the_loop(caplog):
    """A KeyboardInterrupt raised in one of the loop's callbacks escapes run_until_complete with the
    task still pending. The stop that follows runs the loop again (asking children to stop): the task
    must not resume there and fail unseen ('Task exception was never retrieved')."""
    loop = new_loop()
    resumed = []

    async def start():
        loop.call_soon(_raise_signal)
        await asyncio.sleep(0.01)  # (shorter than the stop's run: resumed there unless settled)
        resumed.append(True)
        raise RuntimeError("a child died")

    try:
        with pytest.raises(_Signal):
            run_task(loop, start())
        run_briefly(loop, asyncio.sleep(0.05), 1.0, "the stop")  # the stop's own run of the loop
        assert not resumed
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            gc.collect()
        assert not [r for r in caplog.records if "never retrieved" in r.getMessage()
                    or "destroyed but it is pending" in r.getMessage()]
    finally:
        loop.close()


def test_a_result_and_an_error_pass_through():
    loop = new_loop()

    async def ok():
        await asyncio.sleep(0)
        return 7

    async def bad():
        await asyncio.sleep(0)
        raise ValueError("bad value")

    try:
        assert run_task(loop, ok()) == 7
        with pytest.raises(ValueError, match="bad value"):
            run_task(loop, bad())
    finally:
        loop.close()
