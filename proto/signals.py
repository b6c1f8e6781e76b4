"""The signals of a run's processes, shared by the launcher's side and the children's
(NOTE [ SIGINT while a child starts ] in coordinator/sigmask.py, NOTE [ shutdown order ] in
coordinator/supervisor.py)."""

from __future__ import annotations

import signal

# the signals a process group gets as a whole: a Ctrl-C, a stop (systemd, `timeout`), a closed terminal,
# a Ctrl-\ (SIGQUIT: at its default it dumped the launcher's core and left the run's shared memory,
# the host cache's gigabytes, until the next boot); children ignore them and the launcher decides how
# the run stops
STOP_SIGNALS = frozenset(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None),
                                     getattr(signal, "SIGQUIT", None)) if s is not None)
# those of them a tool raises as Stopped (SIGINT is Python's KeyboardInterrupt)
RAISED = tuple(sorted(STOP_SIGNALS - {signal.SIGINT}))
# the shutdown ladder's own signal to one child: its default action ends the process, and nothing sends
# it to a group (SIGTERM where there is no SIGUSR1: children then take the group's too)
TERMINATE = getattr(signal, "SIGUSR1", signal.SIGTERM)
# a stop signal's word in a tool's last line (run-pipeline's, bin/bench's, synth's)
HOW = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}
if hasattr(signal, "SIGHUP"):
    HOW[signal.SIGHUP] = "hung up"
if hasattr(signal, "SIGQUIT"):
    HOW[signal.SIGQUIT] = "quit"


class Stopped(KeyboardInterrupt):
    """A stop signal (SIGTERM, SIGHUP, SIGQUIT) raised where a tool runs, so that it stops as on Ctrl-C: its
    `finally`s run (the files and processes it made are removed). `signum`: which; its status is
    128 + signum and its word HOW[signum]."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def raise_stopped(signum, frame):
    """A handler for RAISED's signals: Stopped, where the tool is."""
    raise Stopped(signum)


def set_handlers(signals, handler) -> dict:
    """`handler` for each of `signals` (in the main thread: ValueError elsewhere, before any is set):
    the handlers it replaced, for restore()."""
    return {s: signal.signal(s, handler) for s in signals}


def restore(previous: dict) -> None:
    """The handlers set_handlers() or raise_on_stop() replaced, back in place (one installed outside
    Python, which reads as None, as the default)."""
    for s, h in previous.items():
        signal.signal(s, signal.SIG_DFL if h is None else h)


def raise_on_stop() -> dict:
    """A tool's own handlers, in place of the launcher's early ones (which exit at once): from here on
    RAISED's signals raise Stopped where the tool is, SIGINT KeyboardInterrupt. Returns the handlers they
    replaced, for restore(). The stop signals are unblocked first, under the handlers they had: a parent
    that blocked them passes the block on across fork and exec, and synth then wrote a whole model
    with a SIGTERM pending unseen; one pending meets the earlier handler, before the tool has begun."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    return set_handlers(RAISED, raise_stopped) | set_handlers((signal.SIGINT,), signal.default_int_handler)


def ignore_stop_signals() -> None:
    """STOP_SIGNALS ignored, then unblocked (a child spawned with them blocked: NOTE [ SIGINT while a
    child starts ]): one pending meanwhile is dropped."""
    set_handlers(STOP_SIGNALS - {TERMINATE}, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
