"""The fused matmul on GGUF blocks for small batches (2 to 32 rows of x) on the tensor cores.

NOTE [ runs on the tensor cores ]
A program owns BN rows of W and MP rows of x (16 or 32: the dot's smallest tile, padded), and
walks its share of K one chunk of 256 values at a time, so each weight is read once for every
row of x. W is the dot's first operand ([BN, R] x [R, MP], "swap AB": the MMA's M dimension is
the weight rows, the few rows of x its N). A chunk is cut into runs of R values that share one
scale and whose quants are R contiguous bytes (Q4_K and Q5_K: a nibble of 32 bytes; Q6_K: a
nibble of 16 ql bytes with 2 bits of qh; Q8_0: a block), and whose values are R contiguous
values of x, so no operand is shuffled. The run's integer quants q become float16 exactly (float16
holds integers up to 2048: 1024 + q from the bits 0x6400 | q, less 1024, no conversion
instruction), and the run's weights w = S * q - O (gguf's scale S and offset O) are made in float16
(two roundings) and multiplied on the tensor cores into a float32 accumulator. float32 and
bfloat16 activations take a float32 dot (w made in float32), at full precision ("ieee") or as TF32
("tf32"), as qkernels' `_matmul_kernel` does.

Where N gives too few programs, K is split over `splits` programs a tile; each stores its float32
partial, and the last of them to arrive (a counter per tile) sums all partials in split order,
writes the output and sets its counter back to zero: one launch, the same bits on every call.
The counters are one buffer a stream, zeroed once (`_tile_counters`): kernels on one stream run one
after another, so each finds its counters zero, and no call launches a memset of its own (a
captured decode step replayed one per matmul). A graph keeps the buffer of the stream it was
captured on, so graphs captured on one stream must not replay at once on two (the engine's
replay on its one stream). The buffer is never replaced (a graph holds its address): a call
that needs more counters than it has, or that is captured before the stream has one (its zeroing
would run only when the graph replays), zeroes counters of its own, as every call did before.

Like qkernels.py's kernels, it runs on the CPU under Triton's interpreter for the tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from layerstream.compute.qgemv import k_scale_min

# qtype id -> (bytes a block of 256 values: Q8_0's 8 blocks of 32, scale-word alignment in bytes)
TYPES = {12: (144, 4), 13: (176, 4), 14: (210, 1), 8: (272, 1)}


@triton.jit
def _q_f16(q, OFF: tl.constexpr):
    """Integers q [.., ..] int32 in 0..1023 as float16 q - OFF, exactly, from the bits of 1024 + q."""
    return (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - (1024.0 + OFF)


@triton.jit
def _run(acc, q, xt, S, O, OFF: tl.constexpr, HAS_OFF: tl.constexpr, DOT_F32: tl.constexpr,  # noqa: E741
         DOT_PRECISION: tl.constexpr):
    """acc [BN, MP] += w @ xt over one run, w = S * (q - OFF) - O [BN, R] from the int32 quants q and the
    rows' float32 scales S and offsets O [BN], in float16 (float32 with DOT_F32); xt [R, MP] x's values."""
    if DOT_F32:
        w = (q - OFF).to(tl.float32) * S[:, None]
        if HAS_OFF:
            w -= O[:, None]
        return tl.dot(w, xt.to(tl.float32), acc, input_precision=DOT_PRECISION)
    w = _q_f16(q, OFF) * S.to(tl.float16)[:, None]
    if HAS_OFF:
        w -= O.to(tl.float16)[:, None]
    return tl.dot(w, xt.to(tl.float16), acc)


@triton.jit
def _chunk(acc, xk, xmask, raw8, w32, halfs, rowb, kb, QT: tl.constexpr, BN: tl.constexpr,
           DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc [BN, MP] += W's chunk kb (rows at byte offsets rowb [BN]) times x's values kb * 256 ..
    (xk [1, MP] pointers to x's rows, xmask [1, MP] its valid rows), run by run (NOTE [ runs on the
    tensor cores ])."""
    if QT == 12 or QT == 13:
        # Q4_K / Q5_K: d | dmin | 12 B scales | (qh 32 B) | qs 128 B; group g = 32 qs bytes, whose low
        # nibbles are values g * 64 + l and high ones g * 64 + 32 + l (l = 0..31), sub-block 2g + P
        TS: tl.constexpr = 144 if QT == 12 else 176
        QO: tl.constexpr = 16 if QT == 12 else 48
        base = rowb + kb * TS  # [BN]
        wb = base // 4
        dd = tl.load(w32 + wb)
        d = (dd & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        dmin = ((dd >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        s0 = tl.load(w32 + wb + 1)  # scale bytes 0..3
        s1 = tl.load(w32 + wb + 2)  # 4..7
        s2 = tl.load(w32 + wb + 3)  # 8..11
        j = tl.arange(0, 32)
        if QT == 13:
            qh = tl.load(raw8 + base[:, None] + 16 + j[None, :]).to(tl.int32)  # [BN, 32]
        for g in tl.static_range(4):
            qb = tl.load(raw8 + base[:, None] + QO + g * 32 + j[None, :]).to(tl.int32)  # [BN, 32]
            for P in tl.static_range(2):
                sub = 2 * g + P
                sc, mn = k_scale_min(s0, s1, s2, sub)
                q = (qb >> (4 * P)) & 15
                if QT == 13:
                    q = q | (((qh >> sub) & 1) << 4)
                xt = tl.load(xk + (kb * 256 + g * 64 + P * 32 + j)[:, None], mask=xmask, other=0)  # [32, MP]
                acc = _run(acc, q, xt, d * sc.to(tl.float32), dmin * mn.to(tl.float32), 0, True,
                           DOT_F32, DOT_PRECISION)
    elif QT == 14:
        # Q6_K: ql 128 B | qh 64 B | 16 x int8 scales | d. Run (h, r, P) = nibble P of ql bytes
        # h * 64 + r * 16 + j with bits 2 * (2P + r // 2) of qh byte h * 32 + (r % 2) * 16 + j (j = 0..15):
        # values h * 128 + P * 64 + r * 16 + j, scale h * 8 + P * 4 + r; w = d * sc * (q - 32)
        base = rowb + kb * 210  # [BN]
        d = tl.load(halfs + (base + 208) // 2).to(tl.float32)
        j = tl.arange(0, 16)
        for h in tl.static_range(2):
            for r2 in tl.static_range(2):
                qh = tl.load(raw8 + base[:, None] + 128 + h * 32 + r2 * 16 + j[None, :]).to(tl.int32)  # [BN, 16]
                for rh in tl.static_range(2):
                    r = 2 * rh + r2
                    ql = tl.load(raw8 + base[:, None] + h * 64 + r * 16 + j[None, :]).to(tl.int32)
                    for P in tl.static_range(2):
                        sc = tl.load(raw8 + base + 192 + h * 8 + P * 4 + r).to(tl.int8, bitcast=True)
                        q = ((ql >> (4 * P)) & 15) | (((qh >> (2 * (2 * P + rh))) & 3) << 4)
                        xt = tl.load(xk + (kb * 256 + h * 128 + P * 64 + r * 16 + j)[:, None], mask=xmask, other=0)
                        acc = _run(acc, q, xt, d * sc.to(tl.float32), d, 32, False, DOT_F32, DOT_PRECISION)
    else:
        # Q8_0: d f16 | 32 x int8, 8 blocks (272 B) a chunk; run b = block b; q + 128 from the byte ^ 0x80
        j = tl.arange(0, 32)
        for b in tl.static_range(8):
            base = rowb + kb * 272 + b * 34  # [BN]
            d = tl.load(halfs + base // 2).to(tl.float32)
            q = tl.load(raw8 + base[:, None] + 2 + j[None, :]).to(tl.int32) ^ 0x80  # [BN, 32] q + 128
            xt = tl.load(xk + (kb * 256 + b * 32 + j)[:, None], mask=xmask, other=0)
            acc = _run(acc, q, xt, d, d, 128, False, DOT_F32, DOT_PRECISION)
    return acc


@triton.jit(do_not_specialize=["M", "n_chunks", "chunks_per_split", "splits"])
def small_kernel(x, raw8, w32, halfs, out, bias, part, count, M, N, n_chunks, chunks_per_split, splits, row_bytes, sxm,
                 QT: tl.constexpr, MP: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr,
                 HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """out[M, N] = x[M, K] @ dequant(W[N, K])^T (+ bias): BN rows of W by MP rows of x a program, over
    split program_id(2) of K's chunks; SPLIT: K is split over `splits` programs (NOTE [ runs on the
    tensor cores ])."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    rm = pid_m * MP + tl.arange(0, MP)
    ok_n = rn < N
    ok_m = rm < M
    rowb = tl.minimum(rn, N - 1).to(tl.int64) * row_bytes  # past-the-end rows read the last
    xk = x + rm.to(tl.int64)[None, :] * sxm  # [1, MP]
    xmask = ok_m[None, :]
    k_lo = split * chunks_per_split
    k_hi = tl.minimum(k_lo + chunks_per_split, n_chunks)
    acc = tl.zeros((BN, MP), dtype=tl.float32)
    for kb in range(k_lo, k_hi):
        acc = _chunk(acc, xk, xmask, raw8, w32, halfs, rowb, kb, QT, BN, DOT_F32, DOT_PRECISION)
    o = rm.to(tl.int64)[None, :] * N + rn[:, None]  # [BN, MP] into out [M, N]
    mask = ok_n[:, None] & ok_m[None, :]
    if SPLIT:
        # partials [splits, M, N] float32; the last program of the tile to arrive sums them in split order
        tl.store(part + split * M * N + o, acc, mask=mask)
        tl.debug_barrier()
        tile = pid_m * tl.num_programs(0) + pid_n
        if tl.atomic_add(count + tile, 1, sem="acq_rel") == splits - 1:
            acc = tl.zeros((BN, MP), dtype=tl.float32)
            for s in range(splits):
                acc += tl.load(part + s * M * N + o, mask=mask, other=0, cache_modifier=".cg")
            if HAS_BIAS:
                acc += tl.load(bias + rn, mask=ok_n, other=0).to(tl.float32)[:, None]
            tl.store(out + o, acc.to(out.dtype.element_ty), mask=mask)
            tl.atomic_xchg(count + tile, 0)  # ready for the next kernel on this stream
    else:
        if HAS_BIAS:
            acc += tl.load(bias + rn, mask=ok_n, other=0).to(tl.float32)[:, None]
        tl.store(out + o, acc.to(out.dtype.element_ty), mask=mask)


COUNTERS = 4096  # tiles of one stream's buffer (the dispatch's largest grid, 16384 rows of W by 32, has 512)
_counters: dict[tuple[torch.device, int], torch.Tensor] = {}  # (device, stream id) -> its counters


def _tile_counters(device: torch.device, n: int) -> torch.Tensor:
    """n zero tile counters on `device` for the current stream (NOTE [ runs on the tensor cores ]):
    the stream's buffer, made once and kept, or counters of the call's own where it cannot serve."""
    cuda = device.type == "cuda"
    key = (device, torch.cuda.current_stream(device).stream_id if cuda else 0)
    buf = _counters.get(key)
    if buf is None and not (cuda and torch.cuda.is_current_stream_capturing()):
        buf = _counters[key] = torch.zeros(COUNTERS, dtype=torch.int32, device=device)
    if buf is None or buf.numel() < n:
        return torch.zeros(n, dtype=torch.int32, device=device)
    return buf


def supports(raw: torch.Tensor, qtype: int, K: int) -> bool:
    """Whether small_kernel takes these blocks: its types, K whole chunks of 256, and Q4_K's and
    Q5_K's scale words 4-aligned."""
    return qtype in TYPES and K % 256 == 0 and raw.storage_offset() % TYPES[qtype][1] == 0


def small_matmul(x: torch.Tensor, raw: torch.Tensor, qtype: int, N: int, K: int, bias: torch.Tensor | None,
                 MP: int, BN: int, warps: int, stages: int, splits: int, interpret: bool) -> torch.Tensor:
    """x [M, K] @ W^T (+ bias) by small_kernel (the caller checked `supports`): a new [M, N] tensor."""
    M = x.shape[0]
    n_chunks = K // 256
    per_split = triton.cdiv(n_chunks, max(1, min(splits, n_chunks)))
    splits = triton.cdiv(n_chunks, per_split)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(N, BN), triton.cdiv(M, MP), splits)
    if splits > 1:
        part = torch.empty(splits, M, N, dtype=torch.float32, device=x.device)
        count = _tile_counters(x.device, grid[0] * grid[1])
    else:
        part = count = out
    kw = {} if interpret else {"num_warps": warps, "num_stages": stages}
    small_kernel[grid](x, raw, raw.view(torch.int32) if TYPES[qtype][1] == 4 else raw, raw.view(torch.float16),
                       out, bias if bias is not None else out, part, count, M, N, n_chunks, per_split, splits,
                       K // 256 * TYPES[qtype][0], x.stride(0), QT=qtype, MP=MP, BN=BN, SPLIT=splits > 1,
                       HAS_BIAS=bias is not None, DOT_F32=x.dtype != torch.float16,
                       DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", **kw)
    return out
