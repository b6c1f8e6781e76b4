"""The coordinator's loop helpers: a signal that escapes the loop leaves no task to run on."""

import asyncio
import gc
import logging
import time

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


@pytest.mark.parametrize("where", ["the running loop set", "the task made"])
def test_a_signal_between_run_tasks_steps_leaves_no_running_loop_and_no_task(monkeypatch, caplog, where):
    """A signal's handler runs between any two steps of run_task: right after the loop is set as the
    running one (the stop's run of the loop would then be refused: 'another loop is running'), or
    right after the task is made (it would run on in the stop's run and fail unseen)."""
    loop = new_loop()
    resumed = []

    async def start():
        await asyncio.sleep(0.01)
        resumed.append(True)
        raise RuntimeError("a child died")

    if where == "the task made":
        made = loop.create_task

        def create_task(c, **kw):
            made(c, **kw)
            raise _Signal
        monkeypatch.setattr(loop, "create_task", create_task)
    else:
        real = asyncio._set_running_loop

        def set_running(lp):
            real(lp)
            if lp is not None:
                raise _Signal
        monkeypatch.setattr(asyncio, "_set_running_loop", set_running)
    try:
        with pytest.raises(_Signal):
            run_task(loop, start())
        monkeypatch.undo()
        assert asyncio._get_running_loop() is None
        stopped = []

        async def stop():
            stopped.append(True)
        run_briefly(loop, stop(), 1.0, "the stop")
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            gc.collect()
        assert stopped == [True] and not resumed
        assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
    finally:
        loop.close()


def test_a_coroutine_whose_task_never_ran_is_closed_on_a_plain_asyncio_loop():
    """On asyncio's own loop a signal from a callback queued before the task's first step escapes
    before the task runs: its cancel never reaches the coroutine, which run_task closes instead (its
    cleanup runs at once)."""
    loop = asyncio.new_event_loop()
    cleaned = []

    async def start():
        loop.call_soon(_raise_signal)
        try:
            await asyncio.sleep(10)
        finally:
            cleaned.append(True)

    try:
        with pytest.raises(_Signal):
            run_task(loop, start())
        assert cleaned == [True]
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


def test_a_call_that_never_waits_does_not_enter_the_loop_and_one_that_waits_goes_on_there(monkeypatch):
    """NOTE [ backend calls without the loop ]: the loop is entered only by a coroutine that waits; the
    coroutine sees the loop as running before and after its first wait, and every later wait (a
    future's result, its error, a bare yield, a timer) reaches it as a task would give it."""
    loop = new_loop()
    entered = []
    real = type(loop).run_until_complete
    monkeypatch.setattr(type(loop), "run_until_complete", lambda self, f: entered.append(1) or real(self, f))

    async def queued():
        assert asyncio.get_running_loop() is loop
        return loop.create_future() is not None

    async def waits():
        assert asyncio.get_running_loop() is loop
        f = loop.create_future()
        loop.call_soon(f.set_result, 3)
        got = await f
        g = loop.create_future()
        loop.call_soon(g.set_exception, KeyError("k"))
        try:
            await g
        except KeyError:
            got += 1
        await asyncio.sleep(0)
        await asyncio.sleep(0.001)
        assert asyncio.get_running_loop() is loop
        return got

    try:
        assert run_task(loop, queued()) is True and entered == []
        assert asyncio._get_running_loop() is None  # (set for the call only)
        assert run_task(loop, waits()) == 4 and len(entered) == 1
    finally:
        loop.close()


def test_a_cancel_reaches_the_coroutine_where_it_waits():
    loop = new_loop()
    seen = []

    async def waits():
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    try:
        loop.call_later(0.01, lambda: [t.cancel() for t in asyncio.all_tasks(loop)])
        with pytest.raises(asyncio.CancelledError):
            run_task(loop, waits())
        assert seen == ["cancelled"]
    finally:
        loop.close()


def test_signals_during_a_deferred_block_come_after_it(ctrl_c_raises):
    """A stop's clean-up runs whole (Pipeline.close): a Ctrl-C in the block is held back and sent
    again after it, so it is raised there, once; the handlers are the caller's again. (Once in CI,
    273fc36, nothing was raised: a suite run as a background job, SIGINT ignored: ctrl_c_raises.)"""
    import os
    import signal

    from layerstream.coordinator.event_loop import signals_deferred

    done = []
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # (a handler runs between bytecodes: it would have raised here)
            done.append(True)
        time.sleep(1)  # (the signal sent again arrives while this sleeps)
    assert done == [True] and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_sigquit_during_a_deferred_block_comes_after_it():
    """A Ctrl-\\ (SIGQUIT, a stop signal as SIGTERM is: proto.signals) in a stop's clean-up is held
    back as the others are, so the clean-up runs whole, then raised as Stopped after it."""
    import os
    import signal

    from layerstream.coordinator.event_loop import signals_deferred
    from layerstream.proto.signals import Stopped, raise_stopped

    before = signal.signal(signal.SIGQUIT, raise_stopped)
    done = []
    try:
        with pytest.raises(Stopped) as got:
            with signals_deferred():
                os.kill(os.getpid(), signal.SIGQUIT)
                time.sleep(0.05)  # (a handler runs between bytecodes: it would have raised here)
                done.append(True)
            time.sleep(1)
        assert done == [True] and got.value.signum == signal.SIGQUIT
    finally:
        signal.signal(signal.SIGQUIT, before)


def test_a_ctrl_c_held_back_is_raised_after_the_block_and_a_second_at_once_where_asked(ctrl_c_raises):
    """(the pipeline's submit holds a Ctrl-C back while a step is sent and recorded; a send that waits
    on a stalled compute process held a second one too, for up to --stall-timeout)"""
    import os
    import signal
    import time

    from layerstream.coordinator.event_loop import signals_deferred

    seen = []
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred(("SIGINT",), second_at_once=True):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            seen.append("held")
        time.sleep(0.05)
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred(("SIGINT",), second_at_once=True):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            seen.append("not reached")
    time.sleep(0.05)  # (no third: the first is not sent again)
    assert seen == ["held"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
