"""qgemv's step on int8 activations for Q4_K: integer dot products of 4 quants by 4 values an
instruction (dp4a), the way llama.cpp's mmvq reads K-quants.

NOTE [ int8 activations ]
Profiled on an H200 (BENCHMARKS.md, "GEMV on int8 activations"), qgemv's float step on Q4_K
keeps the SM's issue slots busier than DRAM: its loop is bound by instructions (several a weight
to decode, convert and multiply), not by memory. Here x is quantized once a
launch (`quantize_x`: int8 in blocks of 32 values, each block's float32 scale and the sum of its
dequantized values, llama.cpp's q8_1 in float32), and a quant byte's nibble and its x are bytes
of two 32-bit words: `dp4a` multiplies 4 pairs and adds them in one instruction. A lane takes a
whole 32-byte group of a chunk (64 values, sub-blocks 2g and 2g + 1) where the float step's lanes
take 8 bytes: its quants, its 64 int8 x and its two (scale, sum) pairs are 16-byte loads (7 a
group), and a sub-block's dot is d * sc * (dx * isum) - dmin * m * sum(x). A first form on the
float step's lanes (8 bytes, x in 4-byte loads, a scale and a sum of 8 per 8 values) ran slower
than the float step: 4 narrow loads per 8 weights.

x rounded to int8 in blocks of 32 changes the product by the rounding of x (at most half a step
of max |x| / 127 a value), as llama.cpp's decode does; the tests compare with float64 over
gguf-py's dequantization of W and the int8 x, and with x itself within that rounding.

dp4a is PTX: under Triton's interpreter (the CPU tests) `_dp4a` computes the same sum from the
bytes with shifts, so the tests check the lanes, words, scales and masks on the CPU, and the GPU
tests the instruction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# block types with an int8-activation step here (Q4_K)
TYPES = (12,)


@triton.jit
def _dp4a(a, b, c, ASM: tl.constexpr):
    """c + sum over bytes i of a's unsigned byte i times b's signed byte i (int32 tensors of one shape)."""
    if ASM:
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)
    r = c
    for i in tl.static_range(4):
        r += ((a >> (8 * i)) & 0xFF) * ((b << (24 - 8 * i)) >> 24)
    return r


@triton.jit
def _split4(v):
    """v [A, S, 4] as its 4 columns, [A, S, 1] each (in registers: one thread holds a row's 4)."""
    e, o = tl.split(tl.reshape(v, (v.shape[0], v.shape[1], 2, 2)))
    v0, v2 = tl.split(e)
    v1, v3 = tl.split(o)
    return v0[:, :, None], v1[:, :, None], v2[:, :, None], v3[:, :, None]


@triton.jit
def _dp(q, x, c, P: tl.constexpr, ASM: tl.constexpr):
    """c [MR, BN, S, 1] + the dot of the 4 nibbles P of word q [BN, S, 1] with the 4 int8 of word x [MR, S, 1]."""
    qq, xx = tl.broadcast(((q >> (4 * P)) & 0x0F0F0F0F)[None], x[:, None])
    return _dp4a(qq, xx, c, ASM)


@triton.jit
def step8(acc, xr, xdsr, xok, w32, rowb, kb0, n_chunks, KB: tl.constexpr, EVEN: tl.constexpr, ASM: tl.constexpr):
    """acc [MR, BN, S, 1] += x . W over Q4_K chunks kb0 .. kb0 + KB - 1, x as int8 words at xr [MR, 1, 1]
    and its blocks' (scale, sum) pairs at xdsr (`quantize_x`): lane s takes group s % 4 of chunk
    kb0 + s // 4, its 32 quant bytes (64 values: sub-blocks 2g and 2g + 1) and their 64 int8 x
    in 16-byte loads (NOTE [ int8 activations ])."""
    s = tl.arange(0, KB * 4)[None, :, None]  # [1, S, 1]
    kb = kb0 + s // 4
    g = s % 4
    okb = (kb < n_chunks) | EVEN
    ok = xok & okb
    j = tl.arange(0, 4)[None, None, :]
    # Q4_K: d | dmin | 12 B scales | qs 128 B; group g's 32 bytes: low nibbles values g * 64 + l (sub-block
    # 2g), high ones g * 64 + 32 + l (2g + 1)
    base = rowb + kb * 36  # [BN, S, 1] in 32-bit words
    w0, s0, s1, s2 = _split4(tl.load(w32 + base + j, mask=okb, other=0))
    d = (w0 & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    dmin = ((w0 >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    q0, q1, q2, q3 = _split4(tl.load(w32 + base + 4 + g * 8 + j, mask=okb, other=0))
    q4, q5, q6, q7 = _split4(tl.load(w32 + base + 8 + g * 8 + j, mask=okb, other=0))
    dx0, sx0, dx1, sx1 = _split4(tl.load(xdsr + kb * 16 + g * 4 + j, mask=ok, other=0.0))
    # scale bytes of sub-blocks 2g, 2g + 1 (qgemv.k_scale_min's rule, sub's byte 2 * (g % 2) + P a shift)
    sh = 16 * (g % 2)
    t0, t1, t2 = s0 >> sh, s1 >> sh, s2 >> sh
    hi = g >= 2
    zero = tl.zeros(acc.shape, dtype=tl.int32)
    for P in tl.static_range(2):
        xo = kb * 64 + g * 16 + P * 8  # x's word of values kb * 256 + g * 64 + 32 P
        x0, x1, x2, x3 = _split4(tl.load(xr + xo + j, mask=ok, other=0))
        x4, x5, x6, x7 = _split4(tl.load(xr + xo + 4 + j, mask=ok, other=0))
        isum = _dp(q0, x0, zero, P, ASM)
        isum = _dp(q1, x1, isum, P, ASM)
        isum = _dp(q2, x2, isum, P, ASM)
        isum = _dp(q3, x3, isum, P, ASM)
        isum = _dp(q4, x4, isum, P, ASM)
        isum = _dp(q5, x5, isum, P, ASM)
        isum = _dp(q6, x6, isum, P, ASM)
        isum = _dp(q7, x7, isum, P, ASM)
        sc = tl.where(hi, ((t2 >> (8 * P)) & 15) | (((t0 >> (8 * P + 6)) & 3) << 4), (t0 >> (8 * P)) & 63)
        mn = tl.where(hi, ((t2 >> (8 * P + 4)) & 15) | (((t1 >> (8 * P + 6)) & 3) << 4), (t1 >> (8 * P)) & 63)
        dx = dx0 if P == 0 else dx1
        sx = sx0 if P == 0 else sx1
        acc += (d * sc.to(tl.float32))[None] * (dx[:, None] * isum.to(tl.float32))
        acc -= (dmin * mn.to(tl.float32))[None] * sx[:, None]
    return acc


@triton.jit
def q8_blocks(v):
    """v [B, 32] (float32) as int8 blocks of 32 (NOTE [ int8 activations ]): (q [B, 32] int32, each
    block's scale dx = max |v| / 127 [B], the sum of its dequantized values [B]), q = round(v / dx)
    with ties away from zero. One rule for quantize_x and the RMSNorm that emits its output's."""
    # IEEE divisions (Triton's `/` on float32 is the approximate one), so that the rounding is the rule's
    dx = tl.math.div_rn(tl.max(tl.abs(v), axis=1), 127.0)
    f = v * tl.math.div_rn(1.0, tl.where(dx > 0, dx, 1.0))[:, None]  # (a block of zeros: zeros)
    qi = tl.where(f >= 0, f + 0.5, f - 0.5).to(tl.int32)  # truncation after +-0.5: ties away from zero
    return qi, dx, tl.sum(qi, axis=1).to(tl.float32) * dx


@triton.jit
def store_q8(xq, xds, row, blk, ok, qi, dx, sx):
    """q8_blocks' blocks `blk` [B] of row `row` (int64) into quantize_x's layout: xq [M, K] int8 and
    xds [M, K / 32, 2] float32, n_blocks = K / 32 a row; `ok` [B] masks blocks past the row."""
    offs = blk[:, None] * 32 + tl.arange(0, 32)[None, :]
    tl.store(xq + row * 32 + offs, qi.to(tl.int8), mask=ok[:, None])
    tl.store(xds + (row + blk) * 2, dx, mask=ok)
    tl.store(xds + (row + blk) * 2 + 1, sx, mask=ok)


@triton.jit
def quantize_x_kernel(x, xq, xds, n_blocks, sxm, BLOCKS: tl.constexpr):
    """Row program_id(1) of x, blocks of 32 values BLOCKS at a time, by q8_blocks."""
    m = tl.program_id(1)
    blk = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    ok = blk < n_blocks
    offs = blk[:, None] * 32 + tl.arange(0, 32)[None, :]
    v = tl.load(x + m.to(tl.int64) * sxm + offs, mask=ok[:, None], other=0).to(tl.float32)
    qi, dx, sx = q8_blocks(v)
    store_q8(xq, xds, m.to(tl.int64) * n_blocks, blk, ok, qi, dx, sx)


def q8_buffers(M: int, K: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty (xq [M, K] int8, xds [M, K / 32, 2] float32) for quantize_x's layout."""
    return (torch.empty(M, K, dtype=torch.int8, device=device),
            torch.empty(M, K // 32, 2, dtype=torch.float32, device=device))


def quantize_x(x: torch.Tensor, interpret: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (K a multiple of 256) as int8 in blocks of 32 (NOTE [ int8 activations ]): the int8
    values [M, K] and each block's (scale, sum of its dequantized values) [M, K / 32, 2], float32."""
    M, K = x.shape
    n_blocks = K // 32
    xq, xds = q8_buffers(M, K, x.device)
    BLOCKS = 32
    kw = {} if interpret else {"num_warps": 4}
    quantize_x_kernel[(triton.cdiv(n_blocks, BLOCKS), M)](x, xq, xds, n_blocks, x.stride(0), BLOCKS=BLOCKS, **kw)
    return xq, xds


# the attribute by which a tensor carries its own int8 form (`attach_q8`)
_Q8_ATTR = "_layerstream_q8"


def attach_q8(x: torch.Tensor, xq: torch.Tensor, xds: torch.Tensor) -> None:
    """Let x [M, K] carry its quantize_x form, computed where x was made (the RMSNorm before a
    decode step's Q4_K matmuls: one launch fewer each); the int8 matmuls then take it instead of
    quantizing x again. x must not change in place afterwards."""
    setattr(x, _Q8_ATTR, (xq, xds))


def q8_of(x: torch.Tensor, interpret: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_x(x): the form x carries (`attach_q8`), or a new one."""
    return getattr(x, _Q8_ATTR, None) or quantize_x(x, interpret)
