"""Triton kernels on GGUF blocks against gguf-py's dequantizer and a float64 matmul.

On the CPU they run under Triton's interpreter (conftest sets TRITON_INTERPRET=1), on tiny
shapes; the gpu-marked tests run them compiled, at full size.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT
from gguf.quants import dequantize as gguf_dequantize

pytest.importorskip("triton")
from layerstream.compute import qkernels  # noqa: E402
from layerstream.compute.dequant import FUSED_TYPES
from layerstream.compute.qlinear import QuantWeight, linear  # noqa: E402

# byte offsets of the fp16 fields of each block, set to small finite values
HALF_FIELDS = {QT.Q4_0: [0], QT.Q4_1: [0, 2], QT.Q5_0: [0], QT.Q5_1: [0, 2], QT.Q8_0: [0],
               QT.Q2_K: [80, 82], QT.Q3_K: [108], QT.Q4_K: [0, 2], QT.Q5_K: [0, 2], QT.Q6_K: [208]}
TYPES = sorted(HALF_FIELDS, key=int)


def random_blocks(rng, qt: QT, N: int, K: int) -> np.ndarray:
    """Random bytes for a [N, K] matrix of type qt, with sane fp16 scales (N * K // block, type_size)."""
    qk, ts = GGML_QUANT_SIZES[qt]
    b = rng.integers(0, 256, (N * K // qk, ts), dtype=np.uint8)
    for o in HALF_FIELDS[qt]:
        b[:, o:o + 2] = rng.uniform(-0.02, 0.02, len(b)).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return b


def int8_x(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] as the GEMV on int8 activations reads it, written out here in float32 as
    qgemv8.quantize_x's rule says: each block of 32 rounded (ties away from zero) to int8 steps of
    max |x| / 127; float64 on x's device."""
    v = x.float().reshape(x.shape[0], -1, 32)
    dx = v.abs().amax(-1, keepdim=True) / 127.0
    f = v * (1.0 / torch.where(dx > 0, dx, torch.ones_like(dx)))
    q = torch.where(f >= 0, f + 0.5, f - 0.5).trunc()
    return (q.double() * dx.double()).reshape(x.shape)


def shapes(qt: QT):
    """Odd row counts; K not a multiple of 256 for the 32-value types (a partial last chunk)."""
    out = [(13, 512), (33, 256), (1, 256)]
    if GGML_QUANT_SIZES[qt][0] == 32:
        out += [(7, 96), (5, 576)]
    return out


def test_kernels_cover_every_block_type():
    assert set(qkernels.GEOMETRY) == set(FUSED_TYPES) == {int(t) for t in TYPES}
    for t in TYPES:
        ts, qk = qkernels.GEOMETRY[int(t)][:2]
        assert (qk, ts) == GGML_QUANT_SIZES[t]


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_dequantize_into_is_bit_exact_with_gguf(qt):
    rng = np.random.default_rng(int(qt))
    for N, K in shapes(qt):
        b = random_blocks(rng, qt, N, K)
        ref = torch.from_numpy(gguf_dequantize(b.reshape(-1), qt)).reshape(N, K)
        out = torch.full((N, K), float("nan"))
        qkernels.dequantize_into(torch.from_numpy(b.reshape(-1).copy()), int(qt), N, K, out)
        assert torch.equal(out, ref), f"{qt.name} [{N}, {K}]"


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_fused_matmul_matches_dequantize_then_linear(qt):
    rng = np.random.default_rng(100 + int(qt))
    torch.manual_seed(int(qt))
    for N, K in shapes(qt):
        b = random_blocks(rng, qt, N, K)
        ref_w = torch.from_numpy(gguf_dequantize(b.reshape(-1), qt)).reshape(N, K).double()
        raw = torch.from_numpy(b.reshape(-1).copy())
        bias = torch.randn(N)
        for M in (1, 3, 17):  # one program per row; tl.dot with padding; two row tiles
            x = torch.randn(M, K)
            ref = x.double() @ ref_w.T + bias.double()
            BM = 1 if M == 1 else 16
            # the tuned choice, and K split over one program per chunk (partials summed after)
            for config in (None, (BM, 8 if M == 1 else 32, 2, -(-K // 256))):
                y = qkernels.matmul(x, raw, int(qt), N, K, bias, config=config)
                assert y.shape == (M, N) and y.dtype == x.dtype
                err = ((y.double() - ref).norm() / ref.norm()).item()
                # float32 activations: float32 products and sums throughout
                assert err < 1e-5, f"{qt.name} [{N}, {K}] M={M} {config}: rel err {err:.2e}"


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_rows_kernel_matches_dequantize_then_linear(qt):
    """The whole-rows kernel (`_rows_kernel`) for every type: float32 activations within float32
    rounding of float64 over gguf-py's dequantization, with K's tail past the last chunk tile
    masked (two tiles of KB chunks, or of KB * 8 for Q6_K and Q3_K, exceed every K here) and the
    rows of x and W split over programs with padding (3 rows in tiles of 2; BN of 64 or 8).
    `_choose` sends only Q5_K and Q6_K here; the other types are kept correct for later tuning."""
    rng = np.random.default_rng(500 + int(qt))
    for N, K in [(5, 576)] if GGML_QUANT_SIZES[qt][0] == 32 else [(13, 512)]:  # 576: a partial chunk
        b = random_blocks(rng, qt, N, K)
        ref_w = torch.from_numpy(gguf_dequantize(b.reshape(-1), qt)).reshape(N, K).double()
        raw = torch.from_numpy(b.reshape(-1).copy())
        bias = torch.randn(N)
        for M, config in ((1, ("rows", 1, 64, 2, 1)), (3, ("rows", 2, 8, 1, 1))):
            x = torch.randn(M, K)
            ref = x.double() @ ref_w.T + bias.double()
            y = qkernels.matmul(x, raw, int(qt), N, K, bias, config=config)
            assert y.shape == (M, N) and torch.isfinite(y).all()
            err = ((y.double() - ref).norm() / ref.norm()).item()
            assert err < 1e-5, f"{qt.name} [{N}, {K}] M={M} {config}: rel err {err:.2e}"


def test_choose_takes_the_rows_kernel_where_it_measured_faster():
    """Where qgemv's kernel is not taken, on a GPU, for matrices of at least 1024 x 4096, Q5_K up to
    4 rows, Q6_K at 2 rows and Q6_K at 1 row of the head's or the gate's shape go to `_rows_kernel`;
    the rest, and everything under Triton's interpreter, to the split-K kernel; both give the
    product within float32 rounding."""
    rows = lambda M, N, K, qt: qkernels._rows_or_split(M, N, K, int(qt), interpret=False)[0] == "rows"  # noqa: E731
    assert qkernels._rows_or_split(1, 4096, 4096, int(QT.Q5_K), interpret=True)[0] != "rows"
    assert all(rows(M, N, 4096, QT.Q5_K) for M in (1, 2, 3, 4) for N in (1024, 4096)) and not rows(5, 4096, 4096, QT.Q5_K)
    assert rows(1, 14336, 4096, QT.Q6_K) and rows(1, 128256, 4096, QT.Q6_K) and rows(2, 4096, 14336, QT.Q6_K)
    assert not rows(1, 4096, 4096, QT.Q6_K) and not rows(1, 4096, 14336, QT.Q6_K) and not rows(4, 4096, 4096, QT.Q6_K)
    assert not any(rows(M, 4096, 4096, qt) for M in (1, 2, 4) for qt in (QT.Q4_K, QT.Q8_0, QT.Q4_0))
    assert not rows(2, 576, 1536, QT.Q6_K) and not rows(1, 960, 4096, QT.Q5_K)  # smaller than any measured
    rng = np.random.default_rng(9)
    N, K = 9, 512
    b = random_blocks(rng, QT.Q6_K, N, K)
    raw = torch.from_numpy(b.reshape(-1).copy())
    x = torch.randn(2, K, generator=torch.Generator().manual_seed(9))
    ref = x.double() @ torch.from_numpy(gguf_dequantize(b.reshape(-1), QT.Q6_K)).reshape(N, K).double().T
    for config in (("rows", 2, 4, 1, 1), (1, 8, 1, 1)):
        y = qkernels.matmul(x, raw, int(QT.Q6_K), N, K, config=config)
        assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5, config


@pytest.mark.parametrize("qt", [QT.Q4_0, QT.Q8_0, QT.Q4_K, QT.Q6_K], ids=lambda t: t.name)
def test_grouped_matmul_matches_each_matrix(qt):
    """Several matrices of one type in one launch, each group with its own row of activations: in
    one buffer (a resident layer's experts) and in separate allocations addressed from an anchor
    (the expert cache's entries), against float64 on gguf-py's dequantization and bit for bit
    against the single-matrix kernel with the same (unsplit) configuration."""
    rng = np.random.default_rng(300 + int(qt))
    N, K, E = 9, 512, 5
    blocks = [random_blocks(rng, qt, N, K).reshape(-1) for _ in range(E)]
    refs = [torch.from_numpy(gguf_dequantize(b, qt)).reshape(N, K).double() for b in blocks]
    x = torch.randn(3, K)
    pick, rows = [4, 0, 4, 2], [0, 2, 1, 2]  # group g: expert pick[g] on activation row rows[g]
    x_row = torch.tensor(rows, dtype=torch.int32)
    one = torch.from_numpy(np.concatenate(blocks).copy())  # [E * N, K] as one tensor
    apart = [torch.from_numpy(b.copy()) for b in blocks]  # one allocation each
    per = blocks[0].nbytes
    layouts = {
        "one buffer": (one, torch.tensor([e * per for e in pick])),
        "separate": (apart[1], torch.tensor([apart[e].data_ptr() - apart[1].data_ptr() for e in pick])),
    }
    for name, (raw, w_off) in layouts.items():
        y = qkernels.grouped_matmul(x, raw, int(qt), N, K, w_off, x_row)
        assert y.shape == (len(pick), N)
        for g, (e, r) in enumerate(zip(pick, rows)):
            ref = x[r].double() @ refs[e].T
            assert ((y[g].double() - ref).norm() / ref.norm()).item() < 1e-5, (name, g)
            single = qkernels.matmul(x[r : r + 1], apart[e], int(qt), N, K, config=(1, 4, 1, 1))
            assert torch.equal(y[g], single[0]), (name, g)


def test_bfloat16_activations_beyond_float16s_range():
    """bfloat16 runs (Gemma 3's default) multiply on float32 operands in the tl.dot path (TF32 on
    a GPU), not float16 ones: activations above 65504 stay finite, within bfloat16 rounding."""
    rng = np.random.default_rng(11)
    N, K = 40, 512
    b = random_blocks(rng, QT.Q4_K, N, K)
    raw = torch.from_numpy(b.reshape(-1).copy())
    ref_w = torch.from_numpy(gguf_dequantize(b.reshape(-1), QT.Q4_K)).reshape(N, K).double()
    x = (torch.randn(5, K, generator=torch.Generator().manual_seed(0)) * 1e5).bfloat16()  # 5 rows: tl.dot
    y = qkernels.matmul(x, raw, int(QT.Q4_K), N, K)
    ref = x.double() @ ref_w.T
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2
    with np.errstate(over="ignore", invalid="ignore"):  # what float16 does (the interpreter's numpy warns)
        assert not torch.isfinite(qkernels.matmul(x.half(), raw, int(QT.Q4_K), N, K)).all()


def test_linear_dispatch_prompt_path_uses_the_scratch():
    """Above the fused limit, `linear` dequantizes into the scratch and calls F.linear (row chunks
    when the matrix is larger than the scratch cap)."""
    from layerstream.compute import qlinear

    rng = np.random.default_rng(7)
    qt, N, K = QT.Q4_K, 40, 256
    b = random_blocks(rng, qt, N, K)
    w = QuantWeight(torch.from_numpy(b.reshape(-1).copy()), int(qt), (N, K))
    ref_w = torch.from_numpy(gguf_dequantize(b.reshape(-1), qt)).reshape(N, K)
    x = torch.randn(qlinear.FUSED_MAX_TOKENS_BY_TYPE[int(qt)] + 5, K, generator=torch.Generator().manual_seed(7))
    ref = x.double() @ ref_w.double().T  # float64: float32's own sums of 256 products differ by order
    torch.testing.assert_close(linear(x, w).double(), ref, rtol=1e-5, atol=1e-4)
    old = qlinear.UNPLANNED_MAX_ELEMS
    qlinear.UNPLANNED_MAX_ELEMS = 16 * K  # 16 rows per chunk: three chunks
    try:
        torch.testing.assert_close(linear(x, w).double(), ref, rtol=1e-5, atol=1e-4)
    finally:
        qlinear.UNPLANNED_MAX_ELEMS = old


def test_bad_blocks_are_refused():
    with pytest.raises(ValueError, match="need 144"):
        qkernels.matmul(torch.randn(1, 256), torch.zeros(100, dtype=torch.uint8), int(QT.Q4_K), 1, 256)


@pytest.mark.gpu
@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_full_size_on_cuda(qt):
    """Llama-3.1-8B matrix sizes, compiled: bit-exact dequantization, matmul within fp16 rounding
    (through either kernel, as `_choose` picks: Q5_K at 1 to 4 rows, Q6_K at 2 and on 14339 rows at 1 take
    the rows kernel; Q4_K at one row on 2048 rows or more takes int8 x, against float64 over it)."""
    rng = np.random.default_rng(200 + int(qt))
    for N, K in [(4096, 4096), (1024, 4096), (14336 + 3, 4096)]:
        b = random_blocks(rng, qt, N, K)
        raw = torch.from_numpy(b.reshape(-1).copy()).cuda()
        ref_w = torch.from_numpy(gguf_dequantize(b.reshape(-1), qt)).reshape(N, K).cuda()
        out = torch.empty(N, K, device="cuda")
        qkernels.dequantize_into(raw, int(qt), N, K, out)
        assert torch.equal(out, ref_w), f"{qt.name} [{N}, {K}]"
        for M, dt in ((1, torch.float16), (2, torch.float16), (4, torch.float16), (16, torch.float16),
                      (16, torch.float32)):
            x = torch.randn(M, K, device="cuda", dtype=dt)
            int8 = qkernels._float_x(qkernels._choose(M, N, K, int(qt)), x)[0] == "gemv8"  # (Q4_K at one row)
            ref = (int8_x(x) if int8 else x.double()) @ ref_w.double().T
            y = qkernels.matmul(x, raw, int(qt), N, K)
            err = ((y.double() - ref).norm() / ref.norm()).item()
            assert err < (2e-3 if dt == torch.float16 else 1e-5), f"{qt.name} [{N}, {K}] M={M} {dt}: rel err {err:.2e}"
            assert torch.equal(qkernels.matmul(x, raw, int(qt), N, K), y), "each output summed in a fixed order"


@pytest.mark.gpu
@pytest.mark.parametrize("qt", [QT.Q4_K, QT.Q6_K, QT.Q8_0], ids=lambda t: t.name)
def test_grouped_matmul_on_cuda(qt):
    """Qwen3-30B-A3B expert sizes, compiled: 8 experts in separate allocations (the expert cache)
    and 2 tokens' activations, each group within fp16 rounding of float64 over gguf-py's
    dequantization, and within float32 summation order of the single-matrix kernel. (Not bit
    for bit: the two kernels share their inner loop, but the compiler may contract it apart;
    measured on an H200, Q4_K differed in the last bit.)"""
    rng = np.random.default_rng(400 + int(qt))
    for N, K in [(768, 2048), (2048, 768)]:
        blocks = [random_blocks(rng, qt, N, K).reshape(-1).copy() for _ in range(8)]
        mats = [torch.from_numpy(b).cuda() for b in blocks]
        x = torch.randn(2, K, device="cuda", dtype=torch.float16)
        pick, rows = [3, 0, 7, 3, 5, 1], [0, 0, 0, 1, 1, 1]
        w_off = torch.tensor([mats[e].data_ptr() - mats[0].data_ptr() for e in pick], device="cuda")
        y = qkernels.grouped_matmul(x, mats[0], int(qt), N, K, w_off, torch.tensor(rows, dtype=torch.int32,
                                                                                     device="cuda"))
        for g, (e, r) in enumerate(zip(pick, rows)):
            w = torch.from_numpy(gguf_dequantize(blocks[e], qt)).reshape(N, K).double().cuda()
            ref = x[r].double() @ w.T
            err = ((y[g].double() - ref).norm() / ref.norm()).item()
            assert err < 2e-3, f"{qt.name} [{N}, {K}] group {g}: rel err {err:.2e}"
            single = qkernels.matmul(x[r : r + 1], mats[e], int(qt), N, K, config=(1, 4, 1, 1))
            torch.testing.assert_close(y[g].float(), single[0].float(), rtol=2e-3, atol=1e-3 * ref.abs().max().item())
