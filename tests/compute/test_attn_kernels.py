"""The decode attention kernel (NOTE [ decode attention ]) against float64 attention.

On the CPU it runs under Triton's interpreter (conftest sets TRITON_INTERPRET=1)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from layerstream.compute import attn_kernels  # noqa: E402


def reference(q, k_cache, v_cache, mask, rows, L, scale):
    """float64 softmax(q k^T * scale) v over each token's row, masked, heads grouped."""
    T, H, D = q.shape
    G = H // k_cache.shape[2]
    out = torch.empty(T, H, D, dtype=torch.float64)
    for t in range(T):
        K = k_cache[rows[t], :L].double().repeat_interleave(G, dim=1)  # [L, H, D]
        V = v_cache[rows[t], :L].double().repeat_interleave(G, dim=1)
        s = torch.einsum("hd,lhd->hl", q[t].double(), K) * scale
        s = s.masked_fill(~mask[t, :L][None, :], float("-inf"))
        out[t] = torch.einsum("hl,lhd->hd", s.softmax(-1), V)
    return out.reshape(T, H * D)


@pytest.mark.parametrize("T,H,Hkv,D,L,dtype", [
    (1, 4, 2, 64, 20, torch.float32),     # one chunk, no split
    (3, 4, 1, 48, 200, torch.float32),    # D below its power of two; split into chunks
    (2, 6, 2, 32, 97, torch.float16),
    (2, 2, 2, 16, 70, torch.bfloat16),
])
def test_decode_attention_matches_float64(T, H, Hkv, D, L, dtype):
    g = torch.Generator().manual_seed(T * 100 + L)
    rows_n, cap = 4, L + 5
    k_cache = torch.randn(rows_n, cap, Hkv, D, generator=g).to(dtype)
    v_cache = torch.randn(rows_n, cap, Hkv, D, generator=g).to(dtype)
    q = torch.randn(T, H, D, generator=g).to(dtype)
    rows = torch.randperm(rows_n, generator=g)[:T]
    mask = torch.rand(T, L + 3, generator=g) < 0.7  # holes, as a ring or a sliding window leaves them
    mask[:, L - 1] = True
    mask[0, : L // 2] = False  # one token sees only its recent half: some chunks see nothing
    scale = 1 / math.sqrt(D)
    out = attn_kernels.decode_attention(q, k_cache, v_cache, mask, rows, L, scale)
    assert out.shape == (T, H * D) and out.dtype == dtype
    ref = reference(q, k_cache, v_cache, mask, rows, L, scale)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


def test_decode_attention_reads_no_slot_past_each_rows_used_ones():
    """A graph pads the attended length (runner.GRAPH_KV_MIN): each token's row is read only up to
    its slots in use (`used`), whatever lies or the mask says past them (NaN here), the chunks past
    them left empty; the result is attention over the used slots."""
    g = torch.Generator().manual_seed(8)
    L, T, H, D = 256, 3, 4, 32
    k_cache, v_cache = torch.randn(3, L, 2, D, generator=g), torch.randn(3, L, 2, D, generator=g)
    q = torch.randn(T, H, D, generator=g)
    rows, used = torch.tensor([1, 2, 0]), torch.tensor([37, 150, 5])
    mask = torch.ones(T, L, dtype=torch.bool)
    for t in range(T):
        k_cache[rows[t], used[t]:] = float("nan")
        v_cache[rows[t], used[t]:] = float("nan")
    out = attn_kernels.decode_attention(q, k_cache, v_cache, mask, rows, L, 0.2, used=used)
    seen = torch.arange(L)[None, :] < used[:, None]
    torch.testing.assert_close(out.double(), reference(q, k_cache.nan_to_num(), v_cache.nan_to_num(), seen, rows, L, 0.2),
                               rtol=1e-5, atol=1e-5)


def test_decode_attention_reads_strided_views():
    """A host-KV layer computes from a [:B, :L] view of a larger buffer, and the mask is a view of
    the step's [B, 1, S, L] mask."""
    g = torch.Generator().manual_seed(5)
    big_k, big_v = torch.randn(6, 64, 2, 32, generator=g), torch.randn(6, 64, 2, 32, generator=g)
    k, v = big_k[:3, :40], big_v[:3, :40]
    mask4 = torch.rand(3, 1, 1, 40, generator=g) < 0.8
    mask4[..., 0] = True
    q = torch.randn(3, 4, 32, generator=g)
    rows = torch.tensor([2, 0, 1])
    out = attn_kernels.decode_attention(q, k, v, mask4[:, 0, 0], rows, 40, 0.2)
    torch.testing.assert_close(out.double(), reference(q, k, v, mask4[:, 0, 0], rows, 40, 0.2), rtol=1e-5, atol=1e-5)


def test_decode_attention_refuses_mismatched_heads():
    with pytest.raises(ValueError, match="multiple of Hkv"):
        attn_kernels.decode_attention(torch.zeros(1, 3, 8), torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8),
                                      torch.ones(1, 4, dtype=torch.bool), torch.zeros(1, dtype=torch.long), 4, 1.0)


@pytest.mark.parametrize("T,H,D,L,dtype", [
    (1, 8, 32, 20, torch.float16),     # one chunk: the decode kernel stores the heads
    (2, 4, 64, 200, torch.bfloat16),   # split: the combine kernel stores them
    (1, 8, 96, 70, torch.float32),     # D below its power of two: the blocks past it masked
    (1, 4, 128, 40, torch.float16),    # the 8B's head width
])
def test_decode_attention_emits_quantize_x_of_its_output(T, H, D, L, dtype):
    """x8: the output carries qgemv8.quantize_x(output) bit for bit, from either kernel that writes
    the heads, and is itself the output without it; widths that are not whole blocks refused."""
    from layerstream.compute import qgemv8

    g = torch.Generator().manual_seed(H * D + L)
    k_cache, v_cache = torch.randn(2, L, 2, D, generator=g).to(dtype), torch.randn(2, L, 2, D, generator=g).to(dtype)
    q = torch.randn(T, H, D, generator=g).to(dtype)
    rows, mask = torch.tensor([1, 0])[:T], torch.ones(T, L, dtype=torch.bool)
    out = attn_kernels.decode_attention(q, k_cache, v_cache, mask, rows, L, 0.3, x8=True)
    assert torch.equal(out, attn_kernels.decode_attention(q, k_cache, v_cache, mask, rows, L, 0.3))
    xq, xds = qgemv8.q8_of(out, interpret=True)
    want_q, want_ds = qgemv8.quantize_x(out, interpret=True)
    assert torch.equal(xq, want_q) and torch.equal(xds, want_ds) and xq.any()
    with pytest.raises(ValueError, match="int8 form needs D a multiple of 32 and H [*] D of 256, not 2 x 64"):
        attn_kernels.decode_attention(torch.zeros(T, 2, 64), torch.zeros(2, L, 2, 64), torch.zeros(2, L, 2, 64),
                                      mask, rows, L, 0.3, x8=True)


@pytest.mark.parametrize("neox,rope_dim,rotate_k,dtype", [
    (False, 64, True, torch.float32),   # llama.cpp NORM pairs, the whole head
    (True, 32, True, torch.float32),    # NEOX pairs over half the head (the rest passes through)
    (True, 64, False, torch.float16),   # a sliding ring keeps K unrotated
    (False, 48, True, torch.bfloat16),
])
def test_rope_and_store_matches_the_torch_path(neox, rope_dim, rotate_k, dtype):
    """One launch against model.apply_rope and the indexed cache writes, in float64."""
    from layerstream.compute.model import apply_rope

    g = torch.Generator().manual_seed(rope_dim)
    T, H, Hkv, D = 5, 4, 2, 64
    q, k, v = (torch.randn(T, n, D, generator=g).to(dtype) for n in (H, Hkv, Hkv))
    ang = torch.rand(T, rope_dim // 2, generator=g, dtype=torch.float64) * 6
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    kc, vc = torch.zeros(3, 8, Hkv, D, dtype=dtype), torch.zeros(3, 8, Hkv, D, dtype=dtype)
    rows, slots = torch.tensor([0, 0, 2, 1, 2]), torch.tensor([3, 4, 0, 7, 1])
    q_out = attn_kernels.rope_and_store(q, k, v, cos, sin, kc, vc, rows, slots, neox, rotate_k)
    c64, s64 = cos.double(), sin.double()
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(q_out.double(), apply_rope(q.double(), c64, s64, neox), rtol=tol, atol=tol)
    want_k = apply_rope(k.double(), c64, s64, neox) if rotate_k else k.double()
    torch.testing.assert_close(kc[rows, slots].double(), want_k, rtol=tol, atol=tol)
    assert torch.equal(vc[rows, slots], v)
    untouched = torch.ones(3, 8, dtype=torch.bool)
    untouched[rows, slots] = False
    assert not kc[untouched].any() and not vc[untouched].any()


@pytest.mark.parametrize("neox,rope_dim,rotate_k,dtype", [
    (True, 64, True, torch.float32),    # Qwen3's: NEOX pairs over the whole head
    (True, 32, True, torch.float16),    # half the head rotated: the rest normed and passed through
    (True, 64, False, torch.bfloat16),  # Gemma 3's sliding layers: K normed, stored unrotated
])
def test_rope_and_store_norms_each_head_first_as_the_separate_norm(neox, rope_dim, rotate_k, dtype):
    """`norms`: q's and k's heads RMS-normed (model.rms_norm, float64) before RoPE and the cache
    write, within the dtype's rounding; v untouched; a weight of the wrong length refused."""
    from layerstream.compute.model import apply_rope

    g = torch.Generator().manual_seed(rope_dim + 1)
    T, H, Hkv, D, eps = 3, 4, 2, 64, 1e-6
    q, k, v = (torch.randn(T, n, D, generator=g).mul(3).to(dtype) for n in (H, Hkv, Hkv))
    qn, kn = (torch.rand(D, generator=g).add(0.5).to(dtype) for _ in range(2))
    ang = torch.rand(T, rope_dim // 2, generator=g, dtype=torch.float64) * 6
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    kc, vc = torch.zeros(2, 4, Hkv, D, dtype=dtype), torch.zeros(2, 4, Hkv, D, dtype=dtype)
    rows, slots = torch.tensor([1, 0, 1]), torch.tensor([0, 3, 2])
    q_out = attn_kernels.rope_and_store(q, k, v, cos, sin, kc, vc, rows, slots, neox, rotate_k, norms=(qn, kn, eps))

    def normed(x, w):
        x = x.double()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()

    c64, s64 = cos.double(), sin.double()
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(q_out.double(), apply_rope(normed(q, qn), c64, s64, neox), rtol=tol, atol=tol)
    want_k = normed(k, kn)
    torch.testing.assert_close(kc[rows, slots].double(), apply_rope(want_k, c64, s64, neox) if rotate_k else want_k,
                               rtol=tol, atol=tol)
    assert torch.equal(vc[rows, slots], v)
    plain = attn_kernels.rope_and_store(q, k, v, cos, sin, kc.clone(), vc.clone(), rows, slots, neox, rotate_k)
    assert (plain - q_out).abs().max() > 0.1  # (the norm moved them: inputs 3 times larger)
    with pytest.raises(ValueError, match=r"norms must be \[64\]"):
        attn_kernels.rope_and_store(q, k, v, cos, sin, kc, vc, rows, slots, neox, rotate_k, norms=(qn[:32], kn, eps))


@pytest.mark.gpu
@pytest.mark.parametrize("T,L", [(1, 4096), (8, 700), (64, 512)])
def test_decode_attention_on_cuda(T, L):
    """Llama-3.1-8B's heads (32 query, 8 KV, 128 wide) in float16, compiled: within float16
    rounding of float64."""
    g = torch.Generator().manual_seed(T)
    k_cache = torch.randn(T + 1, L + 8, 8, 128, generator=g).half()
    v_cache = torch.randn(T + 1, L + 8, 8, 128, generator=g).half()
    q = torch.randn(T, 32, 128, generator=g).half()
    rows = torch.randperm(T + 1, generator=g)[:T]
    mask = torch.rand(T, L, generator=g) < 0.9
    mask[:, 0] = True
    out = attn_kernels.decode_attention(q.cuda(), k_cache.cuda(), v_cache.cuda(), mask.cuda(), rows.cuda(), L,
                                        1 / math.sqrt(128))
    ref = reference(q, k_cache, v_cache, mask, rows, L, 1 / math.sqrt(128))
    torch.testing.assert_close(out.cpu().double(), ref, rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_rope_and_store_with_norms_on_cuda_as_the_separate_launches(dtype):
    """Compiled, Qwen3-30B-A3B's heads (32 query, 4 KV, 128 wide, NEOX): the norms in the launch
    within the dtype's rounding of model.rms_norm's launches and then RoPE's."""
    from layerstream.compute.model import rms_norm

    g = torch.Generator().manual_seed(2)
    T, H, Hkv, D = 2, 32, 4, 128
    q, k, v = (torch.randn(T, n, D, generator=g).to(dtype).cuda() for n in (H, Hkv, Hkv))
    qn, kn = (torch.rand(D, generator=g).add(0.5).to(dtype).cuda() for _ in range(2))
    ang = torch.rand(T, D // 2, generator=g) * 6
    cos, sin = ang.cos().to(dtype).cuda(), ang.sin().to(dtype).cuda()
    caches = [tuple(torch.zeros(2, 4, Hkv, D, dtype=dtype, device="cuda") for _ in range(2)) for _ in range(2)]
    rows, slots = torch.tensor([1, 0]).cuda(), torch.tensor([3, 1]).cuda()
    got = attn_kernels.rope_and_store(q, k, v, cos, sin, *caches[0], rows, slots, True, norms=(qn, kn, 1e-6))
    want = attn_kernels.rope_and_store(rms_norm(q, qn, 1e-6), rms_norm(k, kn, 1e-6), v, cos, sin, *caches[1],
                                       rows, slots, True)
    tol = 4e-3 if dtype == torch.float16 else 3e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    torch.testing.assert_close(caches[0][0], caches[1][0], rtol=tol, atol=tol)
    assert torch.equal(caches[0][1], caches[1][1])
