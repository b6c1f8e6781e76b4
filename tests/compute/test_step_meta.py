"""build_step_meta: the packed step's indices and the attention kernels it asks for, set once."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from layerstream.compute.step_meta import SeqStep, build_step_meta, rope_inv_freq

HP = SimpleNamespace(rope_dim=8, rope_theta=10000.0, rope_scale=1.0, swa_window=0)


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
