"""The fused dequant-matmul by whole rows of W: every K-step of a row in one program, up to 16
rows of activations at once (qkernels.matmul chooses it where it measured faster).

Like qkernels.py's kernels, it runs on the CPU under Triton's interpreter for the tests.
"""

from __future__ import annotations

import triton
import triton.language as tl

# NOTE [ the fused matmul by whole rows ]
# `rows_kernel` is the second fused matmul: a program owns BN whole rows of W and MR rows of x
# and walks all of K, KB chunk tiles a step, so there are no split-K partials and no second
# launch, and each weight is read once for all MR rows (small batches, speculative verification).
# - Each quant byte is loaded once and every part (nibble, bit pair) is taken from it.
# - A quant q of b bits becomes a float without a conversion instruction: the bits
#   0x3F800000 | q << (23 - b) are the float f = 1 + q / 2^b, and the run's scale and offset
#   fold into one fused multiply-add, w = f * (2^b * s) - (2^b * s + offset); the products
#   sum elementwise into a [MR, BN, runs, L] accumulator, reduced once at the end.
# - Loads of a tile align alike in every step: a step covers KB * PH chunks, PH (PHASES) the
#   chunks whose bytes make a multiple of 16 (Q6_K's 210-byte blocks: 8), each phase a static
#   offset; so Q6_K's loads are up to 16 bytes wide where a chunk at a time gave 2.
# Measured on an H200 (CUDA graphs, the 8B's matrices, 2026-12-01) against `_matmul_kernel`
# with its split-K: faster for Q5_K at 1 to 4 rows (1.1 to 1.5x), Q6_K at 2 rows (1.1 to 1.4x)
# and at 1 row on rows of 4096 values with 8192 or more of them (1.06x; the 128256-row head
# 418 -> 374 us); not faster for Q6_K's other single rows, slower for Q4_K and Q8_0 (17 us
# against 12 on 4096x4096 Q4_K). It is held back by occupancy (96 to 150 registers a thread,
# a layout conversion through shared memory a part) and each program's load-then-compute
# steps; prefetching the next steps into L2 changed nothing. `_rows_or_split` takes the faster kernel
# (where qgemv.py's, faster still at 1 and 2 rows, is not taken).
# The runs are those of NOTE [ parts of a chunk ]: R = KB * G runs of L values a part.


@triton.jit
def _mac(acc, w, xv):
    """acc [MR, BN, R, L] += w [BN, R, L] * x [MR, R, L], elementwise (summed once, at the end)."""
    return acc + w[None, :, :, :] * xv.to(tl.float32)[:, None, :, :]


@triton.jit
def _f(bits):
    """Float from the mantissa bits of a quant: 0x3F800000 | bits (the caller shifted q there)."""
    return (bits | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _chunks_mac(acc, xr, xok, raw, halfs, rowb, kb0, ph, n_chunks, nblk, QT: tl.constexpr, KB: tl.constexpr):
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
            acc = _mac(acc, w, xv)
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
            acc = _mac(acc, w, xv)
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
            acc = _mac(acc, w, xv)
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
                acc = _mac(acc, w, xv)
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
                    acc = _mac(acc, w, xv)
    return acc


# qtype id -> (phases PH, runs a chunk R, run length L) of _chunks_mac's tiles: a step covers
# KB * PH chunks, a tile [BN, KB * R, L]
PHASES = {2: (1, 1, 16), 3: (1, 1, 16), 6: (1, 1, 16), 7: (1, 1, 16), 8: (1, 1, 32),
          10: (4, 4, 16), 11: (8, 4, 16), 12: (1, 4, 32), 13: (1, 4, 32), 14: (8, 8, 16)}


@triton.jit
def rows_kernel(x, raw, halfs, out, bias, M, N, n_chunks, nblk, row_bytes, sxm, som,
                 QT: tl.constexpr, PH: tl.constexpr, R: tl.constexpr, L: tl.constexpr, KB: tl.constexpr,
                 MR: tl.constexpr, BN: tl.constexpr, HAS_BIAS: tl.constexpr):
    """out[M, N] = x[M, K] @ dequant(raw[N, K])^T (+ bias): BN whole rows of W by MR rows of x a
    program, on the CUDA cores (NOTE [ the fused matmul ])."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rm = tl.program_id(1) * MR + tl.arange(0, MR)
    ok_n = rn < N
    rowb = tl.minimum(rn, N - 1).to(tl.int64)[:, None, None] * row_bytes  # past-the-end rows read the last
    xr = x + rm.to(tl.int64)[:, None, None] * sxm
    xok = (rm < M)[:, None, None]
    acc = tl.zeros((MR, BN, KB * R, L), dtype=tl.float32)
    STEP: tl.constexpr = KB * PH
    for it in range(0, tl.cdiv(n_chunks, STEP)):
        kb0 = it * STEP  # a multiple of KB * PH, as the alignment of the loads needs
        for ph in tl.static_range(PH):
            acc = _chunks_mac(acc, xr, xok, raw, halfs, rowb, kb0, ph, n_chunks, nblk, QT, KB)
    y = tl.sum(tl.sum(acc, axis=3), axis=2)  # [MR, BN]
    if HAS_BIAS:
        y += tl.load(bias + rn, mask=ok_n, other=0).to(tl.float32)[None, :]
    tl.store(out + rm.to(tl.int64)[:, None] * som + rn[None, :], y.to(out.dtype.element_ty),
             mask=(rm < M)[:, None] & ok_n[None, :])
