"""The name a process of the run shows in ps, top and pgrep: `layerstream`, `layerstream-compute`, ..."""

from __future__ import annotations

import ctypes

PR_SET_NAME = 15  # linux/prctl.h
COMM_BYTES = 15  # the kernel keeps this much of a name in /proc/PID/comm, what top and pgrep show


def set_process_name(name: str, detail: str = "") -> None:
    """Name this process: its command line (ps -f, pgrep -f) `name` and `detail`, through setproctitle
    where installed, and its comm (top, pgrep) `name` cut to COMM_BYTES."""
    try:
        import setproctitle
    except ImportError:  # (the comm alone)
        pass
    else:
        title = f"{name} {detail}" if detail else name
        # (argv's bytes that are not UTF-8 come as surrogates, which setproctitle cannot encode)
        setproctitle.setproctitle(title.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
    _set_comm(name)  # (setproctitle's comm would be the title's first bytes, options included)


def _set_comm(name: str) -> None:
    """prctl(PR_SET_NAME): Linux only; elsewhere the name stays as it was."""
    try:
        libc = ctypes.CDLL(None)  # (the interpreter's own symbols, libc's among them: no library search)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode("utf-8", "surrogateescape")[:COMM_BYTES]), 0, 0, 0)
    except (OSError, AttributeError):
        pass
