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
