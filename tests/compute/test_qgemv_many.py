"""Several matrices in one launch (qgemv.gemv_many_kernel: q/k/v, gate and up with SiLU, a residual in
the epilogue) against the separate launches and a float64 reference over gguf-py's dequantization,
under Triton's interpreter on tiny odd shapes; and the layer code's use of it (qlinear, model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT

pytest.importorskip("triton")
from layerstream.compute import model, qgemv, qkernels, qlinear  # noqa: E402
from layerstream.compute.qlinear import QuantWeight  # noqa: E402
from tests.compute.test_qgemv import TYPES, reference, rel_err  # noqa: E402
from tests.compute.test_qkernels import int8_x, random_blocks  # noqa: E402


def in_one_store(blocks: list[np.ndarray], order: list[int]) -> list[torch.Tensor]:
    """The matrices' bytes as views into one allocation, laid out in `order` with 4-byte gaps between
    them (the first matrix need not come first: offsets from it are then negative)."""
    sizes = [b.size for b in blocks]
    store = torch.zeros(sum(sizes) + 4 * len(blocks), dtype=torch.uint8)
    views, at = [None] * len(blocks), 4
    for i in order:
        views[i] = store[at:at + sizes[i]]
        views[i].copy_(torch.from_numpy(blocks[i].reshape(-1).copy()))
        at += sizes[i] + 4
    return views


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_segments_equal_the_separate_launches_and_float64(qt):
    """Three matrices of 5, 3 and 4 rows (q, k, v-like) by 1 and 5 rows of x, in separate allocations
    and as views of one store in another order: each product equals a separate launch bit for bit and
    matches float64; Q8_0 also with K not a multiple of 256."""
    rng = np.random.default_rng(40 + int(qt))
    gen = torch.Generator().manual_seed(int(qt))
    K = 288 if qt == QT.Q8_0 else 512
    Ns = [5, 3, 4]
    blocks = [random_blocks(rng, qt, n, K) for n in Ns]
    refs = [reference(b, qt, n, K) for b, n in zip(blocks, Ns)]
    apart = [torch.from_numpy(b.reshape(-1).copy()) for b in blocks]
    for raws, M, cfg in ((apart, 1, ("gemv", 1, 4, 2, 1)), (in_one_store(blocks, [2, 0, 1]), 5, ("gemv", 8, 4, 1, 1))):
        x = torch.randn(M, K, generator=gen)
        ys = qkernels.matmul_many(x, raws, int(qt), Ns, K, config=cfg)
        assert [y.shape for y in ys] == [(M, n) for n in Ns] and all(y.is_contiguous() for y in ys)
        for y, raw, n, ref in zip(ys, raws, Ns, refs):
            assert torch.equal(y, qkernels.matmul(x, raw, int(qt), n, K, config=cfg))
            assert rel_err(y, x.double() @ ref.T) < 1e-5


@pytest.mark.parametrize("qt", [QT.Q4_K, QT.Q6_K], ids=lambda t: t.name)
def test_glu_is_silu_of_gate_times_up(qt):
    """Gate and up rows paired in one program: SiLU(x W_g^T) * (x W_u^T) against float64, and within
    a rounding of float16's separate ops (silu, then the product), for 2 and 16 rows of x."""
    rng = np.random.default_rng(7 + int(qt))
    gen = torch.Generator().manual_seed(7)
    N, K = 4, 512
    bg, bu = random_blocks(rng, qt, N, K), random_blocks(rng, qt, N, K)
    raws = in_one_store([bg, bu], [1, 0])
    for M, cfg in ((2, ("gemv", 2, 4, 2, 1)), (16, ("gemv", 16, 4, 2, 1))):
        x = torch.randn(M, K, generator=gen)
        g64, u64 = x.double() @ reference(bg, qt, N, K).T, x.double() @ reference(bu, qt, N, K).T
        (y,) = qkernels.matmul_many(x, raws, int(qt), [N, N], K, glu=True, config=cfg)
        assert y.shape == (M, N)
        assert rel_err(y, F.silu(g64) * u64) < 1e-5
        xh = x.half()
        (yh,) = qkernels.matmul_many(xh, raws, int(qt), [N, N], K, glu=True, config=cfg)
        g, u = (qkernels.matmul(xh, r, int(qt), N, K, config=cfg) for r in raws)
        sep = F.silu(g) * u
        assert yh.dtype == torch.float16
        assert torch.allclose(yh.float(), sep.float(), rtol=2e-3, atol=1e-4)


def test_residual_in_the_epilogue_is_the_separate_add():
    """One matrix with a residual: residual + x W^T in float16 bit for bit as the separate launch and
    add (the product rounded first, then the sum, as torch rounds them)."""
    rng = np.random.default_rng(3)
    gen = torch.Generator().manual_seed(3)
    N, K, M = 9, 768, 3
    b = random_blocks(rng, QT.Q4_K, N, K)
    raw = torch.from_numpy(b.reshape(-1).copy())
    x = torch.randn(M, K, generator=gen).half()
    res = (torch.randn(M, N, generator=gen) * 4).half()
    cfg = ("gemv", 4, 2, 2, 1)
    (y,) = qkernels.matmul_many(x, [raw], int(QT.Q4_K), [N], K, residual=res, config=cfg)
    assert torch.equal(y, res + qkernels.matmul(x, raw, int(QT.Q4_K), N, K, config=cfg))
    with pytest.raises(ValueError, match="residual"):
        qkernels.matmul_many(x, [raw], int(QT.Q4_K), [N], K, residual=res[:, :4].contiguous(), config=cfg)


def test_one_launch_on_int8_x_is_the_separate_launches():
    """On int8 x (gemv8, Q4_K): q/k/v-like segments bit for bit as separate gemv8 launches and within float32
    rounding of float64 over the int8 x; gate and up with SiLU, and one matrix with a residual, in
    float16 as the separate launches and ops."""
    qt = QT.Q4_K
    rng = np.random.default_rng(60 + int(qt))
    gen = torch.Generator().manual_seed(60)
    K, Ns = 512, [5, 3, 4]
    blocks = [random_blocks(rng, qt, n, K) for n in Ns]
    raws = in_one_store(blocks, [1, 2, 0])
    cfg = ("gemv8", 2, 4, 1, 1)
    x = torch.randn(3, K, generator=gen)
    for y, raw, n, b in zip(qkernels.matmul_many(x, raws, int(qt), Ns, K, config=cfg), raws, Ns, blocks):
        assert torch.equal(y, qkernels.matmul(x, raw, int(qt), n, K, config=cfg))
        assert rel_err(y, int8_x(x) @ reference(b, qt, n, K).T) < 1e-5
    xh = x.half()
    gate_up = in_one_store([blocks[0], random_blocks(rng, qt, 5, K)], [1, 0])
    (a,) = qkernels.matmul_many(xh, gate_up, int(qt), [5, 5], K, glu=True, config=cfg)
    g, u = (qkernels.matmul(xh, r, int(qt), 5, K, config=cfg) for r in gate_up)
    assert torch.allclose(a.float(), (F.silu(g) * u).float(), rtol=2e-3, atol=1e-4)
    res = torch.randn(3, 5, generator=gen).half()
    (y,) = qkernels.matmul_many(xh, [raws[0]], int(qt), [5], K, residual=res, config=cfg)
    assert torch.equal(y, res + g)


def test_what_one_launch_does_not_take():
    """Under the interpreter without a configuration (its programs run one by one), types the kernel
    lacks, and blocks a whole word apart from none: None, and the callers launch each matrix."""
    rng = np.random.default_rng(5)
    N, K = 4, 512
    b = random_blocks(rng, QT.Q4_K, N, K).reshape(-1)
    raw = torch.from_numpy(b.copy())
    x = torch.randn(1, K)
    assert qkernels.matmul_many(x, [raw, raw], int(QT.Q4_K), [N, N], K) is None  # no measured configuration here
    q3 = torch.from_numpy(random_blocks(rng, QT.Q3_K, N, K).reshape(-1).copy())
    assert qkernels.matmul_many(x, [q3, q3], int(QT.Q3_K), [N, N], K, config=("gemv", 1, 1, 1, 1)) is None
    store = torch.zeros(2 * b.size + 6, dtype=torch.uint8)
    odd = [store[:b.size], store[b.size + 6:]]  # the second 2 bytes off a word
    assert not qgemv.many_supported(odd, int(QT.Q4_K))
    assert qkernels.matmul_many(x, odd, int(QT.Q4_K), [N, N], K, config=("gemv", 1, 1, 1, 1)) is None
    with pytest.raises(ValueError, match="1 to 3"):
        qgemv.gemv_many(x, [raw] * 4, int(QT.Q4_K), [N] * 4, K, 4 * 144 // 2, 2, 1, 1, 1, 1, True)


def test_layer_code_takes_one_launch_where_configured(monkeypatch):
    """qlinear.linear_many groups the Q4_K q and k in one launch and runs the Q6_K v alone; glu runs
    gate and up in one launch; linear adds a residual in it; model.ffn_block gives what the separate
    ops give (the configuration that the interpreter lacks given here)."""
    monkeypatch.setattr(qkernels, "_many_config", lambda M, Ns, K, qtype: ("gemv", 2, 64, 1, 1))
    launches = []
    real = qgemv.gemv_many
    monkeypatch.setattr(qgemv, "gemv_many", lambda *a, **k: launches.append(len(a[1])) or real(*a, **k))
    rng = np.random.default_rng(11)
    gen = torch.Generator().manual_seed(11)
    K = 256

    def qw(qt, n):
        b = random_blocks(rng, qt, n, K)
        return QuantWeight(torch.from_numpy(b.reshape(-1).copy()), int(qt), (n, K)), reference(b, qt, n, K)

    (wq, rq), (wk, rk), (wv, rv) = qw(QT.Q4_K, 6), qw(QT.Q4_K, 3), qw(QT.Q6_K, 3)
    x = torch.randn(2, K, generator=gen)
    q, k, v = qlinear.linear_many(x, [wq, wk, wv])
    assert launches == [2]  # q and k together; v by qkernels.matmul
    for y, r in ((q, rq), (k, rk), (v, rv)):
        assert rel_err(y, x.double() @ r.T) < 1e-5
    (wg, rg), (wu, ru), (wd, rd) = qw(QT.Q4_K, K), qw(QT.Q4_K, K), qw(QT.Q4_K, K)  # F = E = 256
    launches.clear()
    a = qlinear.glu(x, wg, wu)
    assert launches == [2] and rel_err(a, F.silu(x.double() @ rg.T) * (x.double() @ ru.T)) < 1e-5
    hp = type("HP", (), {"norm_eps": 1e-5, "ffn_act": "silu"})()
    w = {"ffn_norm.weight": torch.rand(K, generator=gen) + 0.5, "ffn_gate.weight": wg, "ffn_up.weight": wu,
         "ffn_down.weight": wd}
    launches.clear()
    y = model.ffn_block(hp, w, x)
    assert launches == [2, 1]  # gate and up with SiLU; down with the residual
    h = model.rms_norm(x, w["ffn_norm.weight"], 1e-5).double()
    ref = x.double() + (F.silu(h @ rg.T) * (h @ ru.T)) @ rd.T
    assert rel_err(y, ref) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("qt", [QT.Q4_K, QT.Q6_K], ids=lambda t: t.name)
def test_on_cuda_at_8b_size_one_launch_is_the_separate_launches(qt):
    """Compiled, at an 8B layer's sizes and the configuration chosen for 1 and 2 rows: q/k/v-like
    products bit for bit as separate launches in the launch's configuration (chosen for all its rows:
    k and v alone would take another, which sums in another order), gate and up with SiLU within
    float16's rounding of the separate ops, down with the residual bit for bit as the separate add."""
    rng = np.random.default_rng(1)
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(1)
    E, Fd = 4096, 14336
    shapes = {"q": (E, E), "k": (1024, E), "v": (1024, E), "g": (Fd, E), "u": (Fd, E), "d": (E, Fd)}
    mats = {n: torch.from_numpy(random_blocks(rng, qt, r, c).reshape(-1).copy()).to(dev) for n, (r, c) in shapes.items()}
    rows = {n: r for n, (r, _) in shapes.items()}

    def config(M, names, K):
        """The dispatch's configuration; where qsmall takes one of the matrices (Q4_K at 2 rows) the
        launch steps aside (None) and the test forces the GEMV configuration for those rows."""
        Ns = [rows[n] for n in names]
        chosen = qkernels._many_config(M, Ns, K, int(qt))
        if chosen is None:
            assert any(qkernels._small_config(M, n, K, int(qt)) for n in Ns)
            assert qkernels.matmul_many(torch.zeros(M, K, dtype=torch.half, device=dev),
                                        [mats[n] for n in names], int(qt), Ns, K) is None
        return chosen or qkernels._gemv_config(M, sum(Ns), K, int(qt))

    for M in (1, 2):
        x = torch.randn(M, E, generator=gen).half().to(dev)
        c = config(M, "qkv", E)
        ys = qkernels.matmul_many(x, [mats["q"], mats["k"], mats["v"]], int(qt), [E, 1024, 1024], E, config=c)
        assert ys is not None
        for y, n, r in zip(ys, "qkv", (E, 1024, 1024)):
            assert torch.equal(y, qkernels.matmul(x, mats[n], int(qt), r, E, config=c))
        c = config(M, "gu", E)
        (a,) = qkernels.matmul_many(x, [mats["g"], mats["u"]], int(qt), [Fd, Fd], E, glu=True, config=c)
        # gate and up alone in the launch's configuration (qsmall, which 2 rows of Q4_K take, makes
        # its weights in float16 and differs by more than the elementwise tolerance)
        g, u = (qkernels.matmul(x, mats[n], int(qt), Fd, E, config=c) for n in "gu")
        assert torch.allclose(a.float(), (F.silu(g) * u).float(), rtol=2e-3, atol=1e-3)
        a = torch.randn(M, Fd, generator=gen).half().to(dev) * 0.1  # (gate*up of random blocks overflows float16)
        res = torch.randn(M, E, generator=gen).half().to(dev)
        c = config(M, "d", Fd)
        (y,) = qkernels.matmul_many(a, [mats["d"]], int(qt), [E], Fd, residual=res, config=c)
        assert torch.equal(y, res + qkernels.matmul(a, mats["d"], int(qt), E, Fd, config=c))
