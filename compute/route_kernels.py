"""A mixture-of-experts router's choice in one launch: softmax over the experts, the top k, and
their weights renormalised where the model says so.

NOTE [ routing in one launch ]
moe.route ran as torch's ops: the logits to float32, softmax, topk, and with Qwen3-MoE's and
Mixtral's renormalisation a sum and a division: five or six launches a layer, each a few
hundred bytes of work, and twice in a streamed layer's graph A (its router, and the next layer's
router on the same input, which predicts that layer's choice: NOTE [ expert prefetch ] in
experts.py). At batch 1 launches are those kernels' cost, on the chain of every MoE layer. Here a
program takes a token's row of logits (a few hundred experts at most: one block), forms the
softmax in float32 as torch does (exp(l - max) / sum), and picks the k largest one at a time
(each pick masks its expert out), largest first as topk returns them; ties go to the lower index.
The weights are the picked probabilities, divided by their sum with `norm`. It runs on the CPU
under Triton's interpreter (TRITON_INTERPRET=1), which is how CI tests it against torch's ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from layerstream.compute.qkernels import INTERPRET

MAX_EXPERTS = 1024  # the most experts one program's block holds (moe.route keeps torch's ops past it)


@triton.jit
def _route_kernel(logits, weight, chosen, E, sl, K: tl.constexpr, KP: tl.constexpr, NORM: tl.constexpr,
                  BLOCK: tl.constexpr):
    """Row t: weight[t] and chosen[t] (k each) = the top K of softmax(logits[t, :E]), renormalised
    with NORM."""
    t = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)
    ok = i < E
    v = tl.load(logits + t * sl + i, mask=ok, other=float("-inf")).to(tl.float32)
    p = tl.exp(v - tl.max(v, axis=0))
    p = tl.where(ok, p, 0.0)
    p = p / tl.sum(p, axis=0)
    q = tl.where(ok, p, -1.0)  # (probabilities are at least 0: a padded entry is never picked)
    j = tl.arange(0, KP)
    ws = tl.zeros((KP,), dtype=tl.float32)
    ids = tl.zeros((KP,), dtype=tl.int32)
    for n in tl.static_range(K):
        best = tl.max(q, axis=0)
        arg = tl.min(tl.where(q == best, i, BLOCK), axis=0)  # the lowest index of the largest
        ws = tl.where(j == n, best, ws)
        ids = tl.where(j == n, arg, ids)
        q = tl.where(i == arg, -1.0, q)
    if NORM:
        ws = ws / tl.sum(ws, axis=0)  # (the padded entries past K are 0)
    tl.store(weight + t * K + j, ws, mask=j < K)
    tl.store(chosen + t * K + j, ids.to(tl.int64), mask=j < K)


def route(logits: torch.Tensor, k: int, norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [T, k] float32, chosen [T, k] int64) of logits [T, E] (NOTE [ routing in one launch ]):
    moe.route's, in one launch."""
    T, E = logits.shape
    if not 0 < k <= E <= MAX_EXPERTS:
        raise ValueError(f"route needs 0 < k <= experts <= {MAX_EXPERTS}; got k={k}, {E} experts")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    weight = torch.empty(T, k, dtype=torch.float32, device=logits.device)
    chosen = torch.empty(T, k, dtype=torch.int64, device=logits.device)
    if T:
        kw = {} if INTERPRET else {"num_warps": 1 if E <= 256 else 4}
        _route_kernel[(T,)](logits, weight, chosen, E, logits.stride(0), K=k, KP=triton.next_power_of_2(k),
                            NORM=norm, BLOCK=triton.next_power_of_2(E), **kw)
    return weight, chosen
