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
driver has cuMemcpyBatchAsync (CUDA 12.8 and later), all of a call's copies, a layer's missing
or predicted experts, go in that one call instead, each 2-D copy as its rows: a streamed MoE
layer issues two such calls at batch 1 (its misses, then the next layer's prediction), which took
the host a few driver calls an expert. Where the batch is refused (an older driver), the
one-by-one calls stay. Where the driver library is absent (a CPU-only machine) torch's copies stay."""

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
        self._batch, self._batch_fail_idx = _batch_copy(lib)
        self._attrs = _MemcpyAttributes(srcAccessOrder=_ORDER_STREAM)  # (the staging bytes are read in stream order)
        self._attrs_idx = ctypes.c_size_t(0)
        self._fail = ctypes.c_size_t(0)

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
        if self._batch is not None and copies and self._issue_batch(copies, stream):
            return
        f, f2, d, ref = self._copy, self._copy2d, self._desc, self._desc_ref
        for dst, src, n, h, dp, sp in copies:
            if h == 1:
                err = f(dst, src, n, stream)
            else:
                d.srcHost, d.srcPitch, d.dstDevice, d.dstPitch, d.WidthInBytes, d.Height = src, sp, dst, dp, n, h
                err = f2(ref, stream)
            if err:
                raise RuntimeError(f"CUDA driver error {err} copying {h} x {n} bytes to the device")

    def _issue_batch(self, copies: list[tuple[int, int, int, int, int, int]], stream: int) -> bool:
        """`copies` in one cuMemcpyBatchAsync; False where the driver refuses it (it is not asked
        again: the copies go one by one, this time and after)."""
        dsts, srcs, sizes = flat_copies(copies)
        n = len(dsts)
        args = [(ctypes.c_uint64 * n)(*dsts), (ctypes.c_uint64 * n)(*srcs), (ctypes.c_size_t * n)(*sizes), n,
                ctypes.byref(self._attrs), ctypes.byref(self._attrs_idx), 1]
        if self._batch_fail_idx:
            args.append(ctypes.byref(self._fail))
        err = self._batch(*args, ctypes.c_void_p(stream))
        if err:
            self._batch = None  # (a refused batch copied nothing that the calls below do not copy again)
            return False
        return True

    def d2d(self, dst: int, src: int, n: int, stream: int) -> None:
        """Enqueue a copy of `n` bytes between two device addresses on `stream` (one call, where
        torch's slice-and-copy_ costs the host about 10 µs)."""
        err = self._d2d(dst, src, n, stream)
        if err:
            raise RuntimeError(f"CUDA driver error {err} copying {n} bytes on the device")


def flat_copies(copies: list[tuple[int, int, int, int, int, int]]) -> tuple[list[int], list[int], list[int]]:
    """(dst, src, width, height, dst pitch, src pitch) copies as one-row copies: their
    destinations, sources and sizes, in order."""
    dsts, srcs, sizes = [], [], []
    for dst, src, n, h, dp, sp in copies:
        if h == 1:
            dsts.append(dst)
            srcs.append(src)
            sizes.append(n)
            continue
        for r in range(h):
            dsts.append(dst + r * dp)
            srcs.append(src + r * sp)
            sizes.append(n)
    return dsts, srcs, sizes


def _batch_copy(lib: ctypes.CDLL):
    """The driver's cuMemcpyBatchAsync and whether it takes a failure index (CUDA 12's form;
    CUDA 13's `_v2` has none): (None, False) where the driver has neither."""
    common = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
              ctypes.c_void_p, ctypes.c_size_t]
    for name, fail_idx in (("cuMemcpyBatchAsync_v2", False), ("cuMemcpyBatchAsync", True)):
        f = getattr(lib, name, None)
        if f is None:
            continue
        f.argtypes = common + ([ctypes.c_void_p] if fail_idx else []) + [ctypes.c_void_p]
        f.restype = ctypes.c_int
        return f, fail_idx
    return None, False


class _MemLocation(ctypes.Structure):
    """The driver's CUmemLocation."""

    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _MemcpyAttributes(ctypes.Structure):
    """The driver's CUmemcpyAttributes."""

    _fields_ = [("srcAccessOrder", ctypes.c_int), ("srcLocHint", _MemLocation), ("dstLocHint", _MemLocation),
                ("flags", ctypes.c_uint)]


_ORDER_STREAM = 1  # CU_MEMCPY_SRC_ACCESS_ORDER_STREAM


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
