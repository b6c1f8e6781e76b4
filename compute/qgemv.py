"""The fused dequant-matmul for decode on K-quants and the 32-value types (Q4_0, Q4_1, Q5_0, Q5_1,
Q8_0): whole rows of W a program, no split-K.

NOTE [ slices of a row ]
A program owns BN rows of W and MR rows of x (1 to 4: decode, small batches, verification) and
walks all of K, KB chunks of 256 values a step, so each weight is read once, every output is
written once, and there is no second launch (the split-K kernel's sum). Its lanes are the
(chunk, slice) pairs of a step: a slice is 8 values' quants (8 bytes of a 32-byte run that
shares its scales; 4 bytes of a 32-value block for Q4_0 to Q5_1), and static loops walk the runs
of a chunk (Q4_K's 4 groups and 2 nibbles, Q6_K's halves, runs and nibbles, the 32-value types' 8
blocks), so each scale is decoded with constant shifts. Words load 4 bytes at a time for Q4_K and
Q5_K (their blocks 4-aligned), else 2 (Q6_K's 210-byte blocks, the 32-value types' 18 to 34);
each tensor is [BN, S, 1] or [MR, S, 8], one layout (Triton converts none of them through shared
memory). A quant q of b bits becomes the float f = 1 + q / 2^b from its bits
(0x3F800000 | q << (23 - b): no conversion instruction), and with w = f * S - O for the run's
scale S = 2^b * d * sc and offset O the dot of a slice is S * sum(f * x) - O * sum(x): one
multiply-add a value and row, x loaded 8 values at once and split in registers. Q8_0 takes its
int8 exactly (2^23 + q + 128 from the bits, less 2^23 + 128), its offset being zero. A slice
of Q4_0 to Q5_1 is 4 quant bytes, whose low and high nibbles are 4 values 16 apart, so x is loaded
as two runs of 4 values.
Measured on an H200 (BENCHMARKS.md, "GEMV"): 1.1 to 1.7 TB/s on the 8B's matrices at one row,
1.3 to 2x the split-K kernel, and from 1.2x (Q6_K, 4 rows) to 3x at 2 rows. Slices of 16 bytes
(half the scale work, 11% fewer instructions) and the nibble (or Q6_K's run, Q8_0's block) in
the lanes (each warp's load of x on 4 lines of 128 bytes instead of 8) both measured slower,
as did 2 rows of W a program at one row of x, and more warps on a row. Q4_K at one row on the
larger matrices takes qgemv8.py's step on int8 x instead (NOTE [ int8 activations ]), faster there.

Like qkernels.py's kernels, it runs on the CPU under Triton's interpreter for the tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from layerstream.compute.qgemv8 import TYPES as X8_TYPES, q8_of, step8

# qtype id -> bytes a word of gemv_kernel's loads (4: aligned 32-bit words; 2: 16-bit ones)
WORD_BYTES = {12: 4, 13: 4, 14: 2, 8: 2, 2: 2, 3: 2, 6: 2, 7: 2}


@triton.jit
def k_scale_min(s0, s1, s2, sub: tl.constexpr):
    """Q4_K's and Q5_K's 6-bit scale and minimum of sub-block `sub` (0..7) from the 12 scale bytes
    as three little-endian words s0, s1, s2 (int32). s[i] = byte i: sub < 4: sc = s[sub] & 63,
    mn = s[sub + 4] & 63; sub >= 4: sc = s[sub + 4] & 15 | (s[sub - 4] >> 6) << 4,
    mn = s[sub + 4] >> 4 | (s[sub] >> 6) << 4."""
    if sub < 4:
        sc = (s0 >> (8 * sub)) & 63
        mn = (s1 >> (8 * sub)) & 63
    else:
        sc = ((s2 >> (8 * sub - 32)) & 15) | (((s0 >> (8 * sub - 26)) & 3) << 4)
        mn = ((s2 >> (8 * sub - 28)) & 15) | (((s1 >> (8 * sub - 26)) & 3) << 4)
    return sc, mn


@triton.jit
def _mantissa(bits):
    """Float 1 + q / 2^b from bits = q << (23 - b) (no conversion instruction)."""
    return (bits | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _x_units(xr, xo, ok):
    """x at xr + xo [MR, S, 8] as float32, split in registers into x_i [MR, S, 1] (i = 0..7): value i,
    byte i % 2 of 16-bit word i // 2."""
    xv = tl.load(xr + xo, mask=ok, other=0).to(tl.float32)
    e, o = tl.split(tl.reshape(xv, (xv.shape[0], xv.shape[1], 2, 2, 2)))  # (i // 4, i // 2 % 2) for i % 2
    e0, e1 = tl.split(e)
    o0, o1 = tl.split(o)
    x0, x4 = tl.split(e0)
    x2, x6 = tl.split(e1)
    x1, x5 = tl.split(o0)
    x3, x7 = tl.split(o1)
    return (x0[:, :, None], x1[:, :, None], x2[:, :, None], x3[:, :, None], x4[:, :, None], x5[:, :, None],
            x6[:, :, None], x7[:, :, None])


@triton.jit
def _dot8(f0, f1, f2, f3, f4, f5, f6, f7, x0, x1, x2, x3, x4, x5, x6, x7):
    """sum_i f_i [BN, S, 1] * x_i [MR, S, 1] -> [MR, BN, S, 1], one multiply-add a value and weight row."""
    t = f0[None] * x0[:, None]
    t += f1[None] * x1[:, None]
    t += f2[None] * x2[:, None]
    t += f3[None] * x3[:, None]
    t += f4[None] * x4[:, None]
    t += f5[None] * x5[:, None]
    t += f6[None] * x6[:, None]
    return t + f7[None] * x7[:, None]


@triton.jit
def _acc(acc, t, xs, scale, off, HAS_OFF: tl.constexpr):
    """acc [MR, BN, S, 1] += scale * t - off * xs, for t like acc, xs [MR, S, 1], scale and off [BN, S, 1]."""
    acc += t * scale[None]
    if HAS_OFF:
        acc -= off[None] * xs[:, None]
    return acc


@triton.jit
def _units4(w16, off, ok):
    """The four 16-bit words at off .. off + 3 [BN, S, 1] as int32 (separate loads: 2-aligned only)."""
    return (tl.load(w16 + off, mask=ok, other=0).to(tl.int32), tl.load(w16 + off + 1, mask=ok, other=0).to(tl.int32),
            tl.load(w16 + off + 2, mask=ok, other=0).to(tl.int32), tl.load(w16 + off + 3, mask=ok, other=0).to(tl.int32))


@triton.jit
def _q4(w, P: tl.constexpr, B: tl.constexpr):
    """Q4_K's f = 1 + q / 16 of nibble P of the byte at bit B of a 32-bit word."""
    return _mantissa(((w >> (B + 4 * P)) & 15) << 19)


@triton.jit
def _q5(w, hw, P: tl.constexpr, sub: tl.constexpr, B: tl.constexpr):
    """Q5_K's f = 1 + q / 32: nibble P of the byte at bit B of w, and bit `sub` of the byte at bit B of hw."""
    return _mantissa((((w >> (B + 4 * P)) & 15) << 18) | (((hw >> (B + sub)) & 1) << 22))


@triton.jit
def _q6(ql, qh, r: tl.constexpr, P: tl.constexpr, B: tl.constexpr):
    """Q6_K's f = 1 + q / 64 of the byte at bit B of the ql and qh words, nibble P, qh bits 2r + 4P."""
    return _mantissa((((ql >> (B + 4 * P)) & 15) << 17) | (((qh >> (B + 2 * r + 4 * P)) & 3) << 21))


@triton.jit
def _q45(w, hb, P: tl.constexpr, B: tl.constexpr, FIVE: tl.constexpr):
    """Q4_0's / Q4_1's f = 1 + q / 16 of nibble P of the byte at bit B of a 16-bit word; Q5_0's /
    Q5_1's (FIVE) f = 1 + q / 32, its fifth bit the low bit of hb."""
    if FIVE:
        return _mantissa((((w >> (B + 4 * P)) & 15) << 18) | ((hb & 1) << 22))
    return _mantissa(((w >> (B + 4 * P)) & 15) << 19)


@triton.jit
def _q8(qv, B: tl.constexpr):
    """Q8_0's int8 at bit B of a 16-bit word, exactly, as float32: 2^23 + (q + 128) from its bits, less
    2^23 + 128 (a subtraction, no conversion instruction)."""
    return ((((qv >> B) & 0xFF) ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def step(acc, xr, xok, w32, w16, raw8, halfs, rowb, kb0, n_chunks, nblk,
         QT: tl.constexpr, KB: tl.constexpr, EVEN: tl.constexpr):
    """acc [MR, BN, S, 1] += x . W over chunks kb0 .. kb0 + KB - 1 for the rows at word offsets
    rowb [BN, 1, 1] (32-bit words for Q4_K / Q5_K, 16-bit for Q6_K / Q8_0): slice q of chunk kb
    on lane-dimension index kb * 4 + q (NOTE [ slices of a row ])."""
    s = tl.arange(0, KB * 4)[None, :, None]  # [1, S, 1]
    kb = kb0 + s // 4
    q = s % 4
    okb = (kb < n_chunks) | EVEN
    xo0 = kb * 256 + q * 8 + tl.arange(0, 8)[None, None, :]  # [1, S, 8]
    if QT == 12 or QT == 13:
        # Q4_K / Q5_K: d | dmin | 12 B scales | (qh 32 B) | qs 128 B. Group g = 32 qs bytes, whose low
        # nibbles are values g * 64 + l and high ones g * 64 + 32 + l; slice q = bytes 8q .. 8q + 7
        BW: tl.constexpr = 36 if QT == 12 else 44  # words a block
        QO: tl.constexpr = 4 if QT == 12 else 12
        base = rowb + kb * BW  # [BN, S, 1]
        w0 = tl.load(w32 + base, mask=okb, other=0)  # d | dmin
        s0 = tl.load(w32 + base + 1, mask=okb, other=0)  # scale bytes 0..3
        s1 = tl.load(w32 + base + 2, mask=okb, other=0)  # 4..7
        s2 = tl.load(w32 + base + 3, mask=okb, other=0)  # 8..11
        d = (w0 & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        dmin = ((w0 >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        if QT == 13:  # qh bytes 8q .. 8q + 7
            h0 = tl.load(w32 + base + 4 + q * 2, mask=okb, other=0)
            h1 = tl.load(w32 + base + 5 + q * 2, mask=okb, other=0)
        for g in tl.static_range(4):
            a = tl.load(w32 + base + QO + g * 8 + q * 2, mask=okb, other=0)  # qs bytes 8q .. 8q + 3 of group g
            b = tl.load(w32 + base + QO + g * 8 + q * 2 + 1, mask=okb, other=0)  # 8q + 4 .. 8q + 7
            for P in tl.static_range(2):
                sub = 2 * g + P
                sc, mn = k_scale_min(s0, s1, s2, sub)
                x0, x1, x2, x3, x4, x5, x6, x7 = _x_units(xr, xo0 + (g * 64 + P * 32), xok & okb)
                if QT == 12:  # f = 1 + q / 16
                    S = d * sc.to(tl.float32) * 16.0
                    t = _dot8(_q4(a, P, 0), _q4(a, P, 8), _q4(a, P, 16), _q4(a, P, 24), _q4(b, P, 0), _q4(b, P, 8),
                              _q4(b, P, 16), _q4(b, P, 24), x0, x1, x2, x3, x4, x5, x6, x7)
                else:  # f = 1 + q / 32, q = nibble | bit `sub` of qh[l] << 4
                    S = d * sc.to(tl.float32) * 32.0
                    t = _dot8(_q5(a, h0, P, sub, 0), _q5(a, h0, P, sub, 8), _q5(a, h0, P, sub, 16),
                              _q5(a, h0, P, sub, 24), _q5(b, h1, P, sub, 0), _q5(b, h1, P, sub, 8),
                              _q5(b, h1, P, sub, 16), _q5(b, h1, P, sub, 24), x0, x1, x2, x3, x4, x5, x6, x7)
                xs = (x0 + x1) + (x2 + x3) + (x4 + x5) + (x6 + x7)
                acc = _acc(acc, t, xs, S, S + dmin * mn.to(tl.float32), True)
    elif QT == 14:
        # Q6_K: ql 128 B | qh 64 B | 16 x int8 scales | d. Run (h, r) = ql bytes h * 64 + r * 32 + l: low
        # nibbles are values h * 128 + r * 32 + l with bits 2r of qh[h * 32 + l], high ones 64 further
        # on with bits 4 + 2r; scale h * 8 + l // 16 + 2r (+ 4 high); slice q = l in 8q .. 8q + 7
        base = rowb + kb * 105  # [BN, S, 1] in 16-bit words
        d = tl.load(halfs + base + 104, mask=okb, other=0).to(tl.float32)
        for h in tl.static_range(2):
            qh0, qh1, qh2, qh3 = _units4(w16, base + 64 + h * 16 + q * 4, okb)
            for r in tl.static_range(2):
                ql0, ql1, ql2, ql3 = _units4(w16, base + h * 32 + r * 16 + q * 4, okb)
                for P in tl.static_range(2):
                    sc = tl.load(raw8 + 2 * base + 192 + h * 8 + q // 2 + 2 * r + 4 * P, mask=okb, other=0)
                    S = d * sc.to(tl.int8, bitcast=True).to(tl.float32) * 64.0  # f = 1 + q / 64
                    x0, x1, x2, x3, x4, x5, x6, x7 = _x_units(xr, xo0 + (h * 128 + P * 64 + r * 32), xok & okb)
                    t = _dot8(_q6(ql0, qh0, r, P, 0), _q6(ql0, qh0, r, P, 8), _q6(ql1, qh1, r, P, 0),
                              _q6(ql1, qh1, r, P, 8), _q6(ql2, qh2, r, P, 0), _q6(ql2, qh2, r, P, 8),
                              _q6(ql3, qh3, r, P, 0), _q6(ql3, qh3, r, P, 8), x0, x1, x2, x3, x4, x5, x6, x7)
                    xs = (x0 + x1) + (x2 + x3) + (x4 + x5) + (x6 + x7)
                    acc = _acc(acc, t, xs, S, 1.5 * S, True)  # w = d * sc * (q - 32)
    elif QT == 8:
        # Q8_0: d f16 | 32 x int8, 8 blocks (272 B) a chunk; slice q of block b = quants 8q .. 8q + 7
        for b in tl.static_range(8):
            okq = ((kb * 8 + b) < nblk) | EVEN
            base = rowb + kb * 136 + b * 17  # [BN, S, 1] in 16-bit words
            q0, q1, q2, q3 = _units4(w16, base + 1 + q * 4, okq)
            d = tl.load(halfs + base, mask=okq, other=0).to(tl.float32)
            x0, x1, x2, x3, x4, x5, x6, x7 = _x_units(xr, xo0 + b * 32, xok & okq)
            t = _dot8(_q8(q0, 0), _q8(q0, 8), _q8(q1, 0), _q8(q1, 8), _q8(q2, 0), _q8(q2, 8), _q8(q3, 0), _q8(q3, 8),
                      x0, x1, x2, x3, x4, x5, x6, x7)
            acc = _acc(acc, t, t, d, d, False)
    else:
        # Q4_0, Q4_1, Q5_0, Q5_1: d f16 | (m f16, _1) | (qh 4 B, Q5) | 16 qs bytes, 32 values a block, 8
        # blocks a chunk, read as 16-bit words (BW a block); slice q of block b = qs bytes
        # 4q .. 4q + 3, whose low nibbles are values 4q + i and high ones 16 + 4q + i (i = 0..3), their
        # fifth bits qh bits 4q + i and 16 + 4q + i. w = d * (q - 2^(b-1)) (_0) or d * q + m (_1) is
        # S * f - O with S = 2^b * d: O = 1.5 * S (_0), S - m (_1)
        FIVE: tl.constexpr = QT == 6 or QT == 7
        MIN: tl.constexpr = QT == 3 or QT == 7
        BW: tl.constexpr = 9 if QT == 2 else 10 if QT == 3 else 11 if QT == 6 else 12
        QH: tl.constexpr = 1 if QT == 6 else 2
        QS: tl.constexpr = 1 if QT == 2 else 2 if QT == 3 else 3 if QT == 6 else 4
        j = tl.arange(0, 8)[None, None, :]
        xo4 = kb * 256 + q * 4 + (j // 4) * 16 + j % 4  # [1, S, 8]: the slice's values in lane order
        for b in tl.static_range(8):
            okq = ((kb * 8 + b) < nblk) | EVEN
            base = rowb + kb * (8 * BW) + b * BW  # [BN, S, 1] in 16-bit words
            a = tl.load(w16 + base + QS + q * 2, mask=okq, other=0).to(tl.int32)  # qs bytes 4q, 4q + 1
            c = tl.load(w16 + base + QS + q * 2 + 1, mask=okq, other=0).to(tl.int32)  # 4q + 2, 4q + 3
            d = tl.load(halfs + base, mask=okq, other=0).to(tl.float32)
            if FIVE:
                hl = tl.load(w16 + base + QH, mask=okq, other=0).to(tl.int32) >> (q * 4)  # qh bits 4q ..
                hh = tl.load(w16 + base + QH + 1, mask=okq, other=0).to(tl.int32) >> (q * 4)  # 16 + 4q ..
                S = d * 32.0
            else:
                hl = a
                hh = a
                S = d * 16.0
            if MIN:
                off = S - tl.load(halfs + base + 1, mask=okq, other=0).to(tl.float32)
            else:
                off = 1.5 * S
            x0, x1, x2, x3, x4, x5, x6, x7 = _x_units(xr, xo4 + b * 32, xok & okq)
            t = _dot8(_q45(a, hl, 0, 0, FIVE), _q45(a, hl >> 1, 0, 8, FIVE), _q45(c, hl >> 2, 0, 0, FIVE),
                      _q45(c, hl >> 3, 0, 8, FIVE), _q45(a, hh, 1, 0, FIVE), _q45(a, hh >> 1, 1, 8, FIVE),
                      _q45(c, hh >> 2, 1, 0, FIVE), _q45(c, hh >> 3, 1, 8, FIVE), x0, x1, x2, x3, x4, x5, x6, x7)
            xs = (x0 + x1) + (x2 + x3) + (x4 + x5) + (x6 + x7)
            acc = _acc(acc, t, xs, S, off, True)
    return acc


@triton.jit
def gemv_kernel(x, xds, w32, w16, raw8, halfs, out, bias, M, N, n_chunks, nblk, row_words, sxm, som,
                QT: tl.constexpr, MR: tl.constexpr, BN: tl.constexpr, KB: tl.constexpr,
                HAS_BIAS: tl.constexpr, EVEN: tl.constexpr, X_EVEN: tl.constexpr, X8: tl.constexpr,
                ASM: tl.constexpr):
    """out[M, N] = x[M, K] @ dequant(W[N, K])^T (+ bias): BN whole rows of W by MR rows of x a
    program (NOTE [ slices of a row ]); EVEN: K is KB chunks a step exactly (no mask on K), X_EVEN:
    M is MR rows a program exactly (no mask on x's rows); X8 (Q4_K): x is `quantize_x`'s int8 (as
    32-bit words), xds its blocks' scales and sums (NOTE [ int8 activations ] in qgemv8.py; ASM: dp4a)."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rm = tl.program_id(1) * MR + tl.arange(0, MR)
    ok_n = rn < N
    rowb = tl.minimum(rn, N - 1).to(tl.int64)[:, None, None] * row_words  # past-the-end rows read the last
    xrow = rm.to(tl.int64)[:, None, None]
    xr = x + xrow * sxm
    xok = (rm < M)[:, None, None] | X_EVEN
    acc = tl.zeros((MR, BN, KB * 4, 1), dtype=tl.float32)
    for kb0 in range(0, n_chunks, KB):
        if X8:
            acc = step8(acc, xr, xds + xrow * (n_chunks * 16), xok, w32, rowb, kb0, n_chunks, KB, EVEN, ASM)
        else:
            acc = step(acc, xr, xok, w32, w16, raw8, halfs, rowb, kb0, n_chunks, nblk, QT, KB, EVEN)
    y = tl.sum(tl.sum(acc, axis=3), axis=2)  # [MR, BN]
    if HAS_BIAS:
        y += tl.load(bias + rn, mask=ok_n, other=0).to(tl.float32)[None, :]
    tl.store(out + rm.to(tl.int64)[:, None] * som + rn[None, :], y.to(out.dtype.element_ty),
             mask=(rm < M)[:, None] & ok_n[None, :])


@triton.jit
def rounded_sums(acc, dt: tl.constexpr):
    """A program's products [rows, BN] from its accumulator [rows, BN, KB * 4, 1], rounded to dt
    as a separate launch's output would be, and back to float32."""
    return tl.sum(tl.sum(acc, axis=3), axis=2).to(dt).to(tl.float32)


@triton.jit
def silu_times(y, u, dt: tl.constexpr):
    """SiLU(y) * u, SiLU's output rounded to dt as a separate op's (y and u rounded already)."""
    return (y / (1.0 + tl.exp(-y))).to(dt).to(tl.float32) * u


# NOTE [ several matrices a launch ]
# A decode layer's q, k and v (and gate and up) read one x: gemv_many_kernel takes up to three
# matrices of one type and K where they lie (no copy), as word offsets from one base, and picks
# each program's matrix (its segment) from the program id; each matrix's output is its own
# contiguous [M, N_s] piece of one buffer, so the callers get the same tensors as from separate
# launches, bit-identical to a separate launch in the same configuration (the launch's configuration
# is chosen for all its rows, so a small matrix may sum its lanes in another order than alone). GLU pairs rows instead: program i walks
# row block i of gate and of up in one loop and writes SiLU(gate) * up, each rounded to x's dtype
# first as the separate ops round them; RES adds a residual in the epilogue, rounded the same way
# (o and down: x + linear(...)). A layer of an 8B then launches 3 or 4 matrices where it launched
# 7 and no separate SiLU, product or residual add.
@triton.jit
def gemv_many_kernel(x, xds, w32, w16, raw8, halfs, out, res, M, n_chunks, nblk, row_words, sxm,
                     off0, off1, off2, n0, n1, n2, p1, p2, o1, o2,
                     QT: tl.constexpr, MR: tl.constexpr, BN: tl.constexpr, KB: tl.constexpr,
                     EVEN: tl.constexpr, X_EVEN: tl.constexpr, GLU: tl.constexpr, HAS_RES: tl.constexpr,
                     X8: tl.constexpr, ASM: tl.constexpr, OFF4: tl.constexpr):
    """out (flat) = the [M, N_s] products x @ dequant(W_s)^T of segments s = 0..2 (W_s: n_s rows at
    word offset off_s of the blocks, programs p_s.. and output elements o_s..; NOTE [ several
    matrices a launch ]); GLU: SiLU(x @ W_0^T) * (x @ W_1^T) [M, n0]; HAS_RES: + res [M, n0]; X8: as
    gemv_kernel's; OFF4: every off_s a multiple of 4 words (16-byte loads)."""
    pid = tl.program_id(0)
    seg = (pid >= p1).to(tl.int32) + (pid >= p2).to(tl.int32)
    first = tl.where(seg == 0, 0, tl.where(seg == 1, p1, p2))
    N = tl.where(seg == 0, n0, tl.where(seg == 1, n1, n2))
    off = tl.where(seg == 0, off0, tl.where(seg == 1, off1, off2)).to(tl.int64)
    up = off1.to(tl.int64)  # (GLU: the up rows')
    if OFF4:
        off = tl.multiple_of(off, 4)
        up = tl.multiple_of(up, 4)
    obase = tl.where(seg == 0, 0, tl.where(seg == 1, o1, o2)).to(tl.int64)
    rn = (pid - first) * BN + tl.arange(0, BN)
    rm = tl.program_id(1) * MR + tl.arange(0, MR)
    ok_n = rn < N
    rows = tl.minimum(rn, N - 1).to(tl.int64)[:, None, None] * row_words  # past-the-end rows read the last
    xrow = rm.to(tl.int64)[:, None, None]
    xr = x + xrow * sxm
    xdsr = xds + xrow * (n_chunks * 16)
    xok = (rm < M)[:, None, None] | X_EVEN
    acc = tl.zeros((MR, BN, KB * 4, 1), dtype=tl.float32)
    if GLU:
        acc_u = tl.zeros((MR, BN, KB * 4, 1), dtype=tl.float32)
    for kb0 in range(0, n_chunks, KB):
        if X8:
            acc = step8(acc, xr, xdsr, xok, w32, off + rows, kb0, n_chunks, KB, EVEN, ASM)
        else:
            acc = step(acc, xr, xok, w32, w16, raw8, halfs, off + rows, kb0, n_chunks, nblk, QT, KB, EVEN)
        if GLU:
            if X8:
                acc_u = step8(acc_u, xr, xdsr, xok, w32, up + rows, kb0, n_chunks, KB, EVEN, ASM)
            else:
                acc_u = step(acc_u, xr, xok, w32, w16, raw8, halfs, up + rows, kb0, n_chunks,
                             nblk, QT, KB, EVEN)
    dt = out.dtype.element_ty
    y = rounded_sums(acc, dt)  # [MR, BN]
    mask = (rm < M)[:, None] & ok_n[None, :]
    o = obase + rm.to(tl.int64)[:, None] * N + rn[None, :]
    if GLU:
        y = silu_times(y, rounded_sums(acc_u, dt), dt)
    if HAS_RES:
        y += tl.load(res + o, mask=mask, other=0).to(tl.float32)
    tl.store(out + o, y.to(dt), mask=mask)


def many_supported(raws: list[torch.Tensor], qtype: int) -> bool:
    """Whether gemv_many_kernel takes these matrices' blocks from one base: each `supports`, and
    their distances from the first whole words."""
    wb = WORD_BYTES.get(qtype)
    return (wb is not None and all(supports(r, qtype) for r in raws)
            and all((r.data_ptr() - raws[0].data_ptr()) % wb == 0 for r in raws))


def gemv_many(x: torch.Tensor, raws: list[torch.Tensor], qtype: int, Ns: list[int], K: int, row_bytes: int,
              nblk: int, MR: int, BN: int, KB: int, warps: int, interpret: bool, glu: bool = False,
              residual: torch.Tensor | None = None, x8: bool = False) -> list[torch.Tensor]:
    """x [M, K] by 1 to 3 matrices of one type (their blocks `raws`, [Ns[s], K] each; the caller
    checked `many_supported`) in one launch: the [M, N_s] products (NOTE [ several matrices a
    launch ]); `glu`: [SiLU(x @ W_0^T) * (x @ W_1^T)] (Ns equal); `residual` [M, N_0]: added to the
    one product; `x8`: on x quantized to int8 (NOTE [ int8 activations ] in qgemv8.py)."""
    S = len(raws)
    if not 1 <= S <= 3 or (glu and (S != 2 or Ns[0] != Ns[1])) or (residual is not None and S != 1 and not glu):
        raise ValueError(f"gemv_many takes 1 to 3 matrices (2 of one shape with glu, a residual with one); got {Ns}")
    M = x.shape[0]
    wb = WORD_BYTES[qtype]
    n_chunks = triton.cdiv(K, 256)
    base = raws[0]
    offs = [(r.data_ptr() - base.data_ptr()) // wb for r in raws] + [0] * (3 - S)
    n = list(Ns) + [1] * (3 - S)
    progs = [triton.cdiv(v, BN) for v in Ns] + [0] * (3 - S)
    if glu:  # programs over the gate's rows only; each walks the up rows too
        progs = [progs[0], 0, 0]
    never = 1 << 30  # the first program of a segment that is not there
    p1 = progs[0] if progs[1] else never
    p2 = progs[0] + progs[1] if progs[2] else never
    o1, o2 = M * n[0], M * (n[0] + n[1])
    total = M * Ns[0] if glu else M * sum(Ns)
    out = torch.empty(total, dtype=x.dtype, device=x.device)
    words = base.view(torch.int32 if wb == 4 else torch.int16)
    kw = {} if interpret else {"num_warps": warps}
    res = residual if residual is not None else out
    if residual is not None and (residual.shape != (M, Ns[0]) or not residual.is_contiguous() or residual.dtype != x.dtype):
        raise ValueError(f"gemv_many's residual must be a contiguous [{M}, {Ns[0]}] tensor of x's dtype")
    xa, xds, sxm = _activations(x, qtype, K, x8, interpret)
    gemv_many_kernel[(sum(progs), triton.cdiv(M, MR))](
        xa, xds, words, words, base, base.view(torch.float16), out, res, M, n_chunks, nblk, row_bytes // wb, sxm,
        offs[0], offs[1], offs[2], n[0], n[1], n[2], p1, p2, o1, o2,
        QT=qtype, MR=MR, BN=BN, KB=KB, EVEN=n_chunks % KB == 0 and K % 256 == 0, X_EVEN=M % MR == 0,
        GLU=glu, HAS_RES=residual is not None, X8=x8, ASM=not interpret, OFF4=all(o % 4 == 0 for o in offs), **kw)
    if glu:
        return [out.view(M, Ns[0])]
    outs, at = [], 0
    for v in Ns:
        outs.append(out[at:at + M * v].view(M, v))
        at += M * v
    return outs


def supports(raw: torch.Tensor, qtype: int) -> bool:
    """Whether gemv_kernel takes these blocks: its types, with words aligned (Q4_K / Q5_K: 4 bytes)."""
    return qtype in WORD_BYTES and (WORD_BYTES[qtype] == 2 or raw.storage_offset() % 4 == 0)


def _activations(x: torch.Tensor, qtype: int, K: int, x8: bool, interpret: bool) -> tuple:
    """The kernels' x, xds and x's row stride: x itself, or with `x8` its int8 quantization as 32-bit
    words and its blocks' scales and sums (qgemv8.quantize_x, or the form x carries: q8_of; Q4_K)."""
    if not x8:
        return x, x, x.stride(0)
    if qtype not in X8_TYPES or K % 256:
        raise ValueError(f"int8 activations take Q4_K with K a multiple of 256, not type {qtype} at K {K}")
    xq, xds = q8_of(x, interpret)
    return xq.view(torch.int32), xds, K // 4


def gemv(x: torch.Tensor, raw: torch.Tensor, qtype: int, N: int, K: int, row_bytes: int, nblk: int,
         bias: torch.Tensor | None, MR: int, BN: int, KB: int, warps: int, interpret: bool,
         x8: bool = False) -> torch.Tensor:
    """x [M, K] @ W^T (+ bias) by gemv_kernel (the caller checked the blocks): a new [M, N] tensor;
    `x8`: on x quantized to int8 (NOTE [ int8 activations ] in qgemv8.py)."""
    M = x.shape[0]
    wb = WORD_BYTES[qtype]
    n_chunks = triton.cdiv(K, 256)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    words = raw.view(torch.int32 if wb == 4 else torch.int16)
    kw = {} if interpret else {"num_warps": warps}
    xa, xds, sxm = _activations(x, qtype, K, x8, interpret)
    gemv_kernel[(triton.cdiv(N, BN), triton.cdiv(M, MR))](
        xa, xds, words, words, raw, raw.view(torch.float16), out, bias if bias is not None else out, M, N,
        n_chunks, nblk, row_bytes // wb, sxm, N, QT=qtype, MR=MR, BN=BN, KB=KB, HAS_BIAS=bias is not None,
        EVEN=n_chunks % KB == 0 and K % 256 == 0, X_EVEN=M % MR == 0, X8=x8, ASM=not interpret, **kw)
    return out
