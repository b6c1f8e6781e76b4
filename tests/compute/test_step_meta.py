"""build_step_meta: the packed step's indices and the attention kernels it asks for, set once."""

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from layerstream.compute.step_meta import SeqStep, build_step_meta, rope_inv_freq, rope_tables

HP = SimpleNamespace(rope=SimpleNamespace(dim=8, theta=10000.0, scale=1.0), attn=SimpleNamespace(swa_window=0))


def _meta(seqs, **kw):
    return build_step_meta(HP, rope_inv_freq(HP), seqs, torch.device("cpu"), torch.float32, **kw)


def test_step_meta_packs_tokens_and_sets_the_kernels_once():
    decode = [SeqStep(row=1, tokens=[5], slots=[3], positions=[3], kv_pos=[0, 1, 2, 3]),
              SeqStep(row=0, tokens=[7], slots=[1], positions=[1], kv_pos=[0, 1])]
    m = _meta(decode, rotate_k_at_read=False, triton_attention=True)
    assert m.tok_row.tolist() == [1, 0] and m.tok_slot.tolist() == [3, 1] and m.kv_len == 4
    assert m.mask[1, 0, 0].tolist() == [True, True, False, False]
    assert m.rope_kernel and m.decode_kernel  # one token a sequence, K stored rotated
    assert not _meta(decode, rotate_k_at_read=True, triton_attention=True).decode_kernel  # a sliding ring
    prompt = [SeqStep(row=0, tokens=[1, 2], slots=[0, 1], positions=[0, 1], kv_pos=[0, 1])]
    m = _meta(prompt, rotate_k_at_read=False, triton_attention=True)
    assert m.rope_kernel and not m.decode_kernel
    m = _meta(decode, rotate_k_at_read=False)
    assert not m.rope_kernel and not m.decode_kernel
    with pytest.raises(dataclasses.FrozenInstanceError):  # nothing sets them afterwards
        m.decode_kernel = True


def _separate_tensors(hp, inv_freq: torch.Tensor, seqs: list[SeqStep], device: torch.device,
                    dtype: torch.dtype, kv_len: int | None = None, rotate_k_at_read: bool = True,
                    inv_freq_swa: torch.Tensor | None = None, triton_attention: bool = False) -> dict:
    """The step's meta as build_step_meta made it before NOTE [ one buffer a step ]: each tensor
    built and copied on its own (the reference for the packed build)."""
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
        swa = dict(cos_q_swa=to(cq), sin_q_swa=to(sq), mask_swa=to(((mask & near) | ~q_valid[:, :, None])[:, None]))
        if rotate_k_at_read:
            ck, sk = rope_tables(inv_freq_swa, kv_pos.clamp(min=0), 1.0, dtype)
            swa |= dict(cos_k_swa=to(ck), sin_k_swa=to(sk))
    return dict(
        tok_id=to(torch.tensor(tok_id, dtype=torch.long)),
        tok_row=to(torch.tensor(tok_row, dtype=torch.long)),
        tok_b=to(torch.tensor(tok_b, dtype=torch.long)),
        tok_slot=to(torch.tensor(tok_slot, dtype=torch.long)),
        q_index=to(q_index), q_valid=to(q_valid), out_index=to(out_index),
        rows=to(torch.tensor([s.row for s in seqs], dtype=torch.long)),
        kv_len=L,
        cos_q=to(cos_q), sin_q=to(sin_q),
        cos_k=None if cos_k is None else to(cos_k), sin_k=None if sin_k is None else to(sin_k),
        mask=to(mask[:, None]),
        **swa,
        rope_kernel=triton_attention,
        decode_kernel=triton_attention and all(len(s.tokens) == 1 for s in seqs) and not rotate_k_at_read,
    )


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
    assert m.kv_len == want.pop("kv_len") == 16
    for name, w in want.items():
        got = getattr(m, name)
        if isinstance(w, torch.Tensor):
            assert got.dtype == w.dtype and torch.equal(got, w), name
            assert m.buf.data_ptr() <= got.data_ptr() < m.buf.data_ptr() + m.buf.numel(), name
            assert torch.equal(m.on_host(name), w), name
        else:
            assert got == w, name
    assert m.tok_id.tolist() == [9, 4, 7, -1, 1, 2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_graphs_copy_without_host_bytes_reads_its_fields_from_the_device():
    """graphs.static_meta keeps `buf` but drops `host_buf`: on_host then copies from the device
    (it indexed None before)."""
    m = build_step_meta(HP, rope_inv_freq(HP), MIXED, torch.device("cuda"), torch.float16, kv_len=16)
    g = dataclasses.replace(m, host_buf=None)
    assert torch.equal(g.on_host("tok_row"), m.tok_row.cpu())
