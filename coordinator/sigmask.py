"""Threads that never take SIGINT, so that a Ctrl-C always reaches the main thread; children that
never take a stop signal sent to the whole process group.

NOTE [ SIGINT and threads ]
The kernel hands a process's SIGINT to any of its threads that does not block it, and a thread
starts with its creator's signal mask. Python runs its handler in the main thread either way,
but a main thread asleep in readline's select() (the chat's prompt) is woken only when the
signal lands on it: taken by another thread, the Ctrl-C seemed lost until the next key. So the
launcher starts the thread pools of numpy (OpenBLAS), torch and tokenizers (Rayon) before
anything else with SIGINT blocked (libzmq's I/O threads block every signal of their own
accord), and tqdm runs without its monitor thread.

NOTE [ SIGINT while a child starts ]
A Ctrl-C reaches the whole process group, children included; so do a closed terminal's SIGHUP and
a SIGTERM sent to the group (systemd's default stop, `timeout`, `kill -- -PGID`). Only the launcher
decides how a run stops: a child that died of the group's SIGTERM cut the server's grace for the
requests in flight short and was reported as a failure. So children ignore all three
(STOP_SIGNALS), and the shutdown ladder terminates a child with TERMINATE, which no one sends to a
group (NOTE [ shutdown order ] in supervisor.py). A spawned child runs multiprocessing's bootstrap
(unpickling its target, importing zmq) before any code of ours can ignore them, and a Ctrl-C there
printed a KeyboardInterrupt traceback from spawn_main. So the launcher spawns with them blocked
(`stop_signals_blocked`: a blocked signal stays blocked across fork and exec), and the child's entry
ignores them before it unblocks them (`proto.signals.ignore_stop_signals`): one pending meanwhile is dropped. In
the launcher it is taken once the spawn is done.
"""

from __future__ import annotations

import contextlib
import signal

from layerstream.proto.signals import STOP_SIGNALS


@contextlib.contextmanager
def stop_signals_blocked():
    """STOP_SIGNALS blocked in this thread meanwhile: threads started meanwhile keep them blocked."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def start_thread_pools(threads: int | None = None, torch: bool = True) -> None:
    """Import numpy and, with `torch`, torch and tokenizers, and start their CPU threads with
    SIGINT blocked in them (the NOTE above); `threads`: torch's CPU threads (else its default).
    Again later it does what is not yet done."""
    with stop_signals_blocked():
        import numpy  # noqa: F401 - OpenBLAS starts its threads as numpy loads

        if not torch:
            return
        import torch as _torch
        from tokenizers import Tokenizer, models

        if threads:
            _torch.set_num_threads(threads)
        _torch.ones(1 << 16).sum()  # a parallel op starts the intra-op threads now
        Tokenizer(models.BPE()).encode_batch(["a", "b"])  # and Rayon's pool its threads
