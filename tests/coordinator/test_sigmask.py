"""NOTE [ SIGINT and threads ] (coordinator/sigmask.py): no thread but the main one takes SIGINT."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# (each program's last part: its threads, and whether each blocks SIGINT)
MASKS = r"""
main = str(os.getpid())
for t in os.listdir("/proc/self/task"):
    blocked = int(next(l for l in open(f"/proc/self/task/{t}/status") if l.startswith("SigBlk")).split()[1], 16)
    print(t == main, bool(blocked & (1 << (signal.SIGINT - 1))))
"""

CHILD = r"""
import os, signal
from layerstream.coordinator.sigmask import start_thread_pools
start_thread_pools(torch=False)
start_thread_pools()
import numpy, torch
from tokenizers import Tokenizer, models
torch.ones(1 << 20).sum(); Tokenizer(models.BPE()).encode_batch(["x"] * 8)  # the pools at work
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads /proc")
def test_threads_of_numpy_torch_and_tokenizers_never_take_sigint():
    """A Ctrl-C handed to one of them left the chat's readline prompt deaf to it (the pipeline's
    Ctrl-C test failed about one run in five)."""
    out = subprocess.run([sys.executable, "-c", CHILD + MASKS], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    rows = [line.split() for line in out.splitlines()]
    assert len(rows) >= 2, out  # numpy's, torch's or Rayon's threads were started
    assert ["True", "False"] in rows  # the main thread takes it
    assert all(blocked == "True" for main, blocked in rows if main == "False"), out


NATIVE = r"""
import os, signal
from layerstream.coordinator.sigmask import start_thread_pools
start_thread_pools()  # (numpy's, torch's and Rayon's first: as the run's processes start them, blocked)
import torch
from layerstream.compute.cpu import native
lib = native.library()
if lib is None:
    raise SystemExit(3)
raw = torch.zeros(64 * native.row_bytes(12, 256), dtype=torch.uint8)
native.matmuls([(raw, 12, 64, 256, torch.randn(2, 256))], threads=4)  # its pool's workers
import time
time.sleep(0.5)  # (a thread still starting shows every signal blocked: glibc sets its mask once it runs)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads /proc")
def test_the_native_kernels_threads_never_take_sigint():
    """The native CPU kernel's workers start with every signal blocked, whichever thread first calls
    it with SIGINT unblocked (here the main thread, as a single-process CPU run's and bin/bench's)."""
    r = subprocess.run([sys.executable, "-c", NATIVE + MASKS], capture_output=True, text=True, timeout=300)
    if r.returncode == 3:
        pytest.skip("no C compiler: the native CPU kernel cannot be built here")
    rows = [line.split() for line in r.stdout.splitlines()]
    assert r.returncode == 0 and len(rows) >= 4, r.stderr  # the main thread and 3 workers at least
    assert ["True", "False"] in rows
    assert all(blocked == "True" for main, blocked in rows if main == "False"), r.stdout
