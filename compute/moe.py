"""Mixture-of-experts FFNs: routing, and the chosen experts' weighted sum, whether the experts are
resident tensors or come from an `ExpertSource` (a streamed layer's: experts.ExpertSet).

Free of I/O: a source fetches its experts itself; this module only hands it the layer's normed
FFN input and the router's choice.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from layerstream.compute.dequant import FUSED_TYPES, have_triton
from layerstream.compute.expert_layout import EXPERT_TENSORS
from layerstream.compute.model import LayerWeights, rms_norm
from layerstream.compute.qlinear import (
    EXPERT_SCRATCH_MAX_ELEMS,
    QuantWeight,
    dequantized_experts,
    grouped_matmul,
    grouped_mm_dtype,
    linear,
    scratch_cap,
)
from layerstream.loader.gguf_index import HParams

# Decode steps of up to this many tokens run a MoE layer's chosen experts as grouped launches
# (NOTE [ grouped experts ]); larger steps run one expert at a time, its tokens as one batch.
GROUPED_MAX_TOKENS = 8


class ExpertSource(Protocol):
    """A layer's experts held apart from its other tensors (under the key "experts" of its
    weights); each method takes the layer's already-normed FFN input h [T, n_embd]."""

    next_router: LayerWeights | None  # the next layer's norm and router, where its experts are predicted

    @property
    def grouped(self) -> bool:
        """Whether `grouped_sum` runs (the experts are blocks the grouped kernel reads)."""

    def fetch(self, experts: list[int]) -> dict[int, tuple]:
        """{expert: (gate, up, down)} of the chosen `experts`."""

    def grouped_sum(self, h: torch.Tensor, weight: torch.Tensor, chosen: torch.Tensor,
                    pred: torch.Tensor | None) -> torch.Tensor:
        """The weighted sum [T, n_embd] float32 of each token's chosen experts (`weight`, `chosen`:
        [T, k]); `pred`: the next layer's predicted choice [T, k], or None."""


def expert(w: "torch.Tensor | QuantWeight", e: int, n_expert: int) -> "torch.Tensor | QuantWeight":
    """Expert e's matrix of a 3-D expert tensor (dense [E, N, K], or blocks held as [E * N, K])."""
    if isinstance(w, QuantWeight):
        n = w.shape[0] // n_expert
        rb = w.nbytes // w.shape[0]
        return QuantWeight(w.raw[e * n * rb : (e + 1) * n * rb], w.qtype, (n, w.shape[1]))
    return w[e]


def route(hp: HParams, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts each token uses and their weights: softmax over all experts, the top
    n_expert_used, renormalised when the model says so (Mixtral's and Qwen3-MoE's routing). On
    CUDA one launch (NOTE [ routing in one launch ] in route_kernels.py)."""
    if logits.is_cuda and logits.dim() == 2 and have_triton():
        from layerstream.compute import route_kernels  # (needs Triton)

        if logits.shape[1] <= route_kernels.MAX_EXPERTS:
            return route_kernels.route(logits, hp.moe.n_expert_used, hp.moe.expert_norm)
    probs = torch.softmax(logits.float(), dim=-1)
    weight, chosen = probs.topk(hp.moe.n_expert_used, dim=-1)
    if hp.moe.expert_norm:
        weight = weight / weight.sum(-1, keepdim=True)
    return weight, chosen


def moe_route(hp: HParams, w: LayerWeights, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A MoE layer's FFN input: the normed activations h, and each token's chosen experts'
    weights and ids (everything before the experts run)."""
    h = rms_norm(x, w["ffn_norm.weight"], hp.norm_eps)
    weight, chosen = route(hp, linear(h, w["ffn_gate_inp.weight"]))
    return h, weight, chosen


def predict_next(hp: HParams, nxt: LayerWeights, x: torch.Tensor) -> torch.Tensor:
    """The experts the next layer's router (`nxt`: its norm and router) would choose for x, this
    layer's expert input: a prediction of that layer's choice (NOTE [ expert prefetch ] in
    experts.py), [T, k] ids."""
    return moe_route(hp, nxt, x)[2]


def with_inputs(ids: torch.Tensor, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """ids (int64) followed by the float32 bits of h and weight, as one int64 tensor for one copy
    to the host (NOTE [ one sync a layer ] in experts.py; ExpertSet.read_step takes it apart)."""
    f = torch.cat((h.float().reshape(-1), weight.float().reshape(-1)))
    if f.numel() % 2:  # (whole int64s)
        f = torch.cat((f, f.new_zeros(1)))
    return torch.cat((ids, f.view(torch.int64)))


def moe_block(hp: HParams, w: LayerWeights, x: torch.Tensor) -> torch.Tensor:
    """A mixture-of-experts FFN: each token's chosen experts (SwiGLU each), weighted and summed."""
    h, weight, chosen = moe_route(hp, w, x)
    src: ExpertSource | None = w.get("experts")
    out = None
    if chosen.shape[0] <= GROUPED_MAX_TOKENS and runs_grouped(w):
        if src is None:
            return _resident_grouped(hp, w, h, weight, chosen, x)
        pred = predict_next(hp, src.next_router, x) if src.next_router is not None else None
        out = src.grouped_sum(h, weight, chosen, pred)
    elif src is None and h.is_cuda:  # every expert at hand (a prompt, or a resident layer);
        out = _experts_prefill(hp, w, h, weight, chosen)  # on the CPU one by one is faster (NOTE below)
    if out is None:
        out = _experts_one_by_one(hp, w, h, weight, chosen)
    return x + out.to(x.dtype)


# NOTE [ grouped prefill ]
# A prompt step's tokens choose nearly every expert of a layer (512 tokens, 8 of 128 each: about
# 32 (token, choice) pairs an expert). Run one expert at a time, that is ten launches an expert,
# over a thousand a layer, and the host's launches, not the PCIe copies, bound the step
# (BENCHMARKS.md). So the pairs are sorted by expert once, and blocks are dequantized as many
# experts at a time as the plan's scratch holds (qlinear.scratch_elems counts the expert
# tensors), one launch a matrix. Each matrix of those experts is then one grouped GEMM over the
# pairs' runs (torch._grouped_mm). CUDA's grouped GEMM takes bf16 only: with fp16 activations the
# experts are dequantized into the same scratch as bf16, and the pairs' activations converted
# (bf16 keeps fp16's range with 8 bits of mantissa against 11; the weights were 4 to 6 bits).
# Where this torch has no grouped GEMM, each expert's pairs are padded to the largest count of a
# run of experts and multiplied by `torch.bmm` (slower than the grouped GEMM, faster than one
# expert at a time); runs are cut where padding would pass `_pad_rows` (skewed routing: one
# expert's many pairs would pad all the others). An expert too large for the scratch alone goes
# one by one (qlinear.EXPERT_SCRATCH_MAX_ELEMS holds one of Mixtral's).
# On the CPU, where a step is bound by arithmetic, not launches, one expert at a time stays: it
# measured faster there than the CPU's grouped GEMM and than padded runs. The tests run both
# ways on the CPU against float64 (tests/compute/test_grouped_prefill.py).


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
    E, k = hp.moe.n_expert, hp.moe.n_expert_used
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
    counts = torch.bincount(flat, minlength=hp.moe.n_expert).tolist()
    ids = [e for e, c in enumerate(counts) if c]
    if "experts" in w:  # streamed: only these experts are fetched (an ExpertSource)
        mats = w["experts"].fetch(ids)
    else:
        mats = {e: tuple(expert(w[n], e, hp.moe.n_expert) for n in EXPERT_TENSORS) for e in ids}
    k = hp.moe.n_expert_used
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
# Where qgemv's types allow, two launches on its loop replace these and the ops after them
# (NOTE [ experts on whole rows ] in qgemv_grouped.py); the grouped kernel stays for the others.


def runs_grouped(w: LayerWeights) -> bool:
    """Whether a layer's experts are blocks the grouped kernel reads."""
    if "experts" in w:
        return w["experts"].grouped
    mats = [w.get(n) for n in EXPERT_TENSORS]
    return all(isinstance(m, QuantWeight) and m.qtype in FUSED_TYPES for m in mats)


def _resident_grouped(hp: HParams, w: LayerWeights, h: torch.Tensor, weight: torch.Tensor,
                      chosen: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x plus a resident layer's grouped experts: expert e is a byte range of each [E * N, K]
    block matrix, found on the device."""
    anchor = w[EXPERT_TENSORS[0]].raw
    places = tuple((w[n].nbytes // hp.moe.n_expert, w[n].raw.data_ptr() - anchor.data_ptr()) for n in EXPERT_TENSORS)
    parts = tuple((w[n].qtype, w[n].shape[0] // hp.moe.n_expert, w[n].shape[1]) for n in EXPERT_TENSORS)
    aligned = all((w[n].raw.data_ptr() % 4, (w[n].nbytes // hp.moe.n_expert) % 4) == (0, 0) for n in EXPERT_TENSORS)
    return experts_grouped(h, weight, anchor, chosen.flatten(), parts, aligned, places=places, res=x)


def experts_grouped(h: torch.Tensor, weight: torch.Tensor, anchor: torch.Tensor, offs: torch.Tensor,
                    parts: tuple, aligned: bool = False, *, places: tuple | None = None,
                    res: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The weighted sum of each token's chosen experts (NOTE [ grouped experts ]): `offs` [3, T * k]
    holds the byte offsets from `anchor` of each (token, choice) pair's gate, up and down blocks,
    `parts` their (qtype, rows, cols); `aligned`: the caller knows every offset a multiple of 4
    bytes (the expert pool's are: expert_layout.ALIGN apart). With `places` ((size, base) a part),
    `offs` is the pairs' expert ids [T * k] instead, part j of expert e at e * size_j + base_j.
    With `res`, res + the sum in res's dtype (moe_block's residual), into `out` where given. Two
    launches on qgemv's loop where its types allow (NOTE [ experts on whole rows ] in
    qgemv_grouped.py), else three and the torch ops; no host sync: a CUDA graph may hold it
    (graphs.py, NOTE [ decode graphs ])."""
    from layerstream.compute import qgemv_grouped  # (needs Triton, as the grouped kernel does)

    if aligned and anchor.data_ptr() % 4 == 0 and qgemv_grouped.takes(parts):
        return qgemv_grouped.experts(h, weight, anchor, offs, parts, places=places, res=res, out=out)
    if places is not None:
        offs = torch.stack([offs * size + base for size, base in places])
    s = _grouped_sum(h, weight, anchor, offs, parts)
    if res is None:
        return s
    s = res + s.to(res.dtype)
    return s if out is None else out.copy_(s)


def _grouped_sum(h: torch.Tensor, weight: torch.Tensor, anchor: torch.Tensor, offs: torch.Tensor,
                 parts: tuple) -> torch.Tensor:
    """experts_grouped's sum (float32) by the grouped kernel (qkernels) and torch's ops."""
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
