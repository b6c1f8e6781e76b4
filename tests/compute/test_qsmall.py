"""qsmall's tensor-core matmul for small batches (Q4_K, Q5_K, Q6_K, Q8_0) against a float64 matmul over
gguf-py's dequantization: under Triton's interpreter on tiny odd shapes here, compiled at the 8B's
shapes on a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

pytest.importorskip("triton")
from layerstream.compute import qkernels, qsmall  # noqa: E402
from tests.compute.test_qgemv import q4k_two_bytes_in, reference, rel_err  # noqa: E402
from tests.compute.test_qkernels import random_blocks  # noqa: E402

TYPES = [QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q8_0]


def test_small_covers_the_types_it_claims():
    assert set(qsmall.TYPES) == {int(t) for t in TYPES}


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_small_matches_float64_over_gguf_dequantization(qt):
    """2, 3, 7 and 16 rows of x (a tile of 16, padded), 17 and 32 in a tile of 32, 33 and 17 rows of W (not a multiple of BN = 16:
    a masked last program), K of 1 to 4 chunks, unsplit and split over 2 or 3 programs (the last to
    arrive sums them; 3 splits of 4 chunks: one split empty of chunks but for its partial), with a
    bias; float32 activations within float32 rounding, float16 ones within float16 rounding (the
    weights are scaled in float16 before the dot)."""
    rng = np.random.default_rng(800 + int(qt))
    gen = torch.Generator().manual_seed(int(qt))
    for N, K, Ms, splits in ((33, 256, (2, 16, 32), (1,)), (17, 512, (3, 17), (1, 2)), (17, 768, (7,), (2,)),
                             (17, 1024, (2,), (3,))):
        b = random_blocks(rng, qt, N, K)
        ref_w = reference(b, qt, N, K)
        raw = torch.from_numpy(b.reshape(-1).copy())
        bias = torch.randn(N, generator=gen)
        for M in Ms:
            for dt, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
                x = torch.randn(M, K, generator=gen).to(dt)
                ref = x.double() @ ref_w.T + bias.to(dt).double()
                for s in splits:
                    y = qkernels.matmul(x, raw, int(qt), N, K, bias.to(dt), config=("small", 16 if M <= 16 else 32, 16, 4, 2, s))
                    assert y.shape == (M, N) and y.dtype == dt
                    err = rel_err(y, ref)
                    assert err < tol, f"{qt.name} [{N}, {K}] M={M} {dt} splits={s}: rel err {err:.2e}"
                    # the tiles' counters are back to zero for the next call, which reuses them
                    assert not qsmall._tile_counters(x.device, 1).any()


def test_a_streams_tile_counters_are_one_buffer_never_replaced():
    """Calls on a stream share its counters (a graph keeps their address); a call needing more
    gets zeroed counters of its own and the stream's buffer stays."""
    dev = torch.device("cpu")
    buf = qsmall._tile_counters(dev, 1)
    more = qsmall._tile_counters(dev, qsmall.COUNTERS + 1)
    assert more.data_ptr() != buf.data_ptr() and more.numel() == qsmall.COUNTERS + 1 and not more.any()
    assert qsmall._tile_counters(dev, qsmall.COUNTERS).data_ptr() == buf.data_ptr()


def test_small_on_words_not_4_aligned_takes_the_other_kernel():
    """Q4_K's scales are loaded as 32-bit words: blocks 2 bytes into their storage go to another kernel,
    with the same product."""
    N, K = 6, 512
    b, store = q4k_two_bytes_in(np.random.default_rng(5), N, K)
    raw = store[2:]
    assert not qsmall.supports(raw, int(QT.Q4_K), K) and qsmall.supports(raw, int(QT.Q6_K), K)
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(5))
    y = qkernels.matmul(x, raw, int(QT.Q4_K), N, K, config=("small", 16, 16, 4, 2, 1))
    assert rel_err(y, x.double() @ reference(b, QT.Q4_K, N, K).T) < 1e-5


def test_choose_takes_small_where_it_measured_faster(monkeypatch):
    """On a GPU, on the 8B's matrices: Q4_K and Q6_K from 3 to 16 rows, Q4_K at 2 rows on 4096 rows
    or more; 1 row, 17, Q4_K's 2 rows on 1024, Q6_K's 2, the types not measured, smaller matrices
    and Triton's interpreter keep the other kernels; the launches of several matrices (qgemv's
    many kernel) are not taken where qsmall is, so each goes to it."""
    choose = lambda M, qt, N=4096, K=4096, interpret=False: qkernels._choose(M, N, K, int(qt), interpret=interpret)  # noqa: E731
    shapes = ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336))
    assert all(choose(M, qt, N, K)[0] == "small" for M in (3, 4, 8, 16, 17, 32) for qt in (QT.Q4_K, QT.Q6_K) for N, K in shapes)
    assert choose(16, QT.Q4_K)[1] == 16 and choose(17, QT.Q4_K)[1] == choose(32, QT.Q6_K)[1] == 32  # x's tile
    assert all(choose(2, QT.Q4_K, N, K)[0] == "small" for N, K in shapes if N >= 4096)
    assert choose(2, QT.Q4_K, 1024)[0] == choose(2, QT.Q6_K)[0] == "gemv"
    assert not any(choose(M, qt)[0] == "small" for M in (1, 33) for qt in TYPES)
    assert not any(choose(M, qt)[0] == "small" for M in (2, 3, 8) for qt in (QT.Q5_K, QT.Q8_0, QT.Q4_0, QT.Q3_K))
    assert choose(8, QT.Q4_K, 576, 4096)[0] != "small" and choose(8, QT.Q4_K, interpret=True)[0] != "small"
    monkeypatch.setattr(qkernels, "INTERPRET", False)
    assert qkernels._many_config(4, [14336, 14336], 4096, int(QT.Q4_K)) is None
    assert qkernels._many_config(2, [1024, 1024], 4096, int(QT.Q6_K))[0] == "gemv"
    # the 70B's gate and up (28672 rows each) are beyond qsmall's measured shapes: one GEMV launch
    assert qkernels._many_config(2, [28672, 28672], 8192, int(QT.Q4_K))[0] == "gemv"
    assert choose(8, QT.Q4_K, 1024)[2] == 32 and choose(8, QT.Q4_K)[2] == 64
    assert choose(8, QT.Q6_K)[2] == 32 and choose(8, QT.Q6_K, 14336)[2] == 64


@pytest.mark.gpu
@pytest.mark.parametrize("qt", [QT.Q4_K, QT.Q6_K, QT.Q5_K, QT.Q8_0], ids=lambda t: t.name)
def test_small_at_the_8b_shapes_on_cuda(qt):
    """The 8B's matrix shapes (and 1027 rows: a masked last program), compiled, 3 to 16 rows, in the
    configuration `_choose` picks and in split and unsplit ones (Q5_K and Q8_0, not dispatched, too): within float16
    output rounding of float64, float32 and bfloat16 activations within theirs, and the same bits
    on a second call (the split sum's order is fixed)."""
    rng = np.random.default_rng(950 + int(qt))
    for N, K in [(4096, 4096), (1024, 4096), (14336, 4096), (1027, 14336)]:
        b = random_blocks(rng, qt, N, K)
        raw = torch.from_numpy(b.reshape(-1).copy()).cuda()
        ref_w = reference(b, qt, N, K).cuda()
        cases = [(M, torch.float16, ("small", 16, 64, 4, 2, 4)) for M in (3, 8, 16)] + [(8, torch.float16, None)]
        cases += [(5, torch.float16, ("small", 16, 64, 4, 2, 4)), (16, torch.float16, ("small", 16, 128, 8, 2, 1)),
                  (4, torch.float32, ("small", 16, 64, 4, 2, 2)), (8, torch.bfloat16, ("small", 16, 64, 4, 2, 1))]
        for M, dt, config in cases:
            x = torch.randn(M, K, device="cuda", dtype=dt)
            ref = x.double() @ ref_w.T
            tol = {torch.float16: 2e-3, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dt]
            y = qkernels.matmul(x, raw, int(qt), N, K, config=config)
            err = rel_err(y, ref)
            assert err < tol, f"{qt.name} [{N}, {K}] M={M} {dt} {config}: rel err {err:.2e}"
            assert torch.equal(qkernels.matmul(x, raw, int(qt), N, K, config=config), y)
