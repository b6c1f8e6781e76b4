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
