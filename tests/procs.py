"""Helpers for tests that start processes: which shared-memory segments a run left behind."""

from __future__ import annotations

import glob
import os
import subprocess


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


def descendants(pid: int) -> list[int]:
    """The processes under `pid`, at any depth (from ps: /proc has no list of children)."""
    out = subprocess.run(["ps", "-eo", "pid,ppid"], capture_output=True, text=True).stdout.split("\n")[1:]
    kids: dict[int, list[int]] = {}
    for line in out:
        if line.strip():
            p, pp = map(int, line.split())
            kids.setdefault(pp, []).append(p)
    found, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            found.append(k)
            todo.append(k)
    return found
