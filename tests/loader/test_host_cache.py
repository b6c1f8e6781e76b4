"""HostCache: LRU order, eviction, pinning, the static policy and counters."""

import pytest

from layerstream.errors import ConfigError
from layerstream.loader.host_cache import HostCache

MiB = 2**20


def test_capacity_in_layers():
    assert HostCache(10 * MiB, 4 * MiB).capacity_layers == 2
    assert HostCache(0, 4 * MiB).capacity_layers == 0
    with pytest.raises(ConfigError, match="policy"):
        HostCache(MiB, MiB, policy="fifo")


def test_lru_order_and_eviction():
    c = HostCache(3 * MiB, MiB)
    assert c.insert(0, 10) is None and c.insert(1, 11) is None and c.insert(2, 12) is None
    assert c.lookup(0) == 10  # 0 becomes most recent: order 1, 2, 0
    assert c.layers() == [1, 2, 0]
    assert c.insert(3, 13) == (1, 11)  # evicts least recent, hands its slot back
    assert c.lookup(1) is None and 1 not in c
    assert c.insert(4, 11) == (2, 12)  # the freed slot is reusable
    assert c.layers() == [0, 3, 4]
    assert (c.hits, c.misses, c.evictions) == (1, 1, 2)
    assert c.stats()["layers"] == 3


def test_pinned_layers_are_never_evicted():
    c = HostCache(2 * MiB, MiB)
    c.insert(0, 0, pin=True)
    c.insert(1, 1)
    assert c.insert(2, 2) == (1, 1)  # 0 is older but pinned
    c.pin(2)
    c.pin(2)  # pins nest
    assert c.insert(3, 3) == (3, 3)  # everything pinned: the new layer is not cached
    assert 3 not in c and c.layers() == [0, 2]
    c.unpin(2)
    assert c.pinned(2)
    c.unpin(2)
    assert not c.pinned(2)
    assert c.insert(3, 3) == (2, 2)
    with pytest.raises(ValueError, match="pinned"):
        c.remove(0)
    c.unpin(0)
    assert c.remove(0) == 0 and c.remove(0) is None
    with pytest.raises(ValueError, match="not pinned"):
        c.unpin(3)
    with pytest.raises(KeyError):
        c.pin(7)


def test_zero_capacity_and_misuse():
    c = HostCache(0, MiB)
    assert c.insert(5, 1) == (5, 1) and len(c) == 0
    c = HostCache(2 * MiB, MiB)
    c.insert(0, 4)
    assert c.insert(0, 4) is None  # re-insert is a touch
    with pytest.raises(ValueError, match="already cached"):
        c.insert(0, 5)
    with pytest.raises(ValueError, match="slot 4"):
        c.insert(1, 4)


def test_cyclic_scan_lru_thrashes_static_keeps_a_set():
    """Decode walks layers 0..L-1 every token: LRU never hits on a cycle longer than the cache."""
    for policy, want_hits in (("lru", 0), ("static", 3 * 4)):
        c = HostCache(3 * MiB, MiB, policy=policy)
        free = list(range(100))
        for _ in range(5):  # forward passes
            for layer in range(6):
                if c.lookup(layer) is None:
                    given_up = c.insert(layer, free.pop())
                    if given_up:
                        free.append(given_up[1])
        assert c.hits == want_hits, policy
