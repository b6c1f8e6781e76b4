"""The command's standard streams: reopened where they were closed, the reply written to stdout
with a failure to write it said in one line, and the start's progress bars on stderr."""

from __future__ import annotations

import contextlib
import os
import sys

from layerstream.errors import LayerstreamError

REOPENED: set[str] = set()  # the standard streams open_standard_fds found closed


def open_standard_fds() -> None:
    """A closed stdin, stdout or stderr (`<&-`, `>&-`) reopened on the null device, and named in
    REOPENED. Left closed, its number went to the next file or socket opened (libuv aborted on its
    loop's, a print could land in a socket), and Python's sys.stdout was None (the children's exit and
    uvicorn's logging raised). A command whose reply goes to stdout refuses a closed one
    (closed_output), as it refuses a full disk: the reply would be lost with exit 0."""
    for fd, name in enumerate(("stdin", "stdout", "stderr")):
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        REOPENED.add(name)
        null = os.open(os.devnull, os.O_RDONLY if fd == 0 else os.O_WRONLY)  # (the lowest free number: fd)
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, "r" if fd == 0 else "w", encoding="utf-8", errors="replace", closefd=False))


def closed_output() -> LayerstreamError | None:
    """The error of a reply whose stdout was closed when the command started (`>&-`), else None."""
    if "stdout" not in REOPENED:
        return None
    return LayerstreamError("cannot write the output (standard output is closed); redirect it to a file, or to "
                            "/dev/null to discard it")


def output_error(e: OSError) -> LayerstreamError:
    return LayerstreamError(f"cannot write the output ({e.strerror or e}); check the disk or the file stdout goes to")


def guarded(fn, *args):
    """fn(*args), a write to the output: its failure but a closed pipe's (the caller's `| head`: exit
    0) raised as the command's one-line output error."""
    try:
        return fn(*args)
    except BrokenPipeError:
        raise
    except OSError as e:
        raise output_error(e) from None


def _put(out, text: str) -> None:
    out.write(text)
    out.flush()


def _write(out, text: str) -> None:
    """`text` on `out`, flushed (guarded)."""
    guarded(_put, out, text)


def print_stream(pieces, out) -> str:
    """The reply on stdout, ended by a newline; an error after partial text leaves the line ended
    first, so that the error line starts on a line of its own, and closes `pieces`. Returns the text
    printed (the newline not counted)."""
    shown: list[str] = []
    try:
        for piece in pieces:
            _write(out, piece)
            shown.append(piece)
    except BaseException:
        if shown and not shown[-1].endswith("\n"):
            with contextlib.suppress(OSError, LayerstreamError):
                _write(out, "\n")
        # a generator stopped while a piece printed (Ctrl-C) is closed now, its finally run: a reply's
        # times are set there (turn.Turn), and its caller counts them next (they read 0 s before)
        getattr(pieces, "close", lambda: None)()
        raise
    _write(out, "\n")
    return "".join(shown)


def flush_stdout() -> str | None:
    """What went wrong writing what is left on stdout, else None (a closed pipe: nothing)."""
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except BrokenPipeError:
        return None
    except OSError as e:
        return str(output_error(e))
    return None


class LoadProgress:
    """The pipeline's on_progress(done, total, what) as bars on a terminal: its processes starting
    and, begun before compute is ready, the first pass reading every layer (filling the host cache)."""

    LABELS = {"processes": "starting processes", "layers": "reading layers"}

    def __init__(self, stream, mininterval: float = 0.1, stages: tuple[str, ...] = ("processes", "layers")):
        self.stream, self.mininterval, self.stages, self.bars = stream, mininterval, stages, {}

    def __call__(self, done: int, total: int, what: str) -> None:
        if what not in self.stages:
            return
        bar = self.bars.get(what)
        if bar is None:
            if what == "layers" and not done:  # (read in the first pass: drawn once it starts, not over a prompt)
                return
            from tqdm import tqdm

            # no monitor thread (NOTE [ SIGINT and threads ] in sigmask.py)
            tqdm.monitor_interval = 0
            bar = self.bars[what] = tqdm(total=total, desc=self.LABELS.get(what, what), leave=False, file=self.stream,
                                         mininterval=self.mininterval, bar_format="{desc}: {n}/{total} {bar} {elapsed}")
        if not bar.disable and done > bar.n:
            bar.update(done - bar.n)
        if done >= total:
            bar.close()
