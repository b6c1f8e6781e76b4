"""build_step_meta: the packed step's indices and the attention kernels it asks for, set once."""

import dataclasses
from operator import attrgetter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from layerstream.compute.step_meta import (
    SeqStep,
    build_step_meta,
    rope_inv_freq,
    rope_rows_into,
    rope_tables,
)

HP = SimpleNamespace(rope=SimpleNamespace(dim=8, theta=10000.0, scale=1.0), attn=SimpleNamespace(swa_window=0))


def _meta(seqs, **kw):
    return build_step_meta(HP, rope_inv_freq(HP), seqs, torch.device("cpu"), torch.float32, **kw)


def test_step_meta_packs_tokens_and_sets_the_kernels_once():
    decode = [SeqStep(row=1, tokens=[5], slots=[3], positions=[3], kv_pos=[0, 1, 2, 3]),
              SeqStep(row=0, tokens=[7], slots=[1], positions=[1], kv_pos=[0, 1])]
    m = _meta(decode, rotate_k_at_read=False, triton_attention=True)
    assert m.tok.row.tolist() == [1, 0] and m.tok.slot.tolist() == [3, 1] and m.q.kv_len == 4
    assert m.attn.mask[1, 0, 0].tolist() == [True, True, False, False]
    assert m.kernels.rope and m.kernels.decode  # one token a sequence, K stored rotated
    assert not _meta(decode, rotate_k_at_read=True, triton_attention=True).kernels.decode  # a sliding ring
    prompt = [SeqStep(row=0, tokens=[1, 2], slots=[0, 1], positions=[0, 1], kv_pos=[0, 1])]
    m = _meta(prompt, rotate_k_at_read=False, triton_attention=True)
    assert m.kernels.rope and not m.kernels.decode
    m = _meta(decode, rotate_k_at_read=False)
    assert not m.kernels.rope and not m.kernels.decode
    with pytest.raises(dataclasses.FrozenInstanceError):  # nothing sets them afterwards
        m.kernels.decode = True


def _separate_tensors(hp, inv_freq: torch.Tensor, seqs: list[SeqStep], device: torch.device,
                    dtype: torch.dtype, kv_len: int | None = None, rotate_k_at_read: bool = True,
                    inv_freq_swa: torch.Tensor | None = None, triton_attention: bool = False) -> dict:
    """The step's meta as build_step_meta made it before NOTE [ one buffer a step ]: each tensor
    built and copied on its own (the reference for the packed build), by its path in StepMeta."""
    B = len(seqs)
    tok_id = [t for s in seqs for t in s.tokens]
    S = max(len(s.slots) for s in seqs)
    L = max(kv_len or 0, max(len(s.kv_pos) for s in seqs))
    tok_row, tok_b, tok_slot, tok_pos = [], [], [], []
    q_index = torch.zeros(B, S, dtype=torch.long)
    q_valid = torch.zeros(B, S, dtype=torch.bool)
    q_pos = torch.full((B, S), -1, dtype=torch.long)
    kv_pos = torch.full((B, L), -1, dtype=torch.long)
    t = 0
    for b, s in enumerate(seqs):
        n = len(s.slots)
        tok_row += [s.row] * n
        tok_b += [b] * n
        tok_slot += s.slots
        tok_pos += s.positions
        q_index[b, :n] = torch.arange(t, t + n)
        q_valid[b, :n] = True
        q_pos[b, :n] = torch.tensor(s.positions)
        kv_pos[b, : len(s.kv_pos)] = torch.from_numpy(np.array(s.kv_pos, dtype=np.int64))  # (numpy converts a long list far faster)
        t += n
    out_index = q_valid.flatten().nonzero().flatten()  # on the host: no device sync
    mask = (kv_pos[:, None, :] >= 0) & (kv_pos[:, None, :] <= q_pos[:, :, None])  # [B, S, L]
    mask |= ~q_valid[:, :, None]  # padded queries see everything (finite; dropped later)
    tok_pos_t = torch.tensor(tok_pos, dtype=torch.long)
    cos_q, sin_q = rope_tables(inv_freq, tok_pos_t, hp.rope.scale, dtype)
    cos_k = sin_k = None
    if rotate_k_at_read:
        cos_k, sin_k = rope_tables(inv_freq, kv_pos.clamp(min=0), hp.rope.scale, dtype)
    to = lambda a: a.to(device, non_blocking=True)  # noqa: E731
    swa = {}
    if hp.attn.swa_window:
        near = (q_pos[:, :, None] - kv_pos[:, None, :]) < hp.attn.swa_window
        cq, sq = rope_tables(inv_freq_swa, tok_pos_t, 1.0, dtype)
        swa = {"swa.cos_q": to(cq), "swa.sin_q": to(sq), "swa.mask": to(((mask & near) | ~q_valid[:, :, None])[:, None]),
               "swa.cos_k": None, "swa.sin_k": None}
        if rotate_k_at_read:
            ck, sk = rope_tables(inv_freq_swa, kv_pos.clamp(min=0), 1.0, dtype)
            swa |= {"swa.cos_k": to(ck), "swa.sin_k": to(sk)}
    return {
        "tok.id": to(torch.tensor(tok_id, dtype=torch.long)),
        "tok.row": to(torch.tensor(tok_row, dtype=torch.long)),
        "tok.b": to(torch.tensor(tok_b, dtype=torch.long)),
        "tok.slot": to(torch.tensor(tok_slot, dtype=torch.long)),
        "tok.known": min(tok_id) >= 0,
        "q.index": to(q_index), "q.valid": to(q_valid), "q.out_index": to(out_index),
        "q.rows": to(torch.tensor([s.row for s in seqs], dtype=torch.long)),
        "q.used": to(torch.tensor([len(s.kv_pos) for s in seqs], dtype=torch.long)),
        "q.kv_len": L,
        "attn.cos_q": to(cos_q), "attn.sin_q": to(sin_q),
        "attn.cos_k": None if cos_k is None else to(cos_k), "attn.sin_k": None if sin_k is None else to(sin_k),
        "attn.mask": to(mask[:, None]),
        **swa,
        "kernels.rope": triton_attention,
        "kernels.decode": triton_attention and all(len(s.tokens) == 1 for s in seqs) and not rotate_k_at_read,
    }


SWA_HP = SimpleNamespace(rope=SimpleNamespace(dim=8, theta=10000.0, scale=2.0), attn=SimpleNamespace(swa_window=3))
MIXED = [SeqStep(row=2, tokens=[9, 4, 7], slots=[5, 6, 7], positions=[5, 6, 7], kv_pos=list(range(8))),
         SeqStep(row=0, tokens=[-1], slots=[2], positions=[2], kv_pos=[0, 1, 2]),
         SeqStep(row=3, tokens=[1, 2], slots=[0, 1], positions=[0, 1], kv_pos=[0, 1])]


@pytest.mark.parametrize("hp", [HP, SWA_HP], ids=["global", "local-layers"])
@pytest.mark.parametrize("rotate", [False, True], ids=["k-rotated", "sliding"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_one_buffer_holds_what_the_separate_tensors_held(hp, rotate, dtype):
    """NOTE [ one buffer a step ]: every field of the packed meta equals the tensor the old build
    made on its own (mixed prompt and decode rows, padding, a padded kv_len, local layers' tables
    and mask), and every field is a view of the one buffer."""
    inv, inv_swa = rope_inv_freq(hp), rope_inv_freq(hp, None, 1000.0)
    kw = dict(kv_len=16, rotate_k_at_read=rotate, inv_freq_swa=inv_swa if hp.attn.swa_window else None)
    m = build_step_meta(hp, inv, MIXED, torch.device("cpu"), dtype, **kw)
    want = _separate_tensors(hp, inv, MIXED, torch.device("cpu"), dtype, **kw)
    assert m.q.kv_len == want.pop("q.kv_len") == 16
    if not hp.attn.swa_window:
        assert m.swa is None
    buf = m.store.buf
    for name, w in want.items():
        got = attrgetter(name)(m)
        if isinstance(w, torch.Tensor):
            assert got.dtype == w.dtype and torch.equal(got, w), name
            assert buf.data_ptr() <= got.data_ptr() < buf.data_ptr() + buf.numel(), name
            assert torch.equal(m.on_host(got), w), name
        else:
            assert got == w, name
    assert m.tensors().keys() == {k for k, w in want.items() if isinstance(w, torch.Tensor)}  # (what a graph copies)
    assert m.tok.id.tolist() == [9, 4, 7, -1, 1, 2] and not m.tok.known


def test_a_graphs_copy_owns_its_buffer_and_a_fill_refreshes_it_in_place():
    """graphs.static_meta: every tensor of the copy is a view of its own buffer (the addresses a
    captured graph reads, nested groups included); fill_meta brings the next step's values to those
    same addresses, and a field set apart from the buffer (HostKV's local rows) by its path."""
    from layerstream.compute.graphs import fill_meta, static_meta

    kw = dict(kv_len=16, rotate_k_at_read=True, inv_freq_swa=rope_inv_freq(SWA_HP, None, 1000.0))
    inv = rope_inv_freq(SWA_HP)
    first = build_step_meta(SWA_HP, inv, MIXED, torch.device("cpu"), torch.float32, **kw)
    nxt = [SeqStep(row=1, tokens=[3, 8, 6], slots=[9, 10, 11], positions=[9, 10, 11], kv_pos=list(range(12))),
           SeqStep(row=3, tokens=[5], slots=[4], positions=[4], kv_pos=[0, 1, 2, 3, 4]),
           SeqStep(row=0, tokens=[2, 7], slots=[2, 3], positions=[2, 3], kv_pos=[0, 1, 2, 3])]
    second = build_step_meta(SWA_HP, inv, nxt, torch.device("cpu"), torch.float32, **kw)
    s, loose = static_meta(first)
    buf = s.store.buf
    assert loose == [] and s.store.host_buf is None and buf.data_ptr() != first.store.buf.data_ptr()
    ptrs = {name: t.data_ptr() for name, t in s.tensors().items()}  # 4 of tok, 5 of q, 5 of each Tables
    assert len(ptrs) == 19 and all(buf.data_ptr() <= p < buf.data_ptr() + buf.numel() for p in ptrs.values())
    fill_meta(s, second, loose)
    for name, t in s.tensors().items():
        assert t.data_ptr() == ptrs[name] and torch.equal(t, attrgetter(name)(second)), name
    assert s.q.kv_len == 16 and s.swa.mask.any() and not torch.equal(s.swa.mask, first.swa.mask)

    apart, loose = static_meta(first.with_tensors({"q.rows": torch.tensor([0, 1, 2])}))
    assert loose == ["q.rows"]
    fill_meta(apart, second.with_tensors({"q.rows": torch.tensor([2, 1, 0])}), loose)
    assert apart.q.rows.tolist() == [2, 1, 0] and torch.equal(apart.tok.row, second.tok.row)
    other = build_step_meta(SWA_HP, inv, MIXED[:2], torch.device("cpu"), torch.float32, **kw)
    with pytest.raises(ValueError, match="laid out otherwise"):
        fill_meta(s, other, [])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_graphs_copy_without_host_bytes_reads_its_fields_from_the_device():
    """graphs.static_meta keeps `buf` but drops `host_buf`: on_host then copies from the device
    (it indexed None before)."""
    m = build_step_meta(HP, rope_inv_freq(HP), MIXED, torch.device("cuda"), torch.float16, kv_len=16)
    g = dataclasses.replace(m, store=dataclasses.replace(m.store, host_buf=None))
    assert torch.equal(g.on_host(g.tok.row), m.tok.row.cpu())


def test_rope_rows_are_rope_tables_gathered_from_a_table_that_grows():
    """The step's RoPE rows from the table of positions, written into a buffer's parts as their
    bits (build_step_meta's way): the same bits as rope_tables, for a first call that makes the
    table, positions past it (the table grown) and [B, L] positions."""
    inv = rope_inv_freq(HP, theta=12345.0)  # inverse frequencies no other test's table holds
    for pos in (torch.tensor([0, 7, 300]), torch.tensor([5000, 2]), torch.tensor([[1, 0, 4097], [9, 9, 9]])):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            want = rope_tables(inv, pos, 2.0, dtype)
            into = [torch.full((*pos.shape, want[0].shape[-1]), float("nan"), dtype=dtype) for _ in range(2)]
            bits = getattr(torch, f"int{8 * dtype.itemsize}")
            rope_rows_into(inv, pos.numpy(), 2.0, dtype, *(t.view(bits).numpy() for t in into))
            assert all(g.shape == w.shape and g.dtype == dtype and torch.equal(g, w) for g, w in zip(into, want))


@pytest.mark.parametrize("B, S, L", [(2, 3, 16), (1, 2048, 1 << 20)], ids=["small", "a 2 GiB mask"])
def test_the_parts_lie_where_the_layout_puts_them_at_any_size(B, S, L):
    """_Layout.numpy_views: each part is a view of its own bytes of the buffer, of its shape (a
    floating part as integers of its size: its bits), a 2 GiB mask too (past what a numpy record
    over the buffer could index). (np.empty of 2 GiB touches no page.)"""
    from layerstream.compute.step_meta import _layout

    lay = _layout(B, S, B * S, L, 4, False, (("cos_q", "sin_q", B * S),), torch.float16)
    buf = np.empty(lay.size + 16, dtype=np.uint8)
    views = lay.numpy_views(buf)
    assert views.keys() == lay.parts.keys()
    base = buf.ctypes.data
    for name, (dt, shape, off) in lay.parts.items():
        v = views[name]
        assert v.shape == shape and v.itemsize == dt.itemsize and v.ctypes.data - base == off, name
        assert v.dtype.kind == ("b" if dt == torch.bool else "i"), name
