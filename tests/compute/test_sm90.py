"""The CUDA decode path's Triton kernels compile for Hopper here, with no GPU (tests/compute/sm90.py):
each case in a child process without Triton's interpreter, Triton's cache a new folder (compiled now,
not found). The control, a kernel the interpreter runs and the compiler refuses, must fail there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
from tests.compute import sm90_control  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CASES = [f"{f}-{d}" for f in ("experts", "rope", "attention", "norms", "matmuls", "others", "route") for d in ("fp16", "bf16")]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, str]:
    """Each case's line of `python -m tests.compute.sm90`: 'ok KERNEL ...' or 'failed: ERROR'."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    run = subprocess.run([sys.executable, "-m", "tests.compute.sm90", *CASES, "control"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    lines = dict(v.split(" ", 1) for v in run.stdout.splitlines() if v.split(" ", 1)[0] in [*CASES, "control"])
    assert run.returncode == 1, f"exit {run.returncode} (1: the control failed)\n{run.stdout}\n{run.stderr[-3000:]}"
    return lines


@pytest.mark.parametrize("case", CASES)
def test_the_kernels_compile_for_sm90(compiled, case):
    """The product's wrappers at decode shapes (batch 1 and 8; the experts' ids and places and residual,
    RoPE with norms, attention with int8 output, graphs' split K, the router; the rows kernel, tl.dot's
    tiles, a prompt's dequantization, the grouped kernel, the CPU share's post): every launch compiled to a cubin."""
    assert compiled.get(case, "missing").startswith("ok "), f"{case}: {compiled.get(case, 'missing')}"


def test_the_control_runs_on_the_interpreter_and_fails_to_compile(compiled):
    """What the CPU tests cannot see and this run does: the interpreter sums it, the compiler refuses it."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert sm90_control.total(torch.arange(64, dtype=torch.float32)).item() == 2016
    assert compiled["control"].startswith("failed: CompilationError"), compiled["control"]
