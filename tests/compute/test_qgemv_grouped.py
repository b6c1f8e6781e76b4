"""A step's experts on qgemv's loop (qgemv_grouped.py, NOTE [ experts on whole rows ]) against a
float64 reference over gguf-py's dequantization and against the grouped kernel's path it replaces,
under Triton's interpreter; and where moe.experts_grouped takes it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT

pytest.importorskip("triton")
from layerstream.compute import moe, qgemv_grouped  # noqa: E402
from tests.compute.test_qgemv import reference, rel_err  # noqa: E402
from tests.compute.test_qkernels import random_blocks  # noqa: E402

ALIGN = 256  # (expert_layout.ALIGN: where each part starts in a pool slot)


def pool_of(rng, gq: QT, dq: QT, E: int, N: int, K: int, device="cpu"):
    """E experts' gate and up [N, K] of gq and down [K, N] of dq in one buffer of equal slots, each part
    at a multiple of ALIGN (as the expert pool lays them out): (pool, blocks, slot, part offsets)."""
    blocks = [(random_blocks(rng, gq, N, K).reshape(-1), random_blocks(rng, gq, N, K).reshape(-1),
               random_blocks(rng, dq, K, N).reshape(-1)) for _ in range(E)]
    sizes = [-(-b.nbytes // ALIGN) * ALIGN for b in blocks[0]]
    starts = [0, sizes[0], sizes[0] + sizes[1]]
    slot = sum(sizes)
    pool = torch.zeros(slot * E, dtype=torch.uint8)
    for e, parts in enumerate(blocks):
        for b, a in zip(parts, starts):
            pool[e * slot + a : e * slot + a + b.nbytes] = torch.from_numpy(b.copy())
    return pool.to(device), blocks, slot, starts


def offsets(chosen: torch.Tensor, slot: int, starts: list[int]) -> torch.Tensor:
    flat = chosen.flatten()
    return torch.stack([flat * slot + a for a in starts])


def float64_sum(h, weight, chosen, blocks, gq, dq, N, K) -> torch.Tensor:
    """Each token's chosen experts, SwiGLU each, weighted and summed, in float64."""
    out = torch.zeros(h.shape[0], K, dtype=torch.float64)
    for t in range(h.shape[0]):
        x = h[t].double().cpu()
        for j, e in enumerate(chosen[t].tolist()):
            g, u, d = (reference(b, q, *s) for b, q, s in zip(blocks[e], (gq, gq, dq), ((N, K), (N, K), (K, N))))
            out[t] += weight[t, j].double().cpu() * ((F.silu(x @ g.T) * (x @ u.T)) @ d.T)
    return out


@pytest.mark.parametrize("gq, dq, T", [(QT.Q4_K, QT.Q6_K, 1), (QT.Q4_K, QT.Q6_K, 3), (QT.Q5_K, QT.Q8_0, 2),
                                       (QT.Q4_0, QT.Q5_1, 2), (QT.Q8_0, QT.Q4_1, 1)],
                         ids=lambda v: getattr(v, "name", str(v)))
def test_experts_match_float64_and_the_grouped_kernels_path(gq, dq, T):
    """Tokens of 2 choices among 4 experts (one expert chosen twice by a token where T is 3), float32:
    the sum matches float64 over gguf-py's dequantization, and the grouped kernel's path (three
    launches and torch's ops) to float32's rounding of sums in another order."""
    rng = np.random.default_rng(500 + 10 * int(gq) + int(dq))
    N, K, E, k = 256, 512, 4, 2
    if gq in (QT.Q4_0, QT.Q8_0):
        K = 288  # (a partial last chunk of the 32-value types)
    if dq in (QT.Q5_1, QT.Q4_1):
        N = 96
    pool, blocks, slot, starts = pool_of(rng, gq, dq, E, N, K)
    chosen = torch.tensor(rng.integers(0, E, (T, k)))
    if T == 3:
        chosen[1] = chosen[1, 0]
    weight = torch.rand(T, k, generator=torch.Generator().manual_seed(T))
    h = torch.randn(T, K, generator=torch.Generator().manual_seed(7))
    parts = ((int(gq), N, K), (int(gq), N, K), (int(dq), K, N))
    offs = offsets(chosen, slot, starts)
    got = qgemv_grouped.experts(h, weight, pool, offs, parts)
    assert got.shape == (T, K) and got.dtype == torch.float32
    ref = float64_sum(h, weight, chosen, blocks, gq, dq, N, K)
    assert rel_err(got, ref) < 1e-5
    old = moe.experts_grouped(h, weight, pool, offs, parts, aligned=False)
    assert rel_err(got, old.double()) < 1e-5


def test_float16_activations_round_as_the_separate_ops():
    """float16 h: the sum within float16 rounding of float64 and of the grouped kernel's path, which
    rounds the gate's, up's and down's products and SiLU's to float16 as these kernels do."""
    rng = np.random.default_rng(9)
    N, K, E, T = 256, 512, 3, 2
    pool, blocks, slot, starts = pool_of(rng, QT.Q4_K, QT.Q6_K, E, N, K)
    chosen = torch.tensor([[2, 0], [1, 2]])
    weight = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    h = (torch.randn(T, K, generator=torch.Generator().manual_seed(3)) * 0.05).half()
    parts = ((int(QT.Q4_K), N, K), (int(QT.Q4_K), N, K), (int(QT.Q6_K), K, N))
    offs = offsets(chosen, slot, starts)
    got = qgemv_grouped.experts(h, weight, pool, offs, parts)
    assert torch.isfinite(got).all()
    assert rel_err(got, float64_sum(h, weight, chosen, blocks, QT.Q4_K, QT.Q6_K, N, K)) < 3e-3
    # (the bound a kernel that skips rounding SiLU's or down's products to float16, as the separate
    # ops round them, lands outside: such a change measured several times further off the old path)
    assert rel_err(got, moe.experts_grouped(h, weight, pool, offs, parts, aligned=False).double()) < 1.5e-4


def test_experts_grouped_takes_these_kernels_only_for_whole_words_of_their_types(monkeypatch):
    """moe.experts_grouped calls qgemv_grouped.experts where the offsets and the anchor are whole words
    and the types are qgemv's with gate and up alike; else the grouped kernel's path, with the same sum."""
    rng = np.random.default_rng(4)
    N, K, E = 256, 256, 2
    pool, blocks, slot, starts = pool_of(rng, QT.Q4_K, QT.Q6_K, E, N, K)
    chosen, weight = torch.tensor([[1, 0]]), torch.tensor([[0.5, 0.5]])
    h = torch.randn(1, K, generator=torch.Generator().manual_seed(1))
    parts = ((int(QT.Q4_K), N, K), (int(QT.Q4_K), N, K), (int(QT.Q6_K), K, N))
    calls = []
    real = qgemv_grouped.experts
    monkeypatch.setattr(qgemv_grouped, "experts", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    offs = offsets(chosen, slot, starts)
    ref = float64_sum(h, weight, chosen, blocks, QT.Q4_K, QT.Q6_K, N, K)
    assert rel_err(moe.experts_grouped(h, weight, pool, offs, parts, aligned=True), ref) < 1e-5 and calls == [1]
    assert rel_err(moe.experts_grouped(h, weight, pool, offs, parts), ref) < 1e-5 and calls == [1]  # (not known aligned)
    shifted = torch.zeros(pool.numel() + 2, dtype=torch.uint8)  # an anchor 2 bytes past a word
    shifted[2:] = pool
    assert rel_err(moe.experts_grouped(h, weight, shifted[2:], offs, parts, aligned=True), ref) < 1e-5 and calls == [1]
    assert not qgemv_grouped.takes(((int(QT.Q2_K), N, K), (int(QT.Q2_K), N, K), (int(QT.Q6_K), K, N)))
    assert not qgemv_grouped.takes(((int(QT.Q4_K), N, K), (int(QT.Q5_K), N, K), (int(QT.Q6_K), K, N)))


def resident_layer(rng, gq: QT, dq: QT, E: int, N: int, K: int):
    """A resident layer's three [E * rows, cols] block tensors in one buffer, up first, then down,
    then gate (the anchor: the others lie before it): (buffer, gate's view, blocks, places)."""
    blocks = [(random_blocks(rng, gq, N, K).reshape(-1), random_blocks(rng, gq, N, K).reshape(-1),
               random_blocks(rng, dq, K, N).reshape(-1)) for _ in range(E)]
    size = [b.nbytes for b in blocks[0]]
    start = {1: 0, 2: E * size[1], 0: E * (size[1] + size[2])}  # (part j's tensor: gate 0, up 1, down 2)
    buf = torch.zeros(E * sum(size), dtype=torch.uint8)
    for e, parts in enumerate(blocks):
        for j, b in enumerate(parts):
            buf[start[j] + e * size[j] : start[j] + (e + 1) * size[j]] = torch.from_numpy(b.copy())
    places = tuple((size[j], start[j] - start[0]) for j in range(3))
    return buf, buf[start[0]:], blocks, places


def test_expert_ids_and_places_as_the_offsets_they_stand_for():
    """A resident layer's pairs given as expert ids and each part's (size, base), bases before the
    anchor too: the same sum, to the bit, as the byte offsets those make, and as float64."""
    rng = np.random.default_rng(11)
    N, K, E, T = 256, 512, 3, 2
    buf, anchor, blocks, places = resident_layer(rng, QT.Q4_K, QT.Q6_K, E, N, K)
    chosen = torch.tensor([[2, 0], [1, 2]])
    weight = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    h = torch.randn(T, K, generator=torch.Generator().manual_seed(5))
    parts = ((int(QT.Q4_K), N, K), (int(QT.Q4_K), N, K), (int(QT.Q6_K), K, N))
    got = qgemv_grouped.experts(h, weight, anchor, chosen.flatten(), parts, places=places)
    offs = torch.stack([chosen.flatten() * size + base for size, base in places])
    assert torch.equal(got, qgemv_grouped.experts(h, weight, anchor, offs, parts))
    assert rel_err(got, float64_sum(h, weight, chosen, blocks, QT.Q4_K, QT.Q6_K, N, K)) < 1e-5
    unaligned = moe.experts_grouped(h, weight, anchor, chosen.flatten(), parts, places=places)  # (torch's ops)
    assert rel_err(got, unaligned.double()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_residual_added_as_moe_block_adds_it(dtype):
    """With `res`, the down kernel's output is res + the sum rounded to res's dtype, to the bit as
    the two separate ops make it, in place of `out` where given; the torch ops' path alike."""
    rng = np.random.default_rng(12)
    N, K, E, T = 256, 512, 3, 2
    pool, blocks, slot, starts = pool_of(rng, QT.Q4_K, QT.Q6_K, E, N, K)
    chosen = torch.tensor([[0, 1], [2, 1]])
    weight = torch.tensor([[0.2, 0.8], [0.5, 0.5]])
    h = (torch.randn(T, K, generator=torch.Generator().manual_seed(6)) * 0.05).to(dtype)
    x = torch.randn(T, K, generator=torch.Generator().manual_seed(8)).to(dtype)
    parts = ((int(QT.Q4_K), N, K), (int(QT.Q4_K), N, K), (int(QT.Q6_K), K, N))
    offs = offsets(chosen, slot, starts)
    want = x + qgemv_grouped.experts(h, weight, pool, offs, parts).to(dtype)
    got = qgemv_grouped.experts(h, weight, pool, offs, parts, res=x)
    assert got.dtype == dtype and torch.equal(got, want)
    into = torch.full_like(x, float("nan"))
    assert moe.experts_grouped(h, weight, pool, offs, parts, aligned=True, res=x, out=into) is into
    assert torch.equal(into, want)
    into.fill_(float("nan"))
    slow = moe.experts_grouped(h, weight, pool, offs, parts, res=x, out=into)  # (the grouped kernel's path)
    assert slow is into and rel_err(slow, want.double()) < (1e-5 if dtype == torch.float32 else 2e-3)
    with pytest.raises(ValueError, match="contiguous"):
        qgemv_grouped.experts(h, weight, pool, offs, parts, res=x, out=torch.empty(K, T, dtype=dtype).T)


@pytest.mark.gpu
@pytest.mark.parametrize("T, dtype", [(1, torch.float16), (8, torch.float16), (1, torch.bfloat16), (8, torch.bfloat16)],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_experts_on_cuda_at_the_qwen3_moe_shape(T, dtype):
    """Compiled, Qwen3-30B-A3B's expert shapes (gate and up Q4_K 768 x 2048, down Q6_K 2048 x 768), 8
    of 16 experts a token, float16 and bfloat16 (which Triton's interpreter cannot check): within the
    dtype's rounding of float64 and of the grouped kernel's path; ids and places, and the residual,
    to the bit as the offsets and the separate add."""
    rng = np.random.default_rng(40 + T)
    N, K, E, k = 768, 2048, 16, 8
    pool, blocks, slot, starts = pool_of(rng, QT.Q4_K, QT.Q6_K, E, N, K, device="cuda")
    chosen = torch.stack([torch.from_numpy(rng.permutation(E)[:k]) for _ in range(T)])
    weight = torch.softmax(torch.randn(T, k), -1).cuda()
    h = (torch.randn(T, K) * 0.002).to(dtype).cuda()  # (products within float16's range on these random blocks)
    parts = ((int(QT.Q4_K), N, K), (int(QT.Q4_K), N, K), (int(QT.Q6_K), K, N))
    offs = offsets(chosen, slot, starts).cuda()
    got = qgemv_grouped.experts(h, weight, pool, offs, parts)
    bound = 3e-3 if dtype == torch.float16 else 2.4e-2  # (bfloat16 keeps 8 bits of mantissa to float16's 11)
    assert rel_err(got.cpu(), float64_sum(h.cpu(), weight.cpu(), chosen, blocks, QT.Q4_K, QT.Q6_K, N, K)) < bound
    assert rel_err(got, moe.experts_grouped(h, weight, pool, offs, parts, aligned=False).double()) < bound * 2 / 3
    places = tuple((slot, a) for a in starts)  # (the pool's slots as a resident layer's places)
    assert torch.equal(qgemv_grouped.experts(h, weight, pool, chosen.flatten().cuda(), parts, places=places), got)
    x = torch.randn(T, K).to(dtype).cuda()
    assert torch.equal(qgemv_grouped.experts(h, weight, pool, offs, parts, res=x), x + got.to(dtype))
