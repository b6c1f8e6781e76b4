"""The command with its standard streams closed or failing (a hostile-user probe): a closed stdin or
stdout is the null device, a write that fails is one line and exit 1, never a traceback or an abort."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import ggufgen
from procs import ends_with_the_test, wait_listening

LAUNCHER = Path(__file__).resolve().parents[2] / "bin" / "run-pipeline"
linux = pytest.mark.skipif(sys.platform != "linux", reason="/dev/full, /proc")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return ggufgen.write_model(tmp_path_factory.mktemp("stdio") / "m.gguf")


def _run(args, closed=(), stdout=subprocess.PIPE):
    def close():
        for fd in closed:
            os.close(fd)
    return subprocess.run([str(LAUNCHER), *args], stdout=stdout, stderr=subprocess.PIPE, text=True,
                          timeout=120, preexec_fn=close)


def _lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.strip()]


@pytest.mark.parametrize("mode", [["--single-process"], []], ids=["one process", "pipeline"])
def test_a_closed_stdin_or_stdout_is_the_null_device(model, mode):
    """`<&-` raised AttributeError on sys.stdin (None) before anything ran; `>&-` gave each child's
    traceback at its exit, then libuv's abort (exit 134) as its loop's socket took fd 1. A closed
    stdout is then refused in one line before the model loads, as a full disk is (a probe's: the
    reply was lost with exit 0)."""
    args = [*mode, "-m", model, "--device", "cpu", "-n", "3", "--temperature", "0", "hello"]
    r = _run(args, closed=(0,))
    assert r.returncode == 0 and r.stdout.strip() and not r.stderr.strip(), r.stderr
    r = _run(args, closed=(1,), stdout=None)
    assert r.returncode == 1 and _lines(r.stderr) == [
        "run-pipeline: error: cannot write the output (standard output is closed); redirect it to a file, or to "
        "/dev/null to discard it"], r.stderr


def test_a_directory_as_stdin_reads_as_the_null_device(model, tmp_path):
    """`< dir` stopped CPython itself before any of this project's code ran ("Fatal Python error:
    init_sys_streams", exit 1); it reads as a closed stdin: a prompt given runs, none is refused."""
    args = ["--single-process", "-m", model, "--device", "cpu", "-n", "3", "--temperature", "0"]
    d = os.open(tmp_path, os.O_RDONLY)  # (a directory opened for reading, as the shell's `<` opens it)
    try:
        ran = subprocess.run([str(LAUNCHER), *args, "hello"], stdin=d, capture_output=True, text=True, timeout=120)
        none = subprocess.run([str(LAUNCHER), *args], stdin=d, capture_output=True, text=True, timeout=120)
    finally:
        os.close(d)
    assert ran.returncode == 0 and ran.stdout.strip() and not ran.stderr.strip(), ran.stderr
    assert none.returncode == 2 and _lines(none.stderr) == [
        "run-pipeline: error: no prompt given; pass the prompt text (or pipe it in), or --chat for an interactive chat"
    ], none.stderr


@linux
@pytest.mark.parametrize("mode", [["--single-process"], []], ids=["one process", "pipeline"])
def test_a_reply_into_a_full_disk_is_one_line_and_exit_1(model, mode):
    with open("/dev/full", "w") as full:
        r = _run([*mode, "-m", model, "--device", "cpu", "-n", "3", "hello"], stdout=full)
    assert r.returncode == 1, r.stderr
    assert _lines(r.stderr) == ["run-pipeline: error: cannot write the output (No space left on device); check the "
                                "disk or the file stdout goes to"], r.stderr


@linux
def test_a_perplexity_into_a_full_disk_is_one_line_and_exit_1(model, tmp_path):
    """(a probe's: an OSError traceback from its print)"""
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    with open("/dev/full", "w") as full:
        r = _run(["--single-process", "-m", model, "--device", "cpu", "--perplexity", str(text)], stdout=full)
    assert r.returncode == 1 and _lines(r.stderr)[-1] == (
        "run-pipeline: error: cannot write the output (No space left on device); check the disk or the file stdout "
        "goes to") and "Traceback" not in r.stderr, r.stderr


@linux
def test_version_into_a_full_disk_or_a_closed_stdout_and_a_model_that_cannot_be_read_are_one_line(model):
    for flag in ("--version", "--help"):  # (--help exited 0, argparse's write dropping the error)
        with open("/dev/full", "w") as full:
            r = _run([flag], stdout=full)
        assert r.returncode == 1 and len(_lines(r.stderr)) == 1 and "cannot write the output" in r.stderr, r.stderr
        r = _run([flag], closed=(1,), stdout=None)  # (`>&-`: exited 0 with nothing written, a probe's)
        assert r.returncode == 1 and _lines(r.stderr) == [
            "run-pipeline: error: cannot write the output (standard output is closed); redirect it to a file, or to "
            "/dev/null to discard it"], (flag, r.stderr)
    r = _run(["-m", "/proc/self/mem", "-n", "1", "hi"])  # (a read that fails, as on a failing disk: EIO)
    assert r.returncode == 1, r.stderr
    assert _lines(r.stderr) == ["run-pipeline: error: /proc/self/mem: cannot read it (Input/output error); check the "
                                "file and the disk it is on"], r.stderr


def test_a_server_with_its_stdout_closed_serves_and_a_sighup_says_so(model):
    """`--serve >&-` never started (uvicorn's logging set-up asked the None sys.stdout whether it was a
    terminal); SIGHUP (a closed terminal) stopped a server with no line, where SIGTERM says "terminated"."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen([str(LAUNCHER), "--serve", "--single-process", "--port", str(port), "-m", model,
                          "--device", "cpu"], stdout=None, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, preexec_fn=lambda: (ends_with_the_test(), os.close(1)))
    try:
        wait_listening(p, port)
        p.send_signal(signal.SIGHUP)
        code = p.wait(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    err = p.stderr.read()
    assert code == 129 and "Traceback" not in err, err
    assert _lines(err)[-1] == "run-pipeline: hung up", err



def test_a_reply_interrupted_while_a_piece_prints_keeps_its_times(model):
    """A probe's: Ctrl-C at a terminal lands while a piece prints, outside the reply's generator, and
    its times were counted before the generator's finally set them: 'decode: 22 tokens in 0.00 s'."""
    from layerstream.compute.sampling import SamplingParams
    from layerstream.coordinator.engine import Engine
    from layerstream.coordinator.stdio import print_stream
    from layerstream.coordinator.turn import Turn

    class Out:  # a terminal whose fourth write is interrupted
        writes = 0

        def write(self, text):
            Out.writes += 1
            if Out.writes == 4:
                raise KeyboardInterrupt

        def flush(self):
            pass

    with Engine.load(model, device="cpu", ctx=64) as e:
        turn = Turn(e, e.encode("hello"), SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
        sampled = decode_s = None  # (None: no interrupt came)
        try:
            print_stream(turn.pieces(), Out())
        except KeyboardInterrupt:  # (run-pipeline counts the times here, while the interrupt is handled)
            sampled, decode_s = turn.rates.sampled, turn.rates.decode_s
        assert sampled is not None and sampled >= 3 and decode_s > 0


@linux
@pytest.mark.parametrize("option", [["-f", "-"], ["--perplexity", "-"]])
def test_text_typed_at_a_terminal_ends_at_one_ctrl_d(model, option):
    """A probe's: `-f -` at a terminal waited for a second Ctrl-D (the read after the first one's
    short read waited again), and `--perplexity -` sat silent."""
    import pty
    import select
    import time

    pid, fd = pty.fork()
    if pid == 0:  # (the child: the command on the terminal)
        os.execv(str(LAUNCHER), [str(LAUNCHER), "--single-process", "-m", model, "--device", "cpu", "-n", "2",
                                 *option] if option[0] == "-f" else
                 [str(LAUNCHER), "--single-process", "-m", model, "--device", "cpu", *option])
    status = None
    try:
        os.write(fd, b"one two three four five six seven eight\n")
        time.sleep(0.5)
        os.write(fd, b"\x04")  # one Ctrl-D, on a line of its own
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and status is None:
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    os.read(fd, 4096)
                except OSError:  # (the terminal's other end closed: the command ended)
                    pass
            got, st = os.waitpid(pid, os.WNOHANG)
            status = st if got else None
        assert status is not None and os.waitstatus_to_exitcode(status) == 0, "still reading after one Ctrl-D"
    finally:
        if status is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
