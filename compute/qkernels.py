"""Triton kernels on GGUF blocks: fused dequant-matmul for decode, dequantization for prompts.

NOTE [ parts of a chunk ]
A weight row is walked in chunks of 256 values: one super-block of a K-quant, or eight
32-value blocks of Q4_0..Q8_0. Each type splits a chunk into NPARTS parts (the low nibbles of
the quant bytes, then their high nibbles, ...), and each part into G runs of L values such
that a run reads L *contiguous* bytes and shares one scale, and says which value of the chunk
each of its columns is (`elem`). The matmul loads the activations at those value indices
instead of reordering the weights, so weight and activation loads stay wide, scales load once
per run, and nothing is shuffled in registers. Dequantization writes each part to
out[n, k0 + elem]. The arithmetic follows gguf-py's order with floating-point contraction
off, so the float32 dequantization is bit-exact with `gguf.quants.dequantize`.

Every kernel runs on the CPU under Triton's interpreter (TRITON_INTERPRET=1), which is how CI
tests them; on CUDA they are compiled. A machine without Triton never imports this module.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# qtype id -> (bytes per block, values per block, parts per chunk, groups G, run length L)
GEOMETRY = {
    2: (18, 32, 2, 8, 16),    # Q4_0
    3: (20, 32, 2, 8, 16),    # Q4_1
    6: (22, 32, 2, 8, 16),    # Q5_0
    7: (24, 32, 2, 8, 16),    # Q5_1
    8: (34, 32, 1, 8, 32),    # Q8_0
    10: (84, 256, 4, 4, 16),  # Q2_K
    11: (110, 256, 4, 4, 16),  # Q3_K
    12: (144, 256, 2, 4, 32),  # Q4_K
    13: (176, 256, 2, 4, 32),  # Q5_K
    14: (210, 256, 2, 8, 16),  # Q6_K
}


@triton.jit
def _part(raw, halfs, rowb, kb, ok_r, nblk, QT: tl.constexpr, P: tl.constexpr, G: tl.constexpr, L: tl.constexpr):
    """Part P of chunk kb for rows at byte offsets rowb [BN, 1, 1], as G runs of L values.

    Returns (w [BN, G, L] float32, elem [G, L] value index within the chunk, valid [G, 1]).
    Every run reads L contiguous bytes and shares one scale: scales load once per run.
    """
    g = tl.arange(0, G)[:, None]  # [G, 1]
    j = tl.arange(0, L)[None, :]  # [1, L]
    if QT == 8:  # Q8_0: d f16 | 32 x int8; run g = block g of the chunk
        blk = kb * 8 + g
        ok = blk < nblk
        m = ok_r & ok[None, :, :]
        base = rowb + blk[None, :, :] * 34
        q = tl.load(raw + base + 2 + j[None, :, :], mask=m, other=0).to(tl.int8, bitcast=True)
        d = tl.load(halfs + base // 2, mask=m, other=0).to(tl.float32)
        return q.to(tl.float32) * d, g * 32 + j, ok
    elif QT == 2 or QT == 3 or QT == 6 or QT == 7:
        # Q4_0 / Q4_1 / Q5_0 / Q5_1: d f16 | (m f16) | (qh 4 B) | 16 B nibbles; part 0 low, 1 high
        FIVE: tl.constexpr = QT == 6 or QT == 7
        HAS_MIN: tl.constexpr = QT == 3 or QT == 7
        TS: tl.constexpr = 18 + 2 * HAS_MIN + 4 * FIVE
        QO: tl.constexpr = TS - 16  # the nibbles end the block
        blk = kb * 8 + g
        ok = blk < nblk
        m = ok_r & ok[None, :, :]
        base = rowb + blk[None, :, :] * TS
        q = (tl.load(raw + base + QO + j[None, :, :], mask=m, other=0).to(tl.int32) >> (4 * P)) & 15
        if FIVE:  # value P*16+j takes bit (P*16+j) of the little-endian 32-bit qh before the nibbles
            qh = (tl.load(raw + base + QO - 4 + 2 * P + j[None, :, :] // 8, mask=m, other=0).to(tl.int32)
                  >> (j[None, :, :] % 8)) & 1
            q = q | (qh << 4)
        d = tl.load(halfs + base // 2, mask=m, other=0).to(tl.float32)
        if HAS_MIN:
            w = q.to(tl.float32) * d + tl.load(halfs + base // 2 + 1, mask=m, other=0).to(tl.float32)
        else:
            w = (q - (16 if FIVE else 8)).to(tl.float32) * d
        return w, g * 32 + P * 16 + j, ok
    elif QT == 12 or QT == 13:  # Q4_K / Q5_K: d | dmin | 12 B scales | (qh 32 B) | qs 128 B
        QO: tl.constexpr = 16 if QT == 12 else 48
        base = rowb + kb * (144 if QT == 12 else 176)  # [BN, 1, 1]
        q = (tl.load(raw + base + QO + (g * 32 + j)[None, :, :], mask=ok_r, other=0).to(tl.int32) >> (4 * P)) & 15
        sub = (2 * g + P)[None, :, :]  # [1, G, 1] sub-block of 32 values
        if QT == 13:
            qh = (tl.load(raw + base + 16 + j[None, :, :], mask=ok_r, other=0).to(tl.int32) >> sub) & 1
            q = q | (qh << 4)
        # s[i] = byte 4 + i of the block; sub < 4: sc = s[sub] & 63, mn = s[sub+4] & 63;
        # sub >= 4: sc = (s[sub+4] & 15) | (s[sub-4] >> 6) << 4, mn = (s[sub+4] >> 4) | (s[sub] >> 6) << 4
        lo = sub < 4
        a = tl.load(raw + base + 4 + sub, mask=ok_r, other=0).to(tl.int32)
        b = tl.load(raw + base + 8 + sub, mask=ok_r, other=0).to(tl.int32)
        c4 = tl.load(raw + base + sub, mask=ok_r & ~lo, other=0).to(tl.int32)
        sc = tl.where(lo, a & 63, (b & 15) | ((c4 >> 6) << 4))
        mn = tl.where(lo, b & 63, (b >> 4) | ((a >> 6) << 4))
        d = tl.load(halfs + base // 2, mask=ok_r, other=0).to(tl.float32)
        dmin = tl.load(halfs + base // 2 + 1, mask=ok_r, other=0).to(tl.float32)
        w = (d * sc.to(tl.float32)) * q.to(tl.float32) - dmin * mn.to(tl.float32)
        return w, g * 64 + P * 32 + j, g >= 0
    elif QT == 14:  # Q6_K: ql 128 B | qh 64 B | 16 x int8 scales | d; run g = (half h, quarter r)
        base = rowb + kb * 210
        h = g // 4
        r = g % 4
        ql = (tl.load(raw + base + (g * 16 + j)[None, :, :], mask=ok_r, other=0).to(tl.int32) >> (4 * P)) & 15
        qh = (tl.load(raw + base + 128 + (h * 32 + (r % 2) * 16 + j)[None, :, :], mask=ok_r, other=0).to(tl.int32)
              >> (2 * (2 * P + r // 2))[None, :, :]) & 3
        q = (ql | (qh << 4)) - 32
        s = tl.load(raw + base + 192 + (h * 8 + P * 4 + r)[None, :, :], mask=ok_r, other=0).to(tl.int8, bitcast=True)
        d = tl.load(halfs + base // 2 + 104, mask=ok_r, other=0).to(tl.float32)
        return (d * s.to(tl.float32)) * q.to(tl.float32), h * 128 + P * 64 + r * 16 + j, g >= 0
    elif QT == 10:  # Q2_K: 16 B scales (lo nibble scale, hi min) | qs 64 B | d | dmin
        base = rowb + kb * 84
        h = g // 2
        q = (tl.load(raw + base + 16 + (g * 16 + j)[None, :, :], mask=ok_r, other=0).to(tl.int32) >> (2 * P)) & 3
        s = tl.load(raw + base + (h * 8 + P * 2 + g % 2)[None, :, :], mask=ok_r, other=0).to(tl.int32)
        d = tl.load(halfs + base // 2 + 40, mask=ok_r, other=0).to(tl.float32)
        dmin = tl.load(halfs + base // 2 + 41, mask=ok_r, other=0).to(tl.float32)
        w = (d * (s & 15).to(tl.float32)) * q.to(tl.float32) - dmin * (s >> 4).to(tl.float32)
        return w, h * 128 + P * 32 + (g % 2) * 16 + j, g >= 0
    else:  # QT == 11, Q3_K: hmask 32 B | qs 64 B | 12 B scales (16 x 6 bits) | d
        base = rowb + kb * 110
        h = g // 2
        ql = (tl.load(raw + base + 32 + (g * 16 + j)[None, :, :], mask=ok_r, other=0).to(tl.int32) >> (2 * P)) & 3
        hm = (tl.load(raw + base + ((g % 2) * 16 + j)[None, :, :], mask=ok_r, other=0).to(tl.int32)
              >> (h * 4 + P)[None, :, :]) & 1
        q = (ql | (hm << 2)) - 4
        i = (h * 8 + P * 2 + g % 2)[None, :, :]  # scale index 0..15
        slo = (tl.load(raw + base + 96 + i % 8, mask=ok_r, other=0).to(tl.int32) >> (4 * (i // 8))) & 15
        shi = (tl.load(raw + base + 104 + i % 4, mask=ok_r, other=0).to(tl.int32) >> (2 * (i // 4))) & 3
        sc = (slo | (shi << 4)) - 32
        d = tl.load(halfs + base // 2 + 54, mask=ok_r, other=0).to(tl.float32)
        return (d * sc.to(tl.float32)) * q.to(tl.float32), h * 128 + P * 32 + (g % 2) * 16 + j, g >= 0


# Fused matmul (decode and small batches).
#
# NOTE [ the fused matmul ]
# A decode matmul reads each weight byte once and does a few operations a value: it is bound by
# the bytes in flight and by the arithmetic a value costs, not by multiplies. So:
# - A program owns BN whole rows of W (and MR rows of x) and walks all of K, KB chunks of 256
#   values at a time: no split-K partials and no second launch, and with BN of 1 or 2 rows a
#   matrix of 1024 rows or more gives every multiprocessor many programs, each with BN * KB
#   blocks of loads in flight (one wide load each: the tile of a part reads contiguous bytes).
# - Each quant byte is loaded once and every part (nibble, bit pair) is taken from it.
# - A quant q of b bits becomes a float without a conversion instruction: the bits
#   0x3F800000 | q << (23 - b) are the float f = 1 + q / 2^b, and the run's scale and offset
#   fold into one fused multiply-add, w = f * (2^b * s) - (2^b * s + offset); the products then
#   sum elementwise into a [MR, BN, runs, L] accumulator reduced once, at the end.
# - MR rows of activations share each weight value (batched decode, speculative verification:
#   the weights are read once for up to 16 rows); DOT multiplies on the tensor cores instead
#   (tl.dot, BN >= 16), for larger batches.
# The runs are those of NOTE [ parts of a chunk ]: R = KB * G runs of L values a part.


@triton.jit
def _mac(acc, w, xv, DOT: tl.constexpr, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc += x . w over one part: w [BN, R, L] float32, xv [MR, R, L]; acc [MR, BN, R, L], or
    [MR, BN] through tl.dot."""
    if DOT:
        BN: tl.constexpr = w.shape[0]
        MR: tl.constexpr = xv.shape[0]
        V: tl.constexpr = w.shape[1] * w.shape[2]
        if DOT_F32:
            acc += tl.dot(tl.reshape(xv, (MR, V)).to(tl.float32), tl.trans(tl.reshape(w, (BN, V))),
                          input_precision=DOT_PRECISION)
        else:
            acc += tl.dot(tl.reshape(xv, (MR, V)).to(tl.float16), tl.trans(tl.reshape(w, (BN, V)).to(tl.float16)))
    else:
        acc += w[None, :, :, :] * xv.to(tl.float32)[:, None, :, :]
    return acc


@triton.jit
def _f(bits):
    """Float from the mantissa bits of a quant: 0x3F800000 | bits (the caller shifted q there)."""
    return (bits | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _chunks_mac(acc, xr, xok, raw, halfs, rowb, kb0, ph, n_chunks, nblk, QT: tl.constexpr, KB: tl.constexpr,
                DOT: tl.constexpr, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc += x . W over KB chunks of 256 values: chunk kb0 + c * PH + ph for c < KB, PH the type's
    phase count (PHASES: 16 * PH bytes hold whole blocks, so each phase's loads align alike and
    stay wide), for the activation rows at xr [MR, 1, 1] (mask xok) and the weight rows at byte
    offsets rowb [BN, 1, 1]. Chunks at or past n_chunks (blocks past nblk) count as zero."""
    if QT == 12 or QT == 13:  # Q4_K / Q5_K: d | dmin | 12 B scales | (qh 32 B) | qs 128 B
        c = tl.arange(0, KB * 4)[None, :, None]
        j = tl.arange(0, 32)[None, None, :]
        kb = kb0 + c // 4
        g = c % 4
        okb = kb < n_chunks
        base = rowb + kb * (144 if QT == 12 else 176)  # [BN, R, 1]
        qb = tl.load(raw + base + (16 if QT == 12 else 48) + g * 32 + j, mask=okb, other=0).to(tl.int32)
        d = tl.load(halfs + base // 2, mask=okb, other=0).to(tl.float32)
        dmin = tl.load(halfs + base // 2 + 1, mask=okb, other=0).to(tl.float32)
        if QT == 13:
            qh = tl.load(raw + base + 16 + j, mask=okb, other=0).to(tl.int32)
        xo = kb * 256 + g * 64 + j  # [1, R, 32]: the low nibbles' values; the high ones' are 32 on
        for P in tl.static_range(2):
            sub = 2 * g + P  # [1, R, 1] sub-block of 32 values
            # s[i] = byte 4 + i; sub < 4: sc = s[sub] & 63, mn = s[sub+4] & 63; sub >= 4:
            # sc = (s[sub+4] & 15) | (s[sub-4] >> 6) << 4, mn = (s[sub+4] >> 4) | (s[sub] >> 6) << 4
            lo = sub < 4
            a = tl.load(raw + base + 4 + sub, mask=okb, other=0).to(tl.int32)
            b = tl.load(raw + base + 8 + sub, mask=okb, other=0).to(tl.int32)
            c4 = tl.load(raw + base + sub, mask=okb & ~lo, other=0).to(tl.int32)
            sc = tl.where(lo, a & 63, (b & 15) | ((c4 >> 6) << 4)).to(tl.float32)
            mn = tl.where(lo, b & 63, (b >> 4) | ((a >> 6) << 4)).to(tl.float32)
            nib = (qb >> (4 * P)) & 15
            if QT == 12:  # f = 1 + q/16
                s = d * sc * 16.0
                w = _f(nib << 19) * s - (s + dmin * mn)
            else:  # f = 1 + q/32, q = nibble | bit `sub` of qh[j] << 4
                s = d * sc * 32.0
                w = _f((nib << 18) | (((qh >> sub) & 1) << 22)) * s - (s + dmin * mn)
            xv = tl.load(xr + xo + 32 * P, mask=xok & okb, other=0)
            acc = _mac(acc, w, xv, DOT, DOT_F32, DOT_PRECISION)
    elif QT == 14:  # Q6_K: ql 128 B | qh 64 B | 16 x int8 scales | d; run g: half h, quarter r
        c = tl.arange(0, KB * 8)[None, :, None]
        j = tl.arange(0, 16)[None, None, :]
        kb = kb0 + (c // 8) * 8 + ph
        g = c % 8
        h = g // 4
        r = g % 4
        okb = kb < n_chunks
        base = rowb + kb * 210
        ql = tl.load(raw + base + g * 16 + j, mask=okb, other=0).to(tl.int32)
        qh = tl.load(raw + base + 128 + h * 32 + (r % 2) * 16 + j, mask=okb, other=0).to(tl.int32)
        d = tl.load(halfs + base // 2 + 104, mask=okb, other=0).to(tl.float32)
        xo = kb * 256 + h * 128 + r * 16 + j
        for P in tl.static_range(2):
            sc = tl.load(raw + base + 192 + h * 8 + P * 4 + r, mask=okb, other=0).to(tl.int8, bitcast=True)
            s = d * sc.to(tl.float32) * 64.0  # f = 1 + q/64, w = d * sc * (q - 32)
            q6 = (((ql >> (4 * P)) & 15) << 17) | (((qh >> (2 * (2 * P + r // 2))) & 3) << 21)
            w = _f(q6) * s - 1.5 * s
            xv = tl.load(xr + xo + 64 * P, mask=xok & okb, other=0)
            acc = _mac(acc, w, xv, DOT, DOT_F32, DOT_PRECISION)
    elif QT == 10 or QT == 11:
        # Q2_K: 16 B scales (low nibble scale, high min) | qs 64 B | d | dmin
        # Q3_K: hmask 32 B | qs 64 B | 12 B scales (16 x 6 bits) | d
        PH: tl.constexpr = 4 if QT == 10 else 8
        c = tl.arange(0, KB * 4)[None, :, None]
        j = tl.arange(0, 16)[None, None, :]
        kb = kb0 + (c // 4) * PH + ph
        g = c % 4
        h = g // 2
        okb = kb < n_chunks
        base = rowb + kb * (84 if QT == 10 else 110)
        qb = tl.load(raw + base + (16 if QT == 10 else 32) + g * 16 + j, mask=okb, other=0).to(tl.int32)
        if QT == 10:
            d = tl.load(halfs + base // 2 + 40, mask=okb, other=0).to(tl.float32)
            dmin = tl.load(halfs + base // 2 + 41, mask=okb, other=0).to(tl.float32)
        else:
            hm = tl.load(raw + base + (g % 2) * 16 + j, mask=okb, other=0).to(tl.int32)
            d = tl.load(halfs + base // 2 + 54, mask=okb, other=0).to(tl.float32)
        for P in tl.static_range(4):
            if QT == 10:
                sb = tl.load(raw + base + h * 8 + P * 2 + g % 2, mask=okb, other=0).to(tl.int32)
                s = d * (sb & 15).to(tl.float32) * 4.0  # f = 1 + q/4
                w = _f(((qb >> (2 * P)) & 3) << 21) * s - (s + dmin * (sb >> 4).to(tl.float32))
            else:
                i = h * 8 + P * 2 + g % 2  # scale index 0..15
                slo = (tl.load(raw + base + 96 + i % 8, mask=okb, other=0).to(tl.int32) >> (4 * (i // 8))) & 15
                shi = (tl.load(raw + base + 104 + i % 4, mask=okb, other=0).to(tl.int32) >> (2 * (i // 4))) & 3
                s = d * ((slo | (shi << 4)) - 32).to(tl.float32) * 8.0  # f = 1 + u/8, q = u - 4
                u = ((qb >> (2 * P)) & 3) | (((hm >> (h * 4 + P)) & 1) << 2)
                w = _f(u << 20) * s - 1.5 * s
            xv = tl.load(xr + kb * 256 + h * 128 + P * 32 + (g % 2) * 16 + j, mask=xok & okb, other=0)
            acc = _mac(acc, w, xv, DOT, DOT_F32, DOT_PRECISION)
    else:
        # 32-value blocks, the 8 of a chunk one at a time (block r of chunk kb0 + c: 8 blocks hold
        # a multiple of 16 bytes). Q8_0: d f16 | 32 x int8. Q4_0 / Q4_1 / Q5_0 / Q5_1: d f16 |
        # (m f16) | (qh 4 B) | 16 B nibbles, part 0 the low nibbles, 1 the high.
        FIVE: tl.constexpr = QT == 6 or QT == 7
        HAS_MIN: tl.constexpr = QT == 3 or QT == 7
        TS: tl.constexpr = 34 if QT == 8 else 18 + 2 * HAS_MIN + 4 * FIVE
        QO: tl.constexpr = 2 if QT == 8 else TS - 16
        LB: tl.constexpr = 32 if QT == 8 else 16
        c = tl.arange(0, KB)[None, :, None]
        j = tl.arange(0, LB)[None, None, :]
        kb = kb0 + c
        for r in tl.static_range(8):
            blk = kb * 8 + r
            okb = blk < nblk
            base = rowb + kb * (8 * TS) + r * TS
            qb = tl.load(raw + base + QO + j, mask=okb, other=0).to(tl.int32)
            d = tl.load(halfs + base // 2, mask=okb, other=0).to(tl.float32)
            if QT == 8:
                s = d * 256.0  # f = 1 + u/256, u = q + 128
                w = _f((qb ^ 0x80) << 15) * s - 1.5 * s
                xv = tl.load(xr + blk * 32 + j, mask=xok & okb, other=0)
                acc = _mac(acc, w, xv, DOT, DOT_F32, DOT_PRECISION)
            else:
                if HAS_MIN:
                    off = tl.load(halfs + base // 2 + 1, mask=okb, other=0).to(tl.float32)
                for P in tl.static_range(2):
                    nib = (qb >> (4 * P)) & 15
                    if FIVE:  # value P*16+j takes bit P*16+j of the little-endian qh before the nibbles
                        hb = (tl.load(raw + base + QO - 4 + 2 * P + j // 8, mask=okb, other=0).to(tl.int32)
                              >> (j % 8)) & 1
                        s = d * 32.0  # f = 1 + q/32
                        w = _f((nib << 18) | (hb << 22)) * s - (s - off if HAS_MIN else 1.5 * s)
                    else:
                        s = d * 16.0  # f = 1 + q/16
                        w = _f(nib << 19) * s - (s - off if HAS_MIN else 1.5 * s)
                    xv = tl.load(xr + blk * 32 + P * 16 + j, mask=xok & okb, other=0)
                    acc = _mac(acc, w, xv, DOT, DOT_F32, DOT_PRECISION)
    return acc


# qtype id -> (phases PH, runs a chunk R, run length L) of _chunks_mac's tiles: a step covers
# KB * PH chunks, a tile [BN, KB * R, L]
PHASES = {2: (1, 1, 16), 3: (1, 1, 16), 6: (1, 1, 16), 7: (1, 1, 16), 8: (1, 1, 32),
          10: (4, 4, 16), 11: (8, 4, 16), 12: (1, 4, 32), 13: (1, 4, 32), 14: (8, 8, 16)}
# Steps prefetched ahead on a GPU (_prefetch; Triton's interpreter has no inline assembly)
PREFETCH = 0 if INTERPRET else 2


@triton.jit
def _prefetch(raw, rowb, kb, row_bytes, CB: tl.constexpr, NCH: tl.constexpr):
    """Ask L2 for the bytes of chunks kb..kb+NCH-1 (CB bytes each) of the rows at rowb [BN, 1, 1]:
    one prefetch a 128-byte line, no registers held, so a program keeps the next steps' bytes in
    flight while it computes (NOTE [ the fused matmul ]). Past the row's end it asks for the last line."""
    NL: tl.constexpr = triton.next_power_of_2((NCH * CB + 127) // 128)
    off = tl.minimum(kb * CB + tl.arange(0, NL)[None, None, :] * 128, row_bytes - 1)
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [raw + rowb + off],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _rows_dot(x, sxm, rm, M, raw, halfs, rowb, n_chunks, nblk, row_bytes, QT: tl.constexpr, PH: tl.constexpr,
              R: tl.constexpr, L: tl.constexpr, KB: tl.constexpr, MR: tl.constexpr, BN: tl.constexpr,
              DOT: tl.constexpr, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr, PF: tl.constexpr,
              CB: tl.constexpr):
    """[MR, BN] float32: activation rows rm (of M; x's rows sxm apart) times the BN weight rows at
    byte offsets rowb [BN, 1, 1], over all of K (NOTE [ the fused matmul ]). PF > 0 prefetches
    the weights PF steps ahead (CB bytes a chunk)."""
    xr = x + rm.to(tl.int64)[:, None, None] * sxm
    xok = (rm < M)[:, None, None]
    if DOT:
        acc = tl.zeros((MR, BN), dtype=tl.float32)
    else:
        acc = tl.zeros((MR, BN, KB * R, L), dtype=tl.float32)
    STEP: tl.constexpr = KB * PH
    if PF > 0:
        _prefetch(raw, rowb, 0, row_bytes, CB, PF * STEP)
    for it in range(0, tl.cdiv(n_chunks, STEP)):
        kb0 = it * STEP  # a multiple of KB * PH, as the alignment of the loads needs
        if PF > 0:
            _prefetch(raw, rowb, kb0 + PF * STEP, row_bytes, CB, STEP)
        for ph in tl.static_range(PH):
            acc = _chunks_mac(acc, xr, xok, raw, halfs, rowb, kb0, ph, n_chunks, nblk, QT, KB, DOT, DOT_F32,
                              DOT_PRECISION)
    if not DOT:
        acc = tl.sum(tl.sum(acc, axis=3), axis=2)
    return acc


@triton.jit
def _matmul_kernel(x, raw, halfs, out, bias, M, N, n_chunks, nblk, row_bytes, sxm, som,
                   QT: tl.constexpr, PH: tl.constexpr, R: tl.constexpr, L: tl.constexpr, KB: tl.constexpr,
                   MR: tl.constexpr, BN: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr, DOT_F32: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, PF: tl.constexpr, CB: tl.constexpr):
    """out[M, N] = x[M, K] @ dequant(raw[N, K])^T (+ bias): BN rows of W by MR rows of x a program.

    DOT multiplies on the tensor cores, on float16 operands (or, DOT_F32, float32 ones: at full
    precision ("ieee") for float32 runs, as TF32 ("tf32") for bfloat16 runs, whose activations
    may exceed float16's range (Gemma 3's do); TF32 keeps float32's range)."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rm = tl.program_id(1) * MR + tl.arange(0, MR)
    ok_n = rn < N
    rowb = tl.minimum(rn, N - 1).to(tl.int64)[:, None, None] * row_bytes  # past-the-end rows read the last
    acc = _rows_dot(x, sxm, rm, M, raw, halfs, rowb, n_chunks, nblk, row_bytes, QT, PH, R, L, KB, MR, BN, DOT,
                    DOT_F32, DOT_PRECISION, PF, CB)
    if HAS_BIAS:
        acc += tl.load(bias + rn, mask=ok_n, other=0).to(tl.float32)[None, :]
    tl.store(out + rm.to(tl.int64)[:, None] * som + rn[None, :], acc.to(out.dtype.element_ty),
             mask=(rm < M)[:, None] & ok_n[None, :])


@triton.jit
def _grouped_kernel(x, raw, halfs, out, w_off, x_row, N, n_chunks, nblk, row_bytes, sxm, som,
                    QT: tl.constexpr, PH: tl.constexpr, R: tl.constexpr, L: tl.constexpr, KB: tl.constexpr,
                    BN: tl.constexpr, PF: tl.constexpr, CB: tl.constexpr):
    """out[grp, N] = x[x_row[grp], K] @ dequant(W_grp)^T, where W_grp is a [N, K] matrix of blocks
    starting w_off[grp] bytes from raw: many matrices of one type and shape in one launch (the
    experts a step chose). One row of activations a group."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    grp = tl.program_id(1)
    ok_n = rn < N
    rowb = tl.load(w_off + grp) + tl.minimum(rn, N - 1).to(tl.int64)[:, None, None] * row_bytes
    xr = tl.load(x_row + grp)
    acc = _rows_dot(x, sxm, xr + tl.arange(0, 1), xr + 1, raw, halfs, rowb, n_chunks, nblk, row_bytes, QT, PH, R, L,
                    KB, 1, BN, False, False, "ieee", PF, CB)
    tl.store(out + grp.to(tl.int64) * som + rn[None, :], acc.to(out.dtype.element_ty), mask=ok_n[None, :])


@triton.jit
def _dequant_kernel(raw, halfs, out, N, K, nblk, row_bytes, so,
                    QT: tl.constexpr, NPARTS: tl.constexpr, G: tl.constexpr, L: tl.constexpr, BN: tl.constexpr):
    """out[N, K] = dequant(raw[N, K]) for one chunk of 256 values of BN rows per program."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    kb = tl.program_id(1)
    ok_r = (rn < N)[:, None, None]
    rowb = rn[:, None, None].to(tl.int64) * row_bytes
    for p in tl.static_range(NPARTS):
        w, e, ok = _part(raw, halfs, rowb, kb, ok_r, nblk, QT, p, G, L)
        tl.store(out + rn[:, None, None].to(tl.int64) * so + kb * 256 + e[None, :, :], w.to(out.dtype.element_ty),
                 mask=ok_r & ok[None, :, :])


def _geometry(qtype: int, K: int):
    ts, qk, nparts, G, L = GEOMETRY[qtype]
    return ts, K // qk, K // qk * ts, nparts, G, L


def _check(raw: torch.Tensor, qtype: int, N: int, K: int) -> None:
    ts, nblk, row_bytes = _geometry(qtype, K)[:3]
    if raw.dtype != torch.uint8 or raw.numel() != N * row_bytes or not raw.is_contiguous() or raw.storage_offset() % 2:
        raise ValueError(f"blocks of type {qtype} for [{N}, {K}] need {N * row_bytes} contiguous, 2-aligned "
                         f"uint8 bytes; got {raw.numel()} ({raw.dtype})")


def dequantize_into(raw: torch.Tensor, qtype: int, N: int, K: int, out: torch.Tensor, BN: int | None = None) -> torch.Tensor:
    """Dequantize raw blocks of a [N, K] matrix into `out` (a [N, K] view, any float dtype)."""
    _check(raw, qtype, N, K)
    BN = BN or (64 if INTERPRET else 16)
    ts, nblk, row_bytes, nparts, G, L = _geometry(qtype, K)
    grid = (triton.cdiv(N, BN), triton.cdiv(K, 256))
    _dequant_kernel[grid](raw, raw.view(torch.float16), out, N, K, nblk, row_bytes, out.stride(0),
                          QT=qtype, NPARTS=nparts, G=G, L=L, BN=BN, enable_fp_fusion=False)
    return out


# Tuned on an H200 (BENCHMARKS.md, "quantized matmul"); see _config.
MAX_ACC = 32  # float32 accumulator elements a thread may hold (64 spilled for Q6_K at 16 rows)


def _config(M: int, N: int, n_chunks: int, qtype: int) -> tuple[int, int, int, int, int]:
    """(MR, BN, KB, num_warps, DOT) for x [M, K] by a [N, K] matrix of `qtype`: the CUDA cores for
    up to 16 rows of activations, all of them in each program (each weight read once), BN whole
    rows of W a program; KB tiles of chunks a step, as many as keep the accumulator in registers."""
    PH, R, L = PHASES[qtype]
    if INTERPRET:  # programs run one after another in Python: fewer, larger ones (numpy-wide)
        return (min(16, triton.next_power_of_2(M)), 64, 2, 1, 0)
    if M > 16:
        return (16, 32, 1, 4, 1)
    MR = triton.next_power_of_2(M)
    BN, warps = (2, 2) if MR <= 2 else (2, 4)
    KB = 16
    while KB > 1 and (MR * BN * KB * R * L > MAX_ACC * 32 * warps or KB * PH > n_chunks):
        KB //= 2
    return MR, BN, KB, warps, 0


def matmul(x: torch.Tensor, raw: torch.Tensor, qtype: int, N: int, K: int,
           bias: torch.Tensor | None = None, config: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """x [M, K] @ W^T (+ bias) for W [N, K] given as GGUF blocks: a new [M, N] tensor in x's dtype.

    One launch, each output written once by one program (deterministic). `config` (MR, BN, KB,
    num_warps, DOT) overrides the tuned choice, for tests and benchmarks.
    """
    _check(raw, qtype, N, K)
    if x.stride(-1) != 1:
        x = x.contiguous()
    M = x.shape[0]
    ts, nblk, row_bytes, nparts, G, L = _geometry(qtype, K)
    n_chunks = triton.cdiv(K, 256)
    MR, BN, KB, warps, dot, *rest = config or _config(M, N, n_chunks, qtype)
    pf = rest[0] if rest else PREFETCH
    PH, R, Lr = PHASES[qtype]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(N, BN), triton.cdiv(M, MR))
    kw = {} if INTERPRET else {"num_warps": warps}
    _matmul_kernel[grid](x, raw, raw.view(torch.float16), out, bias if bias is not None else out,
                         M, N, n_chunks, nblk, row_bytes, x.stride(0), N,
                         QT=qtype, PH=PH, R=R, L=Lr, KB=KB, MR=MR, BN=BN, HAS_BIAS=bias is not None, DOT=bool(dot),
                         PF=pf, CB=GEOMETRY[qtype][0] * 256 // GEOMETRY[qtype][1],
                         DOT_F32=x.dtype != torch.float16,
                         DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", **kw)
    return out


def grouped_matmul(x: torch.Tensor, raw: torch.Tensor, qtype: int, N: int, K: int, w_off: torch.Tensor,
                   x_row: torch.Tensor, config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """out[g] = x[x_row[g]] @ W_g^T for every group g in one launch, W_g the [N, K] matrix of
    `qtype` blocks that starts w_off[g] bytes after raw's first byte: a new [len(w_off), N]
    tensor in x's dtype. w_off (int64, even) and x_row (int32) are on x's device; an offset may
    point into another allocation of that device (the expert cache's entries), which raw only
    anchors. `config` (BN, KB, num_warps) overrides the default."""
    if raw.dtype != torch.uint8 or raw.storage_offset() % 2 or K % GEOMETRY[qtype][1]:
        raise ValueError(f"grouped blocks of type {qtype} need uint8 bytes at an even offset and K ({K}) "
                         f"a multiple of {GEOMETRY[qtype][1]}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    ts, nblk, row_bytes, nparts, G, L = _geometry(qtype, K)
    n_chunks = triton.cdiv(K, 256)
    n = w_off.numel()
    out = torch.empty(n, N, dtype=x.dtype, device=x.device)
    if config is None:
        _, BN, KB, warps, _ = _config(1, N, n_chunks, qtype)
    else:
        BN, KB, warps = config
    PH, R, Lr = PHASES[qtype]
    kw = {} if INTERPRET else {"num_warps": warps}
    _grouped_kernel[(triton.cdiv(N, BN), n)](x, raw, raw.view(torch.float16), out, w_off, x_row, N,
                                             n_chunks, nblk, row_bytes, x.stride(0), N,
                                             QT=qtype, PH=PH, R=R, L=Lr, KB=KB, BN=BN, PF=PREFETCH,
                                             CB=ts * 256 // GEOMETRY[qtype][1], **kw)
    return out
