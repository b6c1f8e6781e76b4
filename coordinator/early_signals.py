"""The launcher's first act: a stop signal that lands while run-pipeline is still importing is
its one line and its status, as after (NOTE [ stopped while it starts ] below).

NOTE [ stopped while it starts ]
`cli.main` turns SIGINT, SIGTERM, SIGHUP and SIGQUIT into the run's one line ("interrupted",
"terminated", "hung up", "quit") and 130 / 143 / 129 / 131. Its module's imports take a fifth of a second first, and a signal
there met Python's defaults: a KeyboardInterrupt traceback from inside some import, or a silent
death by SIGTERM or SIGHUP (a core dump by SIGQUIT). Nothing exists yet to clean up then (no child, no segment, no file), so
these handlers print the line and exit at once; main() replaces them with its own. This module
imports only `proto.signals` (proto's package loads its names on use), so they are in place as soon
as the interpreter has started; what lands before that meets CPython's own defaults.
"""

from __future__ import annotations

import os
import signal

from layerstream.proto.signals import HOW

PROG = "run-pipeline"  # (coordinator.args.PROG; that module is not imported here, it is what takes the time)


def install(prog: str = PROG) -> None:
    """The handlers for the imports' time (NOTE above), naming `prog` (bin/bench's launcher's too)."""
    def stop(signum, frame) -> None:
        lead = "\n" if os.isatty(2) else ""  # (as cli._stopped: ^C may end the terminal's line)
        os.write(2, f"{lead}{prog}: {HOW[signum]}\n".encode())
        os._exit(128 + signum)

    for s in HOW:
        signal.signal(s, stop)


def entry() -> None:
    """run-pipeline's entry point (bin/run-pipeline's and the installed script's): these handlers,
    then the command itself (cli.entry)."""
    install()
    from layerstream.coordinator.cli import entry as command

    command()
