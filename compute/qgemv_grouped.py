"""A decode step's chosen experts as two launches on qgemv's inner loop: gate and up with SiLU, then
down with each token's weighted sum.

NOTE [ experts on whole rows ]
moe.experts_grouped ran a step's (token, choice) pairs as qkernels' grouped kernel (`_row_dot`,
four rows a program, one warp), then SiLU and the product, the down launch, and the weighted sum
as torch ops: five to seven launches a layer, and the grouped kernel read an expert's blocks far
below the device's memory rate at one token (BENCHMARKS.md, H1). At batch 1 a MoE layer's experts
are most of its device time, and that time is on the layer's chain (the next layer's attention
waits for it). Here the dense decode's loop (qgemv.step: whole rows of W a program, K walked in
steps of KB chunks, NOTE [ slices of a row ] in qgemv.py) reads the pairs' blocks instead:
- `glu_kernel`, a program on BN rows of one pair: its token's row of x times those rows of the
  pair's gate and of its up, SiLU(gate) * up written in x's dtype, each rounded to x's dtype first
  as the separate ops round them (qgemv's GLU epilogue);
- `down_kernel`, a program on BN rows of one token: for each of its k pairs in order, that pair's
  SiLU product times the rows of its down, rounded to x's dtype as a separate launch's output,
  times the pair's weight, summed in float32: the [T, n_embd] float32 sum moe.experts_grouped
  returns, with no [T * k, n_embd] outputs written and read again.
The pairs' blocks are found as before, by byte offsets from one anchor (the expert pool, or a
resident layer's gate tensor), which must be whole words of the type (`aligned`): the pool's
parts start at multiples of expert_layout.ALIGN, and a resident layer's tensors are checked.
A resident layer's offsets follow from the chosen ids (expert e's part j at e * size_j + base_j),
so there the kernels take the ids and `places` (size_j, base_j) and work them out: the torch ops
that formed them were seven launches a layer, more than the experts' own two, on the chain of
every layer of a fully resident decode step. With `res` (the layer's input) the down kernel adds
it as moe_block's `x + out.to(x.dtype)` does, rounding alike, and writes x's dtype into `out`
(graph B's input copy, where the next layer reads it): two or three launches fewer again.
Types: qgemv's (Q4_K, Q5_K, Q6_K, Q8_0, Q4_0 to Q5_1) with gate and up of one type; others keep
the grouped kernel. Under Triton's interpreter (the CPU tests) a program takes up to 256 rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from layerstream.compute.qgemv import WORD_BYTES, rounded_sums, silu_times, step
from layerstream.compute.qkernels import GEOMETRY, INTERPRET, geometry


@triton.jit
def glu_kernel(x, words, raw8, halfs, out, offs, srow, m0, a0, m1, a1, k, N, n_chunks, nblk, row_words, sxm,
               QT: tl.constexpr, WB: tl.constexpr, BN: tl.constexpr, KB: tl.constexpr, EVEN: tl.constexpr):
    """out[g, rn] = SiLU(x[g // k] @ gate_g[rn]^T) * (x[g // k] @ up_g[rn]^T) for pair g =
    program_id(1), gate_g and up_g the blocks offs[g] * m0 + a0 and offs[srow + g] * m1 + a1 bytes
    from `words` (byte offsets: srow pairs, m 1, a 0; ids: srow 0, m and a the parts' places)."""
    g = tl.program_id(1)
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    ok_n = rn < N
    rows = tl.minimum(rn, N - 1).to(tl.int64)[:, None, None] * row_words  # past-the-end rows read the last
    gate = (tl.load(offs + g).to(tl.int64) * m0 + a0) // WB
    up = (tl.load(offs + srow + g).to(tl.int64) * m1 + a1) // WB
    xrow = tl.zeros((1, 1, 1), dtype=tl.int64) + (g // k).to(tl.int64)
    xr = x + xrow * sxm
    xok = xrow >= 0
    acc = tl.zeros((1, BN, KB * 4, 1), dtype=tl.float32)
    acc_u = tl.zeros((1, BN, KB * 4, 1), dtype=tl.float32)
    for kb0 in range(0, n_chunks, KB):
        acc = step(acc, xr, xok, words, words, raw8, halfs, gate + rows, kb0, n_chunks, nblk, QT, KB, EVEN)
        acc_u = step(acc_u, xr, xok, words, words, raw8, halfs, up + rows, kb0, n_chunks, nblk, QT, KB, EVEN)
    dt = out.dtype.element_ty
    y = silu_times(rounded_sums(acc, dt), rounded_sums(acc_u, dt), dt)  # [1, BN]
    tl.store(out + g.to(tl.int64) * N + rn[None, :], y.to(dt), mask=ok_n[None, :])


@triton.jit
def down_kernel(a, words, raw8, halfs, out, res, offs, srow, m2, a2, weight, k, N, n_chunks, nblk, row_words,
                sam, srm, QT: tl.constexpr, WB: tl.constexpr, BN: tl.constexpr, KB: tl.constexpr,
                EVEN: tl.constexpr, HAS_RES: tl.constexpr):
    """out[t, rn] (float32) = sum over j < k of weight[t, j] * (a[t * k + j] @ down_{t*k+j}[rn]^T),
    each product rounded to a's dtype, for token t = program_id(1); down_g the blocks
    offs[2 * srow + g] * m2 + a2 bytes from `words`. HAS_RES: out[t, rn] (res's dtype) =
    res[t, rn] + that sum rounded to res's dtype, as two separate ops round it."""
    t = tl.program_id(1)
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    ok_n = rn < N
    rows = tl.minimum(rn, N - 1).to(tl.int64)[:, None, None] * row_words
    dt = a.dtype.element_ty
    y = tl.zeros((1, BN), dtype=tl.float32)
    for j in range(0, k):
        g = t * k + j
        w = (tl.load(offs + 2 * srow + g).to(tl.int64) * m2 + a2) // WB
        arow = tl.zeros((1, 1, 1), dtype=tl.int64) + g.to(tl.int64)
        ar = a + arow * sam
        acc = tl.zeros((1, BN, KB * 4, 1), dtype=tl.float32)
        for kb0 in range(0, n_chunks, KB):
            acc = step(acc, ar, arow >= 0, words, words, raw8, halfs, w + rows, kb0, n_chunks, nblk, QT, KB, EVEN)
        d = rounded_sums(acc, dt)
        y += d * tl.load(weight + g)
    if HAS_RES:
        rt = res.dtype.element_ty
        r = tl.load(res + t.to(tl.int64) * srm + rn[None, :], mask=ok_n[None, :], other=0.0).to(tl.float32)
        y = (r + y.to(rt).to(tl.float32)).to(rt)
    tl.store(out + t.to(tl.int64) * N + rn[None, :], y, mask=ok_n[None, :])


def takes(parts: tuple) -> bool:
    """Whether these kernels run a layer's experts: gate and up of one type, and every type qgemv's."""
    (gq, _, _), (uq, _, _), (dq, _, _) = parts
    return gq == uq and gq in WORD_BYTES and dq in WORD_BYTES


def config(N: int, K: int) -> tuple[int, int, int]:
    """(BN, KB, num_warps) of a launch over [N, K] matrices: one warp on a row, its 32 lanes on 8
    chunks of K (qkernels._gemv_config's choice for small matrices), fewer where K has fewer."""
    if INTERPRET:
        return min(256, triton.next_power_of_2(N)), 8, 1
    n_chunks = triton.cdiv(K, 256)
    kb = min(8, triton.next_power_of_2(n_chunks))
    return 8 // kb, kb, 1


def _rows(qtype: int, K: int) -> tuple[int, int, int]:
    """(n_chunks, blocks a row, bytes a row) of [*, K] blocks of `qtype` (qkernels.geometry's)."""
    if K % GEOMETRY[qtype][1]:
        raise ValueError(f"experts of type {qtype} need K ({K}) a multiple of {GEOMETRY[qtype][1]}")
    return (triton.cdiv(K, 256), *geometry(qtype, K)[1:3])


def _words(anchor: torch.Tensor, qtype: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The anchor's bytes as the kernels' words, as float16 (the blocks' scales), and the word's bytes."""
    wb = WORD_BYTES[qtype]
    n = anchor.numel() // 4 * 4  # (whole words of either size; the offsets reach past the anchor)
    return anchor[:n].view(torch.int32 if wb == 4 else torch.int16), anchor[:n].view(torch.float16), wb


def experts(h: torch.Tensor, weight: torch.Tensor, anchor: torch.Tensor, offs: torch.Tensor, parts: tuple,
            glu_cfg: tuple | None = None, down_cfg: tuple | None = None, *, places: tuple | None = None,
            res: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The weighted sum [T, n_embd] float32 of each token's chosen experts (NOTE [ experts on whole
    rows ]): h [T, K] the normed activations, weight [T, k] float32, `offs` [3, T * k] int64 the
    pairs' gate, up and down byte offsets from `anchor` (whole words of their types), `parts` their
    (qtype, rows, cols). `places` ((size_j, base_j) for j = gate, up, down): `offs` is instead the
    pairs' expert ids [T * k], part j of expert e at e * size_j + base_j. `res` [T, n_embd]: res +
    that sum, in res's dtype, written into `out` where given. `glu_cfg`, `down_cfg`: (BN, KB,
    num_warps) for a benchmark's sweep."""
    T, k = weight.shape
    (gq, N, K), _, (dq, Nd, Kd) = parts
    if h.stride(-1) != 1 or h.stride(0) != K:
        h = h.contiguous()
    offs = offs.contiguous()
    weight = weight.float().contiguous()
    G = T * k
    if places is None:
        srow, (m0, a0), (m1, a1), (m2, a2) = G, (1, 0), (1, 0), (1, 0)
    else:
        srow, (m0, a0), (m1, a1), (m2, a2) = 0, *places
    act = torch.empty(G, N, dtype=h.dtype, device=h.device)
    words, halfs, wb = _words(anchor, gq)
    n_chunks, nblk, row_bytes = _rows(gq, K)
    BN, KB, warps = glu_cfg or config(N, K)
    kw = {} if INTERPRET else {"num_warps": warps}
    glu_kernel[(triton.cdiv(N, BN), G)](h, words, anchor, halfs, act, offs, srow, m0, a0, m1, a1, k, N, n_chunks,
                                         nblk, row_bytes // wb, h.stride(0), QT=gq, WB=wb, BN=BN, KB=KB,
                                         EVEN=n_chunks % KB == 0 and K % 256 == 0, **kw)
    if res is not None and res.stride(-1) != 1:
        res = res.contiguous()
    if out is not None and not out.is_contiguous():
        raise ValueError(f"experts' out must be contiguous (strides {out.stride()})")
    if out is None:
        out = torch.empty(T, Nd, dtype=torch.float32 if res is None else res.dtype, device=h.device)
    words, halfs, wb = _words(anchor, dq)
    n_chunks, nblk, row_bytes = _rows(dq, Kd)
    BN, KB, warps = down_cfg or config(Nd, Kd)
    kw = {} if INTERPRET else {"num_warps": warps}
    down_kernel[(triton.cdiv(Nd, BN), T)](act, words, anchor, halfs, out, out if res is None else res, offs, srow,
                                          m2, a2, weight, k, Nd, n_chunks, nblk, row_bytes // wb, N,
                                          0 if res is None else res.stride(0), QT=dq, WB=wb, BN=BN, KB=KB,
                                          EVEN=n_chunks % KB == 0 and Kd % 256 == 0, HAS_RES=res is not None, **kw)
    return out
