"""The compute device and dtype from the command line, and the form weights take on it."""

from __future__ import annotations

import functools
import os

import torch

from layerstream.compute.cpu import native
from layerstream.compute.dequant import have_triton, triton_installed
from layerstream.errors import ConfigError


@functools.cache
def _cpu_has_fast_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_dtype(device: torch.device, weights: str = "auto") -> torch.dtype:
    """float16 on CUDA. On the CPU float32 where the native kernel reads the weights as blocks: the
    activations' dtype then costs no weight bytes (decode ran at the same speed in both), and
    float32 keeps the residual stream exact, as llama.cpp's CPU path does (in bfloat16 SmolLM2's
    greedy replies went astray). Where the weights are dequantized (no native kernel, or asked),
    bfloat16 on a CPU with bf16 instructions, for half the bytes a token reads; else float32."""
    if device.type == "cuda":
        return torch.float16
    if weights_form(device, weights) == "native":
        return torch.float32
    return torch.bfloat16 if _cpu_has_fast_bf16() else torch.float32


def cuda_visible() -> bool:
    """Whether a CUDA device is visible, asked of NVML where it answers (torch.cuda.device_count):
    torch.cuda.is_available() starts the CUDA driver, which the launcher's plan would wait for
    (BENCHMARKS.md, "The 8B's start-up"). A device NVML sees whose driver cannot start fails where
    it is first used, in one line (plan.fit_budget, the compute process's start)."""
    return torch.cuda.device_count() > 0


def resolve_device(name: str) -> torch.device:
    """--device: "auto" is CUDA when one is visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if cuda_visible() else "cpu")
    if name.startswith("cuda") and not cuda_visible():
        raise ConfigError(f"--device {name}: no CUDA device is visible; use --device cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):  # (meta, mps: torch's names, not this engine's)
        raise ConfigError(f"--device {name}: use auto, cpu, cuda or cuda:N")
    return device


# Architectures whose activations exceed float16's range: Gemma 3 270M's logits are NaN in
# float16, and match float32's top-1 in bfloat16 (measured on the CPU, 60 positions).
FLOAT16_OVERFLOWS = frozenset({"gemma3"})

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # --dtype's, by name


def resolve_dtype(name: str | None, device: torch.device, arch: str | None = None, weights: str = "auto") -> torch.dtype:
    """--dtype, or the device's default for the weights' form (default_dtype; bfloat16 instead of
    float16 for an architecture in FLOAT16_OVERFLOWS, which refuses float16)."""
    if name is None:
        dtype = default_dtype(device, weights)
        return torch.bfloat16 if dtype == torch.float16 and arch in FLOAT16_OVERFLOWS else dtype
    try:
        dtype = DTYPES[name]
    except KeyError:
        raise ConfigError(f"--dtype {name}: use float32, float16 or bfloat16") from None
    if dtype == torch.float16 and arch in FLOAT16_OVERFLOWS:
        raise ConfigError(f"--dtype float16: {arch}'s activations exceed float16's range (its logits become NaN); "
                          "use bfloat16 (its default) or float32")
    return dtype


WEIGHTS = ("auto", "quantized", "native", "dense")


def weights_form(device, weights: str = "auto") -> str:
    """How matrices are held and multiplied on `device`: "triton" (GGUF blocks read by the Triton
    kernels: on CUDA, or on the CPU when asked, "quantized", under Triton's interpreter, for
    tests), "native" (blocks read by the CPU's native kernel, cpu/native.py; the CPU's "auto" where
    it is built, NOTE [ native blocks on the CPU device ] in qlinear.py) or "dense" (dequantized
    into the compute dtype: CUDA without Triton, the CPU without the native kernel, or asked)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: use {', '.join(WEIGHTS[:-1])} or {WEIGHTS[-1]}")
    cuda = torch.device(device).type == "cuda"
    if weights == "auto":
        if cuda:
            return "triton" if triton_installed() else "dense"
        return "native" if native.available() else "dense"
    if weights == "quantized" and not (triton_installed() and (cuda or os.environ.get("TRITON_INTERPRET") == "1")):
        raise ConfigError("quantized weights need Triton and a CUDA device (on the CPU only under Triton's "
                          "interpreter, TRITON_INTERPRET=1, for tests); use the default weights")
    if weights == "native" and (cuda or not native.available()):
        raise ConfigError("native weights are the CPU's, and need its native kernel built (a C compiler: "
                          f"cc, gcc or clang; {'the device is CUDA' if cuda else 'none could build it'}); "
                          "use the default weights")
    return {"quantized": "triton", "native": "native", "dense": "dense"}[weights]


def computing_form(device, weights: str = "auto") -> str:
    """weights_form where the weights are computed with: there, a Triton that is found (all the plan
    asks) must also import, or the run stops in one line."""
    form = weights_form(device, weights)
    if form == "triton" and not have_triton():
        raise ConfigError("Triton is installed but does not import (python -c 'import triton' says why); "
                          "reinstall it, or give --weights dense")
    return form


def keeps_quantized(device, weights: str = "auto") -> bool:
    """Whether matrices stay as GGUF blocks on `device` (weights_form is "triton" or "native"): what
    the plan counts."""
    return weights_form(device, weights) != "dense"


def triton_cache_dir() -> str:
    """Where Triton keeps compiled kernels, by its own rule (TRITON_CACHE_DIR, else TRITON_HOME or the
    home folder's .triton/cache), without importing it."""
    home = os.environ.get("TRITON_HOME") or os.path.expanduser("~")
    return os.environ.get("TRITON_CACHE_DIR") or os.path.join(home, ".triton", "cache")


def first_compile_note(form: str) -> str | None:
    """A line for a run whose GPU kernels are not compiled yet on this machine (Triton's cache empty
    or missing, as on a fresh install): its first steps compile them, silently, for tens of seconds
    (BENCHMARKS.md: a fresh H200 machine's first SmolLM2 steps); None where it is not so."""
    if form != "triton":
        return None
    d = triton_cache_dir()
    try:
        with os.scandir(d) as it:
            if next(it, None) is not None:
                return None
    except OSError:
        pass
    return (f"Triton's kernel cache ({d}) is empty: the first steps compile the GPU kernels, which takes tens "
            "of seconds once on this machine (later runs load them)")
