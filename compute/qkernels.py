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

from layerstream.compute import qgemv, qsmall
from layerstream.compute.kernel_shapes import SMALL_SPLITS, TARGET_PROGRAMS, small_shape
from layerstream.compute.qkernels_rows import PHASES, rows_kernel

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
GEMV_KINDS = ("gemv", "gemv8")  # qgemv's configurations: on x as it is, on x quantized to int8 (qgemv8.py)

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


@triton.jit
def _row_dot(xrow, raw, halfs, rowb, ok_r, nblk, k_lo, k_hi, QT: tl.constexpr, NPARTS: tl.constexpr,
             G: tl.constexpr, L: tl.constexpr, BN: tl.constexpr):
    """[BN] float32: one row of activations (xrow, K values) times the BN weight rows at byte
    offsets rowb, over chunks k_lo..k_hi-1, on the CUDA cores (the decode matmuls' inner loop)."""
    acc = tl.zeros((BN,), dtype=tl.float32)
    for kb in range(k_lo, k_hi):
        for p in tl.static_range(NPARTS):
            w, e, ok = _part(raw, halfs, rowb, kb, ok_r, nblk, QT, p, G, L)
            xv = tl.load(xrow + kb * 256 + e, mask=ok, other=0).to(tl.float32)
            acc += tl.sum(tl.sum(w * xv[None, :, :], axis=2), axis=1)
    return acc


@triton.jit
def _matmul_kernel(x, raw, halfs, out, bias, M, N, n_chunks, chunks_per_split, nblk, row_bytes, sxm, som, sos,
                   QT: tl.constexpr, NPARTS: tl.constexpr, G: tl.constexpr, L: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
                   DOT_PRECISION: tl.constexpr = "ieee"):
    """out[s, M, N] = x[M, K] @ dequant(raw[N, K])^T over split s of the chunks (+ bias on split 0).

    BM == 1 multiplies and sums on the CUDA cores; BM > 1 uses tl.dot, on float16 operands (or,
    DOT_F32, float32 ones: at full precision ("ieee") for float32 runs, as TF32 ("tf32") for
    bfloat16 runs, whose activations may exceed float16's range (Gemma 3's do). TF32 keeps
    float32's range; these kernels are bound by the weights' bytes, not by the dot's rate).
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    rm = pid_m * BM + tl.arange(0, BM)
    ok_n = rn < N
    ok_r = ok_n[:, None, None]
    rowb = rn[:, None, None].to(tl.int64) * row_bytes
    k_lo = split * chunks_per_split
    k_hi = tl.minimum(k_lo + chunks_per_split, n_chunks)
    if BM == 1:
        acc = _row_dot(x + pid_m * sxm, raw, halfs, rowb, ok_r, nblk, k_lo, k_hi, QT, NPARTS, G, L, BN)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for kb in range(k_lo, k_hi):
            for p in tl.static_range(NPARTS):
                w, e, ok = _part(raw, halfs, rowb, kb, ok_r, nblk, QT, p, G, L)
                xv = tl.load(x + rm[:, None, None] * sxm + (kb * 256 + e)[None, :, :],
                             mask=(rm[:, None, None] < M) & ok[None, :, :], other=0)
                if DOT_F32:
                    acc += tl.dot(tl.reshape(xv, (BM, G * L)).to(tl.float32),
                                  tl.trans(tl.reshape(w, (BN, G * L))), input_precision=DOT_PRECISION)
                else:
                    acc += tl.dot(tl.reshape(xv, (BM, G * L)).to(tl.float16),
                                  tl.trans(tl.reshape(w, (BN, G * L)).to(tl.float16)))
    if HAS_BIAS:
        b = tl.load(bias + rn, mask=ok_n, other=0).to(tl.float32) * (split == 0).to(tl.float32)
        acc += b[None, :] if BM > 1 else b
    out += split * sos
    if BM == 1:
        tl.store(out + pid_m * som + rn, acc.to(out.dtype.element_ty), mask=ok_n)
    else:
        tl.store(out + rm[:, None] * som + rn[None, :], acc.to(out.dtype.element_ty),
                 mask=(rm[:, None] < M) & ok_n[None, :])


@triton.jit
def _grouped_kernel(x, raw, halfs, out, w_off, x_row, N, n_chunks, nblk, row_bytes, sxm, som,
                    QT: tl.constexpr, NPARTS: tl.constexpr, G: tl.constexpr, L: tl.constexpr, BN: tl.constexpr):
    """out[grp, N] = x[x_row[grp], K] @ dequant(W_grp)^T, where W_grp is a [N, K] matrix of blocks
    starting w_off[grp] bytes from raw: many matrices of one type and shape in one launch (the
    experts a step chose). One row of activations a group, on the CUDA cores, K not split."""
    pid_n = tl.program_id(0)
    grp = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    ok_n = rn < N
    ok_r = ok_n[:, None, None]
    rowb = tl.load(w_off + grp) + rn[:, None, None].to(tl.int64) * row_bytes
    xr = tl.load(x_row + grp).to(tl.int64)
    acc = _row_dot(x + xr * sxm, raw, halfs, rowb, ok_r, nblk, 0, n_chunks, QT, NPARTS, G, L, BN)
    tl.store(out + grp.to(tl.int64) * som + rn, acc.to(out.dtype.element_ty), mask=ok_n)


@triton.jit
def _sum_splits_kernel(part, out, n, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = sum over s of part[s, i], in split order (deterministic), cast to out's dtype."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        acc += tl.load(part + s * n + i, mask=ok, other=0)
    tl.store(out + i, acc.to(out.dtype.element_ty), mask=ok)


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


def geometry(qtype: int, K: int):
    """(bytes a block, blocks a row, bytes a row, parts a chunk, G, L) of [*, K] blocks of `qtype`."""
    ts, qk, nparts, G, L = GEOMETRY[qtype]
    return ts, K // qk, K // qk * ts, nparts, G, L


def _check(raw: torch.Tensor, qtype: int, N: int, K: int) -> None:
    ts, nblk, row_bytes = geometry(qtype, K)[:3]
    if raw.dtype != torch.uint8 or raw.numel() != N * row_bytes or not raw.is_contiguous() or raw.storage_offset() % 2:
        raise ValueError(f"blocks of type {qtype} for [{N}, {K}] need {N * row_bytes} contiguous, 2-aligned "
                         f"uint8 bytes; got {raw.numel()} ({raw.dtype})")


def dequantize_into(raw: torch.Tensor, qtype: int, N: int, K: int, out: torch.Tensor, BN: int | None = None) -> torch.Tensor:
    """Dequantize raw blocks of a [N, K] matrix into `out` (a [N, K] view, any float dtype)."""
    _check(raw, qtype, N, K)
    BN = BN or (64 if INTERPRET else 16)
    ts, nblk, row_bytes, nparts, G, L = geometry(qtype, K)
    grid = (triton.cdiv(N, BN), triton.cdiv(K, 256))
    _dequant_kernel[grid](raw, raw.view(torch.float16), out, N, K, nblk, row_bytes, out.stride(0),
                          QT=qtype, NPARTS=nparts, G=G, L=L, BN=BN, enable_fp_fusion=False)
    return out




def _config(M: int, N: int, n_chunks: int) -> tuple[int, int, int, int]:
    """(BM, BN, num_warps, splits) for a [M, N] output, from the sweep on an H200 recorded in
    BENCHMARKS.md: one warp on 4 rows (8 for head-sized N) per program, K split until about
    TARGET_PROGRAMS programs run; two rows of activations are cheaper as two programs reading
    the same weights (the second read hits L2) than as a padded tl.dot, which wins from 3 rows."""
    if M <= 2:
        BM, BN, warps = 1, (8 if N >= 32768 else 4), 1
    else:
        BM, BN, warps = 16, 32, 4
    if INTERPRET:  # programs run one after another in Python: fewer, larger ones (numpy-wide)
        BN = min(256, triton.next_power_of_2(N))
    tiles = triton.cdiv(N, BN) * (M if BM == 1 else triton.cdiv(M, BM))
    splits = max(1, min(n_chunks // 2, triton.cdiv(TARGET_PROGRAMS, tiles)))
    if not INTERPRET and not torch.cuda.is_current_stream_capturing():
        # NOTE: launched one by one (the streaming pipeline), a call costs ~35 us of Python and
        # Triton launch overhead, more than the split saves; the summing kernel doubles it
        # (measured on the H200: 4096x4096 Q4_K 35 us eager unsplit, 53 us split in 4). CUDA
        # graphs (the resident engine's decode) replay without launch cost: there, split.
        splits = 1
    return BM, BN, warps, splits


def _gemv_config(M: int, N: int, K: int, qtype: int) -> tuple | None:
    """("gemv", MR, BN, KB, num_warps) for qgemv.gemv_kernel where it measured faster than the other
    kernels on an H200 (CUDA graphs, BENCHMARKS.md "GEMV"), else None: one or two rows of x for
    every type, 3 and 4 for Q4_K (Q5_K's and Q6_K's rows kernel and Q8_0's split-K stay ahead there)
    on matrices of at least 1024 x 4096 (the 8B's; Q4_0 to Q5_1 there not measured, so not taken);
    on smaller ones (SmolLM2's, the 1B's and the MoE's attention) one or two rows where K takes at
    most two steps, which saves the split-K kernel's second launch that dominates a tiny matrix's
    time. One warp a program, its 32 lanes on 8 chunks; on 1024 to 2047 rows of W, two warps on 16
    chunks. ("gemv8", ...) for Q4_K at one row on 2048 rows or more: x quantized to int8
    (qgemv8.py), faster there than the float step, slower on 1024 rows (BENCHMARKS.md, "GEMV on int8
    activations")."""
    if N < 1024 or K < 4096:
        return ("gemv", M, 1, 8, 1) if 1 <= M <= 2 and K <= 4096 else None
    if qtype not in (12, 13, 14, 8):
        return None
    if M == 1:
        if N >= 2048:
            return ("gemv8" if qtype in qgemv.X8_TYPES else "gemv", 1, 1, 8, 1)
        return ("gemv", 1, 1, 16, 2)
    if M == 2:
        return ("gemv", 2, 2, 8, 1) if N >= 4096 else ("gemv", 2, 1, 8, 1)
    if M <= 4 and qtype == 12:
        return ("gemv", 4, 4, 8, 1) if N >= 4096 else ("gemv", 2, 4, 8, 1)
    return None


def _small_config(M: int, N: int, K: int, qtype: int) -> tuple | None:
    """("small", MP, BN, num_warps, num_stages, splits) for qsmall.small_kernel where it measured
    faster than the other kernels and dequantize + cuBLAS on an H200 (the 8B's four matrices, 1024 to
    14336 rows, in CUDA graphs; BENCHMARKS.md "Small batches on the tensor cores"), else None: Q4_K
    from 3 rows, and at 2 rows on 4096 rows or more (qgemv's 2-row kernel stays ahead on 1024), Q6_K
    from 3 rows (at 2, qgemv's), up to 32 rows (x in a tile of 16 rows, above 16 of 32); K split in 4
    (the most measured, and the fastest everywhere), 64 rows of W a program (Q4_K on 1024 rows, Q6_K
    on up to 4096 and in the tile of 32: 32). Q5_K and Q8_0, the head and the 70B's larger matrices
    were not measured and keep the other kernels."""
    if qtype not in (12, 14) or not small_shape(M, N, K):
        return None
    if M == 2 and (qtype == 14 or N < 4096):
        return None
    BN = (32 if N <= 2048 else 64) if qtype == 12 else (64 if N >= 8192 and M <= 16 else 32)
    return ("small", 16 if M <= 16 else 32, BN, 4, 2, SMALL_SPLITS)


def _choose(M: int, N: int, K: int, qtype: int, interpret: bool = INTERPRET) -> tuple:
    """The kernel and configuration for x [M, K] by a [N, K] matrix of `qtype`, on a GPU:
    `_small_config`'s where it has one, else `_gemv_config`'s for qgemv's types (Q4_K, Q5_K, Q6_K,
    Q8_0, and Q4_0 to Q5_1) where it has one; else (and under Triton's interpreter) `_rows_or_split`'s."""
    if not interpret:
        small = _small_config(M, N, K, qtype)
        if small is not None:
            return small
    gemv = None if interpret or qtype not in qgemv.WORD_BYTES else _gemv_config(M, N, K, qtype)
    return gemv if gemv is not None else _rows_or_split(M, N, K, qtype, interpret)


def _float_x(config: tuple | None, x: torch.Tensor) -> tuple | None:
    """A chosen configuration, with float32 x kept off int8 (gemv8 -> gemv): float32 activations are
    asked for their precision, which x's rounding to int8 (a few parts in a thousand) would undo."""
    if config is not None and config[0] == "gemv8" and x.dtype == torch.float32:
        return ("gemv", *config[1:])
    return config


def _rows_or_split(M: int, N: int, K: int, qtype: int, interpret: bool = INTERPRET) -> tuple:
    """("rows", MR, BN, KB, num_warps) where `rows_kernel` measured faster than `_matmul_kernel` on
    an H200 (NOTE [ the fused matmul by whole rows ] in qkernels_rows.py: the best of a sweep on the
    8B's four matrix shapes and the head, in CUDA graphs; no matrix smaller than 1024 x 4096 was
    measured, and those keep the split-K kernel, whose splits give small matrices their programs),
    else the latter's (BM, BN, num_warps, splits). Triton's interpreter takes the latter always: its
    numpy-wide programs do the rows kernel's masked phases in full (Q6_K at K = 512: 2.5x slower)."""
    measured = not interpret and N >= 1024 and K >= 4096  # smaller matrices keep today's kernel
    if measured and qtype == 13 and M <= 4:  # Q5_K
        cfg = (4, 2, 4, 4) if M > 2 else (2, 2, 2, 2) if M == 2 else (1, 2, 4, 2) if N <= 2048 else (1, 2, 2, 1)
    elif measured and qtype == 14 and (M == 2 or (M == 1 and N >= 8192 and K <= 8192)):  # Q6_K
        cfg = (1, 4, 2, 4) if M == 1 else (2, 2, 2, 2) if K <= 8192 else (2, 4, 1, 4)
    else:
        return _config(M, N, triton.cdiv(K, 256))
    return ("rows", *cfg)


def matmul(x: torch.Tensor, raw: torch.Tensor, qtype: int, N: int, K: int,
           bias: torch.Tensor | None = None, config: tuple | None = None) -> torch.Tensor:
    """x [M, K] @ W^T (+ bias) for W [N, K] given as GGUF blocks: a new [M, N] tensor in x's dtype.

    Every kernel writes each output once, in a fixed order (deterministic). `config` overrides
    `_choose`, for tests and benchmarks: (BM, BN, num_warps, splits) for `_matmul_kernel`, whose
    chunks of K are split over `splits` programs per output tile and their float32 partials
    summed by a second kernel; ("rows", MR, BN, KB, num_warps) for `rows_kernel` (qkernels_rows.py);
    ("gemv", MR, BN, KB, num_warps) for qgemv.gemv_kernel (Q4_K, Q5_K, Q6_K, Q8_0, Q4_0 to Q5_1);
    ("small", MP, BN, num_warps, num_stages, splits) for qsmall.small_kernel (Q4_K, Q5_K, Q6_K, Q8_0,
    K a multiple of 256).
    """
    _check(raw, qtype, N, K)
    if x.stride(-1) != 1:
        x = x.contiguous()
    M = x.shape[0]
    ts, nblk, row_bytes, nparts, G, L = geometry(qtype, K)
    n_chunks = triton.cdiv(K, 256)
    config = config or _float_x(_choose(M, N, K, qtype), x)
    if (config[0] in GEMV_KINDS and not qgemv.supports(raw, qtype)) or (config[0] == "small" and not qsmall.supports(raw, qtype, K)):
        config = _rows_or_split(M, N, K, qtype)  # words not aligned: the other kernels
    if config[0] in GEMV_KINDS:
        _, MR, BN, KB, warps = config
        return qgemv.gemv(x, raw, qtype, N, K, row_bytes, nblk, bias, MR, BN, KB, warps, INTERPRET, config[0] == "gemv8")
    if config[0] == "small":
        _, MP, BN, warps, stages, splits = config
        return qsmall.small_matmul(x, raw, qtype, N, K, bias, MP, BN, warps, stages, splits, INTERPRET)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if config[0] == "rows":
        _, MR, BN, KB, warps = config
        PH, R, Lr = PHASES[qtype]
        kw = {} if INTERPRET else {"num_warps": warps}
        rows_kernel[(triton.cdiv(N, BN), triton.cdiv(M, MR))](
            x, raw, raw.view(torch.float16), out, bias if bias is not None else out, M, N, n_chunks, nblk,
            row_bytes, x.stride(0), N, QT=qtype, PH=PH, R=R, L=Lr, KB=KB, MR=MR, BN=BN, HAS_BIAS=bias is not None,
            **kw)
        return out
    BM, BN, warps, splits = config
    splits = max(1, min(splits, n_chunks))
    per_split = triton.cdiv(n_chunks, splits)
    splits = triton.cdiv(n_chunks, per_split)
    part = out if splits == 1 else torch.empty(splits, M, N, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(N, BN), M if BM == 1 else triton.cdiv(M, BM), splits)
    kw = {} if INTERPRET else {"num_warps": warps}
    _matmul_kernel[grid](x, raw, raw.view(torch.float16), part, bias if bias is not None else out,
                         M, N, n_chunks, per_split, nblk, row_bytes, x.stride(0), N, M * N,
                         QT=qtype, NPARTS=nparts, G=G, L=L, BM=BM, BN=BN, HAS_BIAS=bias is not None,
                         DOT_F32=x.dtype != torch.float16, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                         **kw)
    if splits > 1:
        n = M * N
        _sum_splits_kernel[(triton.cdiv(n, 1024),)](part, out, n, SPLITS=splits, BLOCK=1024)
    return out


def grouped_matmul(x: torch.Tensor, raw: torch.Tensor, qtype: int, N: int, K: int, w_off: torch.Tensor,
                   x_row: torch.Tensor) -> torch.Tensor:
    """out[g] = x[x_row[g]] @ W_g^T for every group g in one launch, W_g the [N, K] matrix of
    `qtype` blocks that starts w_off[g] bytes after raw's first byte: a new [len(w_off), N]
    tensor in x's dtype. w_off (int64, even) and x_row (int32) are on x's device; an offset may
    point into another allocation of that device (the expert cache's entries), which raw only
    anchors."""
    if raw.dtype != torch.uint8 or raw.storage_offset() % 2 or K % GEOMETRY[qtype][1]:
        raise ValueError(f"grouped blocks of type {qtype} need uint8 bytes at an even offset and K ({K}) "
                         f"a multiple of {GEOMETRY[qtype][1]}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    ts, nblk, row_bytes, nparts, G, L = geometry(qtype, K)
    n = w_off.numel()
    out = torch.empty(n, N, dtype=x.dtype, device=x.device)
    # (under the interpreter, whose programs run one after another in Python: one program over up to
    # 256 rows, numpy-wide, where rows cost little and each program's ops much)
    BN = min(256, triton.next_power_of_2(N)) if INTERPRET else 4
    kw = {} if INTERPRET else {"num_warps": 1}
    _grouped_kernel[(triton.cdiv(N, BN), n)](x, raw, raw.view(torch.float16), out, w_off, x_row, N,
                                             triton.cdiv(K, 256), nblk, row_bytes, x.stride(0), N,
                                             QT=qtype, NPARTS=nparts, G=G, L=L, BN=BN, **kw)
    return out


def _many_config(M: int, Ns: list[int], K: int, qtype: int) -> tuple | None:
    """`_gemv_config` for a launch of several matrices of Ns rows (None under Triton's interpreter,
    which takes one matrix a launch: its programs run one after another, and where `_small_config`
    takes the rows of any of the matrices: each matrix is then launched on its own kernel)."""
    if INTERPRET or any(_small_config(M, n, K, qtype) is not None for n in Ns):
        return None
    return _gemv_config(M, sum(Ns), K, qtype)


def _many_chosen(x: torch.Tensor, qtype: int, Ns: list[int], K: int) -> tuple | None:
    """matmul_many's configuration for x [M, K] by [Ns[s], K] matrices, or None (each launched alone)."""
    return _float_x(_many_config(x.shape[0], Ns, K, qtype), x)


def takes_int8_x(x: torch.Tensor, qtype: int, Ns: list[int], K: int) -> bool:
    """Whether x [M, K] by these [Ns[s], K] matrices would run on x quantized to int8 (gemv8), so that
    the op making x may emit that form (norm_kernels' x8). matmul_many's choice, which matmul's
    agrees with on gemv8 for one matrix (both take it from _gemv_config, after _small_config)."""
    c = _many_chosen(x, qtype, Ns, K)
    return c is not None and c[0] == "gemv8"


def matmul_many(x: torch.Tensor, raws: list[torch.Tensor], qtype: int, Ns: list[int], K: int, glu: bool = False,
                residual: torch.Tensor | None = None, config: tuple | None = None) -> list[torch.Tensor] | None:
    """x [M, K] by 1 to 3 [Ns[s], K] matrices of `qtype` blocks in one launch of
    qgemv.gemv_many_kernel (NOTE [ several matrices a launch ]): their products, or with `glu`
    [SiLU(x @ W_0^T) * (x @ W_1^T)], with `residual` [residual + x @ W_0^T]; None where that kernel
    does not take them (its types, aligned words, a configuration measured for M rows), and the
    caller launches each matrix. `config`: ("gemv", MR, BN, KB, num_warps), for tests."""
    if qtype not in qgemv.WORD_BYTES or x.dim() != 2 or not qgemv.many_supported(raws, qtype):
        return None
    for raw, n in zip(raws, Ns):
        _check(raw, qtype, n, K)
    if x.stride(-1) != 1:
        x = x.contiguous()
    config = config or _many_chosen(x, qtype, Ns, K)
    if config is None or config[0] not in GEMV_KINDS:
        return None
    _, MR, BN, KB, warps = config
    ts, nblk, row_bytes = geometry(qtype, K)[:3]
    return qgemv.gemv_many(x, raws, qtype, Ns, K, row_bytes, nblk, MR, BN, KB, warps, INTERPRET, glu, residual,
                           config[0] == "gemv8")
