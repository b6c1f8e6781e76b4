"""What a failed step leaves in the layer source is forgotten (StreamedLayers.abandon; NOTE [ a
failed step ] in compute_proc.py): the CUDA bookkeeping, driven on the CPU with plain values."""

from types import SimpleNamespace

import torch

from layerstream.compute.experts import ExpertCache
from layerstream.compute.streamed import StreamedLayers
from layerstream.compute.vram_ring import VramRing
from layerstream.proto.timeline import Timeline


def _source(given_back: list):
    ring = object.__new__(VramRing)  # (its bookkeeping only: no device memory, no streams)
    ring.vram, ring.freed, ring.free_vram = [None] * 3, ["ev0", "ev1", None], [2]
    # layer 3 copied ahead into VRAM slot 0 from staging slot 7; layer 4's dense part kept (staging slot 8)
    ring.copies = {3: (0, 7, "c0", "c1", 10), 4: (None, 8, None, None, 0)}
    ring.in_use, ring.layer_start, ring.gpu_events = {2: 1}, {2: "d0"}, [("copy", 2, "c0", "c1", 10)]
    ring.ahead, ring.ahead_step = {}, -1  # (no copy across the step's end with experts)
    # a cache of 4 slots of 256 bytes and a room of two 1 KiB layer slots (NOTE [ the layer slots lent to the
    # expert cache ]), one expert kept
    cache = ExpertCache(4 * 256, torch.device("cpu"), torch.float32, True, Timeline("compute", "t"), "lfu", 256,
                        room=(2, 1024))
    cache.kept.put((2, 5), None, set(), 256)
    cache.ahead.layers[3], cache.ahead.reading[2] = ({1: 6}, None), 0
    returned = []
    experts = SimpleNamespace(held={2: 6}, sets={2: "set"}, cache=cache, return_slots=lambda wait: returned.append(wait))
    src = object.__new__(StreamedLayers)
    src.cuda, src.ring, src.ready, src.share, src.experts, src.step_no = True, ring, {}, None, experts, 4
    src.layer_done = lambda step, layer, slot: given_back.append((step, layer, slot))
    return src, returned


def test_a_failed_step_s_copies_go_back_to_ready_and_its_vram_slots_are_free():
    given_back = []
    src, returned = _source(given_back)
    src.abandon(5, reset_experts=True)
    r = src.ring
    assert src.step_no == 5 and src.ready == {(5, 3): 7, (5, 4): 8}  # still lent: the caller gives them back
    assert sorted(r.free_vram) == [0, 1, 2] and r.freed[:2] == [None, None]
    assert not (r.copies or r.in_use or r.layer_start or r.gpu_events)
    assert returned == [True] and given_back == [(5, 2, 6)] and src.experts.held == {}
    cache = src.experts.cache
    assert (2, 5) not in cache.kept and cache.kept.free == [0, 1, 2, 3] and cache.kept.capacity == 4 * 256
    assert not cache.ahead.layers and not cache.ahead.reading and src.experts.sets == {}


def test_a_step_failed_while_the_room_is_lent_leaves_the_cache_its_own_slots_and_the_ring_every_slot():
    """A step that raised while the room was lent: the cache starts empty with its own slots and
    bytes, the room no longer lent (rebuilt from the lent size, it counted the room as its own and
    freed the in-flight slots too, and the next reclaim dropped nothing); lent again, each slot
    appears once. A VRAM slot a raise lost before it was recorded is free again too."""
    src, _ = _source([])
    cache = src.experts.cache
    room = cache.store.room_slots
    assert len(room) == 2 * 4096 // 256 and room[0] >= 4  # (past the cache's own slots; each layer slot a page)
    cache.lend()
    cache.kept.put((2, 6), None, set(), 256)
    cache.pending = ("a fetch's bookkeeping",)
    src.ring.free_vram = []  # (slot 2 lost: popped, never recorded)
    src.abandon(7, reset_experts=True)
    assert sorted(src.ring.free_vram) == [0, 1, 2] and src.ring.freed == [None] * 3
    assert not cache.lent and cache.pending is None and not cache.kept.entries
    assert cache.kept.free == [0, 1, 2, 3] and cache.kept.slots == 4 and cache.kept.capacity == 4 * 256
    cache.reclaim()  # (nothing lent: nothing to take back)
    cache.lend()
    assert sorted(cache.kept.free) == [0, 1, 2, 3, *room] and cache.kept.slots == 4 + len(room)


def test_a_step_failed_unrun_keeps_the_expert_cache():
    src, _ = _source([])
    src.abandon(6, reset_experts=False)
    assert (2, 5) in src.experts.cache.kept and src.experts.sets == {2: "set"}
