"""qgemv's whole-row fused matmul (Q4_K, Q5_K, Q6_K, Q8_0, Q4_0 to Q5_1) against a float64 matmul over gguf-py's
dequantization: under Triton's interpreter on tiny odd shapes here, compiled at full size on a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT
from gguf.quants import dequantize as gguf_dequantize

pytest.importorskip("triton")
from layerstream.compute import qgemv, qkernels  # noqa: E402
from tests.compute.test_qkernels import random_blocks  # noqa: E402

TYPES = [QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1]


def reference(b: np.ndarray, qt: QT, N: int, K: int) -> torch.Tensor:
    return torch.from_numpy(gguf_dequantize(b.reshape(-1), qt)).reshape(N, K).double()


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


def test_gemv_covers_the_types_it_claims():
    assert set(qgemv.WORD_BYTES) == {int(t) for t in TYPES}


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_gemv_matches_float64_over_gguf_dequantization(qt):
    """1 to 16 rows of x, in program tiles of 1, 2, 4 or 16 rows (3 rows pad theirs in tiles of 4
    and of 2), with a bias; K of 3 chunks walked 1 or 2 chunks a step (in steps of 2: a masked
    tail; for Q4_0 to Q5_1 at 576), and the 32-value types' K not a multiple of 256 (blocks past the
    last masked); 3 rows of W, one or two a program (at two the last program masked). The
    interpreter's time grows with the programs and their steps, so each tile size, rows a program
    and chunks a step is taken once or twice, on the fewest rows that keep the masks."""
    rng = np.random.default_rng(700 + int(qt))
    gen = torch.Generator().manual_seed(int(qt))
    shapes = [(3, 96), (3, 576)] if GGML_QUANT_SIZES[qt][0] == 32 else [(3, 768)]
    for N, K in shapes:
        b = random_blocks(rng, qt, N, K)
        ref_w = reference(b, qt, N, K)
        raw = torch.from_numpy(b.reshape(-1).copy())
        bias = torch.randn(N, generator=gen)
        for M, config in ((1, ("gemv", 1, 2, 1, 1)), (3, ("gemv", 4, 1, 2, 1)), (3, ("gemv", 2, 2, 1, 1)),
                          (16, ("gemv", 16, 1, 2, 1))):
            x = torch.randn(M, K, generator=gen)
            ref = x.double() @ ref_w.T + bias.double()
            y = qkernels.matmul(x, raw, int(qt), N, K, bias, config=config)
            assert y.shape == (M, N) and y.dtype == x.dtype
            err = rel_err(y, ref)
            # float32 activations: float32 products and sums throughout
            assert err < 1e-5, f"{qt.name} [{N}, {K}] M={M} {config}: rel err {err:.2e}"


def q4k_two_bytes_in(rng, N: int, K: int) -> tuple[np.ndarray, torch.Tensor]:
    """Random Q4_K blocks [N, K] (flat) and a storage holding them from its third byte on."""
    b = random_blocks(rng, QT.Q4_K, N, K).reshape(-1)
    store = torch.zeros(b.size + 2, dtype=torch.uint8)
    store[2:] = torch.from_numpy(b.copy())
    return b, store


def test_gemv_on_words_not_4_aligned_takes_the_other_kernel():
    """Q4_K's words are loaded 4 bytes at a time: blocks that start 2 bytes into their storage (a
    view) go to the split-K kernel instead, with the same product."""
    N, K = 6, 512
    b, store = q4k_two_bytes_in(np.random.default_rng(3), N, K)
    raw = store[2:]
    assert not qgemv.supports(raw, int(QT.Q4_K)) and qgemv.supports(store[4:], int(QT.Q4_K))
    x = torch.randn(2, K, generator=torch.Generator().manual_seed(3))
    y = qkernels.matmul(x, raw, int(QT.Q4_K), N, K, config=("gemv", 2, 1, 2, 1))
    assert rel_err(y, x.double() @ reference(b, QT.Q4_K, N, K).T) < 1e-5


def test_choose_takes_gemv_where_it_measured_faster():
    """On a GPU, on matrices of at least 1024 x 4096: the measured types (Q4_K, Q5_K, Q6_K, Q8_0) at
    1 and 2 rows, Q4_K at 3 and 4; on smaller ones every qgemv type at 1 and 2 rows where K is at
    most 4096; more rows, the other types (Q4_0 to Q5_1 on the 8B's matrices too), K over 4096 on
    a small matrix and Triton's interpreter keep the other kernels. A chosen configuration has 2
    to 4 rows of x a program (1 alone) and a slice on every lane."""
    choose = lambda M, qt, N=4096, K=4096, interpret=False: qkernels._choose(M, N, K, int(qt), interpret=interpret)[0]  # noqa: E731
    # (Q4_K from 2 rows on 4096 rows or more and Q6_K from 3 go to qsmall: test_qsmall.py)
    assert all(choose(M, qt, N, K) == "gemv" for M in (1, 2) for qt in TYPES[:4] for N in (1024, 14336, 128256)
               for K in (4096, 14336) if (M, qt) != (2, QT.Q4_K) or N == 1024 or N == 128256)
    assert not any(choose(M, qt, 14336, 4096) == "gemv" for M in (1, 2) for qt in TYPES[4:])
    assert qkernels._gemv_config(3, 4096, 4096, int(QT.Q4_K))[0] == qkernels._gemv_config(4, 1024, 4096, int(QT.Q4_K))[0] == "gemv"
    assert not any(choose(M, qt) == "gemv" for M in (3, 4) for qt in (QT.Q5_K, QT.Q6_K, QT.Q8_0))
    assert choose(5, QT.Q4_K) != "gemv" and choose(16, QT.Q6_K) != "gemv"
    assert choose(1, QT.Q3_K) != "gemv" and choose(1, QT.Q4_K, interpret=True) != "gemv"
    # SmolLM2's matrices (K 576 and 1536, 192 to 49152 rows) and the MoE's K of 2048
    assert all(choose(M, qt, N, K) == "gemv" for M in (1, 2) for qt in (QT.Q5_0, QT.Q8_0, QT.Q4_1, QT.Q6_K)
               for N, K in ((576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576), (4096, 2048)))
    assert choose(3, QT.Q5_0, 576, 576) != "gemv" and choose(1, QT.Q4_K, 576, 14336) != "gemv"
    assert qkernels._gemv_config(0, 576, 576, int(QT.Q5_0)) is None
    for M in (1, 2, 3, 4):
        for N in (1024, 4096, 128256):
            _, MR, BN, KB, warps = qkernels._gemv_config(M, N, 4096, int(QT.Q4_K))
            assert min(M, 2) <= MR <= 4 and KB * 4 == 32 * warps


@pytest.mark.gpu
@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_gemv_full_size_on_cuda(qt):
    """The 8B's K (4096, and 14336: 56 chunks, in masked steps of 16) and SmolLM2's (1536, and 576
    for the 32-value types: a masked last step), compiled, 1 to 4 rows, in the configuration
    `_choose` picks (the other kernels on 333 rows and for Q4_0 to Q5_1 on the 8B's matrices, and
    at 3 or 4 rows but for Q4_K), and in the GEMV's on one warp, and with 2 rows of W on two warps
    at one row (a masked last program on 333 and 1027 rows): within float16 output rounding of
    float64, float32 activations within float32 rounding, bfloat16 ones within theirs, and the same
    bits on a second call."""
    rng = np.random.default_rng(900 + int(qt))
    legacy = qt in (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1)  # (their one code path: fewer shapes)
    small = [(1536, 576)] if GGML_QUANT_SIZES[qt][0] == 32 else []  # SmolLM2's K
    for N, K in [(4096, 4096), (333, 4096)] + ([] if legacy else [(1027, 14336)]) + [(576, 1536)] + small:
        b = random_blocks(rng, qt, N, K)
        raw = torch.from_numpy(b.reshape(-1).copy()).cuda()
        ref_w = reference(b, qt, N, K).cuda()
        cases = [(M, torch.float16, (None, ("gemv", 1 << (M - 1).bit_length(), 1, 8, 1))) for M in (1, 2, 3, 4)]
        cases += [(1, torch.float16, (("gemv", 1, 2, 16, 2),)), (1, torch.float32, (None,)), (2, torch.bfloat16, (None,))]
        for M, dt, configs in cases:
            x = torch.randn(M, K, device="cuda", dtype=dt)
            ref = x.double() @ ref_w.T
            tol = {torch.float16: 2e-3, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dt]
            for config in configs:
                y = qkernels.matmul(x, raw, int(qt), N, K, config=config)
                err = rel_err(y, ref)
                assert err < tol, f"{qt.name} [{N}, {K}] M={M} {dt} {config}: rel err {err:.2e}"
                assert torch.equal(qkernels.matmul(x, raw, int(qt), N, K, config=config), y)
