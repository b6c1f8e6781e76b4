"""The shutdown ladder (NOTE [ shutdown order ] in coordinator/supervisor.py)."""

import time

import zmq

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


def _entry(cfg) -> None:
    """A child's entry point (its module is renamed below: the child cannot import it)."""


def test_a_child_that_cannot_import_its_entry_point_reports_the_error():
    """A failure before the child's own code runs (importing its module, unpickling its config)
    reaches the coordinator as a Failed naming the error, not as a traceback on stderr."""
    import os
    import types

    from layerstream.proto import Failed, make_router, recv_msg, temporary_run_dir
    from layerstream.proto.child import ChildEndpoints

    with temporary_run_dir() as run_dir:
        ctx = zmq.Context()
        router, control = make_router(ctx, f"ipc://{run_dir}/control.sock")
        entry = types.FunctionType(_entry.__code__, {}, "_entry")
        entry.__module__ = "layerstream_no_such_module"
        cfg = types.SimpleNamespace(endpoints=ChildEndpoints(control, f"ipc://{run_dir}/work.sock"),
                                    parent_pid=os.getpid())
        sup = Supervisor()
        try:
            c = sup.start("compute", "compute", entry, cfg)
            got = recv_msg(router, 20000)
            assert got is not None, "the child's failure never reached the coordinator"
            ident, msg = got
            assert ident == b"compute" and isinstance(msg, Failed)
            assert msg.error == "ModuleNotFoundError: No module named 'layerstream_no_such_module'"
            c.proc.join(10)
            assert c.proc.exitcode == 1
        finally:
            sup.kill_all()
            router.close(linger=0)
            ctx.term()
