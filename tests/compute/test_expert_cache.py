"""The device cache of streamed experts: what it copies, what it keeps, when a step streams experts."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from layerstream.compute.streamed import ExpertCache, streams_experts
from layerstream.loader.layout import LayerLayout, SlotTensor
from layerstream.proto.timeline import Timeline


def _layer(n_expert=4, rows=8, cols=16):
    """A layer of three F32 expert tensors whose values name (tensor, expert, row, col)."""
    tensors, host, off = [], [], 0
    for k, name in enumerate(("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")):
        vals = (1000 * k + 100 * np.arange(n_expert)[:, None, None] + np.arange(rows)[None, :, None]
                + np.arange(cols)[None, None, :] / 100).astype(np.float32)
        tensors.append(SlotTensor(name, int(QT.F32), (n_expert, rows, cols), off, vals.nbytes, "f", 0))
        host.append(vals.view(np.uint8).reshape(-1))
        off += vals.nbytes
    return LayerLayout(0, tuple(tensors), off), np.concatenate(host)


def test_fetch_copies_the_right_bytes_and_keeps_the_most_recent():
    lay, host = _layer()
    per = 3 * 8 * 16 * 4  # bytes of one expert (three 8 x 16 float32 matrices)
    cache = ExpertCache(2 * per, torch.device("cpu"), torch.float32, False, Timeline("compute", "t"))
    got = cache.fetch(0, [1, 3], lay, host)
    assert set(got) == {1, 3}
    gate, up, down = got[3]
    assert gate.shape == (8, 16) and gate[2, 0].item() == 302 and up[0, 0].item() == 1300 and down[7, 0].item() == 2307
    assert (cache.hits, cache.misses, cache.bytes_moved) == (0, 2, 2 * per)
    cache.fetch(0, [1], lay, host)  # 1 is now the most recent, 3 the least
    cache.fetch(0, [2], lay, host)  # full: 3 goes
    assert set(k[1] for k in cache.entries) == {1, 2}
    assert (cache.hits, cache.misses) == (1, 3)
    host[:] = 0  # a hit reads nothing from the staging bytes
    assert cache.fetch(0, [2], lay, host)[2][0][0, 0].item() == 200


def test_steps_stream_experts_while_they_touch_at_most_half():
    assert streams_experts(128, 8, 1) and streams_experts(128, 8, 8)
    assert not streams_experts(128, 8, 16) and not streams_experts(128, 8, 512)
    assert streams_experts(8, 2, 2) and not streams_experts(8, 2, 3)  # Mixtral: batches of 1 and 2
    assert not streams_experts(0, 0, 1)
