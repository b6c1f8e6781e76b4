"""NOTE [ SIGINT and threads ] (coordinator/sigmask.py): no thread but the main one takes SIGINT."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from procs import THREAD_MASKS, sigint_takers

pytestmark = pytest.mark.default_threads  # (the threads' masks: their pools as a run has them)

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
    out = subprocess.run([sys.executable, "-c", CHILD + THREAD_MASKS], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    threads, taking = sigint_takers(out)
    assert threads >= 2 and taking == 0, out  # numpy's, torch's or Rayon's threads were started; none takes it


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
    r = subprocess.run([sys.executable, "-c", NATIVE + THREAD_MASKS], capture_output=True, text=True, timeout=300)
    if r.returncode == 3:
        pytest.skip("no C compiler: the native CPU kernel cannot be built here")
    assert r.returncode == 0, r.stderr
    threads, taking = sigint_takers(r.stdout)
    assert threads >= 4 and taking == 0, r.stdout  # the main thread and 3 workers at least
