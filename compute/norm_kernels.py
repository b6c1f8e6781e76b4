"""A Triton RMSNorm, optionally fused with the residual add that precedes it (one launch, one
pass over the row: a decode step's norms are a few kilobytes each, so launches are their cost).

out = x * rsqrt(mean(x^2) + eps) * w, in float32 inside and cast once to x's dtype; with a
residual r, s = x + r is formed first (in float32, then rounded to x's dtype as the residual
stream keeps it), written back to `r`'s place (the caller's new residual stream), and normed.
With `x8` it also writes its output's int8 form for the Q4_K matmuls that follow (qgemv8.py,
NOTE [ int8 activations ]): a decode step's quantization then costs no launch of its own.
Like qkernels.py, it runs on the CPU under Triton's interpreter (TRITON_INTERPRET=1), which is how
CI tests it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from layerstream.compute.qgemv8 import attach_q8, q8_blocks, q8_buffers, store_q8
from layerstream.compute.qkernels import INTERPRET


@triton.jit
def _rms_norm_kernel(x, r, w, out, xq, xds, E, sx, sr, so, eps, HAS_RES: tl.constexpr, X8: tl.constexpr,
                     BLOCK: tl.constexpr):
    """Row t of out [T, E] = RMSNorm(x[t] (+ r[t], then stored to r[t])) * w; X8: and row t's
    int8 form, quantize_x's rule over out as stored (E a multiple of 32)."""
    t = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)
    ok = i < E
    v = tl.load(x + t * sx + i, mask=ok, other=0).to(tl.float32)
    if HAS_RES:
        v = (v + tl.load(r + t * sr + i, mask=ok, other=0).to(tl.float32)).to(r.dtype.element_ty)
        tl.store(r + t * sr + i, v, mask=ok)
        v = v.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(v * v, axis=0) / E + eps)
    g = tl.load(w + i, mask=ok, other=0).to(tl.float32)
    y = (v * inv * g).to(out.dtype.element_ty)
    tl.store(out + t * so + i, y, mask=ok)
    if X8:  # the values as stored, so that the form is quantize_x(out)'s bit for bit
        qi, dx, sxs = q8_blocks(tl.reshape(y.to(tl.float32), (BLOCK // 32, 32)))
        blk = tl.arange(0, BLOCK // 32)
        store_q8(xq, xds, t * (E // 32), blk, blk < E // 32, qi, dx, sxs)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             x8: bool = False) -> torch.Tensor:
    """RMSNorm of x [T, E] by w [E]: a new tensor in x's dtype. With `residual` [T, E] (x's
    dtype), x + residual is normed instead and written into `residual` (updated in place). With
    `x8` (E a multiple of 256) the result carries its int8 form (qgemv8.attach_q8)."""
    if x.dim() != 2 or w.shape != (x.shape[1],) or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"rms_norm needs x [T, E], w [E] and a residual like x; got {tuple(x.shape)}, "
                         f"{tuple(w.shape)}, {None if residual is None else tuple(residual.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if residual is not None and (residual.stride(-1) != 1 or residual.dtype != x.dtype):
        raise ValueError("rms_norm's residual must be contiguous in its last dimension and of x's dtype")
    T, E = x.shape
    if x8 and E % 256:
        raise ValueError(f"rms_norm's int8 form needs a width that is a multiple of 256, not {E}")
    out = torch.empty_like(x)
    xq, xds = q8_buffers(T, E, x.device) if x8 else (out, out)
    BLOCK = triton.next_power_of_2(E)
    r = residual if residual is not None else x
    kw = {} if INTERPRET else {"num_warps": max(1, min(16, BLOCK // 512))}
    _rms_norm_kernel[(T,)](x, r, w.contiguous(), out, xq, xds, E, x.stride(0), r.stride(0), out.stride(0),
                           float(eps), HAS_RES=residual is not None, X8=x8, BLOCK=BLOCK, **kw)
    if x8:
        attach_q8(out, xq, xds)
    return out
