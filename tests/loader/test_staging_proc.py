"""The staging process keeps its arena's segment to itself: made, registered and unlinked whole,
whenever the shutdown ladder's TERMINATE (SIGUSR1) lands."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import time

import pytest

from layerstream.proto.signals import TERMINATE

# A staging process whose coordinator never answers (with a parent_pid of -1, not its parent, it stops
# by itself within half a second), with TERMINATE sent to itself at one point of the arena's life
# ("waiting": none, nothing patched; the test sends it).
STAGING = """
import os, signal, sys, threading, time
from multiprocessing import resource_tracker
from layerstream.proto.signals import TERMINATE
from multiprocessing.shared_memory import SharedMemory
from layerstream.loader import staging_proc
from layerstream.proto.child import ChildEndpoints

resource_tracker.ensure_running()  # (as the launcher starts it before its children: theirs is running)
where = sys.argv[1]
if where == "registered":  # the segment made and registered, its finalizer not yet set
    register = resource_tracker.register
    def register_then_term(name, rtype):
        register(name, rtype)
        os.kill(os.getpid(), TERMINATE)
    resource_tracker.register = register_then_term
elif where == "unlinking":  # the cleanup, under way after the stop, just before the segment's unlink: a second TERMINATE
    unlink = SharedMemory.unlink
    def term_then_unlink(self):
        os.kill(os.getpid(), TERMINATE)
        unlink(self)
    SharedMemory.unlink = term_then_unlink
elif where == "populating":  # as the thread that makes the arena's pages starts (which then takes its time)
    start, populate = threading.Thread.start, staging_proc.Arena.populate
    def start_then_term(self):
        start(self)
        if self.name == "arena-populate":
            os.kill(os.getpid(), TERMINATE)
    def slow_populate(self, threads, stop):  # (past the stop's start: the stop is set, or the arena closed)
        deadline = time.monotonic() + 5
        while not (stop.is_set() or self._closed) and time.monotonic() < deadline:
            time.sleep(0.01)
        return populate(self, threads, stop)
    threading.Thread.start, staging_proc.Arena.populate = start_then_term, slow_populate
endpoints = ChildEndpoints(f"ipc://{sys.argv[2]}/control", f"ipc://{sys.argv[2]}/work")
try:
    staging_proc.main(staging_proc.StagingConfig("staging", 2, 4096, endpoints, parent_pid=int(sys.argv[3]),
                                                populate_threads=1))
finally:
    time.sleep(0.2)  # (a thread left running says what it met before the exit ends it)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="POSIX shared memory in /dev/shm, POSIX signals")
@pytest.mark.parametrize("where", ["registered", "unlinking", "populating"])
def test_terminate_anywhere_in_the_arenas_life_leaves_no_segment_and_no_tracker_warning(tmp_path, where):
    """Probe of issue 25: a Ctrl-C during start-up sometimes ended with the resource tracker's 'leaked
    shared_memory' warning after the run's one line. A SIGTERM (now TERMINATE) that staging took between the segment's
    registration and its finalizer raised ShutdownRequested there, leaving the segment to the tracker;
    a second one (the shutdown ladder's) in the cleanup cut it short after the finalizer's detach; one
    as the arena's page-making thread started closed the arena under it (its TypeError's traceback)."""
    p = subprocess.Popen([sys.executable, "-c", STAGING, where, str(tmp_path), "-1"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=60)  # (the tracker's warning comes as its pipe closes, at the exit)
    assert p.returncode == 0, err
    assert "leaked" not in err and "Traceback" not in err, err
    assert not glob.glob(f"/dev/shm/layerstream-{p.pid}-*")


@pytest.mark.skipif(sys.platform != "linux", reason="POSIX shared memory in /dev/shm, POSIX signals")
def test_terminate_stops_staging_well_before_the_shutdown_ladders_sigkill(tmp_path):
    """TERMINATE only sets a flag, which staging's loop reads between short waits: it must still stop
    (exit 0, its segment unlinked) well inside the wait the shutdown ladder gives it before SIGKILL."""
    from layerstream.coordinator.supervisor import TERM_WAIT_S

    p = subprocess.Popen([sys.executable, "-c", STAGING, "waiting", str(tmp_path), str(os.getpid())],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not glob.glob(f"/dev/shm/layerstream-{p.pid}-*"):  # (its TERMINATE handler is set by then)
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()[1]
            time.sleep(0.05)
        time.sleep(0.5)  # (into its loop's waits for a message)
        p.send_signal(TERMINATE)
        sent = time.monotonic()
        while glob.glob(f"/dev/shm/layerstream-{p.pid}-*") and time.monotonic() < sent + 60:
            time.sleep(0.01)
        took = time.monotonic() - sent  # (to the unlink: the interpreter's exit after it is not staging's)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
        out, err = p.communicate()
    assert p.returncode == 0, err
    assert took < TERM_WAIT_S, f"staging unlinked its arena {took:.2f} s after TERMINATE"
