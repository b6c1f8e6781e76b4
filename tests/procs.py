"""Helpers for tests that start processes: which shared-memory segments a run left behind."""

from __future__ import annotations

import glob
import os


def segments() -> set[str]:
    return set(glob.glob("/dev/shm/layerstream-*"))


def creator_alive(path: str) -> bool:
    """Whether the process that made a segment (the pid in layerstream-PID-...) still runs."""
    try:
        os.kill(int(os.path.basename(path).split("-")[1]), 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def leaked(before: set[str]) -> set[str]:
    """New segments whose creator is gone: leaks. One whose creator still runs belongs to another
    run on this machine, not to the test."""
    return {s for s in segments() - before if not creator_alive(s)}
