"""GGUF tensor dequantization in torch, bit-exact with gguf-py, on whatever device the bytes are on.

Shaped like gguf-py's `quants.py`: `dequantize` dispatches through a registry; each quant type is
one small function doing block math on an (n_blocks, type_size) uint8 tensor and returning
(n_blocks, block_size) float32. Float32 products and sums happen in the same order as in gguf-py
(half-precision scales go to float32 first), so results match `gguf.quants.dequantize` bit for
bit. Pure torch ops: no host syncs, no Python loop over blocks, runs on CPU and CUDA alike.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from typing import Callable, Sequence

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from layerstream.errors import ModelError, UnsupportedQuantError

# Block types the Triton kernels of qkernels.py handle (Triton is imported lazily).
FUSED_TYPES = frozenset(int(t) for t in (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0,
                                         QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K))


@functools.cache
@functools.cache
def have_triton() -> bool:
    """Whether Triton imports (CUDA installs have it; CPU installs only with the test extra): asked
    once, since rms_norm and moe.route ask it at every eager call."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def triton_installed() -> bool:
    """Whether Triton is installed: found, not imported, for the launcher's plan (device.weights_form),
    which would otherwise wait for an import it does not use (BENCHMARKS.md, "The 8B's start-up");
    the compute process checks that it imports (compute_proc.ComputeWorker)."""
    return importlib.util.find_spec("triton") is not None


# blocks: (n, type_size) uint8 -> (n, block_size) float32
BlockFn = Callable[[torch.Tensor], torch.Tensor]

_BLOCK_FNS: dict[int, BlockFn] = {}
_FLOAT_DTYPES: dict[int, torch.dtype] = {QT.F32: torch.float32, QT.F16: torch.float16, QT.BF16: torch.bfloat16}


def _register(qtype: QT) -> Callable[[BlockFn], BlockFn]:
    def wrap(fn: BlockFn) -> BlockFn:
        _BLOCK_FNS[int(qtype)] = fn
        return fn
    return wrap


def _type_name(qtype: int) -> str:
    try:
        return QT(qtype).name
    except ValueError:
        return f"unknown type id {qtype}"


def check_supported(qtype: int, name: str) -> None:
    """Raise UnsupportedQuantError unless tensor `name` of type `qtype` can be dequantized."""
    if qtype not in SUPPORTED:
        raise UnsupportedQuantError(
            f"tensor {name} is stored as {_type_name(qtype)}, which layerstream cannot dequantize; "
            "use a GGUF quantized as F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 or Q2_K..Q6_K")


def tensor_nbytes(qtype: int, shape: Sequence[int]) -> int:
    """Bytes of a tensor of type `qtype` and torch-order `shape` (any type gguf knows)."""
    try:
        block_size, type_size = GGML_QUANT_SIZES[QT(qtype)]
    except (ValueError, KeyError):
        raise UnsupportedQuantError(f"tensor type {_type_name(qtype)} has no known block size; "
                                    "the GGUF may need a newer gguf package") from None
    n = math.prod(shape)
    if not shape or shape[-1] % block_size:
        raise ModelError(f"shape {tuple(shape)} does not fit {_type_name(qtype)} blocks of {block_size} values")
    return n // block_size * type_size


def dequantize(raw: torch.Tensor, qtype: int, shape: tuple[int, ...], name: str = "?",
               dtype: torch.dtype = torch.float32, fused: bool = True) -> torch.Tensor:
    """Dequantize the 1-D uint8 bytes `raw` into a new `dtype` tensor of `shape` on raw.device.

    On CUDA, block types go through the Triton kernel of qkernels.py (one pass, bit-exact with the
    torch path) unless fused=False.
    """
    check_supported(qtype, name)
    try:
        nbytes = tensor_nbytes(qtype, shape)
    except ModelError as e:
        raise ModelError(f"tensor {name}: {e}") from None
    if raw.dtype != torch.uint8 or raw.dim() != 1 or raw.numel() != nbytes:
        raise ModelError(f"tensor {name} ({_type_name(qtype)}, shape {tuple(shape)}) needs {nbytes} bytes, "
                         f"got {raw.numel()} ({raw.dtype}, {raw.dim()}-D); the file may be truncated or its "
                         "tensor table wrong")
    # Viewing bytes as 2- or 4-byte types needs contiguous bytes at an aligned offset; every
    # fp16 field of every supported block sits at an even offset within an even-sized block.
    if not raw.is_contiguous() or raw.storage_offset() % 4:
        raw = raw.clone()
    if fused and raw.is_cuda:
        if qtype in FUSED_TYPES and have_triton():
            from layerstream.compute import qkernels

            K = shape[-1]
            out = torch.empty(math.prod(shape), dtype=dtype, device=raw.device)
            return qkernels.dequantize_into(raw, qtype, out.numel() // K, K, out.view(-1, K)).view(shape)
    if (src := _FLOAT_DTYPES.get(qtype)) is not None:
        # .to() copies when the dtype changes; clone otherwise so the result never aliases raw
        out = raw.view(src).to(dtype)
        return (out.clone() if src == dtype else out).view(shape)
    _, type_size = GGML_QUANT_SIZES[QT(qtype)]
    out = _BLOCK_FNS[qtype](raw.view(-1, type_size))
    if dtype != torch.float32:
        out = out.to(dtype)
    return out.view(shape)


def _unpack(x: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., L) uint8 -> (..., 8 // bits, L): field i holds bits [i*bits, (i+1)*bits) of each byte."""
    # NOTE: scalar shifts into slices of one output; a broadcast tensor shift is ~5x slower on CPU
    k, mask = 8 // bits, (1 << bits) - 1
    out = x.new_empty(*x.shape[:-1], k, x.shape[-1])
    torch.bitwise_and(x, mask, out=out[..., 0, :])
    for i in range(1, k):  # over bit fields (at most 8), never over blocks
        torch.bitwise_right_shift(x, i * bits, out=out[..., i, :])
    if k > 2:
        out[..., 1:k - 1, :].bitwise_and_(mask)
    return out


def _signed(q: torch.Tensor, offset: int) -> torch.Tensor:
    """uint8 q -> int8 q - offset, in place (wraps; exact for results in -128..127)."""
    return q.sub_(offset).view(torch.int8)


def _mul(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """New float32 q * d for integer q and float32 d (broadcast); q converts to float32 exactly first."""
    # NOTE: CUDA casts inside one fused kernel; on CPU the mixed-dtype kernel is ~3x slower than
    # a cast followed by an in-place multiply. Either way: one rounding, so the bits agree.
    if q.is_cuda:
        return torch.mul(q, d)
    return q.float().mul_(d)


def _f16(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """(n, 1) float32 from the fp16 field at byte `offset` of each block."""
    return blocks.view(torch.float16)[:, offset // 2:offset // 2 + 1].float()


@_register(QT.Q4_0)
def dequant_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    # d: f16 | qs: 16 bytes, low nibbles are values 0..15, high nibbles 16..31
    n = blocks.shape[0]
    d = _f16(blocks, 0)
    q = _unpack(blocks[:, 2:], 4).view(n, 32)
    return _mul(_signed(q, 8), d)


@_register(QT.Q4_1)
def dequant_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    # d: f16 | m: f16 | qs: 16 bytes
    n = blocks.shape[0]
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _unpack(blocks[:, 4:], 4).view(n, 32)
    return _mul(q, d).add_(m)


def _q5(ql_bytes: torch.Tensor, qh_bytes: torch.Tensor) -> torch.Tensor:
    """(n, 16) nibble bytes + (n, 4) little-endian high bits -> (n, 32) uint8 values 0..31."""
    n = ql_bytes.shape[0]
    ql = _unpack(ql_bytes, 4).view(n, 32)
    # value i takes bit i of the little-endian 32-bit qh: byte i // 8, bit i % 8
    qh = _unpack(qh_bytes, 1).transpose(-1, -2).reshape(n, 32)
    return ql.bitwise_or_(qh.bitwise_left_shift_(4))


@_register(QT.Q5_0)
def dequant_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    # d: f16 | qh: 4 bytes | qs: 16 bytes
    d = _f16(blocks, 0)
    return _mul(_signed(_q5(blocks[:, 6:], blocks[:, 2:6]), 16), d)


@_register(QT.Q5_1)
def dequant_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    # d: f16 | m: f16 | qh: 4 bytes | qs: 16 bytes
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    return _mul(_q5(blocks[:, 8:], blocks[:, 4:8]), d).add_(m)


@_register(QT.Q8_0)
def dequant_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    # d: f16 | qs: 32 int8
    d = _f16(blocks, 0)
    return _mul(blocks[:, 2:].view(torch.int8), d)


@_register(QT.Q2_K)
def dequant_q2_k(blocks: torch.Tensor) -> torch.Tensor:
    # scales: 16 bytes (low nibble scale, high nibble min) | qs: 64 bytes | d: f16 | dmin: f16
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 80), _f16(blocks, 82)
    scales = blocks[:, :16]
    dl = (d * (scales & 0x0F).float()).unsqueeze(-1)   # (n, 16, 1)
    ml = (dmin * (scales >> 4).float()).unsqueeze(-1)  # (n, 16, 1)
    q = _unpack(blocks[:, 16:80].view(n, 2, 32), 2)   # (n, 2, 4, 32)
    return _mul(q.view(n, 16, 16), dl).sub_(ml).view(n, 256)


@_register(QT.Q3_K)
def dequant_q3_k(blocks: torch.Tensor) -> torch.Tensor:
    # hmask: 32 bytes | qs: 64 bytes | scales: 12 bytes (16 packed 6-bit) | d: f16
    n = blocks.shape[0]
    d = _f16(blocks, 108)
    lo = _unpack(blocks[:, 96:104], 4).view(n, 16)     # low 4 bits of the 16 scales
    hi = _unpack(blocks[:, 104:108], 2).view(n, 16)    # high 2 bits
    sc = _signed(lo.bitwise_or_(hi.bitwise_left_shift_(4)), 32)
    dl = (d * sc.float()).unsqueeze(-1)                 # (n, 16, 1)
    ql = _unpack(blocks[:, 32:96].view(n, 2, 32), 2).view(n, 16, 16)
    hm = _unpack(blocks[:, :32].view(n, 1, 32), 1).view(n, 16, 16)
    # q = ql - 4 where the hmask bit is clear, ql where set: (ql | bit << 2) - 4
    q = _signed(ql.bitwise_or_(hm.bitwise_left_shift_(2)), 4)
    return _mul(q, dl).view(n, 256)


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 12) packed bytes of Q4_K/Q5_K -> 8 six-bit scales and 8 six-bit mins, each (n, 8) uint8."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return sc, mn


def _k_scales(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K (n, 8, 1) float32 d * scale and dmin * min from the block header."""
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, mn = _k_scale_min(blocks[:, 4:16])
    return (d * sc.float()).unsqueeze(-1), (dmin * mn.float()).unsqueeze(-1)


@_register(QT.Q4_K)
def dequant_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    # d: f16 | dmin: f16 | scales: 12 bytes | qs: 128 bytes
    n = blocks.shape[0]
    dl, ml = _k_scales(blocks)
    q = _unpack(blocks[:, 16:].view(n, 4, 32), 4)      # (n, 4, 2, 32)
    return _mul(q.view(n, 8, 32), dl).sub_(ml).view(n, 256)


@_register(QT.Q5_K)
def dequant_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    # d: f16 | dmin: f16 | scales: 12 bytes | qh: 32 bytes | qs: 128 bytes
    n = blocks.shape[0]
    dl, ml = _k_scales(blocks)
    ql = _unpack(blocks[:, 48:].view(n, 4, 32), 4).view(n, 8, 32)
    qh = _unpack(blocks[:, 16:48].view(n, 1, 32), 1).view(n, 8, 32)
    q = ql.bitwise_or_(qh.bitwise_left_shift_(4))
    return _mul(q, dl).sub_(ml).view(n, 256)


@_register(QT.Q6_K)
def dequant_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    # ql: 128 bytes | qh: 64 bytes | scales: 16 int8 | d: f16
    n = blocks.shape[0]
    d = _f16(blocks, 208)
    dl = (d * blocks[:, 192:208].view(torch.int8).float()).unsqueeze(-1)  # (n, 16, 1)
    ql = _unpack(blocks[:, :128].view(n, 2, 64), 4).view(n, 16, 16)
    qh = _unpack(blocks[:, 128:192].view(n, 2, 32), 2).view(n, 16, 16)
    q = _signed(ql.bitwise_or_(qh.bitwise_left_shift_(4)), 32)
    return _mul(q, dl).view(n, 256)


SUPPORTED: frozenset[int] = frozenset(_FLOAT_DTYPES) | frozenset(_BLOCK_FNS)
