"""qgemv's whole-row fused matmul (Q4_K, Q5_K, Q6_K, Q8_0, Q4_0 to Q5_1) against a float64 matmul over gguf-py's
dequantization: under Triton's interpreter on tiny odd shapes here, compiled at full size on a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT
from gguf.quants import dequantize as gguf_dequantize

pytest.importorskip("triton")
from layerstream.compute import qgemv, qgemv8, qkernels  # noqa: E402
from tests.compute.test_qkernels import int8_x, random_blocks  # noqa: E402

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


def test_quantize_x_is_int8_blocks_of_32_with_their_scales_and_sums():
    """quantize_x against the rule written out (int8_x): int8 values, each block's scale and the sum
    of its dequantized values; a row of zeros gives zeros (no NaN from its scale of 0)."""
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(5)) * torch.tensor([[1.0], [0.0], [30.0]])
    xq, xds = qgemv8.quantize_x(x, interpret=True)
    assert xq.dtype == torch.int8 and xds.shape == (3, 16, 2) and xds.dtype == torch.float32
    xd, xs = xds[..., 0].double(), xds[..., 1].double()
    want = int8_x(x)
    got = xq.double().view(3, 16, 32) * xd[:, :, None]
    assert torch.equal(got.view(3, 512), want)
    assert torch.allclose(xd * 127, x.double().view(3, 16, 32).abs().amax(-1), rtol=1e-6)
    assert torch.allclose(xs, want.view(3, 16, 32).sum(-1), rtol=1e-5, atol=1e-6)
    assert not xq[1].any() and not xds[1].any()
    assert (got.view(3, 512) - x.double()).abs().max() <= xd.max() / 2 * (1 + 1e-6)


def test_gemv_on_int8_x_matches_float64_over_the_int8_x():
    """The int8-activation step on Q4_K (qgemv8.step8: the dot's bytes summed as dp4a sums them), 1
    and 3 rows of x in tiles of 1, 4 and 2, K of 3 chunks in masked steps of 2, 3 rows of W one or
    two a program: within float32 rounding of float64 over gguf-py's W and the int8 x, and within the
    int8 rounding (a few parts in a thousand) of x itself; other types refused."""
    qt = QT.Q4_K
    rng = np.random.default_rng(800 + int(qt))
    gen = torch.Generator().manual_seed(int(qt))
    N, K = 3, 768
    b = random_blocks(rng, qt, N, K)
    ref_w = reference(b, qt, N, K)
    raw = torch.from_numpy(b.reshape(-1).copy())
    for M, config in ((1, ("gemv8", 1, 2, 1, 1)), (3, ("gemv8", 4, 1, 2, 1)), (3, ("gemv8", 2, 2, 1, 1))):
        x = torch.randn(M, K, generator=gen)
        y = qkernels.matmul(x, raw, int(qt), N, K, config=config)
        assert y.shape == (M, N) and y.dtype == x.dtype
        err = rel_err(y, int8_x(x) @ ref_w.T)
        assert err < 1e-5, f"{qt.name} M={M} {config}: rel err {err:.2e}"
        assert rel_err(y, x.double() @ ref_w.T) < 2e-2
    for other in (QT.Q6_K, QT.Q8_0):
        blocks = torch.from_numpy(random_blocks(rng, other, 1, 256).reshape(-1).copy())
        with pytest.raises(ValueError, match="int8 activations take Q4_K"):
            qkernels.matmul(torch.randn(1, 256), blocks, int(other), 1, 256, config=("gemv8", 1, 1, 1, 1))


def test_a_carried_int8_form_is_taken_in_place_of_quantizing_again():
    """qgemv8.attach_q8 (what the RMSNorm before a Q4_K matmul emits): the int8 matmuls, one matrix
    a launch and several, take the form x carries, here another x's, which shows it is read and
    not remade; a tensor without one is quantized as before."""
    qt = QT.Q4_K
    rng = np.random.default_rng(810)
    gen = torch.Generator().manual_seed(810)
    N, K = 3, 512
    b = random_blocks(rng, qt, N, K)
    ref_w = reference(b, qt, N, K)
    raw = torch.from_numpy(b.reshape(-1).copy())
    x, other = torch.randn(1, K, generator=gen), torch.randn(1, K, generator=gen)
    plain = qkernels.matmul(x, raw, int(qt), N, K, config=("gemv8", 1, 1, 2, 1))
    assert rel_err(plain, int8_x(x) @ ref_w.T) < 1e-5
    qgemv8.attach_q8(x, *qgemv8.quantize_x(other, interpret=True))
    y = qkernels.matmul(x, raw, int(qt), N, K, config=("gemv8", 1, 1, 2, 1))
    assert rel_err(y, int8_x(other) @ ref_w.T) < 1e-5
    y2, y3 = qkernels.matmul_many(x, [raw, raw], int(qt), [N, N], K, config=("gemv8", 1, 1, 2, 1))
    assert torch.equal(y2, y) and torch.equal(y3, y)


def test_takes_int8_x_where_the_gpu_choice_is_int8(monkeypatch, request):
    """qlinear.takes_int8_x, which tells the RMSNorm to emit the int8 form: yes where a launch of the
    matrices that follow would take gemv8 on a GPU (one row of half x, Q4_K on 2048 rows or more at
    K 4096: q, k and v in one launch, v alone, the head), no for Q6_K alone, 1024 rows, float32 x,
    two rows, the CPU's native matrices and under the interpreter (whose tests ask by `config`)."""
    from layerstream.compute.qlinear import QuantWeight, _takes_int8_x, takes_int8_x

    def qw(qt, N, K=4096, native=False):
        return QuantWeight(torch.empty(0, dtype=torch.uint8), int(qt), (N, K), native)

    x = torch.zeros(1, 4096, dtype=torch.float16)
    _takes_int8_x.cache_clear()
    assert not takes_int8_x(x, [qw(QT.Q4_K, 4096)])  # the interpreter (CI's CPU)
    monkeypatch.setattr(qkernels, "INTERPRET", False)
    _takes_int8_x.cache_clear()  # (its answers under the interpreter; cleared again after the test)
    request.addfinalizer(_takes_int8_x.cache_clear)
    qkv = [qw(QT.Q4_K, 4096), qw(QT.Q4_K, 1024), qw(QT.Q4_K, 1024)]
    assert takes_int8_x(x, qkv)
    assert takes_int8_x(x, [qw(QT.Q4_K, 4096), qw(QT.Q4_K, 1024), qw(QT.Q6_K, 1024)])  # q and k's launch
    assert takes_int8_x(x, [qw(QT.Q4_K, 14336)] * 2) and takes_int8_x(x, [qw(QT.Q4_K, 128256)])
    assert not takes_int8_x(x, [qw(QT.Q6_K, 128256)]) and not takes_int8_x(x, [qw(QT.Q4_K, 1024)])
    assert not takes_int8_x(x.float(), qkv) and not takes_int8_x(torch.zeros(2, 4096, dtype=torch.float16), qkv)
    assert not takes_int8_x(x, [qw(QT.Q4_K, 4096, native=True)])
    assert not takes_int8_x(torch.zeros(1, 2048, dtype=torch.float16), [qw(QT.Q4_K, 4096, 2048)])


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
    a small matrix and Triton's interpreter keep the other kernels. At one row, Q4_K on 2048 rows
    or more takes x as int8 ("gemv8", qgemv8.py). A chosen configuration has 2 to 4 rows of x a
    program (1 alone) and a slice on every lane."""
    def choose(M, qt, N=4096, K=4096, interpret=False):
        kind = qkernels._choose(M, N, K, int(qt), interpret=interpret)[0]
        if kind == "gemv8":
            assert M == 1 and int(qt) in qgemv8.TYPES and N >= 2048 and K >= 4096, (M, qt, N, K)
            return "gemv"
        return kind

    assert qkernels._choose(1, 14336, 4096, int(QT.Q4_K), interpret=False)[0] == "gemv8"
    assert qkernels._choose(1, 4096, 14336, int(QT.Q6_K), interpret=False)[0] == "gemv"
    assert qkernels._choose(1, 1024, 4096, int(QT.Q4_K), interpret=False)[0] == "gemv"
    # float32 activations keep the float step where the choice was int8's
    cfg = qkernels._choose(1, 14336, 4096, int(QT.Q4_K), interpret=False)
    assert qkernels._float_x(cfg, torch.zeros(1, 1, dtype=torch.float32)) == ("gemv", *cfg[1:])
    assert qkernels._float_x(cfg, torch.zeros(1, 1, dtype=torch.float16)) == cfg
    assert qkernels._float_x(None, torch.zeros(1, 1)) is None
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
    bits on a second call. Q4_K also on int8 x (gemv8, which _choose takes at one row on the large
    matrices), against float64 over the int8 x (int8_x)."""
    rng = np.random.default_rng(900 + int(qt))
    legacy = qt in (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1)  # (their one code path: fewer shapes)
    small = [(1536, 576)] if GGML_QUANT_SIZES[qt][0] == 32 else []  # SmolLM2's K
    for N, K in [(4096, 4096), (333, 4096)] + ([] if legacy else [(1027, 14336)]) + [(576, 1536)] + small:
        b = random_blocks(rng, qt, N, K)
        raw = torch.from_numpy(b.reshape(-1).copy()).cuda()
        ref_w = reference(b, qt, N, K).cuda()
        cases = [(M, torch.float16, (None, ("gemv", 1 << (M - 1).bit_length(), 1, 8, 1))) for M in (1, 2, 3, 4)]
        cases += [(1, torch.float16, (("gemv", 1, 2, 16, 2),)), (1, torch.float32, (None,)), (2, torch.bfloat16, (None,))]
        if int(qt) in qgemv8.TYPES:  # on int8 x: the configurations _choose takes at one row, and 2 rows
            cases += [(1, torch.float16, (("gemv8", 1, 1, 8, 1), ("gemv8", 1, 1, 16, 2))),
                      (2, torch.float16, (("gemv8", 2, 2, 8, 1),))]
        for M, dt, configs in cases:
            x = torch.randn(M, K, device="cuda", dtype=dt)
            tol = {torch.float16: 2e-3, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dt]
            for config in configs:
                kind = (config or qkernels._float_x(qkernels._choose(M, N, K, int(qt)), x))[0]
                ref = (int8_x(x) if kind == "gemv8" else x.double()) @ ref_w.T
                y = qkernels.matmul(x, raw, int(qt), N, K, config=config)
                err = rel_err(y, ref)
                assert err < tol, f"{qt.name} [{N}, {K}] M={M} {dt} {config}: rel err {err:.2e}"
                assert torch.equal(qkernels.matmul(x, raw, int(qt), N, K, config=config), y)
