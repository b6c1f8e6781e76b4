"""A run stopped while its children start: one line, 128 + the signal, nothing left
(NOTE [ SIGINT while a child starts ] in coordinator/sigmask.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ggufgen
from layerstream.coordinator.supervisor import Supervisor
from layerstream.proto.child import ShutdownRequested
from procs import descendants, ends_with_the_test, leaked, segments

LAUNCHER = Path(__file__).resolve().parents[2] / "bin" / "run-pipeline"
SIGINT_BIT = 1 << (signal.SIGINT - 1)
WARM_LAUNCHER = ("from layerstream.coordinator import supervisor\nsupervisor.WARM_MIN_CPUS = 1\n"
                 "from layerstream.coordinator.cli import entry\nentry()")


def _status(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/status") as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except OSError:
        return {}


def _bootstrapping(pid: int) -> list[int]:
    """Spawned children inside multiprocessing's bootstrap: Python's SIGINT handler installed, not
    yet named by our entry point (child_main names it first thing)."""
    found = []
    for k in descendants(pid):
        try:
            with open(f"/proc/{k}/cmdline", "rb") as f:
                spawn = b"spawn_main" in f.read()
        except OSError:
            continue
        st = _status(k)
        if spawn and st and not st.get("Name", "").startswith("layerstream-") \
                and int(st.get("SigCgt", "0"), 16) & SIGINT_BIT:
            found.append(k)
    return found


@pytest.mark.default_threads
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
@pytest.mark.parametrize("nth,sig,warm", [(1, signal.SIGINT, False), (2, signal.SIGINT, False),
                                          (3, signal.SIGINT, False), (2, signal.SIGTERM, False),
                                          (2, signal.SIGINT, True)],
                         ids=["staging-int", "reader-int", "compute-int", "reader-term", "warm-reader-int"])
def test_a_signal_while_a_child_starts_prints_one_line(tmp_path, nth, sig, warm):
    """Probe of issue 25: a Ctrl-C (to the whole process group, as a terminal sends it) while a
    child ran multiprocessing's bootstrap printed its KeyboardInterrupt traceback from spawn_main,
    and a staging process terminated while it connected a ShutdownRequested one. The signal is
    sent while the nth child is in that bootstrap (`warm`: children spawned ahead, NOTE [ warm
    starts ], which this machine may have too few cores to take by default)."""
    path = ggufgen.write_model(tmp_path / "m.gguf")
    before = segments()
    launcher = [str(LAUNCHER)] if not warm else [sys.executable, "-c", WARM_LAUNCHER]
    p = subprocess.Popen([*launcher, "-m", path, "--device", "cpu", "-n", "2000", "--ignore-eos", "hello"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         preexec_fn=lambda: (signal.signal(signal.SIGINT, signal.SIG_DFL), ends_with_the_test()))
    try:
        seen: set[int] = set()
        deadline = time.monotonic() + 90
        while len(seen) < nth and p.poll() is None and time.monotonic() < deadline:
            seen |= set(_bootstrapping(p.pid))
            time.sleep(0.003)
        assert len(seen) >= nth, f"never saw {nth} children starting; stderr: {p.communicate(timeout=60)[1]}"
        kids = descendants(p.pid)
        os.killpg(p.pid, sig)
        err = p.communicate(timeout=60)[1]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    word = "terminated" if sig == signal.SIGTERM else "interrupted"
    assert [line for line in err.splitlines() if line.strip()] == [f"run-pipeline: {word}"], err
    assert p.returncode == 128 + sig
    time.sleep(0.5)
    assert not [k for k in kids if _status(k) and _status(k).get("State", "").split()[0] != "Z"]
    assert not leaked(before, run=p.pid)


def _stopped_at_once(cfg) -> None:
    """A child's entry point that is told to stop before its body runs (a ShutdownRequested, as a
    SIGTERM turns into in staging)."""
    raise ShutdownRequested("terminated")


def test_a_child_stopped_before_its_body_exits_quietly(capfd):
    """A ShutdownRequested outside run_child's body (what a SIGTERM turns into in staging) printed a
    'Process layerstream-staging: Traceback' and exited 1."""
    sup = Supervisor()
    try:
        c = sup.start("staging", "staging", _stopped_at_once, None)
        c.proc.join(60)
        assert c.proc.exitcode == 0
    finally:
        sup.kill_all()
    assert "Traceback" not in capfd.readouterr().err


LOST_IN_A_CALLBACK = """
import gc, os, signal, sys, time, weakref
from layerstream.coordinator import cli
from layerstream.proto.signals import raise_stopped

def run(args):
    class Thing:
        pass
    t = Thing()
    # a SIGTERM whose handler runs inside a weakref callback (as one did while the server started)
    ref = weakref.ref(t, lambda r: raise_stopped(signal.SIGTERM, None))
    del t
    gc.collect()
    time.sleep(2)  # (where the signal sent again lands)
    print("carried on", file=sys.stderr)
    return 0

cli.run = run
sys.exit(cli.main(["hi"]))
"""


def test_a_sigterm_lost_in_a_callback_still_stops_the_run():
    """A SIGTERM right after a --serve start sometimes raised in a weakref callback: Python printed
    'Exception ignored in: <function WeakValueDictionary...>' with a traceback and the server served
    on, never stopping (test_process_names' terminate timed out)."""
    r = subprocess.run([sys.executable, "-c", LOST_IN_A_CALLBACK], capture_output=True, text=True, timeout=60)
    assert r.returncode == 143 and r.stderr.split() == ["run-pipeline:", "terminated"], (r.returncode, r.stderr)


STOPPED_BY = """
import sys
from layerstream.coordinator import cli

def run(args):
    raise {exc}

cli.run = run
sys.exit(cli.main(["hi"]))
"""


@pytest.mark.parametrize("exc,code,line", [("KeyboardInterrupt", 130, "interrupted"),
                                           ("cli.Stopped(15)", 143, "terminated"), ("cli.Stopped(1)", 129, "hung up")])
def test_a_stop_line_has_no_blank_line_before_it_off_a_terminal(exc, code, line):
    """Probe of issue 25: into a file or a pipe, a blank line came before 'run-pipeline: interrupted'.
    On a terminal the line still starts a line of its own (after the terminal's ^C)."""
    snippet = STOPPED_BY.format(exc=exc)
    r = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (code, f"run-pipeline: {line}\n")
    ours, theirs = os.openpty()
    try:
        r = subprocess.run([sys.executable, "-c", snippet], stdout=subprocess.DEVNULL, stderr=theirs, timeout=60)
        os.close(theirs)
        shown = b""
        while True:
            try:
                data = os.read(ours, 4096)
            except OSError:  # (EIO: the terminal's other side is closed and drained)
                break
            if not data:
                break
            shown += data
    finally:
        os.close(ours)
    assert (r.returncode, shown) == (code, f"\r\nrun-pipeline: {line}\r\n".encode())


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
def test_a_whole_group_stopped_and_continued_goes_on(tmp_path):
    """Ctrl-Z, then fg: the launcher and its children stopped together for longer than
    --stall-timeout are not a stall. The watchdog blamed compute from when it was last heard, before
    the loop read what compute had sent as it stopped (a hostile-user probe); now a wait that
    returns well past its deadline (this process was stopped) counts anew."""
    path = ggufgen.write_model(tmp_path / "m.gguf")
    p = subprocess.Popen([str(LAUNCHER), "-m", path, "--device", "cpu", "-n", "300", "--ignore-eos", "--on-context-full", "slide",
                          "--temperature", "0", "--stall-timeout", "2", "hello"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                         preexec_fn=ends_with_the_test)
    try:
        assert p.stdout.read(64), "no output before the stop"  # (decoding)
        os.killpg(p.pid, signal.SIGSTOP)
        time.sleep(4)
        os.killpg(p.pid, signal.SIGCONT)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 0, err.decode()
    assert b"stalled" not in err and out  # (still decoding when stopped: the rest came after the continue)


@pytest.mark.default_threads
@pytest.mark.parametrize("sig,line,code", [(signal.SIGINT, "interrupted", 130), (signal.SIGTERM, "terminated", 143),
                                           (signal.SIGHUP, "hung up", 129), (signal.SIGQUIT, "quit", 131)])
def test_a_stop_signal_during_the_imports_is_the_runs_one_line(sig, line, code):
    """NOTE [ stopped while it starts ] (coordinator/early_signals.py): the handlers the launcher
    installs before cli's imports. A signal there gave a KeyboardInterrupt traceback from inside an
    import, or (SIGTERM, SIGHUP) a silent death; here the signal lands with the handlers in place."""
    r = subprocess.run([sys.executable, "-c", "from layerstream.coordinator.early_signals import install\n"
                        f"install()\nimport os, time\nos.kill(os.getpid(), {int(sig)})\ntime.sleep(30)"],
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (code, f"run-pipeline: {line}\n")


def test_the_launchers_first_import_leaves_zmq_and_the_codec_out():
    """NOTE [ stopped while it starts ]: a fresh clone's CI stopped the launcher in proto's package
    imports (zmq, the codec) before early_signals had set its handlers: a KeyboardInterrupt traceback
    and status -2. The package loads its names on first use, so the handlers come first."""
    r = subprocess.run([sys.executable, "-c", "import sys\nfrom layerstream.coordinator.early_signals import entry\n"
                        "print(sorted(m for m in sys.modules if m == 'zmq' or m.startswith(('torch', 'layerstream.proto.'))))"],
                       capture_output=True, text=True, timeout=60, check=True)
    assert r.stdout.split() == ["['layerstream.proto.signals']"], r.stdout


def test_the_launchers_run_this_checkout_whatever_the_working_directory_holds(tmp_path):
    """bin/run-pipeline and bin/bench started from a folder that holds another checkout's `layerstream`
    and `benchmarks` (an A/B of two trees did: the old tree's bench ran the new tree's benchmarks) run
    their own: `-c` had put the working directory first on the path."""
    for name in ("layerstream", "benchmarks"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise SystemExit('the decoy {name}')\n")
    (tmp_path / "benchmarks" / "bench.py").write_text("")
    bench = LAUNCHER.with_name("bench")
    for argv, want in (([str(LAUNCHER), "--version"], "run-pipeline (layerstream)"), ([str(bench), "--help"], "usage: bin/bench")):
        r = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and r.stdout.startswith(want) and "decoy" not in r.stdout + r.stderr, (argv, r)


@pytest.mark.default_threads
@pytest.mark.parametrize("delay", [0.2, 0.4])
def test_the_launcher_stopped_as_it_imports_says_so_in_one_line(delay, tmp_path):
    """The launcher stopped a fraction of a second after its start, while it imports (a hostile
    probe's traceback): SIGINT to its process group ends it with the one line and 130, wherever it lands
    after the interpreter's own start, which keeps CPython's defaults (the test below: what lands in the
    launcher's first imports)."""
    p = subprocess.Popen([str(LAUNCHER), "-n", "4", "Hi"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    time.sleep(delay)
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err.splitlines()[-1:] == ["run-pipeline: interrupted"], (p.returncode, err)
    assert "Traceback" not in err
