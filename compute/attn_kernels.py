"""Triton kernels for attention: RoPE with the KV-cache write, and decode attention read in place.

NOTE [ decode attention ]
In a decode step each sequence adds one token, whose query attends the cached keys of its row.
The general path (model.attention_block) gathers each row's K and V into new tensors, casts them,
and runs scaled_dot_product_attention under a boolean mask, which on CUDA dispatches to the math
kernel: about twenty launches a layer, most of them copies. Here one launch reads the cache where
it lies (row `rows[t]`, slots 0..L-1, the KV head of the query head's group) and skips the slots
the step's mask hides, with an online softmax in float32 (FlashAttention's recurrence). Short
contexts give too few programs for a GPU (Llama-3.1-8B at batch 1: 32 query heads), so the
slots are split into chunks, each program keeping its running maximum, sum and weighted values,
and a second launch combines the chunks (flash-decoding). The arithmetic is float32 throughout,
so it agrees with the float64 reference as closely as the general path. A row is read only up to
its slots in use (`used`, from the step's meta), and its chunks split those slots, not L: a
captured graph pads L to its own length (runner.GRAPH_KV_MIN and up), and a short row's slots
still spread over up to n_split programs, a BL block at least each (chunks of L's length left a
50-slot row to one program's serial blocks: 2.5% slower decode on the 8B shape, BENCHMARKS.md).

NOTE [ RoPE and the cache write ]
Rotating q and k in torch takes a slice, four products, two sums and a concatenation for each,
and writing k and v into the cache two indexed copies with their casts: a dozen launches a layer
for a few kilobytes at decode. `rope_and_store` does it in one: a program per (token, head)
rotates its pairs in float32 (q into a new tensor; k, unless the cache keeps it unrotated) and
writes the token's k and v at (tok_row, tok_slot) in the cache's dtype. Where the model norms
each head of q and k before RoPE (Qwen3's and Gemma 3's attn_q_norm, attn_k_norm), the program
norms its head first (`norms`), as model.rms_norm does, in float32 and rounded to the
activations' dtype: those were two launches more a layer, on the chain of every decode step.

With `x8` decode attention also writes its output's int8 form for the Q4_K projection that follows
(qgemv8.py, NOTE [ int8 activations ]; a program's head is D / 32 whole blocks): the step's
quantization of o then costs no launch of its own.

Like qkernels.py, these kernels run on the CPU under Triton's interpreter (TRITON_INTERPRET=1), which is
how CI tests them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from layerstream.compute.qgemv8 import attach_q8, q8_blocks, q8_buffers, store_q8
from layerstream.compute.qkernels import INTERPRET

BL = 32  # cached slots a program reads per iteration
# programs to aim for: enough to keep every multiprocessor reading (132 on an H100); Triton's
# interpreter runs programs one after another, so there a few still split the slots
TARGET_PROGRAMS = 32 if INTERPRET else 512


@triton.jit
def _store_head(o, xq, xds, t, h, H, y, D: tl.constexpr, BD: tl.constexpr, X8: tl.constexpr):
    """Head h of token t's output y [BD] (o's dtype) into o [T, H * D]; X8: and its int8 form, D / 32
    blocks at block (t * H + h) * D / 32 of quantize_x's layout."""
    d = tl.arange(0, BD)
    tl.store(o + (t * H + h) * D + d, y, mask=d < D)
    if X8:
        qi, dx, sx = q8_blocks(tl.reshape(y.to(tl.float32), (BD // 32, 32)))
        blk = tl.arange(0, BD // 32)
        store_q8(xq, xds, (t * H + h).to(tl.int64) * (D // 32), blk, blk < D // 32, qi, dx, sx)


# The slot count and its split are plain arguments, not specialized (their divisibility would be):
# a decode graph captured at a longer KV bucket then compiles nothing, where a new specialization
# stalled the step that crossed the bucket (BENCHMARKS.md: SmolLM2 at 1,024 tokens).
@triton.jit(do_not_specialize=["L", "n_split"])
def _decode_kernel(q, kc, vc, mask, rows, used, o, xq, xds, part_m, part_l, part_acc, sq_t, sq_h, sk_r, sk_l, sk_h,
                   sv_r, sv_l, sv_h, sm_t, L, n_split, H, scale,
                   GROUP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BL: tl.constexpr,
                   SPLIT: tl.constexpr, X8: tl.constexpr):
    """Query head h of token t over chunk s of the slots its row uses (`used`, at most L), split in
    n_split chunks of whole BL-slot blocks (a chunk past them stores an empty part, its max -inf)."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    hk = h // GROUP
    row = tl.load(rows + t).to(tl.int64)
    d = tl.arange(0, BD)
    ok_d = d < D
    qv = tl.load(q + t * sq_t + h * sq_h + d, mask=ok_d, other=0).to(tl.float32) * scale
    m_i = tl.max(tl.full([BL], float("-inf"), tl.float32), axis=0)
    l_i = tl.sum(tl.zeros([BL], tl.float32), axis=0)
    acc = tl.zeros([BD], tl.float32)
    u = tl.minimum(tl.load(used + t).to(tl.int32), L)
    chunk = tl.cdiv(tl.cdiv(u, n_split), BL) * BL
    lo = s * chunk
    hi = tl.minimum(lo + chunk, u)
    kbase = kc + row * sk_r + hk * sk_h
    vbase = vc + row * sv_r + hk * sv_h
    for l0 in range(lo, hi, BL):
        ls = l0 + tl.arange(0, BL)
        valid = (tl.load(mask + t * sm_t + ls, mask=ls < hi, other=0) != 0) & (ls < hi)
        m2 = valid[:, None] & ok_d[None, :]
        kb = tl.load(kbase + ls[:, None].to(tl.int64) * sk_l + d[None, :], mask=m2, other=0).to(tl.float32)
        sc = tl.where(valid, tl.sum(kb * qv[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: keep every term 0
        p = tl.exp(sc - m_ref)
        alpha = tl.exp(m_i - m_ref)
        vb = tl.load(vbase + ls[:, None].to(tl.int64) * sv_l + d[None, :], mask=m2, other=0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * vb, axis=0)
        m_i = m_new
    if SPLIT:
        i = (t * H + h) * n_split + s
        tl.store(part_m + i, m_i)
        tl.store(part_l + i, l_i)
        tl.store(part_acc + i * BD + d, acc)
    else:
        _store_head(o, xq, xds, t, h, H, (acc / l_i).to(o.dtype.element_ty), D, BD, X8)


@triton.jit(do_not_specialize=["n_split"])
def _combine_kernel(part_m, part_l, part_acc, o, xq, xds, n_split, H, D: tl.constexpr, BD: tl.constexpr,
                    BS: tl.constexpr, X8: tl.constexpr):
    """Query head h of token t: its chunks' partial softmaxes weighted by exp(m_s - max m)."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BS)
    d = tl.arange(0, BD)
    ok_s = s < n_split
    base = (t * H + h) * n_split
    m = tl.load(part_m + base + s, mask=ok_s, other=float("-inf"))
    mx = tl.max(m, axis=0)
    w = tl.where(ok_s & (m > float("-inf")), tl.exp(m - mx), 0.0)
    den = tl.sum(w * tl.load(part_l + base + s, mask=ok_s, other=0), axis=0)
    acc = tl.load(part_acc + (base + s[:, None]) * BD + d[None, :], mask=ok_s[:, None], other=0)
    num = tl.sum(w[:, None] * acc, axis=0)
    _store_head(o, xq, xds, t, h, H, (num / den).to(o.dtype.element_ty), D, BD, X8)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor,
                     rows: torch.Tensor, L: int, scale: float, used: torch.Tensor | None = None,
                     x8: bool = False) -> torch.Tensor:
    """Attention of T one-token queries q [T, H, D] over slots 0..L-1 of their cache rows:
    k_cache, v_cache [rows, cap, Hkv, D] (last dim contiguous), mask [T, >= L] (bool, True where
    the query may attend; last dim contiguous), rows [T] (int64), used [T] (the slots in use in
    each token's row: none further is read; default L). A new [T, H * D] tensor in q's dtype.
    Every query must see at least one slot. `x8` (H * D a multiple of 256, D of 32): the result
    carries its int8 form (qgemv8.attach_q8)."""
    T, H, D = q.shape
    Hkv = k_cache.shape[2]
    if H % Hkv or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or mask.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError(f"decode attention needs H ({H}) a multiple of Hkv ({Hkv}) and contiguous last dims")
    if x8 and (D % 32 or H * D % 256):
        raise ValueError(f"decode attention's int8 form needs D a multiple of 32 and H * D of 256, not {H} x {D}")
    BD = triton.next_power_of_2(D)
    most = max(1, triton.cdiv(TARGET_PROGRAMS, T * H))  # (the split at any L: the combine's block, one compile)
    n_split = max(1, min(triton.cdiv(L, BL), most))  # (each token's chunks: its used slots')
    o = torch.empty(T, H * D, dtype=q.dtype, device=q.device)
    xq, xds = q8_buffers(T, H * D, q.device) if x8 else (o, o)
    split = n_split > 1
    if split:
        part_m = torch.empty(T * H * n_split, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(T * H * n_split * BD, dtype=torch.float32, device=q.device)
    else:
        part_m = part_l = part_acc = o
    m8 = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    kw = {} if INTERPRET else {"num_warps": 4}
    if used is None:
        used = torch.full((T,), L, dtype=torch.long, device=q.device)
    _decode_kernel[(T, H, n_split)](q, k_cache, v_cache, m8, rows, used, o, xq, xds, part_m, part_l, part_acc,
                                    q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                                    v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), m8.stride(0),
                                    L, n_split, H, scale,
                                    GROUP=H // Hkv, D=D, BD=BD, BL=BL, SPLIT=split, X8=x8, **kw)
    if split:
        _combine_kernel[(T, H)](part_m, part_l, part_acc, o, xq, xds, n_split, H, D=D, BD=BD,
                                BS=triton.next_power_of_2(most), X8=x8)
    if x8:
        attach_q8(o, xq, xds)
    return o


@triton.jit
def _normed(src, w, idx, mask, inv, NORM: tl.constexpr):
    """src[idx] in float32; with NORM times inv and w[idx], rounded to src's dtype (model.rms_norm's
    output) and back."""
    x = tl.load(src + idx, mask=mask, other=0).to(tl.float32)
    if NORM:
        x = (x * inv * tl.load(w + idx, mask=mask, other=0).to(tl.float32)).to(src.dtype.element_ty).to(tl.float32)
    return x


@triton.jit
def _inv_rms(src, eps, D: tl.constexpr, BD: tl.constexpr, NORM: tl.constexpr):
    """1 / sqrt(mean(src[:D]^2) + eps) in float32 (1 without NORM)."""
    if NORM:
        d = tl.arange(0, BD)
        x = tl.load(src + d, mask=d < D, other=0).to(tl.float32)
        return 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    return 1.0


@triton.jit
def _rope_store_kernel(q, k, v, cos, sin, q_out, kc, vc, tok_row, tok_slot, qn, kn, eps, H, Hkv, sq_t, sq_h,
                       sk_t, sk_h, sv_t, sv_h, sc_t, skc_r, skc_l, skc_h, svc_r, svc_l, svc_h,
                       D: tl.constexpr, HALF: tl.constexpr, BH: tl.constexpr, BP: tl.constexpr, BD: tl.constexpr,
                       NEOX: tl.constexpr, ROTATE_K: tl.constexpr, NORM: tl.constexpr):
    """Head j of token t: j < H a query head, then Hkv key/value heads; NORM: q's heads normed by
    qn, k's by kn (RMSNorm over D, eps) before RoPE."""
    t = tl.program_id(0)
    j = tl.program_id(1)
    i = tl.arange(0, BH)
    ok = i < HALF
    if NEOX:  # pairs (i, i + rope_dim / 2)
        ia, ib = i, i + HALF
    else:  # llama.cpp NORM: adjacent pairs (2i, 2i + 1)
        ia, ib = 2 * i, 2 * i + 1
    c = tl.load(cos + t * sc_t + i, mask=ok, other=0).to(tl.float32)
    s = tl.load(sin + t * sc_t + i, mask=ok, other=0).to(tl.float32)
    p = 2 * HALF + tl.arange(0, BP)  # features past rope_dim pass through
    okp = p < D
    if j < H:
        src = q + t * sq_t + j * sq_h
        dst = q_out + (t * H + j) * D
        inv = _inv_rms(src, eps, D, BD, NORM)
        a = _normed(src, qn, ia, ok, inv, NORM)
        b = _normed(src, qn, ib, ok, inv, NORM)
        tl.store(dst + ia, (a * c - b * s).to(q_out.dtype.element_ty), mask=ok)
        tl.store(dst + ib, (a * s + b * c).to(q_out.dtype.element_ty), mask=ok)
        tl.store(dst + p, _normed(src, qn, p, okp, inv, NORM).to(q_out.dtype.element_ty), mask=okp)
    else:
        h = j - H
        row = tl.load(tok_row + t).to(tl.int64)
        slot = tl.load(tok_slot + t).to(tl.int64)
        src = k + t * sk_t + h * sk_h
        dst = kc + row * skc_r + slot * skc_l + h * skc_h
        inv = _inv_rms(src, eps, D, BD, NORM)
        a = _normed(src, kn, ia, ok, inv, NORM)
        b = _normed(src, kn, ib, ok, inv, NORM)
        if ROTATE_K:
            a, b = a * c - b * s, a * s + b * c
        tl.store(dst + ia, a.to(kc.dtype.element_ty), mask=ok)
        tl.store(dst + ib, b.to(kc.dtype.element_ty), mask=ok)
        tl.store(dst + p, _normed(src, kn, p, okp, inv, NORM).to(kc.dtype.element_ty), mask=okp)
        d = tl.arange(0, BH * 2)
        vdst = vc + row * svc_r + slot * svc_l + h * svc_h
        for d0 in tl.static_range(0, D, BH * 2):
            okd = d0 + d < D
            tl.store(vdst + d0 + d, tl.load(v + t * sv_t + h * sv_h + d0 + d, mask=okd, other=0)
                     .to(vc.dtype.element_ty), mask=okd)


def rope_and_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, tok_row: torch.Tensor, tok_slot: torch.Tensor,
                   neox: bool, rotate_k: bool = True, norms: tuple | None = None) -> torch.Tensor:
    """q [T, H, D] rotated (a new tensor); k [T, Hkv, D] rotated when `rotate_k` and written with
    v to k_cache/v_cache [rows, cap, Hkv, D] at (tok_row[t], tok_slot[t]). cos, sin [T, rope_dim/2]
    as model.rope_tables makes them. `norms` (q's [D] weights, k's, eps): each head of q and of k
    RMS-normed first. See NOTE [ RoPE and the cache write ]."""
    T, H, D = q.shape
    Hkv = k.shape[1]
    half = cos.shape[-1]
    if any(x.stride(-1) != 1 for x in (q, k, v, cos, sin, k_cache, v_cache)):
        raise ValueError("rope_and_store needs contiguous last dims")
    q_out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
    if T == 0:
        return q_out
    BH = triton.next_power_of_2(half)
    qn, kn, eps = norms or (q, k, 0.0)
    if norms is not None and (qn.shape != (D,) or kn.shape != (D,)):
        raise ValueError(f"rope_and_store's norms must be [{D}] (q's {tuple(qn.shape)}, k's {tuple(kn.shape)})")
    _rope_store_kernel[(T, H + Hkv)](q, k, v, cos, sin, q_out, k_cache, v_cache, tok_row, tok_slot, qn, kn,
                                     float(eps), H, Hkv, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                                     v.stride(0), v.stride(1), cos.stride(0), k_cache.stride(0), k_cache.stride(1),
                                     k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
                                     D=D, HALF=half, BH=BH, BP=max(1, triton.next_power_of_2(max(1, D - 2 * half))),
                                     BD=triton.next_power_of_2(D), NEOX=neox, ROTATE_K=rotate_k,
                                     NORM=norms is not None)
    return q_out
