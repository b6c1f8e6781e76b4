"""Threads that never take SIGINT, so that a Ctrl-C always reaches the main thread.

NOTE [ SIGINT and threads ]
The kernel hands a process's SIGINT to any of its threads that does not block it, and a thread
starts with its creator's signal mask. Python runs its handler in the main thread either way,
but a main thread asleep in readline's select() (the chat's prompt) is woken only when the
signal lands on it: taken by another thread, the Ctrl-C seemed lost until the next key. So the
launcher starts the thread pools of numpy (OpenBLAS), torch and tokenizers (Rayon) before
anything else with SIGINT blocked (libzmq's I/O threads block every signal of their own
accord), and tqdm runs without its monitor thread.

NOTE [ SIGINT while a child starts ]
A Ctrl-C reaches the whole process group, children included. A spawned child runs
multiprocessing's bootstrap (unpickling its target, importing zmq) before any code of ours can
ignore SIGINT, and a Ctrl-C there printed a KeyboardInterrupt traceback from spawn_main. So the
launcher spawns with SIGINT blocked (`sigint_blocked`: a blocked signal stays blocked across
fork and exec), and the child's entry ignores SIGINT before it unblocks it (`ignore_sigint`):
a Ctrl-C pending meanwhile is dropped. In the launcher it is taken once the spawn is done.
"""

from __future__ import annotations

import contextlib
import signal


@contextlib.contextmanager
def sigint_blocked():
    """SIGINT blocked in this thread meanwhile: threads started meanwhile keep it blocked."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def ignore_sigint() -> None:
    """SIGINT ignored, then unblocked, in a child (NOTE [ SIGINT while a child starts ])."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "SIGHUP"):  # a closed terminal's, likewise: the launcher decides how the run stops
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def start_thread_pools(threads: int | None = None, torch: bool = True) -> None:
    """Import numpy and, with `torch`, torch and tokenizers, and start their CPU threads with
    SIGINT blocked in them (the NOTE above); `threads`: torch's CPU threads (else its default).
    Again later it does what is not yet done."""
    with sigint_blocked():
        import numpy  # noqa: F401 - OpenBLAS starts its threads as numpy loads

        if not torch:
            return
        import torch as _torch
        from tokenizers import Tokenizer, models

        if threads:
            _torch.set_num_threads(threads)
        _torch.ones(1 << 16).sum()  # a parallel op starts the intra-op threads now
        Tokenizer(models.BPE()).encode_batch(["a", "b"])  # and Rayon's pool its threads
