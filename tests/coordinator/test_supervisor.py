"""The shutdown ladder (NOTE [ shutdown order ] in coordinator/supervisor.py)."""

import time

from layerstream.coordinator.supervisor import Supervisor


def test_a_child_the_shutdown_could_not_reach_is_terminated_at_once():
    """A child still starting when a run is interrupted cannot be asked to stop: it gets SIGTERM
    at once, where a child that was asked is given its time to stop by itself first."""
    sup = Supervisor()
    unasked = sup.start("reader", "r0", time.sleep, 60)
    asked = sup.start("reader", "r1", time.sleep, 60)  # (it ignores the request: sleeps on)
    try:
        t0 = time.monotonic()
        sup.stop(["r0"], 5.0, asked=set())
        assert time.monotonic() - t0 < 2.0 and unasked.proc.exitcode is not None
        t0 = time.monotonic()
        sup.stop(["r1"], 1.0, asked={"r1"})
        assert time.monotonic() - t0 >= 1.0 and asked.proc.exitcode is not None  # waited, then terminated
    finally:
        sup.kill_all()
