"""Threads that never take SIGINT, so that a Ctrl-C always reaches the main thread.

NOTE [ SIGINT and threads ]
The kernel hands a process's SIGINT to any of its threads that does not block it, and a thread
starts with its creator's signal mask. Python runs its handler in the main thread either way,
but a main thread asleep in readline's select() (the chat's prompt) is woken only when the
signal lands on it: taken by another thread, the Ctrl-C seemed lost until the next key. So the
launcher starts the thread pools of numpy (OpenBLAS), torch and tokenizers (Rayon) before
anything else with SIGINT blocked (libzmq's I/O threads block every signal of their own
accord), and tqdm runs without its monitor thread.
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
