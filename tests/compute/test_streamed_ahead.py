"""Copies across a step's end (NOTE [ copies across the step's end ] in compute/streamed.py): the
CUDA bookkeeping of StreamedLayers driven on the CPU with plain values (no device, no streams)."""

from types import SimpleNamespace

from layerstream.compute.streamed import StreamedLayers
from layerstream.compute.vram_ring import VramRing
from layerstream.proto.timeline import Timeline


def _source(step: int = 4, n_layer: int = 5, resident=(0, 1), slots: int = 2):
    """Layers `resident` loaded, the others streamed through `slots` VRAM slots; each copy started
    is logged as (layer, vram slot, staging slot) and its entry is (vram slot, staging slot, ...)."""
    ring = object.__new__(VramRing)
    ring.vram, ring.freed, ring.free_vram = [None] * slots, [None] * slots, list(range(slots))
    ring.copies, ring.ahead, ring.ahead_step = {}, {}, -1
    ring.in_use, ring.layer_start, ring.gpu_events = {}, {}, []
    src = object.__new__(StreamedLayers)
    src.cuda, src.ring, src.ready, src.share, src.experts, src.step_no = True, ring, {}, None, None, step
    src.layouts = [SimpleNamespace(layer=i, nbytes=100 + i) for i in range(n_layer)]
    src.resident_ids = set(resident)
    src.resident = {i: f"w{i}" for i in resident}
    src.tl = Timeline("compute", "test")
    src.pump = lambda block: None
    src.started = []

    def start(j, slot, ranges):
        k = ring.free_vram.pop(0)
        src.started.append((j, k, slot))
        return k, slot, "c0", "c1", sum(n for _, n in ranges)

    src._start_copy = start
    return src


def _release(src, i: int) -> None:
    """What release(i) does to the ring once layer i's kernels are queued: its slot is free after them."""
    k = src.ring.in_use.pop(i)
    src.ring.free_slot(k, f"end{i}")
    src._issue_copies(i + 1)


def _take(src, i: int) -> None:
    """What _layer_cuda(i) does with its copy: the VRAM slot is read until the layer's release."""
    k, *_ = src.ring.copies.pop(i)
    src.ring.in_use[i] = k


def test_the_next_step_s_first_layers_are_copied_once_this_step_s_last_are():
    src = _source()
    src.ready = {(4, 2): 12, (4, 3): 13, (4, 4): 14, (5, 2): 22, (5, 3): 23, (5, 4): 24}
    src._issue_copies(0)
    assert src.started == [(2, 0, 12), (3, 1, 13)] and not src.ring.ahead  # step 4's layer 4 waits for a slot
    _take(src, 2)
    _release(src, 2)  # its slot goes to step 4's layer 4, not to step 5
    assert src.started[-1] == (4, 0, 14) and not src.ring.ahead
    _take(src, 3)
    _release(src, 3)  # every layer of step 4 has its copy: the slot takes step 5's first streamed layer
    assert src.started[-1] == (2, 1, 22) and list(src.ring.ahead) == [2] and src.ring.ahead_step == 5
    assert 2 not in src.ring.copies and (5, 2) not in src.ready
    _take(src, 4)
    _release(src, 4)
    assert src.started[-1] == (3, 0, 23) and list(src.ring.ahead) == [2, 3]
    assert src.tl.count["copies_ahead"] == 2
    src.step_no = 5
    src._take_ahead(5)  # (set_step's part)
    assert sorted(src.ring.copies) == [2, 3] and not src.ring.ahead
    src._issue_copies(0)  # step 5's layer 4 waits for a slot, as in any step
    assert src.started[-1] == (3, 0, 23) and src.ready == {(5, 4): 24}


def test_nothing_crosses_before_the_next_step_is_announced():
    src = _source()
    src.ready = {(4, 2): 12, (4, 3): 13}
    src.resident_ids, src.resident = {0, 1, 4}, {0: "w0", 1: "w1", 4: "w4"}
    src._issue_copies(0)
    _take(src, 2)
    _release(src, 2)
    assert src.ring.free_vram == [0] and not src.ring.ahead
    src.ready[(5, 2)] = 22  # the announcement comes: the next release (or pump) issues it
    _take(src, 3)
    _release(src, 3)
    assert [s[0] for s in src.started] == [2, 3, 2] and src.ring.ahead_step == 5


def test_no_copy_crosses_with_a_cpu_share_experts_or_resident_layers_not_yet_loaded():
    for change in ("share", "experts", "loading"):
        src = _source()
        src.ready = {(4, 2): 12, (4, 3): 13, (4, 4): 14, (5, 2): 22}
        if change == "share":  # (a share the balancer set to 0 for this step copies across: the last test)
            src.share = SimpleNamespace(frac=0.3, rows=lambda i, lay, frac: {}, ranges=lambda j, lay, frac: [(0, 7)])
        elif change == "experts":
            src.experts = SimpleNamespace(of=lambda i: False, kept=lambda i: False)
        else:
            src.resident = {0: "w0"}  # layer 1 is still on its way through the ring
            src.ready[(4, 1)] = 11
        src._issue_copies(0)
        for i in sorted(src.ring.copies):
            _take(src, i)
        for i in sorted(src.ring.in_use):
            _release(src, i)
        assert not src.ring.ahead and (5, 2) in src.ready, change


def _one_copied_ahead():
    """A 4-layer step 4 whose last layer's copy is issued and whose first streamed one is done: its
    VRAM slot took step 5's layer 2."""
    src = _source()
    src.ready = {(4, 2): 12, (4, 3): 13, (5, 2): 22}
    src.layouts = src.layouts[:4]
    src._issue_copies(0)
    _take(src, 2)
    _release(src, 2)
    assert list(src.ring.ahead) == [2]
    return src


def test_a_failed_or_skipped_step_gets_the_copies_back_as_announced():
    src = _one_copied_ahead()
    src.abandon(4, reset_experts=False)  # step 4 failed: step 5's copy goes back under step 5
    assert src.ready == {(4, 3): 13, (5, 2): 22} and not src.ring.ahead
    assert sorted(src.ring.free_vram) == [0, 1]

    src = _one_copied_ahead()
    src._take_ahead(6)  # step 5 was answered unrun (NOTE [ a failed step ]): its copy is not step 6's
    assert src.ready[(5, 2)] == 22 and not src.ring.ahead and 2 not in src.ring.copies
    assert 0 in src.ring.free_vram


def test_a_step_whose_share_is_none_copies_across_whole_layers():
    src = _source()
    src.share = SimpleNamespace(frac=0.0)
    src.ready = {(4, 2): 12, (4, 3): 13, (4, 4): 14, (5, 2): 22}
    src._issue_copies(0)
    for i in (2, 3):
        _take(src, i)
        _release(src, i)
    assert list(src.ring.ahead) == [2] and src.ring.ahead[2][4] == 102  # every byte of layer 2


def test_a_step_takes_its_copies_over_and_starts_the_rest_only_after_its_first_launch():
    """NOTE [ a step's copies after its first launch ]: set_step leaves the step's copies due; the
    launch of its resident layers' graph (graph_ran) takes over those issued ahead and starts the
    next announced layer where a slot is free, once."""
    src = _source()
    src.ready = {(4, 2): 12, (4, 3): 13, (4, 4): 14, (5, 2): 22, (5, 3): 23, (5, 4): 24}
    src._issue_copies(0)
    for i in (2, 3, 4):
        _take(src, i)
        _release(src, i)
    assert list(src.ring.ahead) == [2, 3] and not src.ring.copies
    src.step_no, src.launched, src._copies_due = 5, False, True  # (what set_step(5) leaves)
    started = len(src.started)
    assert not src.ring.copies and src.ring.ahead_step == 5
    src.graph_ran(0, 2, None, None)
    assert src.launched and sorted(src.ring.copies) == [2, 3] and not src.ring.ahead
    assert src.ready == {(5, 4): 24} and len(src.started) == started  # (layer 4 waits for a slot)
    _take(src, 2)
    _release(src, 2)
    assert src.started[-1] == (4, 1, 24)
    src.graph_ran(2, 3, None, None)  # (a streamed MoE layer's graphs): nothing taken over again
    assert sorted(src.ring.copies) == [3, 4] and len(src.started) == started + 1
