"""NOTE [ grouped prefill ] (moe.py): a prompt step's experts as batched GEMMs over the pairs
sorted by expert, against float64 over gguf-py's dequantization, with as many experts at a time
as the scratch holds, experts no token chose, runs cut where padding would grow, and the
one-by-one path where an expert does not fit."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT, quants

from layerstream.compute import moe, qlinear
from layerstream.compute.expert_layout import EXPERT_TENSORS
from layerstream.compute.moe import moe_block
from layerstream.compute.qlinear import QuantWeight

E, K, N = 10, 64, 96  # experts, n_embd, n_ff


def _experts(rng, qt):
    """Each expert tensor as GGUF blocks [E * rows, cols] and as float64 [E, rows, cols]."""
    out = {}
    for name in EXPERT_TENSORS:
        rows, cols = (E * K, N) if name == "ffn_down_exps.weight" else (E * N, K)
        raw = quants.quantize((rng.standard_normal((rows, cols)) * 0.2).astype(np.float32), qt)
        ref = torch.from_numpy(quants.dequantize(raw, qt)).double().view(E, rows // E, cols)
        out[name] = (QuantWeight(torch.from_numpy(raw.reshape(-1)), int(qt), (rows, cols)), ref)
    return out


def _reference(h, weight, chosen, ref):
    g, u, d = (ref[n] for n in EXPERT_TENSORS)
    out = torch.zeros(h.shape, dtype=torch.float64)
    for t in range(h.shape[0]):
        for j in range(chosen.shape[1]):
            e = int(chosen[t, j])
            a = torch.nn.functional.silu(h[t].double() @ g[e].T) * (h[t].double() @ u[e].T)
            out[t] += weight[t, j].double() * (a @ d[e].T)
    return out


@pytest.mark.parametrize("run,pad", [(None, None), (1, None), (4, None), (None, 5)])  # experts the scratch
@pytest.mark.parametrize("quantized", [True, False])  # holds (all, one, four), padded rows a run may take
@pytest.mark.parametrize("grouped", [True, False])  # torch's grouped GEMM, or padded runs where there is none
def test_grouped_prefill_against_float64(run, pad, quantized, grouped, monkeypatch):
    pytest.importorskip("triton") if quantized else None
    rng = np.random.default_rng(0)
    mats = _experts(rng, QT.Q8_0)
    T = 30
    h = torch.from_numpy(rng.standard_normal((T, K)).astype(np.float32))
    chosen = torch.from_numpy(rng.integers(0, E - 1, (T, 2)))  # expert E - 1 is never chosen
    chosen[:, 1] = (chosen[:, 0] + 1 + torch.from_numpy(rng.integers(0, E - 2, T))) % (E - 1)
    weight = torch.softmax(torch.from_numpy(rng.standard_normal((T, 2))).float(), -1)
    hp = SimpleNamespace(moe=SimpleNamespace(n_expert=E, n_expert_used=2))
    w = {n: (q if quantized else ref.float()) for n, (q, ref) in mats.items()}
    per = 3 * N * K
    if run is not None:
        monkeypatch.setattr(moe, "scratch_cap", lambda *a: run * per + per // 2)
    if grouped and moe.grouped_mm_dtype("cpu", torch.float32) is None:
        pytest.skip("this torch has no grouped GEMM on the CPU")
    if not grouped:
        monkeypatch.setattr(moe, "grouped_mm_dtype", lambda *a: None)
    if pad is not None:
        monkeypatch.setattr(moe, "_pad_rows", lambda *a: pad)
    calls = []
    real = moe.dequantized_experts
    monkeypatch.setattr(moe, "dequantized_experts", lambda *a: calls.append(a[2:4]) or real(*a))
    got = moe._experts_prefill(hp, w, h, weight, chosen)
    want = _reference(h, weight, chosen, {n: ref for n, (_, ref) in mats.items()})
    assert (got.double() - want).abs().max().item() < 1e-4 * want.abs().max().item()
    if quantized:  # as many experts at a time as the scratch holds; none for expert E - 1 alone
        step = run or E
        assert calls == [(e, min(E, e + step)) for e in range(0, E - 1, step)]


def test_runs_bound_the_padding_of_skewed_routing():
    counts = [3, 0, 40, 2, 2, 0, 0, 5]
    assert moe._runs(counts, 0, 8, 1000) == [(0, 8)]
    assert moe._runs(counts, 0, 8, 80) == [(0, 2), (2, 4), (4, 8)]  # 3 experts padded to 40 would be 120
    assert moe._runs(counts, 0, 8, 10) == [(0, 2), (2, 3), (3, 7), (7, 8)]  # 40 alone
    assert moe._runs(counts, 4, 7, 100) == [(4, 7)]
    assert moe._runs([0, 0], 0, 2, 5) == []


def test_an_expert_larger_than_the_scratch_goes_one_by_one(monkeypatch):
    pytest.importorskip("triton")
    rng = np.random.default_rng(1)
    mats = _experts(rng, QT.Q8_0)
    T = 12
    h = torch.from_numpy(rng.standard_normal((T, K)).astype(np.float32))
    chosen = torch.stack([torch.arange(T) % E, (torch.arange(T) + 1) % E], 1)
    weight = torch.full((T, 2), 0.5)
    hp = SimpleNamespace(moe=SimpleNamespace(n_expert=E, n_expert_used=2))
    w = {n: q for n, (q, _) in mats.items()}
    monkeypatch.setattr(moe, "scratch_cap", lambda *a: 3 * N * K - 1)
    assert moe._experts_prefill(hp, w, h, weight, chosen) is None
    hp = SimpleNamespace(moe=SimpleNamespace(n_expert=E, n_expert_used=2, expert_norm=False), norm_eps=1e-6)
    w["ffn_norm.weight"] = torch.ones(K)
    w["ffn_gate_inp.weight"] = torch.from_numpy(rng.standard_normal((E, K)).astype(np.float32))
    x = h
    got = moe_block(hp, w, x)  # falls back to one expert at a time
    hn = x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    wt, ch = moe.route(hp, hn @ w["ffn_gate_inp.weight"].T)
    want = x.double() + _reference(hn, wt, ch, {n: ref for n, (_, ref) in mats.items()})
    assert (got.double() - want).abs().max().item() < 1e-4 * want.abs().max().item()


def test_experts_dequantized_as_bf16_into_the_fp16_scratch():
    """CUDA's grouped GEMM takes bf16: with fp16 activations, a run of experts is dequantized as
    bf16 into the plan's fp16 scratch (same size), against gguf-py."""
    pytest.importorskip("triton")
    rng = np.random.default_rng(2)
    mats = _experts(rng, QT.Q8_0)
    ws = [q for q, _ in mats.values()]
    got = qlinear.dequantized_experts(ws, E, 2, 5, torch.float16, torch.bfloat16)
    for g, (_, ref) in zip(got, mats.values()):
        assert g.dtype == torch.bfloat16 and g.shape == ref[2:5].shape
        assert (g.double() - ref[2:5]).abs().max().item() <= 2 ** -7 * ref[2:5].abs().max().item()  # a bf16 ulp
    assert got[0].untyped_storage().data_ptr() == qlinear.scratch("cpu", torch.float16, 1).untyped_storage().data_ptr()
