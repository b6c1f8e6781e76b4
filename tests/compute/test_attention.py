"""Attention's general path (compute/model.py, NOTE [ attention's temporaries ]): the folded grouped
queries and the math kernel against a float64 reference, its groups under the cap, and the bytes
the plan counts for it; the CPU's decode path against the reference and the general path."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import ggufgen
from layerstream.compute import model
from layerstream.compute.model import _sdpa, attention_bytes, attention_groups, attention_path, attention_temps
from layerstream.loader.synth import shaped_index

MiB = 1 << 20


def _reference(Q, K, V, mask):
    """Float64 attention of Q [b, s, H, D] over K, V [b, Hkv, L, D], each KV head serving H / Hkv query heads."""
    b, s, H, D = Q.shape
    G = H // K.shape[1]
    Kd, Vd = K.double().repeat_interleave(G, 1), V.double().repeat_interleave(G, 1)
    p = ((Q.double().transpose(1, 2) @ Kd.transpose(-1, -2)) / math.sqrt(D)).masked_fill(~mask, float("-inf"))
    return (p.softmax(-1) @ Vd).transpose(1, 2).reshape(b, s, H * D)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("b,s,H,Hkv,D,L", [(2, 5, 8, 2, 16, 37), (1, 3, 9, 3, 64, 130), (3, 1, 4, 4, 32, 20)])
@pytest.mark.parametrize("path", ["folded", "math"])
def test_both_paths_match_the_float64_reference(dtype, tol, b, s, H, Hkv, D, L, path):
    """Grouped queries (4 and 3 to a KV head, and none), slots not a multiple of the bias's alignment."""
    g = torch.Generator().manual_seed(b * 100 + L)
    Q = torch.randn(b, s, H, D, generator=g).to(dtype)
    K, V = (torch.randn(b, Hkv, L, D, generator=g).to(dtype) for _ in range(2))
    mask = torch.rand(b, 1, s, L, generator=g) > 0.3
    mask[..., 0] = True
    out = torch.full((b, s, H * D), float("nan"), dtype=dtype)
    _sdpa(Q, K, V, mask, None, path, out)
    torch.testing.assert_close(out.double(), _reference(Q, K, V, mask), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("B,H,Hkv,D,L", [(3, 8, 2, 16, 37), (1, 9, 3, 64, 256), (2, 4, 4, 32, 20)])
def test_the_cpus_decode_attention_matches_the_float64_reference(dtype, tol, B, H, Hkv, D, L):
    """One query a sequence, read from cache rows out of order (rows 3, 0, 2 of 4), each over its own
    length of slots (masked), with 4, 3 and 1 query heads to a KV head."""
    g = torch.Generator().manual_seed(B * 100 + L)
    rows = torch.tensor([3, 0, 2][:B])
    k_cache, v_cache = (torch.randn(4, L + 5, Hkv, D, generator=g).to(dtype) for _ in range(2))
    q = torch.randn(B, H, D, generator=g).to(dtype)
    mask = torch.zeros(B, 1, 1, L, dtype=torch.bool)
    for b in range(B):
        mask[b, ..., : L - 7 * b] = True
    out = model._cpu_decode_attention(q, k_cache, v_cache, rows, mask, L, None)
    K, V = (c[rows, :L].transpose(1, 2) for c in (k_cache, v_cache))
    torch.testing.assert_close(out.double(), _reference(q.unsqueeze(1), K, V, mask).squeeze(1), rtol=tol, atol=tol)


def test_the_cpus_decode_steps_take_their_own_path_and_give_the_general_paths_tokens(monkeypatch, tmp_path):
    """A CPU engine's greedy decode of a tiny model, two sequences of different lengths: its decode
    steps take _cpu_decode_attention, and the tokens equal those of every step on the general path."""
    from layerstream.compute.sampling import SamplingParams
    from layerstream.coordinator.engine import Engine

    calls = []
    fast = model._cpu_decode_attention

    def counted(*a, **k):
        calls.append(1)
        return fast(*a, **k)

    path = ggufgen.write_model(tmp_path / "m.gguf", n_vocab=256)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    with Engine.load(str(path), device="cpu", dtype="float32", ctx=64, max_seqs=2) as e:
        monkeypatch.setattr(model, "_cpu_decode_attention", counted)
        got = e.generate_batch(prompts, params)
        taken = len(calls)
        assert taken >= 2 * 11  # (both layers of every decode step)
        monkeypatch.setattr(model, "CPU_DECODE", False)
        want = e.generate_batch(prompts, params)
        assert len(calls) == taken
    assert got == want and len(got[0]) == 12
    calls.clear()
    monkeypatch.setattr(model, "CPU_DECODE", True)
    monkeypatch.setattr(model, "ATTN_TEMP_BYTES", 1)  # (a cap one sequence's K and V pass: taken one at a time)
    with Engine.load(str(path), device="cpu", dtype="float32", ctx=64, max_seqs=2) as e:
        assert e.generate_batch(prompts, params) == want and not calls


def test_groups_keep_the_temporaries_under_the_cap():
    hp = shaped_index("llama-3.1-8b", n_layer=1).hparams
    per_seq, per_row = attention_temps(hp, 4096, 2, "folded", False)
    assert per_seq == 2 * 4096 * 8 * 128 * 2  # K and V gathered as they lie, not expanded to 32 heads
    # a 512-token chunk at 4096 in one group: tens of MiB (the math kernel's: about 600 MiB)
    bc, sc = attention_groups(hp, 1, 512, 4096, 2, "folded", False)
    assert (bc, sc) == (1, 512) and per_seq + 512 * per_row < model.ATTN_TEMP_BYTES
    m_seq, m_row = attention_temps(hp, 4096, 2, "math", False)
    assert m_seq + 512 * m_row > 500 * MiB
    # under a smaller cap, fewer query rows a group; many sequences, fewer of them a group
    for cap in (24 * MiB, 40 * MiB):
        bc, sc = attention_groups(hp, 1, 512, 4096, 2, "folded", False, cap)
        assert bc == 1 and sc < 512 and per_seq + sc * per_row <= cap < per_seq + (sc + 1) * per_row
    bc, sc = attention_groups(hp, 64, 1, 4096, 2, "folded", False)
    assert sc == 1 and 1 < bc < 64 and bc * (per_seq + per_row) <= model.ATTN_TEMP_BYTES
    total, largest = attention_bytes(hp, 64, 1, 64, 4096, 2, "folded", False)
    assert total <= model.ATTN_TEMP_BYTES + 2 * 64 * 4096 * 2 and largest >= bc * per_seq // 2


def test_the_math_kernel_only_where_the_efficient_one_cannot_run():
    hp = shaped_index("llama-3.1-8b", n_layer=1).hparams
    assert attention_path(hp, 2, True) == attention_path(hp, 2, False) == "folded"
    assert attention_path(hp, 2, True, bf16_unsupported=True) == "math"
    # (a head size not a multiple of 8: the efficient kernel refuses it)
    odd = dataclasses.replace(hp, attn=dataclasses.replace(hp.attn, head_dim=20))
    assert attention_path(odd, 2, True) == "math" and attention_path(odd, 4, True) == "folded"


@pytest.mark.gpu
def test_device_temporaries_stay_within_what_the_plan_counts():
    """A 512-token chunk of the 8B over 4096 slots on CUDA: the gathered K and V, the folded queries,
    the bias and the memory-efficient kernel's output, measured, within attention_bytes."""
    hp = shaped_index("llama-3.1-8b", n_layer=1).hparams
    dev, dt = torch.device("cuda"), torch.float16
    H, Hkv, D, S, L = hp.attn.n_head, hp.attn.n_head_kv, hp.attn.head_dim, 512, 4096
    k_cache, v_cache = (torch.randn(1, L, Hkv, D, device=dev, dtype=dt) for _ in range(2))
    q = torch.randn(S, H, D, device=dev, dtype=dt)
    mask = torch.ones(1, 1, S, L, dtype=torch.bool, device=dev).tril(L - S)
    rows = torch.zeros(1, dtype=torch.long, device=dev)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    out = torch.empty(1, S, H * D, device=dev, dtype=dt)
    K, V = k_cache[rows, :L], v_cache[rows, :L]
    _sdpa(q[None], K.transpose(1, 2), V.transpose(1, 2), mask, None, attention_path(hp, 2, True), out)
    packed = out.view(S, H * D)[torch.arange(S, device=dev)]
    torch.cuda.synchronize()
    used = torch.cuda.max_memory_allocated(dev) - base
    counted, _ = attention_bytes(hp, 1, S, S, L, 2, "folded", False)
    assert packed.isfinite().all() and used <= counted, (used / MiB, counted / MiB)
