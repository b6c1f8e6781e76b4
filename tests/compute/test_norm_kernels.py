"""The Triton RMSNorm (compute/norm_kernels.py) against float64, with and without the residual add.

On the CPU it runs under Triton's interpreter (conftest sets TRITON_INTERPRET=1)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from layerstream.compute import norm_kernels  # noqa: E402


def reference(x, w, eps):
    xd = x.double()
    return xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * w.double()


@pytest.mark.parametrize("T,E,dtype,tol", [
    (1, 64, torch.float32, 1e-6),
    (3, 100, torch.float32, 1e-6),   # E below its power of two: the tail masked
    (2, 96, torch.float16, 2e-3),
    (2, 160, torch.bfloat16, 1e-2),
])
def test_rms_norm_matches_float64(T, E, dtype, tol):
    g = torch.Generator().manual_seed(T * 1000 + E)
    x = (torch.randn(T, E, generator=g) * 3).to(dtype)
    w = (torch.rand(E, generator=g) + 0.5).to(dtype)
    y = norm_kernels.rms_norm(x, w, 1e-5)
    assert y.dtype == dtype and y.shape == (T, E)
    ref = reference(x, w, 1e-5)
    assert ((y.double() - ref).norm() / ref.norm()).item() < tol


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3)])
def test_rms_norm_with_residual_updates_the_stream(dtype, tol):
    """x + residual is written into the residual (the stream the next block adds to) and normed."""
    g = torch.Generator().manual_seed(5)
    T, E = 3, 72
    x = torch.randn(T, E, generator=g).to(dtype)
    res = torch.randn(T, E, generator=g).to(dtype)
    w = (torch.rand(E, generator=g) + 0.5).to(dtype)
    s = (x.double() + res.double())
    res_in = res.clone()
    y = norm_kernels.rms_norm(x, w, 1e-6, residual=res)
    assert not torch.equal(res, res_in)
    assert ((res.double() - s).norm() / s.norm()).item() < tol
    ref = reference(s.to(dtype), w, 1e-6)
    assert ((y.double() - ref).norm() / ref.norm()).item() < tol


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="rms_norm needs x"):
        norm_kernels.rms_norm(torch.randn(2, 8), torch.ones(7), 1e-5)
    with pytest.raises(ValueError, match="dtype"):
        norm_kernels.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-5, residual=torch.randn(2, 8).half())


@pytest.mark.gpu
def test_rms_norm_on_cuda_matches_torch():
    """Compiled, at Llama-3.1-8B's width: within fp16 rounding of torch's fused rms_norm."""
    x = torch.randn(5, 4096, device="cuda", dtype=torch.float16)
    w = torch.rand(4096, device="cuda", dtype=torch.float16) + 0.5
    ref = torch.nn.functional.rms_norm(x.float(), (4096,), w.float(), 1e-5)
    y = norm_kernels.rms_norm(x, w, 1e-5)
    assert ((y.float() - ref).norm() / ref.norm()).item() < 2e-3


@pytest.mark.parametrize("T,E,dtype,res", [
    (1, 512, torch.float16, False),
    (1, 768, torch.bfloat16, True),   # E below its power of two: the blocks past it masked
    (3, 256, torch.float32, True),
])
def test_the_int8_form_is_quantize_x_of_the_output_bit_for_bit(T, E, dtype, res):
    """x8: the norm's output carries qgemv8.quantize_x(output) exactly (the same rule over the values
    as stored), so the Q4_K matmuls that take it give what they give on their own quantization;
    the output and the residual are those of the norm without it."""
    from layerstream.compute import qgemv8

    g = torch.Generator().manual_seed(T * 7 + E)
    x = (torch.randn(T, E, generator=g) * 3).to(dtype)
    x[0, :32] = 0  # a block of zeros: a scale of 0, no NaN
    w = (torch.rand(E, generator=g) + 0.5).to(dtype)
    r0 = torch.randn(T, E, generator=g).to(dtype) if res else None
    if res:
        r0[0, :32] = 0
    r1 = r0.clone() if res else None
    y = norm_kernels.rms_norm(x, w, 1e-5, residual=r0, x8=True)
    plain = norm_kernels.rms_norm(x, w, 1e-5, residual=r1)
    assert torch.equal(y, plain) and (not res or torch.equal(r0, r1))
    xq, xds = qgemv8.q8_of(y, interpret=True)
    want_q, want_ds = qgemv8.quantize_x(y, interpret=True)
    assert torch.equal(xq, want_q) and torch.equal(xds, want_ds)
    assert not xds[0, 0].any()
    assert not hasattr(plain, qgemv8._Q8_ATTR)


def test_an_int8_form_needs_a_width_of_whole_q4k_blocks():
    with pytest.raises(ValueError, match="multiple of 256, not 96"):
        norm_kernels.rms_norm(torch.randn(1, 96), torch.ones(96), 1e-5, x8=True)


@pytest.mark.gpu
def test_the_int8_forms_leave_the_decode_products_unchanged_on_cuda():
    """Compiled, at the 8B's widths: model.rms_norm with the Q4_K matrices that follow (q, k, v in one
    launch; gate and up in the GLU's) and decode attention before the Q4_K output projection emit the
    int8 form, and the products taken from it equal those that quantize on their own, bit for bit."""
    import math

    import numpy as np
    from gguf import GGMLQuantizationType as QT

    from layerstream.compute import attn_kernels, model, qgemv8
    from layerstream.compute.qlinear import QuantWeight, glu, linear, linear_many
    from tests.compute.test_qkernels import random_blocks

    rng = np.random.default_rng(4)

    def qw(N, K=4096):
        raw = torch.from_numpy(random_blocks(rng, QT.Q4_K, N, K).reshape(-1).copy()).cuda()
        return QuantWeight(raw, int(QT.Q4_K), (N, K))

    qkv, gate, up, wo = [qw(4096), qw(1024), qw(1024)], qw(14336), qw(14336), qw(4096)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    w = torch.rand(4096, device="cuda", dtype=torch.float16) + 0.5
    for then, run in ((qkv, lambda h: linear_many(h, qkv)), ([gate, up], lambda h: [glu(h, gate, up)])):
        h, h0 = model.rms_norm(x, w, 1e-5, then=then), model.rms_norm(x, w, 1e-5)
        assert hasattr(h, qgemv8._Q8_ATTR) and not hasattr(h0, qgemv8._Q8_ATTR) and torch.equal(h, h0)
        assert all(torch.equal(a, b) for a, b in zip(run(h), run(h0)))
    kc, vc = torch.randn(2, 600, 8, 128, device="cuda", dtype=torch.float16), torch.randn(2, 600, 8, 128, device="cuda", dtype=torch.float16)
    q = torch.randn(1, 32, 128, device="cuda", dtype=torch.float16)
    args = (q, kc, vc, torch.ones(1, 600, dtype=torch.bool, device="cuda"), torch.tensor([1], device="cuda"), 600, 1 / math.sqrt(128))
    o, o0 = attn_kernels.decode_attention(*args, x8=True), attn_kernels.decode_attention(*args)
    assert hasattr(o, qgemv8._Q8_ATTR) and torch.equal(o, o0)
    assert torch.equal(linear(o, wo, residual=x), linear(o0, wo, residual=x))
