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


def _wait_for(path, seconds: float = 30.0) -> bool:
    end = time.monotonic() + seconds
    while not path.exists() and time.monotonic() < end:
        time.sleep(0.02)
    return path.exists()


def test_a_warm_process_imports_ahead_then_runs_the_child_it_is_given(tmp_path, monkeypatch):
    """NOTE [ warm starts ]: the process spawned ahead imports its role's modules and runs the last
    one's `prepare_warm` before any config exists, and the child started later runs in it (no second
    spawn)."""
    import os

    from layerstream.coordinator import supervisor

    imported, prepared, ran = tmp_path / "imported", tmp_path / "prepared-", tmp_path / "ran"
    (tmp_path / "warm_marker_mod.py").write_text(f"import os\nos.mkdir({str(imported)!r})\n\n\n"
                                                 f"def prepare_warm(device):\n    os.mkdir({str(prepared)!r} + device)\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # (a spawned child starts with this sys.path)
    monkeypatch.setitem(supervisor.WARM_MODULES, "reader", ("warm_marker_mod",))
    with supervisor.WarmStarts({"reader": 1}, device="cpu") as warm:
        (proc, _), = warm.waiting["reader"]
        assert _wait_for(imported) and _wait_for(tmp_path / "prepared-cpu") and not ran.exists()
        sup = Supervisor(warm)
        try:
            c = sup.start("reader", "r0", os.mkdir, str(ran))  # the child's entry point and config
            assert c.proc is proc and _wait_for(ran)
            c.proc.join(10)
            assert c.proc.exitcode == 0 and warm.waiting["reader"] == []
            assert sup.start("reader", "r1", os.mkdir, str(tmp_path / "spawned")).proc is not proc  # none left
        finally:
            sup.kill_all()


def test_warm_processes_that_get_nothing_exit_when_let_go():
    from layerstream.coordinator.supervisor import WarmStarts

    warm = WarmStarts({"reader": 2, "staging": 1})
    procs = [p for waiting in warm.waiting.values() for p, _ in waiting]
    t0 = time.monotonic()
    warm.close()
    assert time.monotonic() - t0 < 5.0 and all(p.exitcode is not None for p in procs)


def test_warm_starts_are_taken_where_cores_are_free():
    from layerstream.coordinator.supervisor import warm_starts_pay

    assert [warm_starts_pay(c) for c in (1, 2, 3, 4, 16)] == [False, False, False, True, True]


# a child's body: an atexit callback, and an object whose finalizer runs only in the interpreter's teardown
_PROBE = """
import atexit, builtins, sys
class _Probe:
    def __del__(self, open=open, path=PATH):
        with open(path, "a") as f:
            f.write("teardown\\n")
builtins._layerstream_probe = _Probe()
atexit.register(lambda: open(PATH, "a").write("atexit\\n"))
print("unflushed", end="")
sys.exit(3)
"""


def test_a_child_ends_with_its_status_after_atexit_without_the_interpreters_teardown(tmp_path):
    """NOTE [ quick exits ]: the compute process's teardown (a second with torch) held up every
    run's stop; a child now ends at once, its status and atexit's callbacks kept."""
    import multiprocessing as mp
    import pickle

    from layerstream.coordinator.supervisor import child_main

    path = tmp_path / "probe"
    path.write_text("")
    code = _PROBE.replace("PATH", repr(str(path)))
    p = mp.get_context("spawn").Process(target=child_main,
                                        args=("reader", "r0", None, 0, "builtins:exec", pickle.dumps(code)))
    p.start()
    p.join(60)
    assert p.exitcode == 3
    assert path.read_text().split() == ["atexit"]


def test_the_command_ends_with_its_status_and_its_output_flushed_without_the_teardown(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "probe"
    path.write_text("")
    code = _PROBE.replace("PATH", repr(str(path))).replace("sys.exit(3)", "")
    code += "from layerstream.coordinator.supervisor import quick_exit\nquick_exit(5)\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 5 and r.stdout == "unflushed" and r.stderr == ""
    assert path.read_text().split() == ["atexit"]


def test_warm_starts_let_go_once():
    from layerstream.coordinator.supervisor import WarmStarts

    warm = WarmStarts({"reader": 1})
    (proc, _), = warm.waiting["reader"]
    warm.close()
    assert proc.exitcode is not None and warm.closed
    warm.close()  # (the launcher's way out and atexit's last resort call it again: nothing left to do)
    assert warm.waiting == {}
