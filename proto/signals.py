"""The signals of a run's processes, shared by the launcher's side and the children's
(NOTE [ SIGINT while a child starts ] in coordinator/sigmask.py, NOTE [ shutdown order ] in
coordinator/supervisor.py)."""

from __future__ import annotations

import signal

# the signals a process group gets as a whole: a Ctrl-C, a stop (systemd, `timeout`), a closed terminal;
# children ignore them and the launcher decides how the run stops
STOP_SIGNALS = frozenset(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)
# the shutdown ladder's own signal to one child: its default action ends the process, and nothing sends
# it to a group (SIGTERM where there is no SIGUSR1: children then take the group's too)
TERMINATE = getattr(signal, "SIGUSR1", signal.SIGTERM)


def ignore_stop_signals() -> None:
    """STOP_SIGNALS ignored, then unblocked (a child spawned with them blocked: NOTE [ SIGINT while a
    child starts ]): one pending meanwhile is dropped."""
    for s in STOP_SIGNALS - {TERMINATE}:
        signal.signal(s, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
