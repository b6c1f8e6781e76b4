"""Host-to-device copies issued straight through the CUDA driver.

NOTE [ driver copies ]
A streamed MoE layer's fetch copies each missing expert's gate, up and down: three byte ranges of
pinned staging memory an expert, 20-odd copies a layer at batch 1, each issued from Python. Through
torch (`copy_` or `torch._foreach_copy_`, which loops over `copy_` for host sources) a copy costs
the host about 8 to 10 µs to issue, and the host's time is the decode step's bound. The
driver's cuMemcpyHtoDAsync, called through ctypes with the addresses worked out once, does the
same copy on the same stream, and where an expert's parts are alike (the same bytes each, evenly
spaced in staging and in the pool slot: gate and up, and down too when it has their type) they
go as one 2-D copy (cuMemcpy2DAsync), so an expert takes one or two calls, not three. Where the
driver library is absent (a CPU-only machine) torch's copies stay."""

from __future__ import annotations

import ctypes


class DriverCopies:
    """cuMemcpyHtoDAsync over lists of (device address, host address, bytes)."""

    def __init__(self, lib: ctypes.CDLL):
        self._copy = lib.cuMemcpyHtoDAsync_v2
        self._copy.argtypes = (ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
        self._copy.restype = ctypes.c_int
        self._copy2d = lib.cuMemcpy2DAsync_v2
        self._copy2d.argtypes = (ctypes.POINTER(_Memcpy2D), ctypes.c_void_p)
        self._copy2d.restype = ctypes.c_int
        self._d2d = lib.cuMemcpyDtoDAsync_v2
        self._d2d.argtypes = (ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p)
        self._d2d.restype = ctypes.c_int
        self._desc = _Memcpy2D(srcMemoryType=_HOST, dstMemoryType=_DEVICE)
        self._desc_ref = ctypes.byref(self._desc)

    @classmethod
    def open(cls) -> "DriverCopies | None":
        """The driver's copies, or None where libcuda cannot be loaded."""
        try:
            return cls(ctypes.CDLL("libcuda.so.1"))
        except (OSError, AttributeError):
            return None

    def issue(self, copies: list[tuple[int, int, int, int, int, int]], stream: int) -> None:
        """Enqueue every (dst, src, width, height, dst pitch, src pitch) copy on `stream` (a CUDA
        stream handle, as torch's `Stream.cuda_stream`): `height` rows of `width` bytes, one call
        (a 2-D copy where height > 1); src must stay valid until the stream has run them."""
        f, f2, d, ref = self._copy, self._copy2d, self._desc, self._desc_ref
        for dst, src, n, h, dp, sp in copies:
            if h == 1:
                err = f(dst, src, n, stream)
            else:
                d.srcHost, d.srcPitch, d.dstDevice, d.dstPitch, d.WidthInBytes, d.Height = src, sp, dst, dp, n, h
                err = f2(ref, stream)
            if err:
                raise RuntimeError(f"CUDA driver error {err} copying {h} x {n} bytes to the device")

    def d2d(self, dst: int, src: int, n: int, stream: int) -> None:
        """Enqueue a copy of `n` bytes between two device addresses on `stream` (one call, where
        torch's slice-and-copy_ costs the host about 10 µs)."""
        err = self._d2d(dst, src, n, stream)
        if err:
            raise RuntimeError(f"CUDA driver error {err} copying {n} bytes on the device")


class _Memcpy2D(ctypes.Structure):
    """The driver's CUDA_MEMCPY2D."""

    _fields_ = [("srcXInBytes", ctypes.c_size_t), ("srcY", ctypes.c_size_t), ("srcMemoryType", ctypes.c_int),
                ("srcHost", ctypes.c_void_p), ("srcDevice", ctypes.c_uint64), ("srcArray", ctypes.c_void_p),
                ("srcPitch", ctypes.c_size_t),
                ("dstXInBytes", ctypes.c_size_t), ("dstY", ctypes.c_size_t), ("dstMemoryType", ctypes.c_int),
                ("dstHost", ctypes.c_void_p), ("dstDevice", ctypes.c_uint64), ("dstArray", ctypes.c_void_p),
                ("dstPitch", ctypes.c_size_t),
                ("WidthInBytes", ctypes.c_size_t), ("Height", ctypes.c_size_t)]


_HOST, _DEVICE = 1, 2  # CUmemorytype
