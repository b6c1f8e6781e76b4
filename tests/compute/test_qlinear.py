"""The prompt path's dequantized matmul in row chunks (compute/qlinear.py) against a float64
product over gguf-py's dequantization, and the scratch the plan reserves for it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize as gguf_dequantize

pytest.importorskip("triton")
from layerstream.compute import qlinear  # noqa: E402
from layerstream.compute.qlinear import QuantWeight, chunk_rows, linear, scratch_elems  # noqa: E402


def q8_blocks(rng, N: int, K: int) -> np.ndarray:
    """Random Q8_0 blocks of a [N, K] matrix with small finite fp16 scales."""
    b = rng.integers(0, 256, (N * K // 32, 34), dtype=np.uint8)
    b[:, 0:2] = rng.uniform(-0.02, 0.02, len(b)).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return b


def test_chunk_rows_take_whole_tiles_within_the_cap():
    assert chunk_rows(14336, 4096, 4096 * 4096) == 4096  # the 8B's gate and up: four chunks
    assert chunk_rows(4096, 14336, 4096 * 4096) == 1024  # its down: 1170 rows fit, 1024 are taken
    assert chunk_rows(4096, 4096, 4096 * 4096) == 4096  # q and o whole
    assert chunk_rows(600, 256, 300 * 256) == 256 and chunk_rows(600, 256, 200 * 256) == 200
    assert chunk_rows(10, 256, 1) == 1
    # the plan's reservation: the largest chunk of any matrix (32 MiB in fp16 for the 8B's)
    assert scratch_elems([(14336, 4096), (4096, 14336), (1024, 4096)]) == 4096 * 4096
    assert scratch_elems([(1536, 576), (576, 1536)]) == 1536 * 576  # SmolLM2's, whole
    # the old cap held the whole 14336 x 4096 matrix: 112 MiB in fp16
    assert scratch_elems([(14336, 4096)]) * 2 < 14336 * 4096 * 2 // 3


@pytest.mark.parametrize("cap_rows,bias", [(None, False), (300, True), (16, False), (16, True)])
def test_linear_in_row_chunks_matches_the_float64_product(monkeypatch, cap_rows, bias):
    """Each chunk's product is written into its columns of the output (torch.mm/addmm into a strided
    view): whole, two chunks of 256 and 88 rows, or many of 16; with and without a bias."""
    rng = np.random.default_rng(3)
    qt, N, K = QT.Q8_0, 344, 64
    b = q8_blocks(rng, N, K)
    w = QuantWeight(torch.from_numpy(b.reshape(-1).copy()), int(qt), (N, K))
    ref_w = torch.from_numpy(gguf_dequantize(b.reshape(-1), qt)).reshape(N, K).double()
    x = torch.randn(qlinear.FUSED_MAX_TOKENS + 3, K)
    bv = torch.randn(N) if bias else None
    if cap_rows is not None:
        monkeypatch.setattr(qlinear, "UNPLANNED_MAX_ELEMS", cap_rows * K)
    calls = []
    real = qlinear.dequantized
    monkeypatch.setattr(qlinear, "dequantized", lambda *a, **k: calls.append(a[2] if len(a) > 2 else None) or real(*a, **k))
    got = linear(x, w, bv)
    want = x.double() @ ref_w.T + (0 if bv is None else bv.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    expect = {None: 1, 300: 2, 16: -(-N // 16)}[cap_rows]
    assert len(calls) == expect
    if cap_rows == 300:
        assert [(s.start, s.stop) for s in calls] == [(0, 256), (256, N)]
