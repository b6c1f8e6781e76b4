"""The transformer math: RMSNorm, RoPE, grouped-query attention over a KV ring, SwiGLU.

Free of I/O, sockets and globals. A layer's weights come in as a dict of tensors, so resident
and streamed layers run the same code. Tokens of a batch are packed: T is the total number of
new tokens over all B sequences of the step.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from layerstream.compute.expert_layout import EXPERT_TENSORS
from layerstream.compute.qlinear import (EXPERT_SCRATCH_MAX_ELEMS, FUSED_TYPES, QuantWeight,  # noqa: F401
                                         dequantized_experts, grouped_matmul, grouped_mm_dtype, linear, linear_many,
                                         scratch_cap)
from layerstream.loader.gguf_index import HParams

LayerWeights = dict[str, "torch.Tensor | QuantWeight"]  # short GGUF names: "attn_q.weight", ...
ATTN_TEMP_BYTES = 256 << 20  # attention temporaries of one group of sequences / query rows


@dataclass
class StepMeta:
    """What every layer of one forward step needs to know about the batch (built once a step)."""

    tok_row: torch.Tensor  # [T] KV-cache row (sequence slot) of each new token
    tok_b: torch.Tensor  # [T] batch index of each new token
    tok_slot: torch.Tensor  # [T] physical KV slot each new token writes
    q_index: torch.Tensor  # [B, S] index of each padded query into the packed tokens
    q_valid: torch.Tensor  # [B, S] bool, False on padding
    out_index: torch.Tensor  # [T] index of each packed token in the flattened [B*S] padded layout
    rows: torch.Tensor  # [B] KV-cache row of each sequence
    kv_len: int  # slots 0..kv_len-1 of the rows are read by attention
    cos_q: torch.Tensor  # [T, rope_dim/2]
    sin_q: torch.Tensor
    cos_k: torch.Tensor | None  # [B, kv_len, rope_dim/2]; None when K is stored rotated
    sin_k: torch.Tensor | None
    mask: torch.Tensor  # [B, 1, S, kv_len] bool, True where a query may attend
    # the local (sliding-window) layers' RoPE tables and mask (Gemma 3); None without such layers
    cos_q_swa: torch.Tensor | None = None
    sin_q_swa: torch.Tensor | None = None
    cos_k_swa: torch.Tensor | None = None
    sin_k_swa: torch.Tensor | None = None
    mask_swa: torch.Tensor | None = None
    # Triton kernels of attn_kernels.py, where Triton runs the matmuls (the runner sets them):
    # RoPE with the cache write in one launch, and, when every sequence adds one token and K is
    # stored rotated, attention read from the cache in place (NOTE [ decode attention ])
    rope_kernel: bool = False
    decode_kernel: bool = False


def rope_inv_freq(hp: HParams, freq_factors: torch.Tensor | None = None, theta: float | None = None) -> torch.Tensor:
    """Inverse frequencies [rope_dim/2] in float64; Llama 3.1 factors divide them."""
    i = torch.arange(0, hp.rope_dim, 2, dtype=torch.float64)
    inv = (theta or hp.rope_theta) ** (-i / hp.rope_dim)
    if freq_factors is not None:
        inv = inv / freq_factors.to(torch.float64).cpu()
    return inv


def rope_tables(inv_freq: torch.Tensor, pos: torch.Tensor, scale: float, dtype: torch.dtype):
    """cos, sin of shape [*pos.shape, rope_dim/2] for integer positions."""
    ang = (pos.to(torch.float64) / scale).unsqueeze(-1) * inv_freq.to(pos.device)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    """Rotate the first rope_dim features of x [..., H, D]; cos/sin [..., rope_dim/2]."""
    rd = cos.shape[-1] * 2
    xr, xpass = x[..., :rd], x[..., rd:]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    if neox:  # pairs (i, i + rd/2)
        a, b = xr[..., : rd // 2], xr[..., rd // 2 :]
        out = torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
    else:  # llama.cpp NORM: adjacent pairs (2i, 2i+1)
        a, b = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    return torch.cat((out, xpass), dim=-1) if xpass.shape[-1] else out


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    if x.is_cuda:  # one fused kernel (it computes in float32 inside)
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


@functools.cache
def _attn_kernels():
    """compute.attn_kernels, imported on first use (it needs Triton, which the runner has checked
    before it sets meta.rope_kernel or meta.decode_kernel)."""
    from layerstream.compute import attn_kernels

    return attn_kernels


def attention_block(hp: HParams, w: LayerWeights, x: torch.Tensor, meta: StepMeta,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, swa: bool = False) -> torch.Tensor:
    """Self-attention of the packed tokens x [T, E]; writes their K/V into the caches.

    k_cache, v_cache: [rows, cap, n_head_kv, head_dim]. With a sliding ring K is stored before
    RoPE and rotated at read time, since positions within the cache change as it slides
    (StreamingLLM); otherwise (meta.cos_k None) it is stored rotated. A local layer (`swa`) takes
    the step's sliding-window mask and its own RoPE tables.
    """
    cos_q, sin_q, cos_k_all, sin_k_all, mask_all = (
        (meta.cos_q_swa, meta.sin_q_swa, meta.cos_k_swa, meta.sin_k_swa, meta.mask_swa) if swa
        else (meta.cos_q, meta.sin_q, meta.cos_k, meta.sin_k, meta.mask))
    T = x.shape[0]
    H, Hkv, D = hp.n_head, hp.n_head_kv, hp.head_dim
    h = rms_norm(x, w["attn_norm.weight"], hp.norm_eps)
    q, k, v = linear_many(h, [w["attn_q.weight"], w["attn_k.weight"], w["attn_v.weight"]],
                          [w.get("attn_q.bias"), w.get("attn_k.bias"), w.get("attn_v.bias")])
    q, k, v = q.view(T, H, D), k.view(T, Hkv, D), v.view(T, Hkv, D)
    if "attn_q_norm.weight" in w:  # qwen3, gemma3: per-head RMSNorm before RoPE
        q = rms_norm(q, w["attn_q_norm.weight"], hp.norm_eps)
        k = rms_norm(k, w["attn_k_norm.weight"], hp.norm_eps)
    # positions never change without sliding (cos_k None): K is stored rotated, once
    if meta.rope_kernel:
        q = _attn_kernels().rope_and_store(q, k, v, cos_q, sin_q, k_cache, v_cache, meta.tok_row, meta.tok_slot,
                                           hp.rope_neox, rotate_k=cos_k_all is None)
    else:
        q = apply_rope(q, cos_q, sin_q, hp.rope_neox)
        if cos_k_all is None:
            k = apply_rope(k, cos_q, sin_q, hp.rope_neox)
        k_cache[meta.tok_row, meta.tok_slot] = k.to(k_cache.dtype)
        v_cache[meta.tok_row, meta.tok_slot] = v.to(v_cache.dtype)
    if meta.decode_kernel and cos_k_all is None:  # token t is sequence t's only one
        o = _attn_kernels().decode_attention(q, k_cache, v_cache, mask_all[:, 0, 0], meta.rows, meta.kv_len,
                                             hp.attn_scale or 1 / math.sqrt(D))
        return _attn_out(hp, w, x, o)

    B, S = meta.q_index.shape
    L = meta.kv_len
    # NOTE: attention's temporaries grow with B * L (K/V gathered, then expanded to every head for
    # grouped queries) and with S * L (scores, when the math kernel runs): groups of sequences
    # and of query rows keep them under ATTN_TEMP_BYTES, which the plan counts.
    per_seq = L * (3 * H + 2 * Hkv) * D * x.element_size()
    per_row = H * L * 4
    bc = max(1, min(B, ATTN_TEMP_BYTES // max(1, per_seq + S * per_row)))
    sc = S if bc > 1 else max(1, min(S, (ATTN_TEMP_BYTES - per_seq) // per_row))
    if sc < S:
        bc = 1
    full = (meta.rows, meta.q_index, mask_all, cos_k_all, sin_k_all)
    scale = hp.attn_scale or None
    groups = [full] if bc == B else [tuple(None if t is None else t[b0:b0 + bc] for t in full)
                                     for b0 in range(0, B, bc)]
    outs = []
    for rows, q_index, mask, cos_k, sin_k in groups:
        K = k_cache[rows, :L].to(x.dtype)  # [b, L, Hkv, D]
        V = v_cache[rows, :L].to(x.dtype)
        if cos_k is not None:
            K = apply_rope(K, cos_k, sin_k, hp.rope_neox)
        Q, Kt, Vt = q[q_index].transpose(1, 2), K.transpose(1, 2), V.transpose(1, 2)  # [b, H, S, D], [b, Hkv, L, D]
        if sc == S:
            outs.append(F.scaled_dot_product_attention(Q, Kt, Vt, attn_mask=mask, enable_gqa=(H != Hkv), scale=scale))
        else:
            outs.append(torch.cat([F.scaled_dot_product_attention(
                Q[:, :, s0:s0 + sc], Kt, Vt, attn_mask=mask[:, :, s0:s0 + sc], enable_gqa=(H != Hkv), scale=scale)
                for s0 in range(0, S, sc)], dim=2))
    o = outs[0] if len(outs) == 1 else torch.cat(outs)  # [B, H, S, D]
    o = o.transpose(1, 2).reshape(B * S, H * D)[meta.out_index]  # back to packed order (no host sync)
    return _attn_out(hp, w, x, o)


def _attn_out(hp: HParams, w: LayerWeights, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """The residual stream after attention's output o [T, H * D] is projected (and normed)."""
    o = linear(o, w["attn_output.weight"], w.get("attn_output.bias"))
    if "post_attention_norm.weight" in w:  # gemma3: the block's output is normed before the residual
        o = rms_norm(o, w["post_attention_norm.weight"], hp.norm_eps)
    return x + o


_ACTS = {"silu": F.silu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh")}  # HParams.ffn_act


def ffn_block(hp: HParams, w: LayerWeights, x: torch.Tensor) -> torch.Tensor:
    h = rms_norm(x, w["ffn_norm.weight"], hp.norm_eps)
    gate, up, down = w["ffn_gate.weight"], w["ffn_up.weight"], w["ffn_down.weight"]
    act = _ACTS.get(hp.ffn_act, F.silu)
    if all(getattr(m, "cpu_only", False) for m in (gate, up, down)):  # the CPU's whole (cpu/split.py)
        y = gate.ffn(h, up, down, act)
    else:
        g, u = linear_many(h, [gate, up])
        y = linear(act(g) * u, down)
    if "post_ffw_norm.weight" in w:
        y = rms_norm(y, w["post_ffw_norm.weight"], hp.norm_eps)
    return x + y


def expert(w: "torch.Tensor | QuantWeight", e: int, n_expert: int) -> "torch.Tensor | QuantWeight":
    """Expert e's matrix of a 3-D expert tensor (dense [E, N, K], or blocks held as [E * N, K])."""
    if isinstance(w, QuantWeight):
        n = w.shape[0] // n_expert
        rb = w.nbytes // w.shape[0]
        return QuantWeight(w.raw[e * n * rb : (e + 1) * n * rb], w.qtype, (n, w.shape[1]))
    return w[e]


def route(hp: HParams, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts each token uses and their weights: softmax over all experts, the top
    n_expert_used, renormalised when the model says so (Mixtral's and Qwen3-MoE's routing)."""
    probs = torch.softmax(logits.float(), dim=-1)
    weight, chosen = probs.topk(hp.n_expert_used, dim=-1)
    if hp.expert_norm:
        weight = weight / weight.sum(-1, keepdim=True)
    return weight, chosen


# Decode steps of up to this many tokens run a MoE layer's chosen experts as grouped launches
# (NOTE [ grouped experts ]); larger steps run one expert at a time, its tokens as one batch.
GROUPED_MAX_TOKENS = 8


def moe_route(hp: HParams, w: LayerWeights, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A MoE layer's FFN input: the normed activations h, and each token's chosen experts'
    weights and ids (everything before the experts run)."""
    h = rms_norm(x, w["ffn_norm.weight"], hp.norm_eps)
    weight, chosen = route(hp, linear(h, w["ffn_gate_inp.weight"]))
    return h, weight, chosen


def predict_next(hp: HParams, nxt: LayerWeights, x: torch.Tensor) -> torch.Tensor:
    """The experts the next layer's router (`nxt`: its norm and router) would choose for x, this
    layer's expert input: a prediction of that layer's choice (experts.py, NOTE [ expert
    prefetch ]), [T, k] ids."""
    return moe_route(hp, nxt, x)[2]


def moe_block(hp: HParams, w: LayerWeights, x: torch.Tensor) -> torch.Tensor:
    """A mixture-of-experts FFN: each token's chosen experts (SwiGLU each), weighted and summed."""
    h, weight, chosen = moe_route(hp, w, x)
    out = None
    if chosen.shape[0] <= GROUPED_MAX_TOKENS and _grouped(w):
        ex = w.get("experts")
        pred = predict_next(hp, ex.next_router, x) if ex is not None and ex.next_router is not None else None
        out = _experts_grouped(hp, w, h, weight, chosen, pred)
    elif "experts" not in w and h.is_cuda:  # every expert at hand (a prompt, or a resident layer);
        out = _experts_prefill(hp, w, h, weight, chosen)  # on the CPU one by one is faster (NOTE below)
    if out is None:
        out = _experts_one_by_one(hp, w, h, weight, chosen)
    return x + out.to(x.dtype)


# NOTE [ grouped prefill ]
# A prompt step's tokens choose nearly every expert of a layer (512 tokens, 8 of 128 each: about
# 32 (token, choice) pairs an expert). Run one expert at a time, that is ten launches an expert,
# over a thousand a layer, and the host's launches, not the PCIe copies, bound the step (473
# tok/s on the Qwen3-30B-A3B shape at 4 GiB against a PCIe floor of 1,636, BENCHMARKS.md). So
# the pairs are sorted by expert once, and blocks are dequantized as many experts at a time as
# the plan's scratch holds (qlinear.scratch_elems counts the expert tensors), one launch a
# matrix. Each matrix of those experts is then one grouped GEMM over the pairs' runs
# (torch._grouped_mm). CUDA's grouped GEMM takes bf16 only: with fp16 activations the experts
# are dequantized into the same scratch as bf16, and the pairs' activations converted (bf16
# keeps fp16's range with 8 bits of mantissa against 11; the weights were 4 to 6 bits).
# Where this torch has no grouped GEMM, each expert's pairs are padded to the largest count of a
# run of experts and multiplied by `torch.bmm` (2.3x the grouped GEMM's time on an H200, with
# the resident engine: BENCHMARKS.md); runs are cut where padding would pass `_pad_rows`
# (skewed routing: one expert's many pairs would pad all the others). An expert too large for
# the scratch alone goes one by one, as before (Mixtral's 176M values fit its 256M: qlinear.
# EXPERT_SCRATCH_MAX_ELEMS).
# On the CPU, where a step is bound by arithmetic, not launches, one expert at a time stays: on
# this project's 2-core CPU a 512-token prompt of two Qwen3-30B-A3B-shaped layers took 654 ms
# one by one, 904 ms with the CPU's grouped GEMM (torch 2.13) and 1,032 ms padded. The tests
# run both ways on the CPU against float64 (tests/compute/test_grouped_prefill.py).


def _runs(counts: list[int], e0: int, e1: int, cap: int) -> list[tuple[int, int]]:
    """Experts [e0, e1) cut into runs [a, b) whose padded rows, (b - a) * max(counts[a:b]), stay
    within `cap` (a run of one expert whatever its count); runs of no pairs are left out."""
    out, a = [], e0
    while a < e1:
        b, top = a + 1, counts[a]
        while b < e1 and (b + 1 - a) * max(top, counts[b]) <= cap:
            top = max(top, counts[b])
            b += 1
        if top:
            out.append((a, b))
        a = b
    return out


def _experts_prefill(hp: HParams, w: LayerWeights, h: torch.Tensor, weight: torch.Tensor,
                     chosen: torch.Tensor) -> torch.Tensor | None:
    """The weighted sum of each token's chosen experts as batched GEMMs (NOTE [ grouped prefill ]);
    None where a single expert's matrices do not fit the scratch."""
    mats = [w[n] for n in EXPERT_TENSORS]
    E, k = hp.n_expert, hp.n_expert_used
    quant = isinstance(mats[0], QuantWeight)
    if quant:
        if not all(isinstance(m, QuantWeight) for m in mats):
            return None
        per = sum(m.shape[0] // E * m.shape[1] for m in mats)  # values of one expert's three matrices
        chunk = min(E, scratch_cap(h.device, h.dtype, EXPERT_SCRATCH_MAX_ELEMS) // per)
        if chunk < 1:
            return None
    else:
        chunk = E
    flat = chosen.flatten()
    order = flat.argsort(stable=True)
    counts_dev = torch.bincount(flat, minlength=E)
    counts = counts_dev.tolist()  # the host sync of this layer
    starts = [0] * E
    for e in range(1, E):
        starts[e] = starts[e - 1] + counts[e - 1]
    xs = h[order // k]  # the pairs' activations, in runs by expert
    ys = torch.empty_like(xs)  # each pair's down output (n_embd wide, as its input)
    gdt = grouped_mm_dtype(h.device.type, h.dtype)
    if gdt is not None:
        ends = counts_dev.cumsum(0).to(torch.int32)
        xg = xs.to(gdt)
        for e0 in range(0, E, chunk):  # one grouped GEMM a matrix of each chunk of experts
            e1 = min(E, e0 + chunk)
            p0, p1 = starts[e0], starts[e1 - 1] + counts[e1 - 1]
            if p0 == p1:
                continue
            gate, up, down = dequantized_experts(mats, E, e0, e1, h.dtype, gdt) if quant else \
                [m[e0:e1].to(gdt) for m in mats]
            offs = ends[e0:e1] - p0
            x = xg[p0:p1]
            a = F.silu(torch._grouped_mm(x, gate.transpose(1, 2), offs=offs).float()) * \
                torch._grouped_mm(x, up.transpose(1, 2), offs=offs).float()
            ys[p0:p1] = torch._grouped_mm(a.to(gdt), down.transpose(1, 2), offs=offs)
    else:  # batched GEMMs over runs of experts, each expert's pairs padded to the run's largest count
        by_expert = flat[order]
        rank = torch.arange(flat.numel(), device=h.device) - (counts_dev.cumsum(0) - counts_dev)[by_expert]
        cap = _pad_rows(flat.numel(), h.shape[0], E)
        for e0 in range(0, E, chunk):
            e1 = min(E, e0 + chunk)
            runs = _runs(counts, e0, e1, cap)
            if not runs:
                continue
            gate, up, down = dequantized_experts(mats, E, e0, e1, h.dtype) if quant else [m[e0:e1] for m in mats]
            for a, b in runs:
                p0, p1 = starts[a], starts[b - 1] + counts[b - 1]
                el, r = by_expert[p0:p1] - a, rank[p0:p1]
                xp = h.new_zeros(b - a, max(counts[a:b]), h.shape[1])
                xp[el, r] = xs[p0:p1]
                g = torch.bmm(xp, gate[a - e0 : b - e0].transpose(1, 2))
                u = torch.bmm(xp, up[a - e0 : b - e0].transpose(1, 2))
                ys[p0:p1] = torch.bmm(F.silu(g) * u, down[a - e0 : b - e0].transpose(1, 2))[el, r]
    out = torch.zeros_like(h, dtype=torch.float32)
    return out.index_add_(0, order // k, ys.float() * weight.flatten()[order, None])


def _pad_rows(pairs: int, tokens: int, n_expert: int) -> int:
    """Padded rows a run of experts may take: twice an even share of the pairs in 16 experts, or
    one token's worth of rows more (bounds the temporaries at O(tokens) whatever the routing)."""
    return 2 * pairs * 16 // n_expert + tokens


def _experts_one_by_one(hp: HParams, w: LayerWeights, h: torch.Tensor, weight: torch.Tensor,
                        chosen: torch.Tensor) -> torch.Tensor:
    """Only the experts some token chose run, each on its tokens as one batch."""
    out = torch.zeros_like(h, dtype=torch.float32)
    # the (token, choice) pairs grouped by expert: one host sync a layer (the counts), not one an expert
    flat = chosen.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=hp.n_expert).tolist()
    ids = [e for e, c in enumerate(counts) if c]
    if "experts" in w:  # streamed: only these experts are fetched (experts.ExpertSet)
        mats = w["experts"].fetch(ids)
    else:
        mats = {e: tuple(expert(w[n], e, hp.n_expert) for n in EXPERT_TENSORS) for e in ids}
    k = hp.n_expert_used
    tok_all, wt_all = order // k, weight.flatten()[order, None]
    start = 0
    for e in ids:
        end = start + counts[e]
        tok = tok_all[start:end]
        he = h[tok] if tok.numel() < h.shape[0] else h  # every token (decode at batch 1): no gather
        gate, up, down = mats[e]
        y = linear(F.silu(linear(he, gate)) * linear(he, up), down)
        out.index_add_(0, tok, y.float() * wt_all[start:end])
        start = end
    return out


# NOTE [ grouped experts ]
# A decode step's experts run as three kernel launches, not three per expert (qkernels.
# grouped_matmul): every (token, choice) pair g of the step is a group, whose gate and up
# matrices multiply its token's activations, and whose down matrix multiplies the pair's own
# SwiGLU output; the pairs' outputs are then weighted and summed per token. A group finds its
# expert's blocks by byte offset from one anchor tensor. For a resident layer the offsets come
# from the chosen ids on the device (no host sync). For a streamed layer they are the
# addresses of the expert cache's entries (experts.ExpertSet), known once its fetch is done.


def _grouped(w: LayerWeights) -> bool:
    """Whether a layer's experts are blocks the grouped kernel reads."""
    if "experts" in w:
        return w["experts"].grouped
    mats = [w.get(n) for n in EXPERT_TENSORS]
    return all(isinstance(m, QuantWeight) and m.qtype in FUSED_TYPES for m in mats)


def _experts_grouped(hp: HParams, w: LayerWeights, h: torch.Tensor, weight: torch.Tensor,
                     chosen: torch.Tensor, pred: torch.Tensor | None = None) -> torch.Tensor:
    flat = chosen.flatten()
    if "experts" in w:  # streamed: the chosen experts' cache entries, by address
        ex = w["experts"]
        ids = ex.read_ids(flat if pred is None else torch.cat((flat, pred.flatten())))  # the host sync of this layer
        offs, keep, run_cpu = ex.prepare(ids[: flat.numel()], h, weight)
        out = experts_grouped(h, weight if keep is None else weight * keep.to(h.device, non_blocking=True),
                              ex.cache.pool, offs.to(h.device), ex.parts)
        ex.prefetch(ids[flat.numel() :])  # while the device computes (NOTE [ expert prefetch ])
        if run_cpu is None:
            return out
        # the device's experts are launched first, then the CPU computes its own (NOTE [ CPU experts ])
        return out + run_cpu().to(h.device, non_blocking=True)
    else:  # resident: expert e is a byte range of each [E * N, K] block matrix, found on the device
        anchor = w[EXPERT_TENSORS[0]].raw
        offs = torch.stack([flat * (w[n].nbytes // hp.n_expert) + (w[n].raw.data_ptr() - anchor.data_ptr())
                            for n in EXPERT_TENSORS])
        parts = tuple((w[n].qtype, w[n].shape[0] // hp.n_expert, w[n].shape[1]) for n in EXPERT_TENSORS)
    return experts_grouped(h, weight, anchor, offs, parts)


def experts_grouped(h: torch.Tensor, weight: torch.Tensor, anchor: torch.Tensor, offs: torch.Tensor,
                    parts: tuple) -> torch.Tensor:
    """The weighted sum of each token's chosen experts (NOTE [ grouped experts ]): `offs` [3, T * k]
    holds the byte offsets from `anchor` of each (token, choice) pair's gate, up and down blocks,
    `parts` their (qtype, rows, cols). Three launches at most, no host sync: a CUDA graph may
    hold it (runner.py, NOTE [ decode graphs ])."""
    T, k = weight.shape
    dev = h.device
    (gq, N, K), (uq, _, _), (dq, Nd, Kd) = parts
    rows = torch.arange(T, device=dev, dtype=torch.int32).repeat_interleave(k)
    if gq == uq:  # gate and up of every pair: one launch
        gu = grouped_matmul(h, anchor, gq, N, K, offs[:2].flatten(), rows.repeat(2))
        g, u = gu[: T * k], gu[T * k :]
    else:
        g, u = (grouped_matmul(h, anchor, q, N, K, offs[j], rows) for j, q in ((0, gq), (1, uq)))
    d = grouped_matmul(F.silu(g) * u, anchor, dq, Nd, Kd, offs[2], torch.arange(T * k, device=dev, dtype=torch.int32))
    return (d.float().view(T, k, -1) * weight.unsqueeze(-1)).sum(1)


def layer_forward(hp: HParams, w: LayerWeights, x: torch.Tensor, meta: StepMeta,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, swa: bool = False) -> torch.Tensor:
    """One transformer block on packed tokens x [T, E]; `swa`: a local (sliding-window) layer."""
    x = attention_block(hp, w, x, meta, k_cache, v_cache, swa)
    return moe_block(hp, w, x) if hp.n_expert else ffn_block(hp, w, x)


def head_forward(hp: HParams, x: torch.Tensor, norm_w: torch.Tensor, out_w: torch.Tensor) -> torch.Tensor:
    """Final RMSNorm and output head: x [N, E] -> logits [N, V] in float32."""
    return linear(rms_norm(x, norm_w, hp.norm_eps), out_w).float()


def build_step_meta(hp: HParams, inv_freq: torch.Tensor, seqs: list["SeqStep"], device: torch.device,
                    dtype: torch.dtype, kv_len: int | None = None, rotate_k_at_read: bool = True,
                    inv_freq_swa: torch.Tensor | None = None) -> StepMeta:
    """Pack the step's sequences; positions come from the KV ring of each sequence.

    kv_len pads the attended slots to a fixed length (masked), for captured CUDA graphs. With
    local layers (hp.swa_window), their mask also hides keys `swa_window` or more positions
    back, and their RoPE tables come from `inv_freq_swa`, unscaled.
    """
    B = len(seqs)
    S = max(len(s.slots) for s in seqs)
    L = max(kv_len or 0, max(len(s.kv_pos) for s in seqs))
    tok_row, tok_b, tok_slot, tok_pos = [], [], [], []
    q_index = torch.zeros(B, S, dtype=torch.long)
    q_valid = torch.zeros(B, S, dtype=torch.bool)
    q_pos = torch.full((B, S), -1, dtype=torch.long)
    kv_pos = torch.full((B, L), -1, dtype=torch.long)
    t = 0
    for b, s in enumerate(seqs):
        n = len(s.slots)
        tok_row += [s.row] * n
        tok_b += [b] * n
        tok_slot += s.slots
        tok_pos += s.positions
        q_index[b, :n] = torch.arange(t, t + n)
        q_valid[b, :n] = True
        q_pos[b, :n] = torch.tensor(s.positions)
        kv_pos[b, : len(s.kv_pos)] = torch.tensor(s.kv_pos)
        t += n
    out_index = q_valid.flatten().nonzero().flatten()  # on the host: no device sync
    mask = (kv_pos[:, None, :] >= 0) & (kv_pos[:, None, :] <= q_pos[:, :, None])  # [B, S, L]
    mask |= ~q_valid[:, :, None]  # padded queries see everything (finite; dropped later)
    tok_pos_t = torch.tensor(tok_pos, dtype=torch.long)
    cos_q, sin_q = rope_tables(inv_freq, tok_pos_t, hp.rope_scale, dtype)
    cos_k = sin_k = None
    if rotate_k_at_read:
        cos_k, sin_k = rope_tables(inv_freq, kv_pos.clamp(min=0), hp.rope_scale, dtype)
    to = lambda a: a.to(device, non_blocking=True)  # noqa: E731
    swa = {}
    if hp.swa_window:
        near = (q_pos[:, :, None] - kv_pos[:, None, :]) < hp.swa_window
        cq, sq = rope_tables(inv_freq_swa, tok_pos_t, 1.0, dtype)
        swa = dict(cos_q_swa=to(cq), sin_q_swa=to(sq), mask_swa=to(((mask & near) | ~q_valid[:, :, None])[:, None]))
        if rotate_k_at_read:
            ck, sk = rope_tables(inv_freq_swa, kv_pos.clamp(min=0), 1.0, dtype)
            swa |= dict(cos_k_swa=to(ck), sin_k_swa=to(sk))
    return StepMeta(
        tok_row=to(torch.tensor(tok_row, dtype=torch.long)),
        tok_b=to(torch.tensor(tok_b, dtype=torch.long)),
        tok_slot=to(torch.tensor(tok_slot, dtype=torch.long)),
        q_index=to(q_index), q_valid=to(q_valid), out_index=to(out_index),
        rows=to(torch.tensor([s.row for s in seqs], dtype=torch.long)),
        kv_len=L,
        cos_q=to(cos_q), sin_q=to(sin_q),
        cos_k=None if cos_k is None else to(cos_k), sin_k=None if sin_k is None else to(sin_k),
        mask=to(mask[:, None]),
        **swa,
    )


@dataclass
class SeqStep:
    """One sequence's part of a step: its cache row, new tokens' slots/positions, all slots' positions."""

    row: int
    tokens: list[int]
    slots: list[int]  # physical slot of each new token
    positions: list[int]  # RoPE position of each new token
    kv_pos: list[int]  # position held by each slot 0..n-1 after the writes (-1: empty)
