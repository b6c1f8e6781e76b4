"""Host-to-device copies issued straight through the CUDA driver.

NOTE [ driver copies ]
A streamed MoE layer's fetch copies each missing expert's gate, up and down: three byte ranges of
pinned staging memory an expert, 20-odd copies a layer at batch 1, each issued from Python. Through
torch (`copy_` or `torch._foreach_copy_`, which loops over `copy_` for host sources) a copy costs
the host about 8 to 10 µs to issue (H200 host, --trace: a layer's fetch took 149 µs for about 18
copies, the prefetch's issue 239 µs for 24), and the host's time is the decode step's bound. The
driver's cuMemcpyHtoDAsync, called through ctypes with the addresses worked out once, does the
same copy on the same stream. Where the driver library is absent (a CPU-only machine) torch's
copies stay."""

from __future__ import annotations

import ctypes


class DriverCopies:
    """cuMemcpyHtoDAsync over lists of (device address, host address, bytes)."""

    def __init__(self, lib: ctypes.CDLL):
        self._copy = lib.cuMemcpyHtoDAsync_v2
        self._copy.argtypes = (ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
        self._copy.restype = ctypes.c_int

    @classmethod
    def open(cls) -> "DriverCopies | None":
        """The driver's copies, or None where libcuda cannot be loaded."""
        try:
            return cls(ctypes.CDLL("libcuda.so.1"))
        except (OSError, AttributeError):
            return None

    def issue(self, copies: list[tuple[int, int, int]], stream: int) -> None:
        """Enqueue every (dst, src, nbytes) copy on `stream` (a CUDA stream handle, as torch's
        `Stream.cuda_stream`); src must stay valid until the stream has run them."""
        f = self._copy
        for dst, src, n in copies:
            err = f(dst, src, n, stream)
            if err:
                raise RuntimeError(f"cuMemcpyHtoDAsync of {n} bytes failed: CUDA driver error {err}")
