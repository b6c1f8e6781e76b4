"""KVRing: slots and positions of each sequence's KV ring, in error and slide modes."""

from __future__ import annotations

import random

import pytest

from layerstream.coordinator.kv_ring import KVRing
from layerstream.errors import ConfigError, ContextFullError


def test_error_mode_fills_slots_in_order():
    r = KVRing(8, mode="error")
    assert r.max_chunk() == 8
    assert r.append(3) == ([0, 1, 2], [0, 1, 2])
    assert r.append(1) == ([3], [3])
    assert r.max_chunk() == 4
    assert list(r.slot_positions()) == [0, 1, 2, 3]
    assert r.append(4) == ([4, 5, 6, 7], [4, 5, 6, 7])
    assert r.max_chunk() == 0


def test_error_mode_raises_when_full_and_keeps_state():
    r = KVRing(8, mode="error")
    r.append(6)
    with pytest.raises(ContextFullError, match=r"context size \(8 tokens\).*raise --ctx.*--on-context-full slide"):
        r.append(3)
    assert (r.count, r.total) == (6, 6)  # a refused chunk reserves nothing
    assert r.append(2) == ([6, 7], [6, 7])
    with pytest.raises(ContextFullError):
        r.append(1)


def test_error_mode_ignores_sink():
    r = KVRing(8, sink=4, mode="error")
    assert r.sink == 0 and r.window == 8


def test_slide_wraps_around_keeping_sinks():
    r = KVRing(8, sink=2, mode="slide")  # window of 6 slots: 2..7
    assert r.max_chunk() == 6
    assert r.append(8) == (list(range(8)), list(range(8)))
    assert r.slot_positions() == range(8)
    # the oldest window token (slot 2) goes first; the new token takes the last position
    assert r.append(1) == ([2], [7])
    assert r.slot_positions() == [0, 1, 7, 2, 3, 4, 5, 6]
    assert r.append(3) == ([3, 4, 5], [5, 6, 7])
    assert r.slot_positions() == [0, 1, 4, 5, 6, 7, 2, 3]
    assert r.append(2) == ([6, 7], [6, 7])  # wrap-around of the ring index back to slot 2
    assert r.append(1) == ([2], [7])
    assert r.count == 8 and r.total == 15


def test_slide_chunk_that_fills_and_evicts():
    r = KVRing(8, sink=2, mode="slide")
    r.append(6)
    slots, pos = r.append(4)  # 2 free slots, then 2 evictions
    assert slots == [6, 7, 2, 3]
    assert pos == [4, 5, 6, 7]
    assert r.slot_positions() == [0, 1, 6, 7, 0 + 2, 1 + 2, 2 + 2, 3 + 2]


def test_slide_rejects_chunk_larger_than_window():
    r = KVRing(8, sink=2, mode="slide")
    r.append(8)
    with pytest.raises(ValueError, match="larger than the ring window 6"):
        r.append(7)


def test_slide_without_sinks():
    r = KVRing(4, sink=0, mode="slide")
    r.append(4)
    assert r.append(1) == ([0], [3])
    assert r.slot_positions() == [3, 0, 1, 2]


@pytest.mark.parametrize("cap,sink", [(8, 2), (16, 4), (5, 0), (7, 5)])
def test_slide_matches_a_list_model(cap, sink):
    """Random chunks against a plain list of the tokens kept: sinks first, then the newest."""
    rng = random.Random(cap * 100 + sink)
    r = KVRing(cap, sink=sink, mode="slide")
    slot_tok: dict[int, int] = {}  # physical slot -> global token index
    total = 0
    for _ in range(60):
        n = rng.randint(1, r.max_chunk())
        slots, pos = r.append(n)
        new = list(range(total, total + n))
        total += n
        for s, t in zip(slots, new):
            slot_tok[s] = t
        held = list(range(min(sink, total))) + list(range(max(sink, total - (cap - sink)), total))
        assert sorted(slot_tok.values()) == held, "the ring holds the sinks and the newest tokens"
        assert pos == [held.index(t) for t in new]
        assert list(r.slot_positions()) == [held.index(slot_tok[s]) for s in range(r.count)]
        assert all(0 <= p < cap for p in r.slot_positions())
        assert all(slot_tok[s] == s for s in range(min(sink, total))), "sink slots never move"
        assert len(set(slots)) == n


def test_constructor_errors():
    with pytest.raises(ConfigError, match="--on-context-full 'wrap'"):
        KVRing(8, mode="wrap")
    with pytest.raises(ConfigError, match="--sink-tokens 7 must be below --ctx 8"):
        KVRing(8, sink=7, mode="slide")
    with pytest.raises(ConfigError):
        KVRing(8, sink=-1, mode="slide")
    KVRing(8, sink=6, mode="slide")  # a window of 2 is the least


@pytest.mark.parametrize("mode", ["error", "slide"])
def test_rollback_gives_the_rejected_slots_and_positions_back(mode):
    r = KVRing(16, sink=2, mode=mode)
    r.append(5)
    assert r.room(4)
    assert r.append(4) == ([5, 6, 7, 8], [5, 6, 7, 8])  # a token and 3 drafts
    r.rollback(2)  # two drafts rejected: slots 7, 8 are written again by the next tokens
    assert (r.count, r.total) == (7, 7) and r.slot_positions() == range(7)
    assert r.append(2) == ([7, 8], [7, 8])
    r.rollback(0)
    assert r.count == 9


def test_a_ring_that_would_evict_has_no_room_and_refuses_a_rollback():
    r = KVRing(8, sink=2, mode="slide")
    r.append(6)
    assert r.room(2) and not r.room(3)
    r.append(3)  # evicts the oldest window token
    assert not r.room(1)
    with pytest.raises(ValueError, match="evicted 1"):
        r.rollback(1)
    assert (r.count, r.total) == (8, 9)  # (refused: nothing changed)
    with pytest.raises(ValueError):
        KVRing(8).rollback(1)  # more than it holds
