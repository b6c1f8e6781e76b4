"""Fused Triton dequantization for the K-quants that dominate Q4_K_M files (CUDA only).

One kernel a type, reading the packed blocks once and writing the output dtype directly:
the torch path in dequant.py runs a dozen kernels and a float32 intermediate per tensor,
slower than PCIe on the streaming hot path. Same arithmetic as gguf-py, in the same order,
with floating-point contraction off, so float32 results agree bit for bit with dequant.py
(checked by the gpu tests). Loaded lazily: a machine without Triton uses dequant.py.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs (and CI) have no Triton
    triton = None

QK_K = 256
_BLOCKS = 8  # quant blocks per program


if triton is not None:

    @triton.jit
    def _q4_k(raw, halfs, out, n_blocks, BLOCKS: tl.constexpr):
        # block: d f16 | dmin f16 | scales 12 B (6-bit sc/min, packed) | qs 128 B (two nibbles)
        b = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)[:, None]
        j = tl.arange(0, 256)[None, :]
        ok = b < n_blocks
        base = b * 144
        d = tl.load(halfs + b * 72, mask=ok).to(tl.float32)
        dmin = tl.load(halfs + b * 72 + 1, mask=ok).to(tl.float32)
        sub = j // 32
        lo = sub < 4
        A = tl.load(raw + base + 4 + sub, mask=ok).to(tl.int32)
        B = tl.load(raw + base + 8 + sub, mask=ok).to(tl.int32)
        C = tl.load(raw + base + 4 + tl.where(lo, sub, sub - 4), mask=ok).to(tl.int32)
        sc = tl.where(lo, A & 63, (B & 15) | ((C >> 6) << 4))
        mn = tl.where(lo, B & 63, (B >> 4) | ((A >> 6) << 4))
        q = tl.load(raw + base + 16 + (j // 64) * 32 + (j % 32), mask=ok).to(tl.int32)
        q = (q >> ((sub % 2) * 4)) & 15
        v = (d * sc.to(tl.float32)) * q.to(tl.float32) - dmin * mn.to(tl.float32)
        tl.store(out + b * 256 + j, v.to(out.dtype.element_ty), mask=ok)

    @triton.jit
    def _q6_k(raw, halfs, out, n_blocks, BLOCKS: tl.constexpr):
        # block: ql 128 B | qh 64 B | scales 16 x int8 | d f16
        b = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)[:, None]
        j = tl.arange(0, 256)[None, :]
        ok = b < n_blocks
        base = b * 210
        d = tl.load(halfs + b * 105 + 104, mask=ok).to(tl.float32)
        h = j // 128
        r = j % 128
        ql = tl.load(raw + base + h * 64 + (r % 64), mask=ok).to(tl.int32)
        ql = (ql >> ((r // 64) * 4)) & 15
        qh = tl.load(raw + base + 128 + h * 32 + (r % 32), mask=ok).to(tl.int32)
        qh = (qh >> ((r // 32) * 2)) & 3
        q = (ql | (qh << 4)) - 32
        s = tl.load(raw + base + 192 + j // 16, mask=ok).to(tl.int8, bitcast=True).to(tl.float32)
        v = (d * s) * q.to(tl.float32)
        tl.store(out + b * 256 + j, v.to(out.dtype.element_ty), mask=ok)

    _KERNELS = {12: (_q4_k, 144), 14: (_q6_k, 210)}  # GGMLQuantizationType.Q4_K, Q6_K
else:
    _KERNELS = {}


def available(raw: torch.Tensor, qtype: int) -> bool:
    return raw.is_cuda and qtype in _KERNELS and raw.storage_offset() % 2 == 0


def dequantize(raw: torch.Tensor, qtype: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Fused dequantization of contiguous uint8 blocks on CUDA (callers check `available` first)."""
    kernel, size = _KERNELS[qtype]
    n = raw.numel() // size
    out = torch.empty(n * QK_K, dtype=dtype, device=raw.device)
    halfs = raw.view(torch.float16)
    kernel[(triton.cdiv(n, _BLOCKS),)](raw, halfs, out, n, BLOCKS=_BLOCKS, enable_fp_fusion=False)
    return out.view(shape)
