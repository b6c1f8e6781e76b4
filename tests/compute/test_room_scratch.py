"""The prompts' dequantization scratch held in the expert pool's room and lent with the layer slots
(expert_stream.py, NOTE [ the layer slots lent to the expert cache ]): where it lies, when it is
lent, and that nothing dequantizes into it while it is."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from layerstream.compute import qlinear
from layerstream.compute.expert_layout import slot_bytes
from layerstream.compute.expert_pool import ROOM_ALIGN
from layerstream.compute.expert_stream import ExpertStream, reserve_prompt_scratch
from layerstream.compute.experts import ExpertCache
from layerstream.compute.moe import GROUPED_MAX_TOKENS
from layerstream.coordinator.stats import ExpertStats
from layerstream.loader.synth import shaped_index
from layerstream.proto.timeline import Timeline
from tests.compute.test_expert_cache import _layer


@pytest.fixture
def fresh_scratch(monkeypatch):
    """qlinear's scratch, reservation and lenders as a new process has them (restored after)."""
    for name in ("_scratch", "_reserved", "_lenders"):
        monkeypatch.setattr(qlinear, name, {})


def _cache(scratch: int, room=(2, 1000)):
    lay, host = _layer(n_expert=8, rows=8, cols=16)
    slot = slot_bytes([lay])
    cache = ExpertCache(slot, torch.device("cpu"), torch.float32, True, Timeline("compute", "t"), "lfu", slot,
                        in_flight=3, prefetch=1, room=room, scratch=scratch)
    return cache, lay, host, slot


def test_the_scratch_lies_after_the_layer_slots_and_its_expert_slots_are_lent_with_them():
    """The scratch starts at a page boundary past the last layer slot and ends the pool; the room's
    whole expert slots cover both, so lending it gives the cache the scratch's slots too; the stats
    say how much was lent and how much of it is the scratch. Without layer slots to lend the pool
    holds no scratch (it stays apart)."""
    cache, lay, host, slot = _cache(scratch=5 * 1024)
    store = cache.store
    ring = store.room(1000)
    sc = store.scratch()
    at = sc.data_ptr() - store.ptr
    assert sc.numel() == 5 * 1024 and at % ROOM_ALIGN == 0
    assert at >= ring[-1].data_ptr() - store.ptr + 1000 and at + sc.numel() == store.buf.numel()
    room = store.room_slots
    assert room[-1] * slot >= at and (room[-1] + 1) * slot <= store.buf.numel()  # slots within the scratch
    n_layer_slots = len([s for s in room if (s + 1) * slot <= at])
    assert len(room) > n_layer_slots
    stats = ExpertStats.parse(cache.stats() | {"steps": 1, "tokens": 1})
    assert stats.room == store.buf.numel() - (ring[0].data_ptr() - store.ptr) and stats.room_scratch == 5 * 1024
    cache.lend()
    assert cache.kept.slots == 1 + len(room)
    for ids in ([0, 1], [2, 3], [4, 5], [6, 7]):
        cache.fetch(0, ids, lay, host)
        cache.settle()
    assert any(v[4] * slot >= at for v in cache.kept.entries.values())  # an expert kept in the scratch's bytes
    alone, *_ = _cache(scratch=5 * 1024, room=(0, 0))
    assert alone.store.scratch() is None and not alone.lendable
    assert alone.stats()["room"] == alone.stats()["room_scratch"] == 0


def test_a_lent_scratch_refuses_a_dequantization_and_serves_once_taken_back(fresh_scratch):
    """reserve_prompt_scratch puts the scratch in the pool's room, with the cache as its lender:
    qlinear.scratch hands out the room's bytes, refuses while the cache holds them, and hands them
    out again once taken back, and once a step that raised reset the cache."""
    cache, *_ = _cache(scratch=64 * 16 * 4)
    stream = SimpleNamespace(cache=cache)
    dev, dt = torch.device("cpu"), torch.float32
    reserve_prompt_scratch(stream, dev, dt, 64 * 16)
    buf = qlinear.scratch(dev, dt, 16)
    assert buf.data_ptr() == cache.store.scratch().data_ptr() and qlinear.scratch_cap(dev, dt) == 64 * 16
    cache.lend()
    with pytest.raises(RuntimeError, match="expert cache held the scratch"):
        qlinear.scratch(dev, dt, 16)
    cache.reclaim()
    assert qlinear.scratch(dev, dt, 16).data_ptr() == buf.data_ptr()
    cache.lend()
    cache.reset()  # (a step that raised: the room is not lent)
    assert qlinear.scratch(dev, dt, 16).data_ptr() == buf.data_ptr()


def test_without_a_room_the_scratch_is_its_own(fresh_scratch):
    dev, dt = torch.device("cpu"), torch.float32
    reserve_prompt_scratch(None, dev, dt, 100)
    reserve_prompt_scratch(None, dev, dt, 0)  # (none reserved where the plan counts none)
    assert qlinear.scratch(dev, dt, 100).numel() == 100 and qlinear.scratch_cap(dev, dt) == 100
    assert not qlinear._lenders


def test_steps_of_more_tokens_than_the_fused_kernels_take_take_the_room_back():
    """Lent at an expert step of no more tokens than the plan's fused_rows, taken back at one of more
    (the prompt path would dequantize into the scratch) and lent again after; a room without the
    scratch is lent at any expert step."""
    cache, lay, _, _ = _cache(scratch=4096)
    layouts = [lay, lay]
    es = ExpertStream(cache, layouts, set(), (64, 2), torch.float32, True, lambda k: np.zeros(1, np.uint8),
                      lambda *a: None, keep_dense=True, scratch_rows=4)
    es.dense = {0: {}, 1: {}}
    seen = []
    for tokens in (1, 4, 5, 2, 40):
        es.set_step(tokens)
        es.lend_room(None, True)
        seen.append(cache.lent)
    assert es.scratch_rows == 4 and seen == [True, True, False, True, False]
    plain, *_ = _cache(scratch=0)
    es = ExpertStream(plain, layouts, set(), (64, 2), torch.float32, True, lambda k: np.zeros(1, np.uint8),
                      lambda *a: None, keep_dense=True, scratch_rows=4)
    es.dense = {0: {}, 1: {}}
    es.set_step(5)
    es.lend_room(None, True)
    assert es.scratch_rows is None and plain.lent


def test_the_plans_fused_rows_is_the_fewest_rows_of_any_matrix_and_the_grouped_experts():
    """The bound the compute process lends the scratch by (the plan's, memory.Sizes.fused_rows): the
    Qwen3-30B-A3B shape (Q4_K and Q6_K, which take 16 rows and more) is bound by its experts' grouped
    kernel (8 tokens); a Q5_K matrix takes 4 rows on its fused kernel."""
    from layerstream.loader.layout import layer_layouts
    from plans import plan

    def fused_rows(mix):
        index = shaped_index("qwen3-30b-a3b", mix=mix, n_layer=2)
        return plan((index, layer_layouts(index)), 8).fused_rows

    assert fused_rows("Q4_K_M") == GROUPED_MAX_TOKENS == 8
    assert fused_rows("Q5_K_M") == 4
