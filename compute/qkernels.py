"""Triton kernels on GGUF blocks: fused dequant-matmul for decode, dequantization for prompts.

NOTE [ parts of a chunk ]
A weight row is walked in chunks of 256 values: one super-block of a K-quant, or eight
32-value blocks of Q4_0..Q8_0. Each type splits a chunk into NPARTS parts of W columns such
that column c of part p reads *contiguous* bytes (low nibbles of 128 bytes, then their high
nibbles, ...), and says which value of the chunk each column is (`elem`). The matmul loads the
activations at those value indices instead of reordering the weights, so weight loads stay
wide and coalesced and nothing is shuffled in registers. Dequantization writes each part to
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

# qtype id -> (bytes per block, values per block, parts per chunk); ids as gguf's GGMLQuantizationType
GEOMETRY = {
    2: (18, 32, 2),    # Q4_0
    3: (20, 32, 2),    # Q4_1
    6: (22, 32, 2),    # Q5_0
    7: (24, 32, 2),    # Q5_1
    8: (34, 32, 1),    # Q8_0
    10: (84, 256, 4),  # Q2_K
    11: (110, 256, 4),  # Q3_K
    12: (144, 256, 2),  # Q4_K
    13: (176, 256, 2),  # Q5_K
    14: (210, 256, 2),  # Q6_K
}


@triton.jit
def _part(raw, halfs, rowb, kb, c, ok_r, nblk, QT: tl.constexpr, P: tl.constexpr):
    """Part P of chunk kb for rows at byte offsets rowb [BN, 1]; columns c [W] (see NOTE above).

    Returns (w [BN, W] float32, elem [W] value index within the chunk, valid [W]).
    """
    if QT == 8:  # Q8_0: d f16 | 32 x int8
        g = c // 32
        blk = kb * 8 + g
        ok = blk < nblk
        m = ok_r & ok[None, :]
        base = rowb + blk[None, :] * 34
        q = tl.load(raw + base + 2 + c[None, :] % 32, mask=m, other=0).to(tl.int8, bitcast=True)
        d = tl.load(halfs + base // 2, mask=m, other=0).to(tl.float32)
        return q.to(tl.float32) * d, c, ok
    elif QT == 2 or QT == 3:  # Q4_0 / Q4_1: d f16 | (m f16) | 16 B nibbles; part 0 low, 1 high
        TS: tl.constexpr = 18 if QT == 2 else 20
        QO: tl.constexpr = 2 if QT == 2 else 4
        g = c // 16
        blk = kb * 8 + g
        ok = blk < nblk
        m = ok_r & ok[None, :]
        base = rowb + blk[None, :] * TS
        q = (tl.load(raw + base + QO + c[None, :] % 16, mask=m, other=0).to(tl.int32) >> (4 * P)) & 15
        d = tl.load(halfs + base // 2, mask=m, other=0).to(tl.float32)
        if QT == 2:
            w = (q - 8).to(tl.float32) * d
        else:
            w = q.to(tl.float32) * d + tl.load(halfs + base // 2 + 1, mask=m, other=0).to(tl.float32)
        return w, g * 32 + P * 16 + c % 16, ok
    elif QT == 6 or QT == 7:  # Q5_0 / Q5_1: d | (m) | qh 4 B | 16 B nibbles
        TS: tl.constexpr = 22 if QT == 6 else 24
        HO: tl.constexpr = 2 if QT == 6 else 4
        g = c // 16
        j = c % 16
        blk = kb * 8 + g
        ok = blk < nblk
        m = ok_r & ok[None, :]
        base = rowb + blk[None, :] * TS
        ql = (tl.load(raw + base + HO + 4 + j[None, :], mask=m, other=0).to(tl.int32) >> (4 * P)) & 15
        # value P*16+j takes bit (P*16+j) of the little-endian 32-bit qh
        qh = (tl.load(raw + base + HO + 2 * P + j[None, :] // 8, mask=m, other=0).to(tl.int32) >> (j[None, :] % 8)) & 1
        q = ql | (qh << 4)
        d = tl.load(halfs + base // 2, mask=m, other=0).to(tl.float32)
        if QT == 6:
            w = (q - 16).to(tl.float32) * d
        else:
            w = q.to(tl.float32) * d + tl.load(halfs + base // 2 + 1, mask=m, other=0).to(tl.float32)
        return w, g * 32 + P * 16 + j, ok
    elif QT == 12 or QT == 13:  # Q4_K / Q5_K: d | dmin | 12 B scales | (qh 32 B) | qs 128 B
        QO: tl.constexpr = 16 if QT == 12 else 48
        base = rowb + kb * (144 if QT == 12 else 176)
        cc = c // 32
        j = c % 32
        q = (tl.load(raw + base + QO + c[None, :], mask=ok_r, other=0).to(tl.int32) >> (4 * P)) & 15
        sub = 2 * cc + P  # [W] sub-block of 32 values
        if QT == 13:
            qh = (tl.load(raw + base + 16 + j[None, :], mask=ok_r, other=0).to(tl.int32) >> sub[None, :]) & 1
            q = q | (qh << 4)
        # s[i] = byte 4 + i of the block; sub < 4: sc = s[sub] & 63, mn = s[sub+4] & 63;
        # sub >= 4: sc = (s[sub+4] & 15) | (s[sub-4] >> 6) << 4, mn = (s[sub+4] >> 4) | (s[sub] >> 6) << 4
        lo = (sub < 4)[None, :]
        a = tl.load(raw + base + 4 + sub[None, :], mask=ok_r, other=0).to(tl.int32)
        b = tl.load(raw + base + 8 + sub[None, :], mask=ok_r, other=0).to(tl.int32)
        c4 = tl.load(raw + base + sub[None, :], mask=ok_r & ~lo, other=0).to(tl.int32)
        sc = tl.where(lo, a & 63, (b & 15) | ((c4 >> 6) << 4))
        mn = tl.where(lo, b & 63, (b >> 4) | ((a >> 6) << 4))
        d = tl.load(halfs + base // 2, mask=ok_r, other=0).to(tl.float32)
        dmin = tl.load(halfs + base // 2 + 1, mask=ok_r, other=0).to(tl.float32)
        w = (d * sc.to(tl.float32)) * q.to(tl.float32) - dmin * mn.to(tl.float32)
        return w, cc * 64 + P * 32 + j, c >= 0
    elif QT == 14:  # Q6_K: ql 128 B | qh 64 B | 16 x int8 scales | d
        base = rowb + kb * 210
        h = c // 64
        j = c % 64
        ql = (tl.load(raw + base + c[None, :], mask=ok_r, other=0).to(tl.int32) >> (4 * P)) & 15
        s2 = 2 * P + j // 32
        qh = (tl.load(raw + base + 128 + h[None, :] * 32 + j[None, :] % 32, mask=ok_r, other=0).to(tl.int32)
              >> (2 * s2[None, :])) & 3
        q = (ql | (qh << 4)) - 32
        e = h * 128 + P * 64 + j
        s = tl.load(raw + base + 192 + e[None, :] // 16, mask=ok_r, other=0).to(tl.int8, bitcast=True)
        d = tl.load(halfs + base // 2 + 104, mask=ok_r, other=0).to(tl.float32)
        return (d * s.to(tl.float32)) * q.to(tl.float32), e, c >= 0
    elif QT == 10:  # Q2_K: 16 B scales (lo nibble scale, hi min) | qs 64 B | d | dmin
        base = rowb + kb * 84
        h = c // 32
        j = c % 32
        q = (tl.load(raw + base + 16 + c[None, :], mask=ok_r, other=0).to(tl.int32) >> (2 * P)) & 3
        e = h * 128 + P * 32 + j
        s = tl.load(raw + base + e[None, :] // 16, mask=ok_r, other=0).to(tl.int32)
        d = tl.load(halfs + base // 2 + 40, mask=ok_r, other=0).to(tl.float32)
        dmin = tl.load(halfs + base // 2 + 41, mask=ok_r, other=0).to(tl.float32)
        w = (d * (s & 15).to(tl.float32)) * q.to(tl.float32) - dmin * (s >> 4).to(tl.float32)
        return w, e, c >= 0
    else:  # QT == 11, Q3_K: hmask 32 B | qs 64 B | 12 B scales (16 x 6 bits) | d
        base = rowb + kb * 110
        h = c // 32
        j = c % 32
        ql = (tl.load(raw + base + 32 + c[None, :], mask=ok_r, other=0).to(tl.int32) >> (2 * P)) & 3
        hb = h * 4 + P  # [W] bit of hmask[j]
        hm = (tl.load(raw + base + j[None, :], mask=ok_r, other=0).to(tl.int32) >> hb[None, :]) & 1
        q = (ql | (hm << 2)) - 4
        e = h * 128 + P * 32 + j
        i = e // 16  # scale index 0..15
        slo = tl.load(raw + base + 96 + (i % 8)[None, :], mask=ok_r, other=0).to(tl.int32)
        slo = (slo >> (4 * (i // 8))[None, :]) & 15
        shi = (tl.load(raw + base + 104 + (i % 4)[None, :], mask=ok_r, other=0).to(tl.int32) >> (2 * (i // 4))[None, :]) & 3
        sc = (slo | (shi << 4)) - 32
        d = tl.load(halfs + base // 2 + 54, mask=ok_r, other=0).to(tl.float32)
        return (d * sc.to(tl.float32)) * q.to(tl.float32), e, c >= 0


@triton.jit
def _matmul_kernel(x, raw, halfs, out, bias, M, N, n_chunks, nblk, row_bytes, sxm, som,
                   QT: tl.constexpr, NPARTS: tl.constexpr, W: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, HAS_BIAS: tl.constexpr):
    """out[M, N] = x[M, K] @ dequant(raw[N, K])^T (+ bias), K = 256 * n_chunks at most; BM == 1 sums
    on CUDA cores, else tl.dot."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    rm = pid_m * BM + tl.arange(0, BM)
    ok_n = rn < N
    ok_r = ok_n[:, None]
    rowb = rn[:, None].to(tl.int64) * row_bytes
    c = tl.arange(0, W)
    if BM == 1:
        acc = tl.zeros((BN,), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kb in range(0, n_chunks):
        for p in tl.static_range(NPARTS):
            w, e, ok = _part(raw, halfs, rowb, kb, c, ok_r, nblk, QT, p)
            k = kb * 256 + e
            if BM == 1:
                xv = tl.load(x + pid_m * sxm + k, mask=ok, other=0).to(tl.float32)
                acc += tl.sum(w * xv[None, :], axis=1)
            else:
                xv = tl.load(x + rm[:, None] * sxm + k[None, :], mask=(rm[:, None] < M) & ok[None, :], other=0)
                acc += tl.dot(xv.to(tl.float16), tl.trans(w.to(tl.float16)))
    if HAS_BIAS:
        acc += tl.load(bias + rn, mask=ok_n, other=0).to(tl.float32)[None, :] if BM > 1 else \
            tl.load(bias + rn, mask=ok_n, other=0).to(tl.float32)
    if BM == 1:
        tl.store(out + pid_m * som + rn, acc.to(out.dtype.element_ty), mask=ok_n)
    else:
        tl.store(out + rm[:, None] * som + rn[None, :], acc.to(out.dtype.element_ty),
                 mask=(rm[:, None] < M) & ok_r.reshape(1, BN))


@triton.jit
def _dequant_kernel(raw, halfs, out, N, K, nblk, row_bytes, so,
                    QT: tl.constexpr, NPARTS: tl.constexpr, W: tl.constexpr, BN: tl.constexpr):
    """out[N, K] = dequant(raw[N, K]) for one chunk of 256 values of BN rows per program."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    kb = tl.program_id(1)
    ok_r = (rn < N)[:, None]
    rowb = rn[:, None].to(tl.int64) * row_bytes
    c = tl.arange(0, W)
    for p in tl.static_range(NPARTS):
        w, e, ok = _part(raw, halfs, rowb, kb, c, ok_r, nblk, QT, p)
        tl.store(out + rn[:, None].to(tl.int64) * so + kb * 256 + e[None, :], w.to(out.dtype.element_ty),
                 mask=ok_r & ok[None, :])


def _geometry(qtype: int, K: int):
    ts, qk, nparts = GEOMETRY[qtype]
    return ts, K // qk, K // qk * ts, nparts, 256 // nparts


def _check(raw: torch.Tensor, qtype: int, N: int, K: int) -> None:
    ts, nblk, row_bytes, _, _ = _geometry(qtype, K)
    if raw.dtype != torch.uint8 or raw.numel() != N * row_bytes or not raw.is_contiguous() or raw.storage_offset() % 2:
        raise ValueError(f"blocks of type {qtype} for [{N}, {K}] need {N * row_bytes} contiguous, 2-aligned "
                         f"uint8 bytes; got {raw.numel()} ({raw.dtype})")


def dequantize_into(raw: torch.Tensor, qtype: int, N: int, K: int, out: torch.Tensor, BN: int = 16) -> torch.Tensor:
    """Dequantize raw blocks of a [N, K] matrix into `out` (a [N, K] view, any float dtype)."""
    _check(raw, qtype, N, K)
    ts, nblk, row_bytes, nparts, W = _geometry(qtype, K)
    grid = (triton.cdiv(N, BN), triton.cdiv(K, 256))
    _dequant_kernel[grid](raw, raw.view(torch.float16), out, N, K, nblk, row_bytes, out.stride(0),
                          QT=qtype, NPARTS=nparts, W=W, BN=BN, enable_fp_fusion=False)
    return out


# (BM, BN, num_warps) by batch size; measured on H100 (see BENCHMARKS.md, "quantized matmul")
def _config(M: int, N: int) -> tuple[int, int, int]:
    if M == 1:
        return 1, (8 if N <= 2048 else 16), 4
    return 16, 32, 4


def matmul(x: torch.Tensor, raw: torch.Tensor, qtype: int, N: int, K: int,
           bias: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ W^T for W [N, K] given as GGUF blocks: a new [M, N] tensor in x's dtype."""
    _check(raw, qtype, N, K)
    if x.stride(-1) != 1:
        x = x.contiguous()
    M = x.shape[0]
    ts, nblk, row_bytes, nparts, W = _geometry(qtype, K)
    if out is None:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    BM, BN, warps = _config(M, N)
    if BM == 1:
        grid = (triton.cdiv(N, BN), M)
    else:
        grid = (triton.cdiv(N, BN), triton.cdiv(M, BM))
    kw = {} if INTERPRET else {"num_warps": warps}
    _matmul_kernel[grid](x, raw, raw.view(torch.float16), out, bias if bias is not None else out,
                         M, N, triton.cdiv(K, 256), nblk, row_bytes, x.stride(0), out.stride(0),
                         QT=qtype, NPARTS=nparts, W=W, BM=BM, BN=BN, HAS_BIAS=bias is not None, **kw)
    return out
