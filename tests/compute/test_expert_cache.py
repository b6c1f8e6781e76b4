"""The device cache of streamed experts: what it copies, what it keeps, when a step streams experts."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from layerstream.compute.expert_layout import ALIGN, expert_parts, slot_bytes, streams_experts
from layerstream.compute.experts import ExpertCache, ExpertSet
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


@pytest.mark.parametrize("policy", ["lfu", "lru"])
def test_fetch_copies_the_right_bytes_and_keeps_the_most_recent(policy):
    lay, host = _layer()
    per = 3 * 8 * 16 * 4  # bytes of one expert (three 8 x 16 float32 matrices)
    cache = ExpertCache(2 * per, torch.device("cpu"), torch.float32, False, Timeline("compute", "t"), policy)
    got = cache.fetch(0, [1, 3], lay, host)
    assert set(got) == {1, 3}
    gate, up, down = got[3]
    assert gate.shape == (8, 16) and gate[2, 0].item() == 302 and up[0, 0].item() == 1300 and down[7, 0].item() == 2307
    assert (cache.hits, cache.misses, cache.bytes_moved) == (0, 2, 2 * per)
    cache.fetch(0, [1], lay, host)  # 1 is now the most recent and the most used, 3 the least of both
    cache.fetch(0, [2], lay, host)  # full: lru drops 3 for 2; lfu keeps 3 (used as often as 2)
    kept = 2 if policy == "lru" else 3
    assert set(k[1] for k in cache.kept.entries) == {1, kept}
    assert (cache.hits, cache.misses) == (1, 3)
    host[:] = 0  # a hit reads nothing from the staging bytes
    assert cache.fetch(0, [kept], lay, host)[kept][0][0, 0].item() == 100 * kept


def test_steps_stream_experts_while_they_touch_at_most_half():
    assert streams_experts(128, 8, 1) and streams_experts(128, 8, 8)
    assert not streams_experts(128, 8, 16) and not streams_experts(128, 8, 512)
    assert streams_experts(8, 2, 2) and not streams_experts(8, 2, 3)  # Mixtral: batches of 1 and 2
    assert not streams_experts(0, 0, 1)


def _cache(n_expert, slots, policy):
    lay, host = _layer(n_expert, rows=2, cols=4)
    per = 3 * 2 * 4 * 4
    return ExpertCache(slots * per, torch.device("cpu"), torch.float32, False, Timeline("compute", "t"), policy), lay, host


def test_lfu_keeps_what_lru_evicts_in_a_cycle_of_layers():
    """A decode pass visits layers in order; a cache smaller than one pass's experts gets no hit
    under LRU (each expert is evicted just before its next use) and its share under LFU."""
    rng = np.random.default_rng(0)
    rates = {}
    for policy in ("lru", "lfu"):
        cache, lay, host = _cache(16, 16, policy)  # 16 of 8 layers x 16 experts; a pass uses 8 x 4
        for step in range(300):
            for layer in range(8):
                cache.fetch(layer, sorted(rng.choice(16, 4, replace=False).tolist()), lay, host)
        rates[policy] = cache.hits / (cache.hits + cache.misses)
        assert cache.kept.used <= cache.kept.capacity and len(cache.kept.entries) <= 16
    assert rates["lru"] < 0.03
    assert 0.09 < rates["lfu"] < 0.16  # uniform routing: about the share of experts cached (1/8)


def test_lfu_keeps_the_experts_used_most():
    cache, lay, host = _cache(8, 2, "lfu")
    for _ in range(5):
        cache.fetch(0, [0, 1], lay, host)  # 0 and 1: used 5 times each
    for e in (2, 3, 4, 5, 6, 7, 2):
        cache.fetch(0, [e], lay, host)  # newcomers used once or twice: served, not kept
    assert set(cache.kept.entries) == {(0, 0), (0, 1)}
    cache.fetch(0, [2], lay, host)
    cache.fetch(0, [2, 3, 4], lay, host)
    cache.fetch(0, [2], lay, host)  # 2 is used five times now, as often as 0 and 1: still not kept
    assert set(cache.kept.entries) == {(0, 0), (0, 1)}
    cache.fetch(0, [2], lay, host)  # six: it replaces the less recent of 0 and 1
    assert set(cache.kept.entries) == {(0, 1), (0, 2)}
    with pytest.raises(ValueError, match="policy 'fifo'"):
        _cache(8, 2, "fifo")


class _HostDriver:
    """The CUDA driver's copies (h2d.DriverCopies.issue) done by the host, for a pool in host
    memory: the addresses and 2-D copies the cache works out are checked on the CPU."""

    def __init__(self):
        self.calls = 0  # copies from the host
        self.moves = 0  # copies on the device (an expert admitted to the cache from where it landed)

    def issue(self, copies, stream):
        import ctypes
        for dst, src, n, h, dp, sp in copies:
            assert n <= min(dp, sp) or h == 1
            for r in range(h):
                ctypes.memmove(dst + r * dp, src + r * sp, n)
            self.calls += 1

    def d2d(self, dst, src, n, stream):
        import ctypes
        ctypes.memmove(dst, src, n)
        self.moves += 1


def test_an_experts_alike_parts_go_as_one_2d_copy():
    """NOTE [ driver copies ]: parts of the same bytes, evenly spaced in staging and in the pool
    slot, are one copy of several rows; a part of other bytes (a Q6_K down beside Q4_K gate and
    up) is a copy of its own."""
    lay, _ = _layer(n_expert=4, rows=8, cols=16)
    cache = ExpertCache(0, torch.device("cpu"), torch.float32, True, Timeline("compute", "t"), "lfu", 4096)
    per = 8 * 16 * 4
    assert cache.store.groups(lay, expert_parts(lay)) == [(0, per, 0, 3, per, 4 * per)]  # gate, up and down alike
    t = list(lay.tensors)
    t[2] = SlotTensor(t[2].name, t[2].qtype, (4, 8, 8), t[2].slot_offset, 4 * 8 * 8 * 4, "f", 0)  # down: half the bytes
    odd = LayerLayout(1, tuple(t), t[2].slot_offset + t[2].nbytes)
    offs = [p[2] for p in expert_parts(odd)]
    assert cache.store.groups(odd, expert_parts(odd)) == [(0, per, 0, 2, offs[1], 4 * per), (t[2].slot_offset, 8 * 8 * 4, offs[2], 1, 0, 0)]


@pytest.mark.parametrize("driver", [False, True], ids=["torch-copies", "driver-copies"])
@pytest.mark.parametrize("policy", ["lfu", "lru"])
def test_the_pool_serves_the_right_bytes_and_never_evicts_what_a_fetch_serves(policy, driver):
    """Block experts land in slots of one buffer (NOTE [ the expert pool ]): the cache's two
    slots, then in-flight slots for newcomers it does not keep. Every fetch of three experts
    evicts and reuses slots; each expert it returns, and each one still cached, must hold its own
    bytes, and the grouped kernel's offsets from the pool must point at them."""
    from layerstream.compute.qlinear import QuantWeight

    lay, host = _layer(n_expert=8, rows=8, cols=16)
    slot = slot_bytes([lay])
    assert slot % ALIGN == 0 and slot >= 3 * 8 * 16 * 4
    cache = ExpertCache(2 * slot, torch.device("cpu"), torch.float32, True, Timeline("compute", "t"), policy,
                        slot, in_flight=4)  # (three newcomers, and the slot of zeros)
    assert cache.pool.numel() == 6 * slot
    if driver:
        cache.store.driver = _HostDriver()

    def check(e, mats):
        for k, m in enumerate(mats):
            v = m.raw.view(torch.float32).view(m.shape)
            assert v[3, 5].item() == pytest.approx(1000 * k + 100 * e + 3 + 0.05), (e, k)

    rng = np.random.default_rng(1)
    for _ in range(60):
        ids = sorted(rng.choice(8, 3, replace=False).tolist())
        got = cache.fetch(0, ids, lay, host)
        for e in ids:
            check(e, got[e])
        for (_, e), entry in cache.kept.entries.items():  # a cached expert's own slot holds its bytes
            check(e, [QuantWeight(cache.pool[entry[4] * slot + off : entry[4] * slot + off + per], t.qtype, (r, c))
                      for t, per, off, r, c in expert_parts(lay)])
        assert len(cache.kept.entries) <= 2 and len(set(entry[4] for entry in cache.kept.entries.values())) == len(cache.kept.entries)
    assert cache.hits > 0 and cache.misses > 60
    if driver:
        assert cache.store.driver.calls == cache.misses  # one 2-D copy an expert: its three parts are alike
    pool, offs, parts, cpu = ExpertSet(cache, 0, lay, host).grouped_offsets([5, 2, 5])
    assert offs.shape == (3, 3) and parts == ((int(QT.F32), 8, 16),) * 3 and cpu == []
    for col, e in enumerate([5, 2, 5]):
        for k in range(3):
            v = pool[offs[k, col] : offs[k, col] + 8 * 16 * 4].view(torch.float32).view(8, 16)
            assert v[7, 1].item() == pytest.approx(1000 * k + 100 * e + 7 + 0.01)
    # the slot of zeros, never written, is what the CPU's pairs read (with weight 0): each part's
    # own offset in it (NOTE [ the expert pool ])
    z = cache.store.zero
    assert z == 2 + 3 and not cache.pool[z * slot : (z + 1) * slot].any()
    cache.fetch(0, [0, 1, 2], lay, host)  # three newcomers: the other in-flight slots hold them
    assert not cache.pool[z * slot : (z + 1) * slot].any()
    _, offs, _, _ = ExpertSet(cache, 0, lay, host).grouped_offsets([5, 2], cpu=[2])
    assert offs[:, 1].tolist() == [z * slot + p[2] for p in expert_parts(lay)]


def test_the_room_lent_holds_experts_until_taken_back_and_its_layer_slots_lie_past_every_expert_slot():
    """NOTE [ the layer slots lent to the expert cache ]: the ring's layer slots are views of the
    pool's end, past the cache, in-flight and prefetch slots, each at a page boundary; lent, the
    room's whole expert slots are cache slots too, each kept expert holding its own bytes; taken
    back, only the experts in the room are dropped (their uses still counted) and the cache is its
    own size again."""
    from layerstream.compute.expert_pool import ROOM_ALIGN

    lay, host = _layer(n_expert=8, rows=8, cols=16)
    slot = slot_bytes([lay])
    cache = ExpertCache(slot, torch.device("cpu"), torch.float32, True, Timeline("compute", "t"), "lfu", slot,
                        in_flight=3, prefetch=1, room=(2, 3 * slot + 5))
    store = cache.store
    ring = store.room(3 * slot + 5)
    starts = [v.data_ptr() - store.ptr for v in ring]
    assert len(ring) == 2 and all(v.numel() == 3 * slot + 5 for v in ring)
    assert starts[0] >= (1 + 3 + 2) * slot and all(a % ROOM_ALIGN == 0 for a in starts)
    assert starts[1] - starts[0] >= 3 * slot + 5 and starts[1] + 3 * slot + 5 <= store.buf.numel()
    room = store.room_slots
    assert len(room) >= 6 and room[0] * slot >= starts[0] and (room[-1] + 1) * slot <= store.buf.numel()
    assert cache.lendable and not cache.lent

    def holds(e, s):  # pool slot s holds expert e's bytes
        for k, (t, per, off, r, c) in enumerate(expert_parts(lay)):
            v = cache.pool[s * slot + off : s * slot + off + per].view(torch.float32).view(r, c)
            assert v[3, 5].item() == pytest.approx(1000 * k + 100 * e + 3 + 0.05), (e, k)

    cache.fetch(0, [0, 1], lay, host)
    cache.settle()
    assert len(cache.kept.entries) == 1  # its own one slot
    cache.lend()
    for ids in ([2, 3], [4, 5], [6, 7], [0, 2]):
        cache.fetch(0, ids, lay, host)
        cache.settle()
    in_room = {k: v[4] for k, v in cache.kept.entries.items() if v[4] in room}
    assert len(cache.kept.entries) >= 7 and len(in_room) >= 6 and cache.hits > 0
    for (_, e), v in cache.kept.entries.items():
        holds(e, v[4])
    own = {k: v for k, v in cache.kept.entries.items() if v[4] not in room}
    cache.reclaim()
    assert not cache.lent and cache.reclaimed == len(in_room)
    assert dict(cache.kept.entries) == own and cache.kept.slots == 1 and cache.kept.capacity == slot
    assert not set(cache.kept.free) & set(room) and cache.kept.uses[(0, 2)] == 2
    cache.fetch(0, [5, 6], lay, host)  # taken back, the cache admits into its own slot alone
    cache.settle()
    assert all(v[4] not in room for v in cache.kept.entries.values()) and len(cache.kept.entries) == 1
    cache.lend()
    assert cache.lends == 2 and cache.kept.slots == 1 + len(room)


def test_a_fetch_leaves_the_caches_bookkeeping_to_settle():
    """NOTE [ misses first, bookkeeping after ]: a fetch for the grouped kernel copies its misses
    into in-flight slots and serves a copy ahead from its set, and changes nothing the cache keeps;
    settle then counts the uses and admits as a fetch that kept its books at once would have, the
    admitted experts' cache slots holding their bytes."""
    lay, host = _layer(n_expert=8, rows=8, cols=16)
    slot = slot_bytes([lay])
    parts = expert_parts(lay)

    def cache():
        c = ExpertCache(2 * slot, torch.device("cpu"), torch.float32, True, Timeline("compute", "t"), "lfu",
                        slot, in_flight=4, prefetch=2)
        c.prefetch(0, [5], lay, host)
        return c

    def holds(c, s, e):
        return all(c.pool[s * slot + off : s * slot + off + per].view(torch.float32)[0].item() == pytest.approx(
            1000 * k + 100 * e) for k, (t, per, off, _, _) in enumerate(parts))

    late, now = cache(), cache()
    got = late.fetch_slots(0, [1, 5, 2], lay, host)
    flight = range(late.store.cached, late.store.cached + late.store.in_flight - 1)
    assert got[1] in flight and got[2] in flight and got[5] >= late.store.prefetch_base(0)
    assert all(holds(late, got[e], e) for e in (1, 5, 2))
    assert not late.kept.entries and not late.kept.uses  # nothing kept nor counted yet
    now.fetch(0, [1, 5, 2], lay, host)  # (keeps its books at once)
    late.settle()
    assert late.kept.uses == now.kept.uses and list(late.kept.entries) == list(now.kept.entries)
    assert len(late.kept.entries) == 2
    for (_, e), entry in late.kept.entries.items():
        assert entry[4] < late.store.cached and holds(late, entry[4], e)
    late.settle()  # (once only)
    assert late.kept.uses == now.kept.uses


@pytest.mark.parametrize("driver", [False, True], ids=["torch-copies", "driver-copies"])
def test_experts_copied_ahead_serve_their_layer_and_are_kept_as_copies_would_be(driver):
    """NOTE [ expert prefetch ]: experts predicted for layer i are copied into layer i's set of
    slots past the in-flight ones; its fetch serves those it chose from there (or from the cache
    slot it admits them to, by a copy on the device), copies only the others, and each returned
    slot holds its expert's bytes. The next layer's set is another: layer i+1's prefetch, issued
    before layer i's fetch, leaves layer i's experts in place."""
    from layerstream.compute.qlinear import QuantWeight

    lay, host = _layer(n_expert=8, rows=8, cols=16)
    lay1 = LayerLayout(1, lay.tensors, lay.nbytes)
    host1 = host.view(np.float32).copy()
    host1 += 10000  # layer 1's experts: other values
    host1 = host1.view(np.uint8)
    slot = slot_bytes([lay])
    cache = ExpertCache(2 * slot, torch.device("cpu"), torch.float32, True, Timeline("compute", "t"), "lfu",
                        slot, in_flight=4, prefetch=2)
    assert cache.pool.numel() == (2 + 4 + 2 * 2) * slot
    if driver:
        cache.store.driver = _HostDriver()

    def value(e, mats):
        return [m.raw.view(torch.float32).view(m.shape)[3, 5].item() for m in mats]

    def want(e, base=0):
        return [pytest.approx(base + 1000 * k + 100 * e + 3 + 0.05) for k in range(3)]

    assert cache.prefetch(0, [4, 6, 7], lay, host) == 2  # two slots a set: the first two
    assert cache.on_device(0, 4) and cache.on_device(0, 6) and not cache.on_device(0, 7)
    assert cache.prefetch(1, [4, 5], lay1, host1) == 2  # the next layer's, in the other set
    got = cache.fetch(0, [4, 7], lay, host)  # 4 copied ahead, 7 not; 6 copied ahead for nothing
    assert value(4, got[4]) == want(4) and value(7, got[7]) == want(7)
    assert (cache.hits, cache.ahead.hits, cache.misses, cache.ahead.copied) == (0, 1, 1, 4)
    per = sum(p[1] for p in expert_parts(lay))
    assert cache.bytes_moved == 5 * per  # 4 ahead + 1 after the router
    assert (0, 4) in cache.kept.entries  # admitted as a copy would be: its cache slot holds its bytes
    s4 = cache.kept.entries[(0, 4)][4]
    assert s4 < cache.store.cached
    mats = [QuantWeight(cache.pool[s4 * slot + off : s4 * slot + off + n], t.qtype, (r, c))
            for t, n, off, r, c in expert_parts(lay)]
    assert value(4, mats) == want(4)
    cache.done(0)
    got = cache.fetch(1, [5, 4], lay1, host1)  # both copied ahead, layer 0's set did not touch them
    assert value(5, got[5]) == want(5, 10000) and value(4, got[4]) == want(4, 10000)
    assert cache.ahead.hits == 3 and cache.misses == 1 and not cache.ahead.layers
    # the grouped kernel's offsets point at a prefetched expert's bytes as at a fetched one's
    cache.prefetch(0, [2], lay, host)
    pool, offs, _, _ = ExpertSet(cache, 0, lay, host).grouped_offsets([2, 7])
    for col, e in enumerate([2, 7]):
        for k in range(3):
            v = pool[offs[k, col] : offs[k, col] + 8 * 16 * 4].view(torch.float32).view(8, 16)
            assert v[3, 5].item() == pytest.approx(1000 * k + 100 * e + 3 + 0.05)
    cache.prefetch(1, [1], lay1, host1)
    cache.drop_prefetched()  # a step that ended early: nothing left to serve
    assert not cache.ahead.layers and not cache.on_device(1, 1)


def test_copies_ahead_follow_what_lands_in_time():
    """NOTE [ copies ahead that land in time ]: a layer copies ahead at most `limit` experts; a
    layer whose copies were late and that waited for a copy it did not need first lowers it by
    one (never below one), a late layer that needed them all leaves it, a layer whose copies had landed raises it back
    towards the set's slots; the mean limit is kept for the run's stats."""
    from layerstream.compute.expert_pool import PrefetchSets

    s = PrefetchSets(4)
    assert s.take(8) == 4 and s.take(2) == 2
    s.landed(False, True)
    assert s.take(8) == 3 and s.late == 1
    s.landed(False, False)  # late, but it waited for nothing it did not need
    assert s.take(8) == 3 and s.late == 1
    for _ in range(5):
        s.landed(False, True)
    assert s.limit == 1 and s.take(8) == 1
    s.landed(True, True)
    s.landed(True, False)
    assert s.take(8) == 3
    for _ in range(5):
        s.landed(True, False)
    assert s.limit == 4
    assert s.take(0) == 0 and s.issued == 6 and s.limits == 4 + 4 + 3 + 3 + 1 + 3
    # a step of several tokens copies up to the slots, and its late layers leave the limit alone
    s.landed(False, True)
    s.single = False
    assert s.take(8) == 4 and s.issued == 6
    s.landed(False, True)
    assert s.limit == 3 and s.late == 7
    s.single = True
    assert s.take(8) == 3


def test_a_lowered_limit_copies_the_best_ranked_experts_ahead():
    """The copies ahead take the predicted experts in the order given (best first: ExpertSet.prefetch),
    so a lowered limit drops the least likely, and the set's slots still bound them."""
    lay, host = _layer(n_expert=8, rows=8, cols=16)
    slot = slot_bytes([lay])
    cache = ExpertCache(2 * slot, torch.device("cpu"), torch.float32, True, Timeline("compute", "t"), "lfu",
                        slot, in_flight=4, prefetch=3)
    cache.ahead.limit = 1
    assert cache.prefetch(0, [6, 4, 2], lay, host) == 1
    assert cache.on_device(0, 6) and not cache.on_device(0, 4)
    cache.ahead.layers.clear()
    cache.ahead.limit = 3
    assert cache.prefetch(0, [6, 4, 2, 1], lay, host) == 3 and not cache.on_device(0, 1)


def test_only_one_token_steps_follow_the_limit():
    """ExpertStream.set_step: a step of one token follows the copies ahead's limit, a step of
    several copies up to the set's slots (NOTE [ copies ahead that land in time ])."""
    from layerstream.compute.expert_stream import ExpertStream

    lay, host = _layer(n_expert=8, rows=8, cols=16)
    slot = slot_bytes([lay])
    cache = ExpertCache(2 * slot, torch.device("cpu"), torch.float32, True, Timeline("compute", "t"), "lfu",
                        slot, in_flight=4, prefetch=3)
    stream = ExpertStream(cache, [lay], set(), (8, 2), torch.float32, True, lambda s: host, lambda *a: None)
    cache.ahead.limit = 1
    stream.set_step(2)
    assert cache.prefetch(0, [6, 4, 2], lay, host) == 3
    cache.ahead.layers.clear()
    stream.set_step(1)
    assert cache.prefetch(0, [6, 4, 2], lay, host) == 1


def _copies_ahead_held_back():
    """On CUDA: a layer of 8 experts in pinned memory, a cache of 2 slots and 3 slots ahead, and
    experts 6 and 4 of layer 0 copied ahead on a side stream that sleeps first (about a fifth of a
    second): (layout, host bytes, slot bytes, cache, side stream)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    dev = torch.device("cuda")
    lay, host = _layer(n_expert=8, rows=8, cols=16)
    host = torch.from_numpy(host).pin_memory().numpy()
    slot = slot_bytes([lay])
    cache = ExpertCache(2 * slot, dev, torch.float32, True, Timeline("compute", "t"), "lfu", slot, in_flight=4,
                        prefetch=3)
    side = torch.cuda.Stream(dev)
    with torch.cuda.stream(side):
        torch.cuda._sleep(400_000_000)  # cycles: a fifth of a second at the H200's clock
    cache.prefetch(0, [6, 4], lay, host, stream=side)
    return lay, host, slot, cache, side


@pytest.mark.gpu
def test_copies_ahead_still_running_at_the_fetch_lower_the_limit():
    """NOTE [ copies ahead that land in time ], on CUDA: copies ahead held back on their stream
    (the stream sleeps first) have not landed when the layer's fetch comes with a miss: the limit
    drops by one; copies that landed raise it again."""
    lay, host, slot, cache, side = _copies_ahead_held_back()
    cache.fetch(0, [6, 1], lay, host)  # 1 missed: copied after the late copies ahead
    assert cache.ahead.limit == 2 and cache.ahead.late == 1
    torch.cuda.synchronize()
    cache.done(0)
    cache.prefetch(1, [6], LayerLayout(1, lay.tensors, lay.nbytes), host, stream=side)
    side.synchronize()
    cache.fetch(1, [6, 2], LayerLayout(1, lay.tensors, lay.nbytes), host)
    assert cache.ahead.limit == 3 and cache.ahead.late == 1
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("chosen, cut", [([6], True), ([6, 4], False)], ids=["one-copied-for-nothing", "all-used"])
def test_late_copies_ahead_for_nothing_lower_the_limit(chosen, cut):
    """NOTE [ copies ahead that land in time ], on CUDA: a layer whose copies ahead are late and
    that missed nothing lowers the limit where one of them was for an expert it did not choose
    (its experts waited for that copy all the same), and leaves it where it chose them all."""
    lay, host, slot, cache, side = _copies_ahead_held_back()
    cache.fetch(0, chosen, lay, host)  # 6 and 4 copied ahead, still held back
    assert cache.misses == 0 and cache.ahead.late == int(cut) and cache.ahead.limit == 3 - int(cut)
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_a_miss_lands_while_the_copies_ahead_still_run():
    """NOTE [ misses before copies ahead ], on CUDA: with the copies ahead held back on their stream
    (the stream sleeps first), a fetch's missed expert is on the device before them, with its bytes
    (it queued behind them before); the experts' stream still waits for the copies ahead."""
    lay, host, slot, cache, side = _copies_ahead_held_back()
    got = cache.fetch_slots(0, [6, 1], lay, host)  # 1 missed
    cache.misses_issued.synchronize()
    assert not side.query()  # the copies ahead have not landed
    other = torch.cuda.Stream()  # (the compute stream waits for them)
    with torch.cuda.stream(other):
        bytes_1 = cache.pool[got[1] * slot : (got[1] + 1) * slot].cpu().numpy()
    for t, per, off, _, _ in expert_parts(lay):  # expert 1's gate, up and down
        assert np.array_equal(bytes_1[off : off + per], host[t.slot_offset + per : t.slot_offset + 2 * per])
    assert not torch.cuda.current_stream().query()  # the layer's experts wait for the copies ahead
    torch.cuda.synchronize()


def _expert_layer(rng, E, n_ff, n_embd, types):
    """A layer of E experts of random blocks of `types` (gate, up, down): its layout, its bytes,
    and float64 [E, rows, cols] of each tensor through gguf-py's dequantizer."""
    from gguf.quants import dequantize

    import ggufgen

    tensors, host, off, ref = [], [], 0, {}
    for (name, (rows, cols)), qt in zip((("ffn_gate_exps.weight", (n_ff, n_embd)),
                                         ("ffn_up_exps.weight", (n_ff, n_embd)),
                                         ("ffn_down_exps.weight", (n_embd, n_ff))), types):
        arr, qt = ggufgen._matrix(rng, (E * rows, cols), qt, 0.05)
        raw = np.ascontiguousarray(arr).view(np.uint8).reshape(-1)
        tensors.append(SlotTensor(name, int(qt), (E, rows, cols), off, raw.nbytes, "f", 0))
        host.append(raw)
        ref[name] = dequantize(raw, qt).astype(np.float64).reshape(E, rows, cols)
        off += raw.nbytes
    return LayerLayout(0, tuple(tensors), off), np.concatenate(host), ref


def _swiglu_ref(ref, ids, k, h, weight, experts):
    """float64 sum over the (token, choice) pairs whose expert is one of `experts`, weighted."""
    want = np.zeros((h.shape[0], h.shape[1]))
    for p, e in enumerate(ids):
        if e in experts:
            x = h[p // k].double().numpy()
            g, u = ref["ffn_gate_exps.weight"][e] @ x, ref["ffn_up_exps.weight"][e] @ x
            want[p // k] += weight.flatten()[p].item() * (ref["ffn_down_exps.weight"][e] @ (g / (1 + np.exp(-g)) * u))
    return want


# NOTE [ CPU experts ]: without the native kernel, 4-bit matrices packed for aten's int4 matmul
# (exact but for the scales' rounding to the CPU's dtype), other block types dequantized once (exact
# but for each value's rounding): float32 is within float32's own rounding. The native kernel
# (cpu/native.py) rounds each activation to int16 steps of 1/(127 * 256) of its block's largest
# value, which over three chained matmuls of random-sign sums stays within
# 2e-4 of the largest output (measured: 5.6e-5). bf16 rounds each weight, the activations and the
# SwiGLU's intermediate to 8 bits of mantissa (2**-9 relative each): within 2% (measured: 0.6%).
@pytest.mark.parametrize("kernel", ["native", "aten"])
@pytest.mark.parametrize("types,dtype,tol", [
    ((QT.Q4_K, QT.Q4_K, QT.Q4_K), torch.float32, 1e-5),
    ((QT.Q4_K, QT.Q4_K, QT.Q6_K), torch.float32, 1e-5),  # a Q4_K_M file's experts
    ((QT.Q5_K, QT.Q8_0, QT.Q6_K), torch.float32, 1e-5),
    ((QT.Q4_K, QT.Q4_K, QT.Q6_K), torch.bfloat16, 2e-2),  # beside a GPU
])
@pytest.mark.parametrize("T", [1, 8])
def test_cpu_experts_match_the_float64_reference(types, dtype, tol, kernel, T, monkeypatch):
    """The CPU's share of a step's experts from their staging bytes against float64 SwiGLU over
    gguf-py's dequantization; only the chosen pairs of the CPU's experts count, weighted. With the
    native kernel the blocks are read in place (nothing packed: the next slot's bytes are what it
    computes); without it each expert is packed once."""
    from layerstream.compute.cpu import native
    from layerstream.compute.cpu.balancer import Balancer
    from layerstream.compute.cpu.experts import CpuExperts

    if kernel == "aten":
        monkeypatch.setattr(native, "library", lambda: None)
    elif not native.available():
        pytest.skip("no C compiler: the native CPU kernel cannot be built here")
    else:
        tol = max(tol, 2e-4)  # x rounded to int16 steps (NOTE above)

    rng = np.random.default_rng(3)
    E, n_ff, n_embd, k = 4, 256, 256, 2
    lay, host, ref = _expert_layer(rng, E, n_ff, n_embd, types)
    cpu = CpuExperts(Balancer({}, 0.0, 1.0, 1.0, 1.0, fixed=1.0), 1 << 30, dtype, Timeline("compute", "t"))
    assert cpu.eligible(0, lay) and cpu.in_place(0, lay) == (kernel == "native")
    assert cpu.choose(0, lay, [0, 1, 2, 3], 0.5) == [0, 1] and cpu.choose(0, lay, [2], 0.5) == []
    ids = [1, 3, 3, 0, 2, 1] if T == 1 else [1, 3, 3, 0, 2, 1, 0, 2, 3, 1, 1, 2, 0, 3, 2, 0]  # [T, k] (T = 1: the first pair)
    ids = ids[: T * k]
    h = torch.from_numpy(rng.standard_normal((T, n_embd))).float()
    weight = torch.from_numpy(rng.random((T, k))).float()
    got = cpu.compute(0, lay, host, [1, 3], ids, h, weight)
    want = _swiglu_ref(ref, ids, k, h, weight, (1, 3))
    assert np.abs(got.double().numpy() - want).max() < tol * np.abs(want).max()
    per = sum(t.nbytes for t in lay.tensors) // E
    assert cpu.computed == 2 and cpu.meter.take()[1] == 2 * (per if kernel == "native" else cpu.packed_bytes // 2)
    if kernel == "native":  # each expert's blocks read once, for all its tokens, where they lie
        assert not cpu.packed and cpu.packed_bytes == 0 and cpu.take_pack_s() == 0
        lay2, host2, ref2 = _expert_layer(rng, E, n_ff, n_embd, types)  # another step's slot
        got2 = cpu.compute(0, lay2, host2, [1, 3], ids, h, weight)
        want2 = _swiglu_ref(ref2, ids, k, h, weight, (1, 3))
        assert np.abs(got2.double().numpy() - want2).max() < tol * np.abs(want2).max()
        return
    assert len(cpu.packed) == 2 and cpu.packed_bytes > 0
    assert cpu.take_pack_s() > 0 and cpu.take_pack_s() == 0  # packing is timed apart (the balancer leaves it out)
    cpu.compute(0, lay, host, [1, 3], ids, h, weight)  # packed already: nothing to pack
    assert cpu.take_pack_s() == 0 and cpu.meter.take()[1] == cpu.packed_bytes


def test_no_cpu_form_keeps_a_layer_on_the_device():
    """A layer with an expert tensor the CPU has no form for (IQ4_XS) stays wholly on the device."""
    from layerstream.compute.cpu.balancer import Balancer
    from layerstream.compute.cpu.experts import CpuExperts

    t = SlotTensor("ffn_down_exps.weight", int(QT.IQ4_XS), (4, 256, 256), 0, 4 * 256 * 136, "f", 0)
    g = SlotTensor("ffn_gate_exps.weight", int(QT.Q4_K), (4, 256, 256), 0, 4 * 256 * 144, "f", 0)
    u = SlotTensor("ffn_up_exps.weight", int(QT.Q4_K), (4, 256, 256), 0, 4 * 256 * 144, "f", 0)
    lay = LayerLayout(0, (g, u, t), 0)
    cpu = CpuExperts(Balancer({}, 0.0, 1.0, 1.0, 1.0, fixed=1.0), 1 << 30, torch.float32, Timeline("compute", "t"))
    assert not cpu.eligible(0, lay) and cpu.choose(0, lay, [0, 1, 2, 3], 1.0) == []
