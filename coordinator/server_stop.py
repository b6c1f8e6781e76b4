"""How the HTTP server stops: requests in flight finish within a grace, then the engine ends the rest.

NOTE [ server shutdown ]
On SIGTERM or a first Ctrl-C the server closes its listening socket and its idle connections and
gives the requests in flight `grace_s` to finish, saying so once on stderr (how many, how long,
Ctrl-C again to stop now). Once they are answered it stops; when the grace runs out, or on a
second signal, the engine aborts what is left and each handler answers as usual, with the text it
has and finish_reason "abort" (a stream: a last chunk with it, then `data: [DONE]`); a request
whose body is still arriving, or is read only later, is answered 503 then, so that no upload holds
the stop past the grace. Where the engine does not answer its aborts within ABORT_WAIT_S (stuck
in a step on a hung process), the server answers them itself, the same way (`cut_requests`). A
second signal waits for neither: the server answers them at once, and the engine's thread is
given HURRIED_S (server.py) instead of STUCK_S. Where the engine fails once the stop began (the
watchdog's verdict on a hung process, within the grace), the requests left end the same way too,
not with an error (`stop_began`).
Connections whose client does not read that within a second more are dropped. Only then is the
engine's thread stopped and joined (the lifespan's end), before the launcher closes the pipeline
under it. uvicorn's own shutdown cancelled the handlers at the grace
instead (a traceback each, the stream cut without [DONE]), and on a second Ctrl-C skipped the
lifespan's end, so the engine thread stepped on while the pipeline closed (ZMQ errors, "engine
failed"). This rests on uvicorn.Server's attributes (`servers`, `server_state`, `lifespan`,
`_captured_signals`), which test_server.py exercises.

finish_reason "abort" (vLLM's word for a request it ended) rather than an error: the openai clients
read finish_reason as a plain string and keep the text, where a 503 makes them retry a server that
is going away and drops the text generated.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from typing import Callable

import uvicorn

# Kubernetes kills a pod 30 s after its SIGTERM by default, `docker stop` after 10 s: a grace well
# under both leaves time for the aborted requests to be answered before SIGKILL cuts every client
# off. A stream of thousands of tokens finishes within no grace a supervisor allows (minutes on a
# CPU), so the grace serves short requests; a longer one only delays the stop.
GRACE_S = 5.0
# handlers given to answer their aborts: the engine aborts after the step in flight (a pass of a
# streamed 70B takes about a second)
ABORT_WAIT_S = 3.0
# a signal's copy: the same signal again within this long is the first one reaching the server twice
# (Ctrl-C or `kill -- -PGID` reaches the group, and `timeout` in it passes its own copy on), not a
# second signal asking to stop at once, which a person's second Ctrl-C comes well after. Measured
# where the handler runs, not where the signal lands: a long call holding the interpreter's lock
# (a large body's parse) delays both copies' handlers, so the window is a few such delays wide.
ECHO_S = 0.25


class GracefulServer(uvicorn.Server):
    """uvicorn's server, stopped as NOTE [ server shutdown ] says; `end_requests()` (Server's) ends the
    requests left when the grace runs out."""

    def __init__(self, config: uvicorn.Config, end_requests: Callable[[], None], grace_s: float = GRACE_S,
                 err=sys.stderr, cut_requests: Callable[[], None] | None = None,
                 stop_began: Callable[[], None] | None = None):
        super().__init__(config)
        self.end_requests, self.grace_s, self.err, self.cut_requests = end_requests, grace_s, err, cut_requests
        self.stop_began = stop_began

    def handle_exit(self, sig: int, frame) -> None:
        now = time.monotonic()
        if not self._captured_signals:  # the first signal sets the exit status (uvicorn raises it again)
            self._captured_signals.append(sig)
            self._first_at = now
        elif sig == self._captured_signals[0] and now - self._first_at < ECHO_S:
            return  # the first one's copy (a group's signal passed on by `timeout` too), not a second
        if self.should_exit:
            self.force_exit = True  # a second signal: stop the requests now
        else:
            self.should_exit = True

    async def shutdown(self, sockets=None) -> None:
        if self.stop_began is not None:
            self.stop_began()
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()  # idle ones close now, busy ones after their response
        tasks = self.server_state.tasks  # (one a request being answered)
        if tasks and self._captured_signals and not self.force_exit:
            n, again = len(tasks), "Ctrl-C again" if self._captured_signals[0] == signal.SIGINT else "a second signal"
            print(f"layerstream: stopping: {n} request{'s' if n != 1 else ''} in flight, given at most "
                  f"{self.grace_s:g} s to finish; {again} ends {'them' if n != 1 else 'it'} now",
                  file=self.err, flush=True)
        await _until(lambda: not tasks or self.force_exit, self.grace_s)
        if tasks:
            self.end_requests()
            await _until(lambda: not tasks or self.force_exit, ABORT_WAIT_S)
        if tasks and self.cut_requests is not None:  # the engine did not answer (its step hangs), or a second signal
            self.cut_requests()
            await _until(lambda: not tasks, 1.0)
        if tasks:  # clients that do not read their answers
            for connection in list(self.server_state.connections):
                connection.transport.abort()
            await _until(lambda: not tasks, 1.0)
        for t in list(tasks):  # (none seen: a handler whose connection is gone returns)
            t.cancel()
        await self.lifespan.shutdown()  # the engine's thread stopped and joined (Server.lifespan)


async def _until(done: Callable[[], bool], timeout_s: float) -> None:
    """Wait until done() or timeout_s, looking every 50 ms."""
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
